//! `mgrun plot`: the PNGs decode with the expected sizes and are drawn (several colours, text in the
//! title), the SVGs hold the expected series names, `--compare` names every run, skipped plots are
//! reported, and bad input names the file and line. Synthetic run directories cover every record
//! kind (sensitivity dumps, SWAD, metrics.jsonl); a tiny DSP-Reg run checks the trainer's own records.

use mgrun_tests::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The figure sizes `mgrun plot` draws (launcher/src/plot).
const LOSS_SIZE: (u32, u32) = (1200, 650);
const COMPARE_SIZE: (u32, u32) = (1200, 650);
const ACCURACY_SIZE: (u32, u32) = (1600, 650);
const STEP_TIME_SIZE: (u32, u32) = (1600, 650);
const HEAT_MAP_WIDTH: u32 = 1300;

/// The heat map's height for `layers` rows (launcher/src/plot/draw.rs `heat_map_height`).
fn heat_map_height(layers: usize) -> u32 {
    (170 + 20 * layers as u32).max(480)
}

const DOMAINS: [&str; 3] = ["cartoon", "painting", "sculpture"];
const TEST_ENV: usize = 2;
/// In natural order (conv2 before conv10), as the heat map's rows go from the top.
const LAYERS: [&str; 5] = ["conv1.weight", "conv2.weight", "conv10.weight", "fc.bias", "fc.weight"];
/// The parts of the step-time stacks (legend entries start with these).
const PHASES: [&str; 6] = ["data_wait", "forward_backward", "comm", "optimizer", "other", "checkpoint_stall"];
const STEPS: u64 = 300;
const EVERY: u64 = 50;

fn write_lines(path: &Path, records: &[Value]) {
    let text: String = records.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).expect("writing a jsonl file");
}

/// A run directory as rank 0 writes it, with made-up numbers: `steps.jsonl`, `results.jsonl` (whose
/// DSP-Reg sensitivity is in dumps recorded under a directory that no longer exists, as after the
/// run was moved, plus a SWAD record) and, with `metrics`, a `metrics.jsonl` of 2 ranks, rank 1 a
/// straggler waiting for data.
fn synthetic_run(dir: &Path, loss_scale: f64, metrics: bool, sensitivity: bool) -> PathBuf {
    std::fs::create_dir_all(dir.join("sensitivity")).expect("creating the run directory");
    let steps: Vec<Value> = (0..STEPS)
        .map(|s| {
            let t = s as f64;
            let loss = loss_scale * (1.4 * (-t / 80.0).exp() + 0.2 + 0.08 * (t * 1.7).sin());
            json!({"step": s, "loss": loss, "step_time": 0.05, "dsp_lambda": 0.1})
        })
        .collect();
    write_lines(&dir.join("steps.jsonl"), &steps);

    let args = json!({"dataset": "PACS", "algorithm": "DSPReg", "test_envs": [TEST_ENV], "domains": DOMAINS});
    let accuracy = |step: u64, domain: usize, shift: f64| {
        let progress = 1.0 - (-(step as f64) / 100.0).exp();
        (0.25 + 0.6 * progress - 0.12 * domain as f64 + shift).clamp(0.0, 1.0)
    };
    let mut results = Vec::new();
    for step in (0..=STEPS).step_by(EVERY as usize).map(|s| s.min(STEPS - 1)) {
        let mut record = json!({"step": step, "tr_outloss": 1.2 * (-(step as f64) / 120.0).exp() + 0.3,
                                 "loss": 0.5, "args": args, "hparams": {"lr": 1e-3}});
        for (domain, _) in DOMAINS.iter().enumerate() {
            record[format!("env{domain}_in_acc")] = json!(accuracy(step, domain, 0.05));
            record[format!("env{domain}_out_acc")] = json!(accuracy(step, domain, 0.0));
        }
        if sensitivity {
            let file = format!("step{step:06}.safetensors");
            let tensors: Vec<(String, tch::Tensor)> = LAYERS
                .iter()
                .enumerate()
                .map(|(i, layer)| {
                    let level = 0.1 + 0.15 * i as f64 + 0.3 * step as f64 / STEPS as f64;
                    (layer.to_string(), tch::Tensor::full([3, 4], level, (tch::Kind::Float, tch::Device::Cpu)))
                })
                .collect();
            tch::Tensor::write_safetensors(&tensors, dir.join("sensitivity").join(&file)).expect("a dump");
            record["sensitivity_dump"] = json!(format!("/moved/away/sensitivity/{file}"));
        }
        results.push(record);
    }
    let mut swad = json!({"step": STEPS - 1, "swad": true, "args": args});
    for (domain, _) in DOMAINS.iter().enumerate() {
        swad[format!("env{domain}_in_acc")] = json!(accuracy(STEPS, domain, 0.08));
        swad[format!("env{domain}_out_acc")] = json!(accuracy(STEPS, domain, 0.03));
    }
    results.push(swad);
    write_lines(&dir.join("results.jsonl"), &results);

    if metrics {
        // As trainer/src/records.rs writes it: means per step, except the checkpoint stall and the
        // evaluation (window totals, between steps).
        let windows: Vec<Value> = (1..=STEPS / EVERY)
            .map(|w| {
                let ranks: Vec<Value> = (0..2)
                    .map(|rank| {
                        let data_wait = if rank == 1 { 9.0 + w as f64 } else { 1.0 };
                        json!({"rank": rank, "steps": EVERY, "step_ms": 38.0 + data_wait + 1.0,
                               "data_wait_ms": data_wait, "forward_backward_ms": 25.0, "comm_ms": 8.0,
                               "comm_overlapped_ms": 3.0, "optimizer_ms": 5.0,
                               "checkpoint_stall_ms": if w == 3 { 400.0 } else { 0.0 }, "evaluation_ms": 900.0,
                               "images_per_s": 700.0, "loss": 0.4, "grad_norm": 1.0, "loader_queue_depth": 2.0,
                               "host_rss_gb": 1.5, "gpu_mem_gb": null, "telemetry_ms": 0.01,
                               "comm_bytes_per_step": {"all_reduce": 4096, "all_gather": 0, "broadcast": 0}})
                    })
                    .collect();
                json!({"step": w * EVERY, "window_steps": EVERY, "world_size": 2, "images_per_s": 1400.0,
                       "loss": 0.4, "ranks": ranks})
            })
            .collect();
        write_lines(&dir.join("metrics.jsonl"), &windows);
    }
    dir.to_path_buf()
}

fn plot(args: &[&str], cwd: &Path) -> (bool, String, String) {
    let mut all = vec!["plot"];
    all.extend(args);
    let out = run_mgrun(&all, cwd);
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// The PNG decodes, has `size`, is not blank (many colours, a fair share of non-white pixels), and
/// has dark text in its title strip (the embedded font drew).
fn check_png(path: &Path, size: (u32, u32)) {
    let image = image::open(path).unwrap_or_else(|e| panic!("decoding {}: {e}", path.display())).to_rgb8();
    assert_eq!(image.dimensions(), size, "{}", path.display());
    let colours: HashSet<[u8; 3]> = image.pixels().map(|p| p.0).collect();
    assert!(colours.len() >= 8, "{}: only {} colours", path.display(), colours.len());
    let drawn = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    assert!(drawn * 100 > image.pixels().len(), "{}: {drawn} pixels drawn", path.display());
    let title_ink = (0..size.0).flat_map(|x| (0..32).map(move |y| (x, y))).filter(|&(x, y)| {
        let p = image.get_pixel(x, y).0;
        p.iter().all(|&c| c < 90)
    });
    assert!(title_ink.count() > 100, "{}: no title text", path.display());
}

/// The SVG's `<text>` elements: their `y` attribute and their contents, in document order.
fn svg_texts(svg: &str) -> Vec<(f64, String)> {
    svg.split("<text")
        .skip(1)
        .filter_map(|element| {
            let (attributes, rest) = element.split_once('>')?;
            let y = attributes.split_once(" y=\"")?.1.split_once('"')?.0.parse().ok()?;
            Some((y, rest.split_once("</text>")?.0.trim().to_string()))
        })
        .collect()
}

/// The SVG's text elements, the document checked to be one `<svg>` element with text and with
/// every name in `names` in a text element (as the SVG escapes it).
fn check_svg(path: &Path, names: &[&str]) -> Vec<(f64, String)> {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let body = svg.trim();
    assert!(body.starts_with("<svg") && body.ends_with("</svg>"), "{}: not an SVG document", path.display());
    assert_eq!(body.matches("<text").count(), body.matches("</text>").count(), "{}", path.display());
    let texts = svg_texts(body);
    assert!(texts.len() > 5, "{}: no text", path.display());
    for name in names {
        let escaped = name.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        assert!(texts.iter().any(|(_, t)| t.contains(&escaped)), "{}: no {name:?} in {texts:?}", path.display());
    }
    texts
}

fn written(stdout: &str) -> Vec<PathBuf> {
    stdout.lines().filter_map(|l| l.strip_prefix("wrote ")).map(PathBuf::from).collect()
}

#[test]
fn synthetic_run_plots_every_figure() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let run = synthetic_run(&dir.path().join("dsp_run"), 1.0, true, true);
    let (ok, stdout, stderr) = plot(&[run.to_str().expect("utf-8 path")], dir.path());
    assert!(ok, "{stdout}{stderr}");

    let plots = run.join("plots");
    let stems = ["loss", "accuracy", "sensitivity", "step_time"];
    let expected: Vec<PathBuf> =
        stems.iter().flat_map(|s| ["png", "svg"].map(|ext| plots.join(format!("{s}.{ext}")))).collect();
    assert_eq!(written(&stdout), expected, "{stdout}");
    assert!(!stdout.contains("skipped"), "{stdout}");

    check_png(&plots.join("loss.png"), LOSS_SIZE);
    check_png(&plots.join("accuracy.png"), ACCURACY_SIZE);
    check_png(&plots.join("sensitivity.png"), (HEAT_MAP_WIDTH, heat_map_height(LAYERS.len())));
    check_png(&plots.join("step_time.png"), STEP_TIME_SIZE);

    check_svg(&plots.join("loss.svg"), &["dsp_run", "loss per step", "validation loss"]);
    let accuracy = check_svg(&plots.join("accuracy.svg"), &DOMAINS);
    let test_label = format!("{} (test)", DOMAINS[TEST_ENV]);
    assert!(accuracy.iter().any(|(_, t)| *t == test_label), "the test domain is not marked");
    assert!(accuracy.iter().any(|(_, t)| t.starts_with("SWAD model")), "the SWAD evaluation is not marked");
    let sensitivity = check_svg(&plots.join("sensitivity.svg"), &LAYERS);
    // Layers top to bottom in natural order: conv2 above conv10.
    let height_of = |name: &str| {
        sensitivity.iter().find(|(_, t)| t == name).map(|(y, _)| *y).unwrap_or_else(|| panic!("no label {name}"))
    };
    let heights: Vec<f64> = LAYERS.iter().map(|layer| height_of(layer)).collect();
    assert!(heights.windows(2).all(|pair| pair[0] < pair[1]), "rows not in natural order: {LAYERS:?} at {heights:?}");
    let mut step_time_names = PHASES.to_vec();
    step_time_names.extend(["rank", "1400 images/s", "3.0 ms/step of comm overlapped"]);
    check_svg(&plots.join("step_time.svg"), &step_time_names);
}

#[test]
fn compare_names_every_run_and_missing_data_is_reported() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let runs = dir.path().join("runs");
    let first = synthetic_run(&runs.join("erm_seed0"), 1.0, true, false);
    let second = synthetic_run(&runs.join("dsp_reg_seed0"), 0.8, false, true);
    let (ok, stdout, stderr) =
        plot(&["--compare", first.to_str().expect("utf-8"), second.to_str().expect("utf-8")], dir.path());
    assert!(ok, "{stdout}{stderr}");
    // Without --out: beside the first run.
    let out = runs.join("compare-plots");
    let expected: Vec<PathBuf> =
        ["loss", "accuracy"].iter().flat_map(|s| ["png", "svg"].map(|ext| out.join(format!("{s}.{ext}")))).collect();
    assert_eq!(written(&stdout), expected, "{stdout}");
    check_png(&out.join("loss.png"), COMPARE_SIZE);
    check_png(&out.join("accuracy.png"), COMPARE_SIZE);
    check_svg(&out.join("loss.svg"), &["erm_seed0", "dsp_reg_seed0"]);
    check_svg(&out.join("accuracy.svg"), &["erm_seed0 (test: sculpture)", "dsp_reg_seed0 (test: sculpture)"]);

    // One run alone: no sensitivity in the first, no metrics.jsonl in the second; each says why.
    let (ok, stdout, stderr) = plot(&[first.to_str().expect("utf-8"), "--out", "erm_plots"], dir.path());
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("skipped sensitivity:") && stdout.contains("no DSP-Reg sensitivity"), "{stdout}");
    assert!(!dir.path().join("erm_plots/sensitivity.png").exists());
    assert!(dir.path().join("erm_plots/step_time.png").exists(), "{stdout}");
    let (ok, stdout, stderr) = plot(&[second.to_str().expect("utf-8")], dir.path());
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("skipped step_time:") && stdout.contains("metrics.jsonl is missing"), "{stdout}");
    assert!(!second.join("plots/step_time.png").exists() && second.join("plots/sensitivity.svg").exists());

    // --compare needs two runs; one run without it.
    let (ok, _, stderr) = plot(&["--compare", first.to_str().expect("utf-8")], dir.path());
    assert!(!ok && stderr.contains("--compare needs two or more"), "{stderr}");
}

#[test]
fn bad_input_names_the_file_and_line() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let run = synthetic_run(&dir.path().join("run"), 1.0, true, false);
    let run_arg = run.to_str().expect("utf-8 path");
    let steps = run.join("steps.jsonl");
    let good = std::fs::read_to_string(&steps).expect("steps.jsonl");
    let mut lines: Vec<&str> = good.lines().collect();

    lines[2] = r#"{"step": 2, "loss": 1.0"#;
    std::fs::write(&steps, lines.join("\n") + "\n").expect("writing steps.jsonl");
    let (ok, _, stderr) = plot(&[run_arg], dir.path());
    assert!(!ok, "a malformed line was accepted");
    assert!(stderr.contains(&format!("{}:3: malformed JSON", steps.display())), "{stderr}");

    lines[2] = r#"{"step": 2, "los": 1.0}"#;
    std::fs::write(&steps, lines.join("\n") + "\n").expect("writing steps.jsonl");
    let (ok, _, stderr) = plot(&[run_arg], dir.path());
    assert!(!ok && stderr.contains(&format!("{}:3: no \"loss\"", steps.display())), "{stderr}");

    // An unfinished last line (a run still writing) is passed over with a note.
    std::fs::write(&steps, good.clone() + r#"{"step": 300, "lo"#).expect("writing steps.jsonl");
    let (ok, stdout, stderr) = plot(&[run_arg], dir.path());
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("{}:301: ignored the unfinished last line", steps.display())), "{stdout}");

    let metrics = run.join("metrics.jsonl");
    std::fs::write(&metrics, "{\"step\": 50, \"ranks\": []}\n{\"step\": 100, \"ranks\": 3}\n").expect("metrics");
    let (ok, _, stderr) = plot(&[run_arg], dir.path());
    assert!(!ok && stderr.contains(&format!("{}:2: \"ranks\" must be an array", metrics.display())), "{stderr}");

    std::fs::remove_file(&steps).expect("removing steps.jsonl");
    let (ok, _, stderr) = plot(&[run_arg], dir.path());
    assert!(!ok && stderr.contains(&format!("reading {}", steps.display())), "{stderr}");
}

/// A tiny DSP-Reg run (1 CPU rank, 20 steps, 4 evaluations): the trainer's own records name the
/// domains and the layers, and every plot but the step-time breakdown (metrics.jsonl, where the
/// trainer writes one) is drawn.
#[test]
fn tiny_dsp_reg_run_plots() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = synthetic_dataset(dir.path(), 4, 16);
    let job = "\n[eval]\nevery_steps = 5\nbatch_size = 64\n[method]\nname = \"dsp_reg\"\n";
    let config = write_tiny_job(&dir.path().join("tiny.toml"), &data, 20, 3, job);
    let run = dir.path().join("tiny_run");
    let out =
        run_mgrun(&["--cpus", "1", "--out", run.to_str().expect("utf-8"), config.to_str().expect("utf-8")], dir.path());
    assert!(out.status.success(), "the run failed: {}{}", text(&out.stdout), text(&out.stderr));

    let (ok, stdout, stderr) = plot(&[run.to_str().expect("utf-8"), "--out", "p"], dir.path());
    assert!(ok, "{stdout}{stderr}");
    let plots = dir.path().join("p");
    check_png(&plots.join("loss.png"), LOSS_SIZE);
    check_png(&plots.join("accuracy.png"), ACCURACY_SIZE);
    let results = read_jsonl(&run.join("results.jsonl")).expect("results.jsonl");
    let domains: Vec<String> = results[0]["args"]["domains"]
        .as_array()
        .expect("the domains")
        .iter()
        .map(|d| d.as_str().expect("a name").to_string())
        .collect();
    let domain_names: Vec<&str> = domains.iter().map(String::as_str).collect();
    let accuracy = check_svg(&plots.join("accuracy.svg"), &domain_names);
    assert!(accuracy.iter().any(|(_, t)| t == "sketch (test)"), "the test domain is not marked");

    let layers: Vec<String> = results
        .iter()
        .flat_map(|r| r["dsp_sensitivity"].as_object().into_iter().flat_map(|l| l.keys().cloned()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(!layers.is_empty(), "the run recorded no sensitivity: {results:?}");
    check_png(&plots.join("sensitivity.png"), (HEAT_MAP_WIDTH, heat_map_height(layers.len())));
    let layer_names: Vec<&str> = layers.iter().map(String::as_str).collect();
    check_svg(&plots.join("sensitivity.svg"), &layer_names);
    if run.join("metrics.jsonl").exists() {
        check_png(&plots.join("step_time.png"), STEP_TIME_SIZE);
        check_svg(&plots.join("step_time.svg"), &PHASES);
    } else {
        assert!(stdout.contains("skipped step_time:"), "{stdout}");
    }
}
