//! SWAD (`[swad] enabled = true`): the loss-valley decisions against a Python transcription of
//! khanrc/swad's `LossValley` (tests/reference/swad_valley.py); the averaged model against the mean
//! of the recorded parameters, and through a checkpoint round trip; and a tiny CPU run whose SWAD
//! model has the same bits on 1 and 2 ranks and after a resume.

use mgrun_tests::*;
use mgrun_trainer::config::SwadConfig;
use mgrun_trainer::swad::{AverageUpdate, FinalChoice, LossValley, SegmentRecord, Swad, ValleyDecision};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tch::{Device, Kind, Tensor};

fn swad_config(n_converge: usize, n_tolerance: usize, tolerance_ratio: f64) -> SwadConfig {
    SwadConfig { enabled: true, n_converge, n_tolerance, tolerance_ratio }
}

/// A small deterministic generator (splitmix64) for loss curves and parameters.
struct Draws(u64);

impl Draws {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Validation-loss curves: hand-made cases for each rule, then noisy valleys (fall, flat, rise).
fn scenarios() -> Vec<(SwadConfig, Vec<f64>)> {
    let mut cases = vec![
        // Never converges: the last segment.
        (swad_config(3, 6, 0.3), vec![5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2]),
        // Converges once the window is full, continues, then the valley dies: early stop.
        (
            swad_config(3, 6, 0.3),
            vec![3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 1.1, 1.2, 1.25, 1.3, 1.5, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0],
        ),
        // Converges and lasts to the end: leftover segments are added.
        (swad_config(3, 6, 0.3), vec![3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 1.1, 1.2, 1.05, 1.1, 1.0, 1.3, 1.6]),
        // Converges at the third evaluation, before the smoothing window is full.
        (swad_config(3, 6, 0.3), vec![1.0, 1.2, 1.3, 1.1, 1.0, 1.05, 1.1, 1.2, 1.0, 0.9]),
        // A segment above the threshold inside the window at convergence.
        (swad_config(3, 6, 0.3), vec![2.0, 1.0, 1.6, 1.0, 0.9, 1.0, 1.1, 1.0, 1.2, 1.3]),
        // VLCS's ratio.
        (swad_config(3, 6, 0.2), vec![3.0, 2.0, 1.5, 1.3, 1.2, 1.25, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]),
        // A shorter smoothing window than the convergence window, and equal ones.
        (swad_config(4, 2, 0.3), vec![3.0, 2.0, 1.0, 1.1, 1.2, 1.3, 1.0, 1.5, 2.0, 2.0]),
        (swad_config(3, 3, 0.3), vec![3.0, 2.0, 1.0, 1.1, 1.2, 1.3, 1.0, 1.5, 2.0, 2.0]),
        (swad_config(1, 1, 0.0), vec![2.0, 1.9, 1.8, 2.1, 2.2]),
    ];
    let mut draws = Draws(2024);
    for i in 0..60 {
        let config = swad_config(1 + i % 4, 1 + (i * 7) % 8, [0.0, 0.1, 0.2, 0.3][i % 4]);
        let len = 8 + (draws.uniform() * 25.0) as usize;
        let bottom = draws.uniform() * len as f64;
        let losses = (0..len)
            .map(|t| {
                let x = (t as f64 - bottom) / len as f64;
                // Rounded so that equal losses (ties) occur too.
                (((0.5 + 4.0 * x * x + 0.15 * draws.uniform()) * 100.0).round()) / 100.0
            })
            .collect();
        cases.push((config, losses));
    }
    cases
}

fn update_json(update: &AverageUpdate) -> Value {
    match update {
        AverageUpdate::StartFrom(id) => json!(["start", id]),
        AverageUpdate::Add(id) => json!(["add", id]),
    }
}

/// What mgrun's [`LossValley`] decides on `losses` (segment i ends at step i), in the script's form.
fn rust_valley(config: &SwadConfig, losses: &[f64]) -> Value {
    let mut valley = LossValley::new(config);
    let mut decisions = Vec::new();
    let mut updates = Vec::new();
    for (i, &loss) in losses.iter().enumerate() {
        let segment = SegmentRecord { id: i as u64, start_step: i as u64, end_step: i as u64, end_loss: loss };
        let decision = valley.observe(segment, &mut updates);
        decisions.push(decision.name());
        if decision == ValleyDecision::Dead {
            break;
        }
    }
    let last = match valley.finish().expect("at least one segment") {
        FinalChoice::LastSegment(id) => json!({"kind": "last", "id": id}),
        FinalChoice::Averaged(leftovers) => {
            json!({"kind": "averaged", "leftovers": leftovers.iter().map(update_json).collect::<Vec<_>>()})
        }
    };
    let threshold_bits = valley.converge_step().map(|_| valley.threshold().to_bits());
    json!({
        "decisions": decisions,
        "updates": updates.iter().map(update_json).collect::<Vec<_>>(),
        "final": last,
        "threshold_bits": threshold_bits,
    })
}

#[test]
fn loss_valley_decisions_match_swad_py() {
    let cases = scenarios();
    let input = json!({"scenarios": cases.iter().map(|(c, losses)| json!({
        "n_converge": c.n_converge, "n_tolerance": c.n_tolerance, "tolerance_ratio": c.tolerance_ratio, "losses": losses,
    })).collect::<Vec<_>>()});
    let script = workspace_root().join("tests/reference/swad_valley.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the reference Python");
    child.stdin.take().expect("stdin").write_all(input.to_string().as_bytes()).expect("writing the scenarios");
    let out = child.wait_with_output().expect("running swad_valley.py");
    assert!(out.status.success(), "swad_valley.py failed: {}", text(&out.stderr));
    let expected: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the script's JSON");
    assert_eq!(expected.len(), cases.len());
    // Every rule must be exercised, or agreement proves little.
    let mut seen = std::collections::BTreeSet::new();
    for ((config, losses), reference) in cases.iter().zip(&expected) {
        let mine = rust_valley(config, losses);
        assert_eq!(&mine, reference, "{config:?} on {losses:?}");
        for d in reference["decisions"].as_array().into_iter().flatten() {
            seen.insert(d.as_str().unwrap_or_default().to_string());
        }
        let kind = reference["final"]["kind"].as_str().unwrap_or_default();
        let leftovers = reference["final"]["leftovers"].as_array().map_or(0, Vec::len);
        seen.insert(format!("final {kind}{}", if leftovers > 0 { " with leftovers" } else { "" }));
    }
    for rule in ["wait", "converge", "pending", "add", "dead", "final last", "final averaged with leftovers"] {
        assert!(seen.contains(rule), "no scenario exercised {rule:?}: {seen:?}");
    }
}

/// Parameters after each step, evaluations, and the SWAD model: the average must be the mean over
/// the averaged segments of each segment's mean over its steps.
fn feed_run(
    swad: &mut Swad,
    params: &[Tensor],
    steps: std::ops::Range<usize>,
    every: usize,
    losses: &[f64],
) -> Option<usize> {
    for step in steps {
        swad.after_step(step as u64, &params[step]);
        if step % every == 0 || step + 1 == params.len() {
            let decision = swad.after_evaluation(step as u64, losses[step.div_ceil(every)]).expect("evaluation");
            if decision == ValleyDecision::Dead {
                return Some(step);
            }
        }
    }
    None
}

#[test]
fn swad_average_is_the_mean_of_the_recorded_parameters_and_survives_a_checkpoint() {
    const NUMEL: i64 = 2000;
    const EVERY: usize = 5;
    let mut draws = Draws(7);
    // A drifting random walk, like training.
    let mut current = vec![0f32; NUMEL as usize];
    let params: Vec<Tensor> = (0..=100)
        .map(|_| {
            for v in current.iter_mut() {
                *v += (draws.uniform() as f32 - 0.5) * 0.1;
            }
            Tensor::from_slice(&current)
        })
        .collect();
    // Per evaluation (0, 5, 10, ...): falls, settles (convergence), rises (dead valley at 80).
    let losses =
        [3.0, 2.5, 2.0, 1.5, 1.2, 1.0, 1.1, 1.2, 1.05, 1.1, 1.3, 1.5, 2.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0];
    let config = swad_config(3, 6, 0.3);
    let mut swad = Swad::new(&config, Device::Cpu);
    let stop = feed_run(&mut swad, &params, 0..params.len(), EVERY, &losses);
    let stop = stop.expect("the valley must end in this run");
    let (average, summary) = swad.finish().expect("the SWAD model");
    assert!(summary.early_stopped && !summary.last_segment_only, "{summary:?}");
    assert!(summary.segments.len() >= 3, "{summary:?}");
    assert_eq!(summary.n_averaged as usize, summary.segments.len());

    // The expected average in f64: the segments' means, averaged uniformly (a segment listed twice
    // counts twice, as in swad.py).
    let flat = |t: &Tensor| Vec::<f64>::try_from(t.to_kind(Kind::Double)).expect("a flat tensor");
    let recorded: Vec<Vec<f64>> = params.iter().map(flat).collect();
    let mut expected = vec![0f64; NUMEL as usize];
    for segment in &summary.segments {
        let steps = segment.start_step as usize..=segment.end_step as usize;
        let count = steps.clone().count() as f64;
        for step in steps {
            for (e, v) in expected.iter_mut().zip(&recorded[step]) {
                *e += v / count / summary.segments.len() as f64;
            }
        }
    }
    let got = flat(&average);
    // f32 running means: each of the (segment length + segment count) updates rounds once, an error
    // of at most about one ulp of the largest value per update.
    let terms = (EVERY + summary.segments.len()) as f64;
    let scale = recorded.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    let bound = 2.0 * terms * f32::EPSILON as f64 * scale;
    let worst = got.iter().zip(&expected).fold(0f64, |m, (g, e)| m.max((g - e).abs()));
    assert!(worst <= bound, "SWAD average off the mean by {worst:e} (bound {bound:e})");

    // Stopped and restored halfway (mid-segment, converged): the same decisions and the same bits.
    for cut in [13usize, 37, 52] {
        let mut first = Swad::new(&config, Device::Cpu);
        assert_eq!(feed_run(&mut first, &params, 0..cut, EVERY, &losses), None);
        let mut resumed = Swad::new(&config, Device::Cpu);
        resumed.load_state(&first.state()).expect("loading the SWAD state");
        assert_eq!(feed_run(&mut resumed, &params, cut..params.len(), EVERY, &losses), Some(stop));
        let (again, again_summary) = resumed.finish().expect("the resumed SWAD model");
        assert_eq!(again_summary, summary, "cut at {cut}");
        assert!(again.equal(&average), "cut at {cut}: the resumed SWAD model differs");
    }

    // Never converged: the last segment's mean.
    let mut falling = Swad::new(&config, Device::Cpu);
    let steady_fall: Vec<f64> = (0..20).map(|i| 10.0 - i as f64).collect();
    assert_eq!(feed_run(&mut falling, &params[..23], 0..23, EVERY, &steady_fall), None);
    let (last, summary) = falling.finish().expect("the last segment");
    assert!(summary.last_segment_only);
    assert_eq!(summary.segments.iter().map(|s| (s.start_step, s.end_step)).collect::<Vec<_>>(), [(21, 22)]);
    let expected: Vec<f64> = recorded[21].iter().zip(&recorded[22]).map(|(a, b)| (a + b) / 2.0).collect();
    let worst = flat(&last).iter().zip(&expected).fold(0f64, |m, (g, e)| m.max((g - e).abs()));
    assert!(worst <= 4.0 * f32::EPSILON as f64 * scale, "last segment off its mean by {worst:e}");
}

// --- A tiny run of the trainer.

const STEPS: usize = 13;

/// The valley starts at the first evaluation and holds while the loss stays under 1.3 x the first
/// evaluation's, so that a short falling run averages every segment after the first: steps 1-12
/// in segments of 4 (evaluations after steps 0, 4, 8 and 12).
const SWAD_JOB: &str = "
[eval]
every_steps = 4
[checkpoint]
every_steps = 1
keep_last = 0
[swad]
enabled = true
n_converge = 1
n_tolerance = 1
tolerance_ratio = 0.3
";

fn run_job(dir: &Path, cfg: &Path, name: &str, world: usize, extra: &[&str]) -> (PathBuf, String) {
    let out_dir = dir.join(name);
    let mut args = vec!["--cpus".to_string(), world.to_string(), "--out".into(), out_dir.display().to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push(cfg.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_mgrun(&args, dir);
    let log = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{name} failed:\n{log}");
    (out_dir, log)
}

/// The parameters after `step` (the flat vector of checkpoint `step<step+1>`).
fn checkpoint_flat(out_dir: &Path, step: usize) -> Tensor {
    let dir = out_dir.join("checkpoints").join(format!("step{}", step + 1));
    let checkpoint = mgrun_checkpoint::load(&dir).expect("loading a checkpoint");
    checkpoint.get("model.flat").expect("the flat parameters").to_kind(Kind::Double)
}

#[test]
fn tiny_run_swad_model_is_the_mean_and_the_same_on_1_and_2_ranks_and_after_resume() {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = synthetic_dataset(dir.path(), 6, 16);
    let cfg = write_tiny_job(&dir.path().join("swad.toml"), &data, STEPS, 7, SWAD_JOB);
    let (one, log) = run_job(dir.path(), &cfg, "w1", 1, &[]);
    assert!(log.contains("swad: step 0") && log.contains("converged at step 0"), "{log}");
    assert!(log.contains("model_swad.safetensors"), "{log}");

    // The record marked swad: segments 1-4, 5-8, 9-12.
    let results = read_jsonl(&one.join("results.jsonl")).expect("results.jsonl");
    let swad_records: Vec<&Value> = results.iter().filter(|r| r["swad"] == json!(true)).collect();
    assert_eq!(swad_records.len(), 1, "{results:?}");
    let record = swad_records[0];
    assert_eq!(record["swad_segments"], json!([[1, 4], [5, 8], [9, 12]]), "{record}");
    assert_eq!(record["step"], json!(STEPS - 1));
    assert!(record["env0_in_acc"].is_number() && record["tr_outloss"].is_number(), "{record}");
    assert!(results.iter().filter(|r| r.get("swad").is_none()).all(|r| r["tr_outloss"].is_number()));

    // The SWAD model is the uniform mean of the parameters after steps 1..=12: compared through a
    // model whose flat parameters are that mean (state-dict names), buffers aside.
    let mean = (1..STEPS).map(|s| checkpoint_flat(&one, s)).reduce(|a, b| a + b).expect("steps") / (STEPS - 1) as f64;
    let classes = std::fs::read_dir(data.join("sketch")).expect("the sketch domain").count();
    let spec = mgrun_models::ModelSpec {
        arch: "small_cnn".into(),
        num_classes: classes,
        width: 8,
        ..mgrun_models::ModelSpec::default()
    };
    let model = mgrun_models::build(&spec, Device::Cpu, 0).expect("building small_cnn");
    model.store().set_flat(&mean.to_kind(Kind::Float)).expect("the mean's layout");
    let swad_model = read_tensors(&one.join("model_swad.safetensors")).expect("model_swad.safetensors");
    let final_model = read_tensors(&one.join("model.safetensors")).expect("model.safetensors");
    let mut compared = 0;
    for param in model.store().params() {
        let expected: Vec<f64> =
            Vec::<f64>::try_from(param.tensor.to_kind(Kind::Double).reshape([-1])).expect("a parameter");
        let got = &swad_model[&param.name];
        // 3 segments of 4 running-mean updates in f32.
        let scale = expected.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&expected).fold(0f64, |m, (g, e)| m.max((g - e).abs()));
        assert!(worst <= 2.0 * 7.0 * f32::EPSILON as f64 * scale, "{}: off the mean by {worst:e}", param.name);
        assert!(got != &final_model[&param.name], "{}: the SWAD model is the final iterate", param.name);
        compared += 1;
    }
    assert!(compared > 0);

    // Deterministic mode: 2 ranks give the same bits, and so does a run resumed mid-segment.
    let (two, _) = run_job(dir.path(), &cfg, "w2", 2, &[]);
    assert!(read_tensors(&two.join("model_swad.safetensors")).expect("w2's SWAD model") == swad_model, "1 vs 2 ranks");
    let checkpoint = one.join("checkpoints").join("step6");
    let (resumed, log) = run_job(dir.path(), &cfg, "resumed", 2, &["--resume", checkpoint.to_str().expect("utf-8")]);
    assert!(log.contains("resuming from"), "{log}");
    let resumed_model = read_tensors(&resumed.join("model_swad.safetensors")).expect("the resumed SWAD model");
    assert!(resumed_model == swad_model, "resumed at step 6 on 2 ranks: the SWAD model differs");
    eprintln!("tiny SWAD runs took {:.1} s", started.elapsed().as_secs_f64());
}
