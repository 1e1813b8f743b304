//! Run directories and resuming: one run per directory, a finished run is never overwritten by
//! accident, `--resume auto` continues this run and no other, and a failed final write loses nothing.

use crate::harness::{assert_no_leftovers, finish, invoke, spawn, Files, LIMIT};
use mgrun_tests::{read_jsonl, synthetic_dataset, write_tiny_job};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A finished 6-step run with a checkpoint every 2 steps (all kept): the dataset root, the config
/// and the run directory.
pub struct CheckpointedRun {
    pub root: PathBuf,
    pub cfg: String,
    pub out: PathBuf,
}

pub fn checkpointed_run(dir: &Path) -> CheckpointedRun {
    let root = synthetic_dataset(dir, 6, 16);
    let checkpoints = "\n[checkpoint]\nevery_steps = 2\nkeep_last = 0\n";
    let cfg = write_tiny_job(&dir.join("job.toml"), &root, 6, 0, checkpoints).to_str().unwrap().to_string();
    let out = dir.join("run");
    let run = invoke(&["--cpus", "1", "--out", out.to_str().unwrap(), &cfg], dir, LIMIT);
    assert!(run.ok(), "{}", run.log);
    CheckpointedRun { root, cfg, out }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `--resume auto` resumes this run's checkpoint (the one `latest` names), never another run's; a
/// changed identity is refused by key; train.steps changes only with --extend; a finished run is not
/// "resumed" into a 0-step success that overwrites its model.
#[test]
fn resume_follows_latest_and_refuses_another_runs_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { root, cfg, out } = checkpointed_run(dir.path());
    let (cfg, out_arg) = (cfg.as_str(), out.to_str().unwrap());
    let finished = Files::of(&out);

    // A finished run: nothing to train, an error, and nothing of the run changes.
    let resume = ["--cpus", "1", "--out", out_arg, "--resume", "auto"];
    let refused = invoke(&[&resume[..], &[cfg]].concat(), dir.path(), LIMIT);
    refused.assert_refused(&["nothing left to train", "--extend"], 60.0);
    finished.assert_kept(&["logs/", "config.resolved.toml", ".mgrun.lock"]);

    // Another run's checkpoint (more steps) lands in this run's checkpoint root, past `latest`.
    let other = dir.path().join("other");
    let more = ["--set", "train.steps=10"];
    let run =
        invoke(&[&["--cpus", "1", "--out", other.to_str().unwrap()][..], &more, &[cfg]].concat(), dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    copy_dir(&other.join("checkpoints/step10"), &out.join("checkpoints/step10"));

    // More steps without --extend: refused, naming the key and the flag.
    let refused = invoke(&[&resume[..], &more, &[cfg]].concat(), dir.path(), LIMIT);
    refused.assert_refused(&["train.steps: 6 -> 10", "--extend"], 60.0);

    // Another dataset root: refused by key.
    let moved = dir.path().join("moved");
    copy_dir(&root, &moved);
    let root_set = format!("data.root={}", moved.display());
    invoke(&[&resume[..], &["--set", &root_set, cfg]].concat(), dir.path(), LIMIT).assert_refused(&["data.root"], 60.0);
    finished.assert_kept(&["logs/", "config.resolved.toml", ".mgrun.lock"]);

    // With --extend this run continues from its own step6 (latest), not the other run's step10.
    let run = invoke(&[&resume[..], &more, &["--extend", cfg]].concat(), dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    run.assert_says(&["newer than latest", "not this run's", "step6 (step 6", "--extend: train.steps: 6 -> 10"]);
    let steps = read_jsonl(&out.join("steps.jsonl")).unwrap();
    assert_eq!(steps.len(), 10, "the extended run records steps 0-9");
    assert_no_leftovers(dir.path());
}

/// A run stopped between committing a checkpoint directory and moving `latest` resumes from that
/// newest commit: it has the run's config fingerprint.
#[test]
fn a_commit_newer_than_latest_from_the_same_run_is_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { cfg, out, .. } = checkpointed_run(dir.path());
    std::fs::write(out.join("checkpoints/latest"), "step4\n").unwrap();
    let args =
        ["--cpus", "1", "--out", out.to_str().unwrap(), "--resume", "auto", "--set", "train.steps=8", "--extend"];
    let run = invoke(&[&args[..], &[cfg.as_str()]].concat(), dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    run.assert_says(&["step6 (step 6"]);
    assert!(!run.log.contains("skipping"), "{}", run.log);
}

/// A dataset whose classes changed since the checkpoint says so on resume (it said only "parameter
/// buffer has [94086] elements, got [94021]").
#[test]
fn a_changed_class_count_on_resume_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let CheckpointedRun { root, cfg, out } = checkpointed_run(dir.path());
    // As if stopped after step 4; then a class appears in every domain.
    std::fs::remove_dir_all(out.join("checkpoints/step6")).unwrap();
    std::fs::write(out.join("checkpoints/latest"), "step4\n").unwrap();
    for domain in std::fs::read_dir(&root).unwrap().flatten().filter(|e| e.path().is_dir()) {
        let class = std::fs::read_dir(domain.path()).unwrap().flatten().next().unwrap().path();
        copy_dir(&class, &domain.path().join("zz_new_class"));
    }
    let checkpoints = Files::of(&out.join("checkpoints"));
    let args = ["--cpus", "1", "--out", out.to_str().unwrap(), "--resume", "auto", &cfg];
    invoke(&args, dir.path(), LIMIT).assert_refused(&["classes changed", "parameters"], 60.0);
    checkpoints.assert_kept(&[]);
    assert_no_leftovers(dir.path());
}

/// A run directory holds one run. Re-running into a finished run is refused (its files untouched)
/// unless --overwrite replaces it, and a second job on a running job's --out fails at once, naming the
/// first, without touching its files.
#[test]
fn a_run_directory_is_locked_and_a_finished_run_is_not_overwritten_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 3, 0, "");
    let (cfg, out) = (cfg.to_str().unwrap(), dir.path().join("run"));
    let out_arg = out.to_str().unwrap();
    let run = invoke(&["--cpus", "1", "--out", out_arg, cfg], dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    let finished = Files::of(&out);

    let refused = invoke(&["--cpus", "1", "--out", out_arg, "--set", "train.seed=1", cfg], dir.path(), LIMIT);
    refused.assert_refused(&["a finished run", "--overwrite", "--resume"], 20.0);
    finished.assert_kept(&[".mgrun.lock"]);

    let run =
        invoke(&["--cpus", "1", "--out", out_arg, "--overwrite", "--set", "train.seed=1", cfg], dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    run.assert_says(&["--overwrite: removed"]);
    assert!(
        finished.read(&out.join("results.jsonl")) != std::fs::read(out.join("results.jsonl")).ok().as_ref(),
        "--overwrite kept the old results"
    );

    // A long job holds the directory; a second one fails fast and names it.
    let long = dir.path().join("long");
    let started = Instant::now();
    let log = dir.path().join("long.log");
    let first =
        spawn(&["--cpus", "1", "--out", long.to_str().unwrap(), "--set", "train.steps=400", cfg], dir.path(), &log);
    let lock = long.join(".mgrun.lock");
    while std::fs::read_to_string(&lock).map_or(true, |t| t.is_empty()) {
        assert!(started.elapsed().as_secs() < 30, "the first job never took its lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = invoke(&["--cpus", "1", "--out", long.to_str().unwrap(), "--resume", "auto", cfg], dir.path(), LIMIT);
    second.assert_refused(&["another mgrun job is running there", &format!("pid {}", first.id())], 10.0);
    let first = finish(first, started, &log, LIMIT);
    assert!(first.ok(), "the first job failed:\n{}", first.log);
    assert_eq!(read_jsonl(&long.join("steps.jsonl")).unwrap().len(), 400, "the first job's records are incomplete");
    assert_no_leftovers(dir.path());
}

/// The final model cannot be written (a directory in its place, as good as an unwritable file for any
/// user, root included): the error names the file and the operation in the operating system's words,
/// and says what is kept and what to do; doing it writes the model from the last checkpoint.
#[test]
fn a_failed_final_write_names_the_file_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = synthetic_dataset(dir.path(), 6, 16);
    let checkpoints = "\n[checkpoint]\nevery_steps = 20\n";
    let cfg = write_tiny_job(&dir.path().join("job.toml"), &root, 40, 0, checkpoints);
    let out = dir.path().join("run");
    let blocker = out.join(mgrun_trainer::MODEL_FILE);
    let args = ["--cpus", "2", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()];
    let log = dir.path().join("blocked.log");
    let started = Instant::now();
    let child = spawn(&args, dir.path(), &log);
    while read_jsonl(&out.join("steps.jsonl")).map_or(0, |r| r.len()) == 0 {
        assert!(started.elapsed() < LIMIT, "the run never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let failed = finish(child, started, &log, LIMIT);
    failed.assert_refused(&["saving the trained model after step 40", "model.safetensors", "Is a directory"], 100.0);
    failed.assert_says(&["--resume auto"]);
    assert_no_leftovers(dir.path());
    assert_eq!(read_jsonl(&out.join("steps.jsonl")).unwrap().len(), 40, "steps were lost");

    std::fs::remove_dir_all(&blocker).unwrap();
    let resume = ["--cpus", "2", "--out", out.to_str().unwrap(), "--resume", "auto", cfg.to_str().unwrap()];
    let run = invoke(&resume, dir.path(), LIMIT);
    assert!(run.ok(), "{}", run.log);
    run.assert_says(&["the run finished at step 40 but its model.safetensors is missing", "the model of step 40"]);
    assert!(blocker.is_file(), "no model after the resume");
    assert_eq!(read_jsonl(&out.join("steps.jsonl")).unwrap().len(), 40, "the records changed");
}
