//! Monitoring of a running job (README "Monitoring"): the Prometheus endpoint scraped over HTTP
//! during a 2-rank CPU run, `metrics.jsonl`, the merged Chrome trace, the progress lines and
//! `--quiet`; and communication overlapped with backward, which must not change a bit.

use mgrun_tests::{mgrun_bin, read_jsonl, run_outputs, synthetic_dataset, text, write_tiny_job};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A fast-path (not deterministic) tiny job: `steps` steps, an evaluation every `eval_every`.
fn job(dir: &Path, steps: usize, eval_every: usize, method: &str, extra: &str) -> std::path::PathBuf {
    let data = synthetic_dataset(dir, 6, 16);
    let rest = format!("\n[eval]\nevery_steps = {eval_every}\n\n[method]\nname = \"{method}\"\n{extra}");
    let path = write_tiny_job(&dir.join("job.toml"), &data, steps, 3, &rest);
    // write_tiny_job's runs are deterministic (no overlap there): this one takes the fast path.
    let config = std::fs::read_to_string(&path).expect("job").replace("deterministic = true", "deterministic = false");
    std::fs::write(&path, config).expect("job");
    path
}

/// A port with nothing listening on it and the next one (ranks 0 and 1 serve on PORT and PORT+1).
fn free_port_pair() -> u16 {
    for _ in 0..50 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = probe.local_addr().expect("addr").port();
        drop(probe);
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no free pair of ports");
}

/// `GET /metrics` over plain HTTP/1.0; `None` while nothing answers.
fn scrape(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    status.split_whitespace().nth(1).is_some_and(|code| code == "200").then(|| body.to_string())
}

/// The value of the sample `name{labels...}` whose labels include every one of `labels`.
fn sample(body: &str, name: &str, labels: &[&str]) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let series_name = series.split('{').next()?;
        (series_name == name && labels.iter().all(|l| series.contains(l))).then(|| value.parse().ok())?
    })
}

#[test]
fn a_running_job_is_scraped_traced_and_summarised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port_pair();
    let extra = format!("\n[metrics]\nprometheus = \"127.0.0.1:{port}\"\n\n[trace]\nenabled = true\nsteps = 8\n");
    let config = job(dir.path(), 400, 100, "erm", &extra);
    let out = dir.path().join("run");
    let child = Command::new(mgrun_bin())
        .args(["--cpus", "2", "--set", "train.progress_every_s=0.5", "--out"])
        .arg(&out)
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting mgrun");

    // Two scrapes of each rank while it trains: the step counter must move between them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut first: Vec<Option<(f64, String)>> = vec![None, None];
    let mut moved = [false, false];
    while Instant::now() < deadline && !moved.iter().all(|&m| m) {
        for rank in 0..2 {
            let Some(body) = scrape(port + rank as u16) else { continue };
            let Some(steps) = sample(&body, "mgrun_steps_total", &[&format!("rank=\"{rank}\"")]) else { continue };
            match &first[rank] {
                None => first[rank] = Some((steps, body)),
                Some((earlier, _)) if steps > *earlier => moved[rank] = true,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = child.wait_with_output().expect("waiting for mgrun");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert_eq!(moved, [true, true], "mgrun_steps_total did not grow between two scrapes of each rank");
    for (rank, scraped) in first.iter().enumerate() {
        let (_, body) = scraped.as_ref().expect("scraped");
        let rank_label = format!("rank=\"{rank}\"");
        for phase in ["data_wait", "forward_backward", "comm", "optimizer"] {
            let label = format!("phase=\"{phase}\"");
            let count = sample(body, "mgrun_step_phase_seconds_count", &[&label, &rank_label]);
            assert!(count.is_some_and(|c| c >= 1.0), "rank {rank}: no {phase} samples in\n{body}");
        }
        let bytes = sample(body, "mgrun_comm_bytes_total", &["kind=\"all_reduce\"", &rank_label]);
        assert!(bytes.is_some_and(|b| b > 0.0), "rank {rank}: no all-reduce bytes");
        for gauge in ["mgrun_loss", "mgrun_images_per_second", "mgrun_grad_norm", "mgrun_loader_queue_depth"] {
            assert!(sample(body, gauge, &[&rank_label]).is_some_and(f64::is_finite), "rank {rank}: no {gauge}");
        }
        assert!(body.contains("node=\"0\""), "the node label is missing");
    }

    // metrics.jsonl: one line per evaluation (steps 0, 100, 200, 300, 399), every rank's breakdown.
    let lines = read_jsonl(&out.join("metrics.jsonl")).expect("metrics.jsonl");
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, [0, 100, 200, 300, 399]);
    for line in &lines[1..] {
        let ranks = line["ranks"].as_array().expect("ranks");
        assert_eq!(ranks.len(), 2);
        for r in ranks {
            let get = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
            let parts = get("data_wait_ms") + get("forward_backward_ms") + get("comm_ms") + get("optimizer_ms");
            // The phases are measured inside the step, so their sum cannot exceed it, and little of
            // the step is outside them (the loop's bookkeeping).
            assert!(parts <= get("step_ms") * 1.0001 && parts >= get("step_ms") * 0.8, "{r}");
            assert!(r["comm_bytes_per_step"]["all_reduce"].as_f64().expect("bytes") > 0.0);
            assert!(get("images_per_s") > 0.0);
        }
    }
    // The gradient norm is sampled (at most once a second): the first step always has one.
    let norms: Vec<f64> = lines
        .iter()
        .flat_map(|l| l["ranks"].as_array().expect("ranks").iter())
        .filter_map(|r| r["grad_norm"].as_f64())
        .collect();
    assert!(!norms.is_empty() && norms.iter().all(|&n| n > 0.0), "{norms:?}");

    // The merged trace: both ranks, the traced steps only, collectives with their sizes.
    let trace: Value =
        serde_json::from_slice(&std::fs::read(out.join("trace.json")).expect("trace.json")).expect("trace JSON");
    let events = trace["traceEvents"].as_array().expect("traceEvents");
    for rank in 0..2 {
        let of_rank = |name: &str| events.iter().filter(|e| e["pid"] == rank && e["name"] == name).count();
        assert_eq!(of_rank("step"), 8, "rank {rank}: trace.steps = 8");
        assert!(of_rank("all_reduce") >= 8, "rank {rank}: an all-reduce per step at least");
    }
    assert!(events.iter().any(|e| e["name"] == "all_reduce" && e["args"]["bytes"].as_u64().is_some_and(|b| b > 0)));
    assert!(stdout.contains("trace: "), "{stdout}");

    // Progress: plain lines (the output is a pipe), never the ranks' raw reports.
    assert!(stdout.lines().any(|l| l.starts_with("[0] step ") && l.contains("img/s")), "{stdout}");
    assert!(!stdout.contains("mgrun-progress"), "{stdout}");
}

#[test]
fn quiet_drops_the_progress_lines_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = job(dir.path(), 20, 10, "erm", "");
    let output = Command::new(mgrun_bin())
        .args(["--cpus", "2", "--quiet", "--set", "train.progress_every_s=0", "--out"])
        .arg(dir.path().join("run"))
        .arg(&config)
        .output()
        .expect("mgrun");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    assert!(!stdout.contains(" img/s | elapsed"), "{stdout}");
    assert!(stdout.contains("done: 20 steps"), "{stdout}");
}

/// Buckets reduced during backward give the same bits as after it, and the overlap is measured.
#[test]
fn overlapped_communication_changes_no_bit() {
    for method in ["erm", "sam"] {
        same_bits_with_and_without_overlap(method);
    }
}

fn same_bits_with_and_without_overlap(method: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    // 3 ranks, buckets of ~4 KB: a dozen buckets per step, several per layer.
    let config = job(dir.path(), 12, 6, method, "\n[comm]\nbucket_mb = 0.004\n");
    let mut runs = Vec::new();
    for overlap in [true, false] {
        let out = dir.path().join(format!("overlap-{overlap}"));
        let output = Command::new(mgrun_bin())
            .args(["--cpus", "3", "--quiet", "--set", &format!("comm.overlap={overlap}"), "--out"])
            .arg(&out)
            .arg(&config)
            .output()
            .expect("mgrun");
        assert!(output.status.success(), "{}{}", text(&output.stdout), text(&output.stderr));
        let last = read_jsonl(&out.join("metrics.jsonl")).expect("metrics").pop().expect("a line");
        let overlapped: f64 = last["ranks"]
            .as_array()
            .expect("ranks")
            .iter()
            .map(|r| r["comm_overlapped_ms"].as_f64().expect("ms"))
            .sum();
        runs.push((run_outputs(&out), overlapped));
    }
    let ((on, on_overlapped), (off, off_overlapped)) = (&runs[0], &runs[1]);
    assert_eq!(on.0, off.0, "{method}: step losses differ with comm.overlap");
    assert_eq!(on.1, off.1, "{method}: parameters differ with comm.overlap");
    assert!(*on_overlapped > 0.0, "{method}: no collective ran beside backward");
    assert_eq!(*off_overlapped, 0.0);
}

#[test]
fn bench_scaling_measures_every_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = job(dir.path(), 10, 10, "erm", "");
    let out = dir.path().join("scaling");
    let output = Command::new(mgrun_bin())
        .args(["bench", "scaling", "--cpus", "1,2", "--methods", "erm,sam", "--modes", "weak", "--steps", "3"])
        .args(["--overlap-off", "--out"])
        .arg(&out)
        .arg(&config)
        .output()
        .expect("mgrun");
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", text(&output.stderr));
    let json: Value = serde_json::from_slice(&std::fs::read(out.join("scaling.json")).expect("json")).expect("json");
    let points = json["points"].as_array().expect("points");
    // Per method: 1 rank, 2 ranks with overlap, 2 ranks without.
    assert_eq!(points.len(), 6, "{stdout}");
    for p in points {
        assert!(p["images_per_s"].as_f64().is_some_and(|x| x > 0.0), "{p}");
        let expected = if p["world_size"] == 1 { 1.0 } else { p["efficiency"].as_f64().expect("efficiency") };
        assert!(p["efficiency"].as_f64().is_some_and(|e| (e - expected).abs() < 1e-12 && e > 0.0), "{p}");
        // Weak scaling: 3 training domains x 8 images per rank.
        assert_eq!(p["images_per_step"].as_u64(), Some(24 * p["world_size"].as_u64().expect("world")));
    }
    assert!(stdout.contains("| weak | sam | 2 | off |"), "{stdout}");
    // The figures: decodable PNGs, and SVGs naming every series.
    for stem in ["scaling", "scaling_step_time"] {
        let png = image::open(out.join(format!("{stem}.png"))).unwrap_or_else(|e| panic!("{stem}.png: {e}"));
        assert!(png.width() >= 1600 && png.height() == 650, "{stem}.png is {}x{}", png.width(), png.height());
    }
    let svg = std::fs::read_to_string(out.join("scaling.svg")).expect("scaling.svg");
    for series in ["weak erm", "weak sam", "weak erm no overlap"] {
        assert!(svg.contains(series), "scaling.svg lacks {series}");
    }
}
