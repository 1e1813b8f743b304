//! Crash safety: the launcher and its ranks are SIGKILLed at pseudo-random instants, during
//! training and during checkpoint writes (a checkpoint every step), then resumed with
//! `--resume auto` on 2 or 3 ranks in turn, many times over. After every kill each committed
//! checkpoint verifies, every resume names the checkpoint it continues from and never meets a torn
//! one, and the final parameters and per-step losses equal the uninterrupted run's, bit for bit.

use mgrun_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const STEPS: u64 = 150;
const KILLS: usize = 14;

fn config(dir: &Path, data_root: &Path) -> PathBuf {
    // Evaluation only at the end; a checkpoint every step so that kills land in checkpoint writes.
    let job =
        CheckpointedJob { eval_every: 1000, method: "dsp_reg", method_tables: "", checkpoint_every: 1, keep_last: 2 };
    write_tiny_job(&dir.join("kill.toml"), data_root, STEPS as usize, 11, &job.tables())
}

/// A small deterministic generator for the kill instants (xorshift64*).
struct Instants(u64);
impl Instants {
    fn next_ms(&mut self, lo: u64, hi: u64) -> u64 {
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

#[test]
fn sigkill_at_random_instants_then_resume_equals_the_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 4, 16);
    let cfg = config(dir.path(), &root);
    let reference = dir.path().join("reference");
    let out = run_mgrun(&["--cpus", "2", "--out", reference.to_str().unwrap(), cfg.to_str().unwrap()], dir.path());
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));

    let run = dir.path().join("killed");
    let mut instants = Instants(0x9E37_79B9_7F4A_7C15);
    let mut kills = 0;
    let mut resumed_from = Vec::new();
    let started = Instant::now();
    for attempt in 0.. {
        assert!(attempt < KILLS + 20, "the job never finished");
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
        let finished = if kills < KILLS {
            // Kill after a pseudo-random amount of *progress* (not time, which depends on the
            // machine), then a pseudo-random few milliseconds so that kills land in every phase of a
            // step, checkpoint writes included.
            let target = last_step(&run) + instants.next_ms(2, 12) as i64;
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut status = None;
            while last_step(&run) < target {
                if let Some(s) = child.try_wait().unwrap() {
                    status = Some(s);
                    break;
                }
                assert!(Instant::now() < deadline, "attempt {attempt} made no progress");
                std::thread::sleep(Duration::from_millis(2));
            }
            if status.is_none() {
                std::thread::sleep(Duration::from_millis(instants.next_ms(0, 15)));
                status = child.try_wait().unwrap();
            }
            match status {
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
                    // Let the orphaned ranks' deaths land before looking at the files.
                    std::thread::sleep(Duration::from_millis(100));
                    None
                }
            }
        } else {
            Some(child.wait().unwrap())
        };
        let log = std::fs::read_to_string(&log_path).unwrap();
        assert!(!log.contains("skipping invalid checkpoint"), "attempt {attempt} met a torn checkpoint:\n{log}");
        if let Some(line) = log.lines().find(|l| l.contains("resuming from")) {
            resumed_from.push(line.to_string());
        }
        // Whatever instant the kill hit, every committed checkpoint is whole.
        for (step, path) in mgrun_checkpoint::committed_steps(&run.join("checkpoints")).unwrap() {
            let loaded = mgrun_checkpoint::load(&path)
                .unwrap_or_else(|e| panic!("after attempt {attempt}: {} is torn: {e:#}", path.display()));
            assert_eq!(loaded.meta.step, step);
        }
        if let Some(status) = finished {
            assert!(status.success(), "attempt {attempt} failed:\n{log}");
            break;
        }
    }
    eprintln!(
        "{kills} kills, {} resumes from a checkpoint, {:.1} s: {resumed_from:#?}",
        resumed_from.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(resumed_from.len() >= KILLS / 2, "too few kills landed after a checkpoint: {resumed_from:?}");

    let steps = read_jsonl(&run.join("steps.jsonl")).unwrap();
    let reference_steps = read_jsonl(&reference.join("steps.jsonl")).unwrap();
    let indices: Vec<u64> = steps.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(indices, (0..STEPS).collect::<Vec<_>>(), "steps.jsonl must hold every step once, in order");
    // Deterministic mode: the resumed run is the uninterrupted one, bit for bit.
    for (a, b) in steps.iter().zip(&reference_steps) {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert_eq!(a, b, "step loss vs the uninterrupted run");
    }
    let params = read_tensors(&run.join("model.safetensors")).unwrap();
    for (name, reference) in read_tensors(&reference.join("model.safetensors")).unwrap() {
        let d = rel_diff(&params[&name], &reference);
        assert!(params[&name] == reference, "parameter {name} differs from the uninterrupted run by {d:e}");
    }
}
