//! A bounded random kill campaign: the launcher and its ranks are SIGKILLed together at pseudo-random
//! instants aimed at the three phases where a kill can do harm (a checkpoint write, a resume loading
//! its checkpoint, an evaluation), then the run is resumed with `--resume auto` on 2 or 3 ranks in
//! turn. It counts torn checkpoints (a committed checkpoint that does not load) and wrong resumes (a
//! resume from anything but the newest whole checkpoint); the target is zero of each, and the finished
//! run must equal the uninterrupted one bit for bit, records and evaluations included.
//!
//! 50 kills in `make test`; `MGRUN_FAULT_KILLS=500` (or any number) for a longer campaign.

use crate::harness::{assert_no_leftovers, describe, invoke, LIMIT};
use mgrun_checkpoint::Resume;
use mgrun_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const EVAL_EVERY: u64 = 4;
/// Steps per kill wanted: an attempt killed after progress trains 2-15 steps (an evaluation kill up to
/// 3 more), one killed while resuming none; 12 per kill makes the run outlast the campaign.
const STEPS_PER_KILL: u64 = 12;

/// A small deterministic generator for the kill instants (xorshift64*).
struct Instants(u64);
impl Instants {
    fn next(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        lo + self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % (hi - lo)
    }
}

/// The highest step recorded in the run's steps.jsonl so far (-1 before any).
fn last_step(run: &Path) -> i64 {
    std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["step"].as_i64())
        .max()
        .unwrap_or(-1)
}

fn kill(pid: u32) {
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// A checkpoint is written after every step: a kill after some progress lands in a write or a step.
    CheckpointWrite,
    /// Within the first second of a resumed attempt: start-up, the store, loading the checkpoint.
    Resume,
    /// Right after the step that precedes an evaluation was recorded.
    Evaluation,
}

/// Accuracy columns of results.jsonl (timings differ between runs).
fn accuracies(run: &Path) -> Vec<Vec<(String, f64)>> {
    read_jsonl(&run.join("results.jsonl"))
        .unwrap()
        .iter()
        .map(|record| {
            let fields = record.as_object().unwrap();
            fields.iter().filter(|(k, _)| k.ends_with("_acc")).map(|(k, v)| (k.clone(), v.as_f64().unwrap())).collect()
        })
        .collect()
}

#[test]
fn random_kills_across_writes_resumes_and_evaluations_never_tear_or_misresume() {
    let kills_wanted: usize = std::env::var("MGRUN_FAULT_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let steps = STEPS_PER_KILL * kills_wanted as u64;
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 4, 16);
    let job = CheckpointedJob {
        eval_every: EVAL_EVERY as usize,
        method: "dsp_reg",
        // Anchor: its θ₀ is part of the checkpointed state.
        method_tables: "\n[method.dsp_reg]\nmode = \"anchor\"\n",
        checkpoint_every: 1,
        keep_last: 2,
    };
    let cfg = write_tiny_job(&dir.path().join("kill.toml"), &root, steps as usize, 11, &job.tables());
    let reference = dir.path().join("reference");
    let out = invoke(&["--cpus", "2", "--out", reference.to_str().unwrap(), cfg.to_str().unwrap()], dir.path(), LIMIT);
    assert!(out.ok(), "{}", out.log);

    let run = dir.path().join("killed");
    let checkpoints = run.join("checkpoints");
    let mut instants = Instants(0x9E37_79B9_7F4A_7C15);
    let (mut kills, mut torn, mut wrong_resumes, mut resumes) = (0, 0, 0, 0);
    let mut by_phase = [(Phase::CheckpointWrite, 0), (Phase::Resume, 0), (Phase::Evaluation, 0)];
    let started = Instant::now();
    for attempt in 0.. {
        assert!(attempt < kills_wanted * 2 + 20, "the job never finished");
        // The checkpoint this attempt must resume from: the newest whole one, as it is now.
        let expected = mgrun_checkpoint::resolve_resume(&checkpoints, &Resume::Auto)
            .ok()
            .and_then(|choice| choice.checkpoint)
            .map(|c| c.meta.step);
        let log_path = dir.path().join(format!("attempt{attempt}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        // Every other attempt on 3 ranks: a crashed job may come back on another number of ranks.
        let ranks = if attempt % 2 == 0 { "2" } else { "3" };
        let mut child = Command::new(mgrun_bin())
            .args(["--cpus", ranks, "--out", run.to_str().unwrap(), "--resume", "auto", cfg.to_str().unwrap()])
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let status = if kills < kills_wanted {
            let phase = match (expected.is_some(), instants.next(0, 3)) {
                (true, 0) => Phase::Resume,
                (_, 1) => Phase::Evaluation,
                _ => Phase::CheckpointWrite,
            };
            // Kill after a pseudo-random amount of *progress* (not time, which depends on the machine),
            // then a pseudo-random few milliseconds, so that kills land in every part of the phase.
            let target = match phase {
                Phase::Resume => None,
                Phase::CheckpointWrite => Some(last_step(&run) + instants.next(2, 12) as i64),
                Phase::Evaluation => {
                    let after = last_step(&run) + instants.next(2, 12) as i64;
                    // The step after which an evaluation runs (step + 1 a multiple of EVAL_EVERY).
                    Some(after + (EVAL_EVERY as i64 - 1 - after.rem_euclid(EVAL_EVERY as i64)))
                }
            };
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut status = None;
            match target {
                None => std::thread::sleep(Duration::from_millis(instants.next(0, 1200))),
                Some(target) => {
                    while last_step(&run) < target {
                        if let Some(s) = child.try_wait().unwrap() {
                            status = Some(s);
                            break;
                        }
                        assert!(Instant::now() < deadline, "attempt {attempt} made no progress");
                        // Polling re-reads steps.jsonl: not so often that it competes with the job.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    let jitter = if phase == Phase::Evaluation { instants.next(0, 4) } else { instants.next(0, 15) };
                    std::thread::sleep(Duration::from_millis(jitter));
                }
            }
            match status.or_else(|| child.try_wait().unwrap()) {
                Some(s) => Some(s),
                None => {
                    // The ranks and the launcher, at the same instant.
                    let ranks = child_pids(child.id());
                    kill(child.id());
                    for pid in ranks {
                        kill(pid);
                    }
                    child.wait().unwrap();
                    kills += 1;
                    by_phase.iter_mut().find(|(p, _)| *p == phase).unwrap().1 += 1;
                    assert_no_leftovers(dir.path());
                    None
                }
            }
        } else {
            Some(child.wait().unwrap())
        };
        let log = std::fs::read_to_string(&log_path).unwrap();
        if log.contains("skipping invalid checkpoint") {
            eprintln!("attempt {attempt} met a torn checkpoint:\n{log}");
            torn += 1;
        }
        if let Some(line) = log.lines().find(|l| l.contains("resuming from")) {
            resumes += 1;
            let step = expected.map(|s| format!("(step {s},"));
            if !step.as_ref().is_some_and(|s| line.contains(s.as_str())) {
                eprintln!("attempt {attempt} resumed wrongly (expected step {expected:?}): {line}");
                wrong_resumes += 1;
            }
        }
        // Whatever instant the kill hit, every committed checkpoint is whole.
        for (step, path) in mgrun_checkpoint::committed_steps(&checkpoints).unwrap() {
            match mgrun_checkpoint::load(&path) {
                Ok(loaded) => assert_eq!(loaded.meta.step, step),
                Err(e) => {
                    eprintln!("after attempt {attempt}: {} is torn: {e:#}", path.display());
                    torn += 1;
                }
            }
        }
        // A kill after the last checkpoint and the model were written leaves a finished run, which
        // `--resume auto` refuses to train further.
        let finished = log.contains("nothing left to train") && run.join(mgrun_trainer::MODEL_FILE).exists();
        if let Some(status) = status {
            assert!(status.success() || finished, "attempt {attempt} ended with {}:\n{log}", describe(&status));
            break;
        }
    }
    eprintln!(
        "kill campaign: {kills} kills {by_phase:?}, {resumes} resumes, {torn} torn checkpoints, {wrong_resumes} wrong \
         resumes, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!((torn, wrong_resumes), (0, 0), "torn checkpoints, wrong resumes");
    assert_eq!(kills, kills_wanted, "the run ended before the campaign did");
    assert!(resumes >= kills / 2, "too few kills landed after a checkpoint: {resumes} resumes after {kills} kills");

    let records = read_jsonl(&run.join("steps.jsonl")).unwrap();
    let reference_records = read_jsonl(&reference.join("steps.jsonl")).unwrap();
    let indices: Vec<u64> = records.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(indices, (0..steps).collect::<Vec<_>>(), "steps.jsonl must hold every step once, in order");
    // Deterministic mode: the resumed run is the uninterrupted one, bit for bit.
    for (a, b) in records.iter().zip(&reference_records) {
        assert_eq!(a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap(), "step loss vs the uninterrupted run");
    }
    assert_eq!(accuracies(&run), accuracies(&reference), "evaluations vs the uninterrupted run");
    let params = read_tensors(&run.join("model.safetensors")).unwrap();
    for (name, reference) in read_tensors(&reference.join("model.safetensors")).unwrap() {
        let d = rel_diff(&params[&name], &reference);
        assert!(params[&name] == reference, "parameter {name} differs from the uninterrupted run by {d:e}");
    }
}
