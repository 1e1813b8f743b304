//! Signals to the launcher and killed or stopped ranks: the job ends quickly, with the signal's exit
//! code or a message naming the rank, leaves no process behind, and what it committed can be resumed.

use crate::harness::{assert_no_leftovers, describe, finish, invoke, spawn, Invocation, LIMIT};
use mgrun_tests::{child_pids, process_env, read_jsonl, synthetic_dataset, write_tiny_job};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// A job that runs until stopped (a million steps), with a checkpoint every 5 steps.
fn endless_job(dir: &Path, extra: &str) -> PathBuf {
    let root = synthetic_dataset(dir, 4, 16);
    let tables = format!("\n[checkpoint]\nevery_steps = 5\n{extra}");
    write_tiny_job(&dir.join("job.toml"), &root, 1_000_000, 0, &tables)
}

fn start(dir: &Path, ranks: &str, cfg: &Path, extra: &[&str]) -> (Child, PathBuf, Instant) {
    let out = dir.join("run");
    let log = dir.join("job.log");
    let args = [&["--cpus", ranks, "--out", out.to_str().unwrap()][..], extra, &[cfg.to_str().unwrap()]].concat();
    let started = Instant::now();
    (spawn(&args, dir, &log), log, started)
}

/// Waits until the run has recorded `steps` steps.
fn wait_for_steps(child: &mut Child, out: &Path, steps: usize) {
    let deadline = Instant::now() + LIMIT;
    while read_jsonl(&out.join("steps.jsonl")).map_or(0, |r| r.len()) < steps {
        assert!(Instant::now() < deadline, "training did not get under way");
        assert!(child.try_wait().unwrap().is_none(), "mgrun exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn rank_pid(launcher: &Child, rank: usize) -> u32 {
    child_pids(launcher.id())
        .into_iter()
        .find(|&pid| process_env(pid, "RANK").as_deref() == Some(&rank.to_string()))
        .unwrap_or_else(|| panic!("no process of rank {rank}"))
}

fn send(pid: u32, signal: i32) -> Instant {
    unsafe { libc::kill(pid as i32, signal) };
    Instant::now()
}

fn ended_after(child: Child, signalled: Instant, log: &Path) -> Invocation {
    let mut ended = finish(child, signalled, log, LIMIT);
    ended.seconds = signalled.elapsed().as_secs_f64();
    ended
}

#[test]
fn sigkill_of_one_rank_stops_the_job_within_10s_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = endless_job(dir.path(), "");
    let (mut child, log, _) = start(dir.path(), "3", &cfg, &[]);
    wait_for_steps(&mut child, &dir.path().join("run"), 3);
    let killed = send(rank_pid(&child, 1), libc::SIGKILL);
    let ended = ended_after(child, killed, &log);
    assert_eq!(ended.status.code(), Some(1), "{}", describe(&ended.status));
    ended.assert_within(10.0);
    ended.assert_says(&["Root Cause", "rank 1", "SIGKILL"]);
    assert_no_leftovers(dir.path());
}

/// A stopped rank (SIGSTOP, as a debugger or a frozen node would leave it) is found by the others'
/// timeout and named as the root cause (it was rank 0, which noticed first).
#[test]
fn a_stopped_rank_is_named_as_the_root_cause_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = endless_job(dir.path(), "[comm]\ntimeout_s = 3\n");
    let (mut child, log, _) = start(dir.path(), "3", &cfg, &[]);
    wait_for_steps(&mut child, &dir.path().join("run"), 3);
    let stopped = send(rank_pid(&child, 1), libc::SIGSTOP);
    let ended = ended_after(child, stopped, &log);
    assert_eq!(ended.status.code(), Some(1), "{}", describe(&ended.status));
    // The timeout, half a second to agree on the culprit, teardown.
    ended.assert_within(3.0 + 10.0);
    ended.assert_says(&["Root Cause: rank 1 stopped making progress", "no progress from rank 1"]);
    assert_no_leftovers(dir.path());
}

/// SIGINT and SIGTERM to the launcher, while the ranks start and while they train: the job stops within
/// seconds with 128 + the signal, and a mid-run stop leaves whole checkpoints that `--resume auto`
/// continues from.
#[test]
fn sigint_and_sigterm_to_the_launcher_stop_the_job_cleanly_at_any_time() {
    for (signal, name, after_steps) in
        [(libc::SIGTERM, "SIGTERM", 0), (libc::SIGINT, "SIGINT", 0), (libc::SIGTERM, "SIGTERM", 12)]
    {
        let dir = tempfile::tempdir().unwrap();
        let cfg = endless_job(dir.path(), "");
        let (mut child, log, _) = start(dir.path(), "2", &cfg, &[]);
        let out = dir.path().join("run");
        if after_steps > 0 {
            wait_for_steps(&mut child, &out, after_steps);
        } else {
            // Start-up: the launcher has started its ranks, which are still loading.
            let deadline = Instant::now() + Duration::from_secs(30);
            while child_pids(child.id()).len() < 2 {
                assert!(Instant::now() < deadline, "the ranks never started");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let signalled = send(child.id(), signal);
        let ended = ended_after(child, signalled, &log);
        assert_eq!(ended.status.code(), Some(128 + signal), "{name} after {after_steps} steps: {}", ended.log);
        ended.assert_within(10.0);
        ended.assert_says(&[name]);
        assert!(!ended.log.contains("panicked"), "{}", ended.log);
        assert_no_leftovers(dir.path());
        if after_steps > 0 {
            let committed = mgrun_checkpoint::committed_steps(&out.join("checkpoints")).unwrap();
            assert!(!committed.is_empty(), "no checkpoint after {after_steps} steps");
            for (_, path) in &committed {
                mgrun_checkpoint::load(path).unwrap_or_else(|e| panic!("{} is torn: {e:#}", path.display()));
            }
            let (mut resumed, log, _) = start(dir.path(), "2", &cfg, &["--resume", "auto"]);
            let newest = committed.iter().map(|(step, _)| *step).max().unwrap();
            let deadline = Instant::now() + LIMIT;
            while !std::fs::read_to_string(&log).unwrap_or_default().contains("resuming from") {
                assert!(Instant::now() < deadline && resumed.try_wait().unwrap().is_none(), "no resume");
                std::thread::sleep(Duration::from_millis(20));
            }
            let stopped = send(resumed.id(), libc::SIGTERM);
            let ended = ended_after(resumed, stopped, &log);
            ended.assert_says(&[&format!("(step {newest},")]);
            assert_no_leftovers(dir.path());
        }
    }
}

/// A SIGKILLed launcher cannot clean up: its ranks notice and exit on their own, and the run directory
/// is free for `--resume auto` at once.
#[test]
fn ranks_of_a_sigkilled_launcher_exit_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = endless_job(dir.path(), "");
    let (mut child, log, _) = start(dir.path(), "2", &cfg, &[]);
    let out = dir.path().join("run");
    wait_for_steps(&mut child, &out, 12);
    let ranks = child_pids(child.id());
    let killed = send(child.id(), libc::SIGKILL);
    let ended = ended_after(child, killed, &log);
    assert_eq!(ended.status.signal(), Some(libc::SIGKILL));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ranks.iter().any(|pid| Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(*pid)) {
        assert!(Instant::now() < deadline, "ranks outlived their launcher by 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_leftovers(dir.path());
    // The lock died with the launcher: the run continues at once, from its newest checkpoint.
    let args = ["--cpus", "2", "--out", out.to_str().unwrap(), "--resume", "auto", "--set", "train.steps=20"];
    let resumed = invoke(&[&args[..], &["--extend", cfg.to_str().unwrap()]].concat(), dir.path(), LIMIT);
    assert!(resumed.ok(), "{}", resumed.log);
    resumed.assert_says(&["resuming from"]);
    assert_eq!(read_jsonl(&out.join("steps.jsonl")).unwrap().len(), 20, "steps lost or repeated");
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
}
