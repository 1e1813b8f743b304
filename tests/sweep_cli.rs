//! `mgrun sweep` end to end on a tiny synthetic tree:
//! - `--run`: every run finishes with a `done` marker, results.jsonl carries the sweep's DomainBed
//!   args and drawn hyperparameters, a second `--run` skips everything, and `mgrun collect` reads
//!   the tree;
//! - `--slurm`: the array script, run by bash as Slurm would (array task variables, a stand-in
//!   `scontrol`), passes SIGUSR1 on to mgrun, which checkpoints, requeues the task and exits 75 with
//!   no `done` marker; the requeued task resumes from the checkpoint and marks the run done; a task
//!   whose run is done exits 0 at once;
//! - `--estimate`: the runs per test domain and hours from a measured step time, consistent with
//!   train.steps, and nothing written.

use mgrun_tests::{run_mgrun, steps_recorded, synthetic_dataset, text, write_tiny_job};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sweep(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["sweep", "tiny.toml", "--algorithms", "erm", "--n-hparams-from", "1", "--n-hparams", "2"];
    args.extend(["--n-trials", "1", "--out", "sw"]);
    args.extend(extra);
    let out = run_mgrun(&args, dir);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "mgrun sweep failed:\n{all}");
    all
}

#[test]
fn sweep_runs_records_and_collects() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    tiny_job(dir, 2, "\n[eval]\nevery_steps = 1\nbatch_size = 256\n");

    let first = sweep(dir, &["--run"]);
    assert!(first.contains("ran 4, skipped 0 already done, 0 failed"), "{first}");
    let sweep_dir = dir.join("sw");
    // Every command resumes: a run with no checkpoint starts at step 0.
    let commands = std::fs::read_to_string(sweep_dir.join("commands.txt")).unwrap();
    assert_eq!(commands.lines().filter(|l| l.contains(" --resume auto --out ")).count(), 4, "{commands}");
    for test_env in 0..4 {
        let run = sweep_dir.join(format!("erm-test{test_env}-hp01-trial0"));
        assert!(run.join("done").is_file(), "{} has no done marker", run.display());
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("run.json")).unwrap()).unwrap();
        let records = mgrun_tests::read_jsonl(&run.join("results.jsonl")).unwrap();
        assert_eq!(records.len(), 2, "evaluations at step 0 and the last step");
        let last = records.last().unwrap();
        for key in ["dataset", "algorithm", "test_envs", "hparams_seed", "trial_seed", "seed"] {
            assert_eq!(last["args"][key], manifest["args"][key], "args.{key} in {}", run.display());
        }
        assert_eq!(last["args"]["test_envs"], serde_json::json!([test_env]));
        for key in ["lr", "batch_size", "resnet_dropout", "weight_decay"] {
            assert_eq!(last["hparams"][key], manifest["hparams"][key], "hparams.{key} in {}", run.display());
        }
        assert!(last["env3_in_acc"].is_number() && last["env3_out_acc"].is_number(), "{last}");
    }

    let second = sweep(dir, &["--run"]);
    assert!(second.contains("ran 0, skipped 4 already done"), "{second}");

    let script = dir.join("sweep.sbatch");
    let third = sweep(dir, &["--slurm", script.to_str().unwrap()]);
    assert!(third.contains("4 done"), "{third}");
    let body = std::fs::read_to_string(&script).unwrap();
    assert!(body.contains("#SBATCH --array=0-3"), "{body}");
    let task = std::process::Command::new("bash").arg(&script).env("SLURM_ARRAY_TASK_ID", "2").output().unwrap();
    assert!(task.status.success(), "{}", text(&task.stderr));
    assert!(text(&task.stdout).contains("erm-test2-hp01-trial0 is done"), "{}", text(&task.stdout));

    let collected = run_mgrun(&["collect", "sw"], dir);
    let table = text(&collected.stdout);
    assert!(collected.status.success(), "{table}{}", text(&collected.stderr));
    assert!(table.contains("### Dataset: synthetic") && table.contains("| ERM |"), "{table}");
    assert!(sweep_dir.join("results.md").is_file());
}

/// `bash SCRIPT` as Slurm would start array task `task` of array job 5000 (job id 5000 + 1 + task) on
/// one node, with `bin` (a stand-in `scontrol`) first on PATH.
fn array_task(script: &Path, task: usize, bin: &Path, restart_count: usize) -> Command {
    let mut command = Command::new("bash");
    command.arg(script).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SLURM_") {
            command.env_remove(name);
        }
    }
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    command
        .env("PATH", path)
        .env("SLURM_JOB_ID", (5001 + task).to_string())
        .env("SLURM_ARRAY_JOB_ID", "5000")
        .env("SLURM_ARRAY_TASK_ID", task.to_string())
        .env("SLURM_JOB_NODELIST", "localhost")
        .env("SLURM_JOB_NUM_NODES", "1")
        .env("SLURM_RESTART_COUNT", restart_count.to_string());
    command
}

fn output_text(output: &std::process::Output) -> String {
    format!("{}{}", text(&output.stdout), text(&output.stderr))
}

#[test]
fn slurm_array_task_is_preempted_requeued_resumed_and_marked_done_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Runs that take a few seconds: no evaluation but the first and last.
    tiny_job(dir, 400, "\n[eval]\nevery_steps = 1000\nbatch_size = 256\n");
    let script = dir.join("sweep.sbatch");
    let mut args = vec!["sweep", "tiny.toml", "--algorithms", "erm", "--n-hparams-from", "0", "--n-hparams", "1"];
    args.extend(["--n-trials", "1", "--out", "sw", "--slurm", script.to_str().unwrap(), "--signal-lead-s", "300"]);
    let written = run_mgrun(&args, dir);
    assert!(written.status.success(), "{}", output_text(&written));
    let body = std::fs::read_to_string(&script).unwrap();
    for directive in ["#SBATCH --array=0-3", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"] {
        assert!(body.contains(directive), "missing {directive} in\n{body}");
    }
    let run = dir.join("sw").join("erm-test1-hp00-trial0");

    // A stand-in for Slurm's scontrol that records what it was asked.
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let asked = dir.join("scontrol.args");
    std::fs::write(bin.join("scontrol"), format!("#!/bin/sh\necho \"$@\" >> {}\n", asked.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("scontrol"), std::fs::Permissions::from_mode(0o755)).unwrap();

    // Task 1 runs its run until the time-limit notice: Slurm signals the batch shell (`B:`) only.
    let task = array_task(&script, 1, &bin, 0).spawn().unwrap();
    let started = Instant::now();
    while steps_recorded(&run) < 3 {
        assert!(started.elapsed() < Duration::from_secs(120), "the run never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) of our child.
    unsafe {
        libc::kill(task.id() as i32, libc::SIGUSR1);
    }
    let preempted = task.wait_with_output().unwrap();
    let said = output_text(&preempted);
    assert_eq!(preempted.status.code(), Some(75), "the preempted task exits 75:\n{said}");
    assert!(said.contains("received SIGUSR1"), "{said}");
    assert!(said.contains("requeued Slurm job 5000_1"), "{said}");
    assert_eq!(std::fs::read_to_string(&asked).unwrap(), "requeue 5000_1\n", "mgrun requeues, the script does not");
    assert!(!run.join("done").exists(), "a preempted run is not done");
    let stopped_at = steps_recorded(&run);
    assert!(stopped_at < 400, "the run finished before the signal ({stopped_at} steps)");
    assert!(run.join("checkpoints").join("latest").exists(), "no checkpoint after the preemption");

    // The requeued task: the same script; the run resumes from the checkpoint and is marked done.
    let resumed = array_task(&script, 1, &bin, 1).output().unwrap();
    let said = output_text(&resumed);
    assert!(resumed.status.success(), "{said}");
    assert!(said.contains("resuming from"), "{said}");
    assert!(run.join("done").is_file(), "{said}");
    let records = mgrun_tests::read_jsonl(&run.join("results.jsonl")).unwrap();
    assert_eq!(records.last().unwrap()["step"], serde_json::json!(399), "{said}");
    assert_eq!(std::fs::read_to_string(&asked).unwrap().lines().count(), 1, "a finished run requeues nothing");

    // Requeued again after its run finished: exits 0 and runs nothing.
    let again = array_task(&script, 1, &bin, 2).output().unwrap();
    assert!(again.status.success() && output_text(&again).contains("is done"), "{}", output_text(&again));
    assert!(!output_text(&again).contains("mgrun:"), "{}", output_text(&again));
    // The other runs were never started.
    assert!(!dir.join("sw").join("erm-test0-hp00-trial0").join("done").exists());
}

/// One parsed row of the estimate's table (one algorithm per sweep, so one value a cell).
#[derive(Debug)]
struct EstimateRow {
    test: String,
    runs: usize,
    steps: u64,
    step_s: f64,
    eval_s: f64,
    hours_per_run: f64,
    hours: f64,
}

/// Runs `mgrun sweep --estimate` and returns its output, its rows and its total.
fn estimate(dir: &Path, config: &Path, algorithms: &str, extra: &[&str]) -> (String, Vec<Vec<String>>, f64) {
    let mut args = vec!["sweep", config.to_str().unwrap(), "--algorithms", algorithms, "--n-hparams-from", "1"];
    args.extend(["--n-hparams", "3", "--n-trials", "2", "--out", "sw", "--estimate"]);
    args.extend(extra);
    let started = Instant::now();
    let out = run_mgrun(&args, dir);
    let said = output_text(&out);
    assert!(out.status.success(), "mgrun sweep --estimate failed:\n{said}");
    eprintln!("--estimate took {:.1} s:\n{said}", started.elapsed().as_secs_f64());
    let cells =
        |line: &str| -> Vec<String> { line.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect() };
    let mut rows: Vec<Vec<String>> =
        said.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| test domain(s)")).map(cells).collect();
    let total_row = rows.pop().expect("no table");
    assert_eq!(total_row[0], "total", "{said}");
    let total: f64 = total_row[6].parse().unwrap();
    (said, rows, total)
}

fn parse_row(cells: &[String]) -> EstimateRow {
    let number = |i: usize| -> f64 { cells[i].parse().unwrap_or_else(|_| panic!("cell {i} of {cells:?}")) };
    EstimateRow {
        test: cells[0].clone(),
        runs: cells[1].parse().unwrap(),
        steps: cells[2].parse().unwrap(),
        step_s: number(3),
        eval_s: number(4),
        hours_per_run: number(5),
        hours: number(6),
    }
}

/// `a` and `b` agree to the four significant digits the table prints.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 2e-3 * a.abs().max(b.abs()) + 1e-12
}

fn tiny_job(dir: &Path, steps: usize, rest: &str) -> PathBuf {
    let data = dir.join("synthetic");
    if !data.exists() {
        synthetic_dataset(dir, 4, 16);
    }
    write_tiny_job(&dir.join("tiny.toml"), &data, steps, 3, rest)
}

#[test]
fn estimate_counts_runs_per_test_domain_measures_hours_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = tiny_job(dir, 50, "");
    let (said, rows, total) = estimate(dir, &config, "erm,sam", &[]);
    // 2 hparams seeds (1..3) x 2 trials x 2 algorithms per test domain, 4 domains.
    let per_test_domain = 2 * 2 * 2;
    assert_eq!(rows.len(), 4, "{said}");
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["noisy", "photo", "rotated", "sketch"], "{said}");
    let mut sum = 0.0;
    for row in &rows {
        assert_eq!(row[1], per_test_domain.to_string(), "{said}");
        assert_eq!(row[2], "50", "{said}");
        // Two algorithms: their own step times, e.g. `erm 0.01234, sam 0.02468` (or one number if equal).
        let hours: f64 = row[6].parse().unwrap();
        assert!(hours > 0.0, "{said}");
        sum += hours;
    }
    assert_eq!(said.matches("| total | 32 |").count(), 1, "{said}");
    assert!(total > 0.0 && close(total, sum), "the total is the sum of the rows:\n{said}");
    assert!(said.contains("CPU-hours") && said.contains("an estimate"), "{said}");
    assert!(said.contains("measured on the CPU ("), "{said}");
    assert!(!dir.join("sw").exists(), "--estimate wrote the sweep directory");
}

#[test]
fn estimate_hours_are_runs_x_steps_x_the_measured_step_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let every = 10u64;
    for steps in [40u64, 80] {
        let config = tiny_job(dir, steps as usize, &format!("\n[eval]\nevery_steps = {every}\n"));
        let (said, rows, total) = estimate(dir, &config, "erm", &[]);
        // Evaluations after step 0, every 10 steps and after the last: the trainer's schedule.
        let passes = (0..steps).filter(|s| s % every == 0 || s + 1 == steps).count();
        assert!(said.contains(&format!("eval s/run: {passes} evaluations")), "{said}");
        let mut sum = 0.0;
        for cells in &rows {
            let row = parse_row(cells);
            assert_eq!(row.runs, 2 * 2, "{}: {said}", row.test);
            assert_eq!(row.steps, steps, "{said}");
            assert!(row.step_s > 0.0 && row.eval_s > 0.0, "{said}");
            // One CPU rank: hours per run = (steps x s/step + eval s) / 3600, from the printed times.
            let expected = (steps as f64 * row.step_s + row.eval_s) / 3600.0;
            assert!(close(row.hours_per_run, expected), "{row:?}: expected {expected} h per run\n{said}");
            assert!(close(row.hours, row.runs as f64 * row.hours_per_run), "{row:?}\n{said}");
            sum += row.hours;
        }
        assert!(close(total, sum), "{said}");
        assert!(!dir.join("sw").exists());
    }
}

#[test]
fn estimate_on_gpus_measures_on_gpu_0_or_says_there_is_none() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let config = tiny_job(dir, 20, "");
    let args = ["sweep", config.to_str().unwrap(), "--algorithms", "erm", "--n-hparams", "1", "--n-trials", "1"];
    let mut args = args.to_vec();
    args.extend(["--out", "sw", "--estimate", "--gpus", "2"]);
    let out = run_mgrun(&args, dir);
    let said = output_text(&out);
    if out.status.success() {
        assert!(said.contains("GPU-hours") && said.contains("measured on GPU 0 ("), "{said}");
        assert!(said.contains("2 GPU(s) per run"), "{said}");
    } else {
        assert!(
            said.contains("--estimate --gpus 2: the estimate measures a training step on GPU 0, but no GPU"),
            "{said}"
        );
        assert!(said.contains("--cpus N"), "{said}");
    }
    assert!(!dir.join("sw").exists());
}
