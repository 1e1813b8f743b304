//! Clusters without a cluster: several launchers on one machine as the nodes of a multi-node job
//! (different --node-rank on loopback), restarts after a killed rank, and preemption by SIGUSR1 with a
//! requeue through `scontrol`. Every training run is in deterministic mode, so "the same result" is
//! checked bit for bit against an uninterrupted one-launcher run.

use mgrun_tests::*;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 16;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    listener.local_addr().expect("local address").port()
}

fn mgrun_command(dir: &Path, args: &[String]) -> Command {
    let mut command = Command::new(mgrun_bin());
    command.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Not inside any Slurm job, whatever the test runner's environment is.
    for name in ["SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "SLURM_NNODES", "SLURM_JOB_NODELIST"] {
        command.env_remove(name);
    }
    command
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Waits for a child with a limit, killing it when the limit passes; returns its status and output.
fn finish(mut child: Child, limit: Duration) -> (ExitStatus, String) {
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for mgrun") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait().expect("reaping mgrun");
            let (out, err) = drain(&mut child);
            panic!("mgrun did not finish within {limit:?} ({status}):\n{out}\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = drain(&mut child);
    (status, format!("{out}\n{err}"))
}

fn drain(child: &mut Child) -> (String, String) {
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    (out, err)
}

fn assert_same_run(out_dir: &Path, reference: &(Vec<(u64, f64)>, Params), what: &str) {
    let (losses, params) = run_outputs(out_dir);
    assert_eq!(losses.len(), STEPS, "{what}: steps.jsonl has {} records", losses.len());
    assert_eq!(losses, reference.0, "{what}: per-step losses differ from the uninterrupted run");
    for (name, values) in &params {
        assert!(values == &reference.1[name], "{what}: parameter {name} differs from the uninterrupted run");
    }
}

/// The uninterrupted one-rank run of `cfg`.
fn reference_run(dir: &Path, cfg: &Path) -> (Vec<(u64, f64)>, Params) {
    let out = dir.join("reference");
    let args = strings(&["--cpus", "1", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()]);
    let (status, log) = finish(mgrun_command(dir, &args).spawn().unwrap(), Duration::from_secs(120));
    assert!(status.success(), "reference run failed:\n{log}");
    let reference = run_outputs(&out);
    assert!(reference.0[0].1 != reference.0[STEPS - 1].1, "the loss did not change: equality would prove nothing");
    reference
}

fn node_args(nnodes: usize, node: usize, port: u16, per_node: usize, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = strings(&[
        "--nnodes",
        &nnodes.to_string(),
        "--node-rank",
        &node.to_string(),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port.to_string(),
        "--rdzv-timeout-s",
        "30",
        "--cpus",
        &per_node.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Two launchers as nodes 0 and 1 of one job on loopback, each with `per_node` CPU ranks.
fn start_two_nodes(dir: &Path, port: u16, per_node: usize, out: &Path, extra: &[&str]) -> (Child, Child) {
    let start = |node| mgrun_command(dir, &node_args(2, node, port, per_node, out, extra)).spawn().unwrap();
    (start(0), start(1))
}

fn wait_for_steps(out_dir: &Path, steps: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while steps_recorded(out_dir) < steps {
        assert!(Instant::now() < deadline, "the run did not reach step {steps} within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The rank processes started by a launcher, by global rank.
fn rank_pids(launcher: u32, expected: usize) -> BTreeMap<usize, u32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ranks: BTreeMap<usize, u32> = child_pids(launcher)
            .into_iter()
            .filter_map(|pid| process_env(pid, "RANK").and_then(|r| r.parse().ok()).map(|rank| (rank, pid)))
            .collect();
        if ranks.len() == expected {
            return ranks;
        }
        assert!(Instant::now() < deadline, "launcher {launcher} has ranks {ranks:?}, expected {expected}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_launchers_on_loopback_train_exactly_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 0);
    let reference = reference_run(dir.path(), &cfg);

    // 2 nodes x 2 ranks: global ranks 0..4 across two launchers that meet at node 0's store.
    let out = dir.path().join("two-nodes");
    let port = free_port();
    let cfg_arg = cfg.to_str().unwrap();
    let (node0, node1) = start_two_nodes(dir.path(), port, 2, &out, &[cfg_arg]);
    let (status1, log1) = finish(node1, Duration::from_secs(120));
    let (status0, log0) = finish(node0, Duration::from_secs(120));
    assert!(status0.success() && status1.success(), "node 0:\n{log0}\nnode 1:\n{log1}");
    assert!(log1.contains("node 1") && log1.contains("joined the rendezvous store at 127.0.0.1"), "{log1}");
    assert!(log0.contains("4 cpu rank(s), 2 here as node 0"), "{log0}");
    assert_same_run(&out, &reference, "2 nodes x 2 ranks");
    // The store token never stays behind.
    assert!(!out.join(".mgrun/store-token").exists());
}

#[test]
fn ranks_of_two_nodes_get_torchruns_environment_and_no_token_on_a_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("selftest");
    let port = free_port();
    let selftest = ["selftest", "--run-ms", "1500"];
    let (node0, node1) = start_two_nodes(dir.path(), port, 2, &out, &selftest);
    let launchers = [node0.id(), node1.id()];

    // While the ranks run: the token file is private, and no process shows the token in its arguments.
    let token_file = out.join(".mgrun/store-token");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !token_file.exists() {
        assert!(Instant::now() < deadline, "node 0 wrote no token file");
        std::thread::sleep(Duration::from_millis(10));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the token file must be readable by its owner only");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let mut pids: Vec<u32> = launchers.to_vec();
    for launcher in launchers {
        pids.extend(rank_pids(launcher, 2).values());
    }
    for pid in &pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(token.trim()),
            "pid {pid} has the token on its command line"
        );
    }

    let (status1, log1) = finish(node1, Duration::from_secs(60));
    let (status0, log0) = finish(node0, Duration::from_secs(60));
    assert!(status0.success() && status1.success(), "node 0:\n{log0}\nnode 1:\n{log1}");
    let logs = format!("{log0}\n{log1}");
    for rank in 0..4 {
        let (node, local) = (rank / 2, rank % 2);
        let line = logs
            .lines()
            .find(|l| l.contains("selftest env") && l.contains(&format!(" RANK={rank} ")))
            .unwrap_or_else(|| panic!("no env line of rank {rank}:\n{logs}"));
        for expected in [
            format!("LOCAL_RANK={local}"),
            "WORLD_SIZE=4".to_string(),
            "LOCAL_WORLD_SIZE=2".to_string(),
            format!("GROUP_RANK={node}"),
            "GROUP_WORLD_SIZE=2".to_string(),
            "MASTER_ADDR=127.0.0.1".to_string(),
            format!("MASTER_PORT={port}"),
            "MGRUN_RESTART_COUNT=0".to_string(),
        ] {
            assert!(line.contains(&format!(" {expected} ")), "rank {rank}: {expected} missing in {line}");
        }
    }
}

/// Runs one launcher that must fail quickly; returns its output.
fn fails_quickly(dir: &Path, args: &[String], limit: Duration) -> String {
    let started = Instant::now();
    let (status, log) = finish(mgrun_command(dir, args).spawn().unwrap(), limit + Duration::from_secs(20));
    assert!(!status.success(), "expected a failure:\n{log}");
    assert!(started.elapsed() < limit, "took {:?} (limit {limit:?}):\n{log}", started.elapsed());
    log
}

#[test]
fn bad_rendezvous_input_fails_within_seconds_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bad");
    let selftest = ["selftest", "--run-ms", "0"];
    let port = free_port();

    let log = fails_quickly(dir.path(), &node_args(2, 2, port, 1, &out, &selftest), Duration::from_secs(5));
    assert!(log.contains("--node-rank 2 is out of range for --nnodes 2"), "{log}");

    // Nothing listens on the port: node 1 gives up after --rdzv-timeout-s, naming the address.
    let mut args = node_args(2, 1, port, 1, &out, &selftest);
    args[9] = "2".into(); // --rdzv-timeout-s 2
    let log = fails_quickly(dir.path(), &args, Duration::from_secs(8));
    assert!(log.contains(&format!("127.0.0.1:{port}")) && log.contains("within 2 s"), "{log}");

    let mut args = node_args(2, 1, port, 1, &out, &selftest);
    args[5] = "no-such-host.invalid".into();
    let log = fails_quickly(dir.path(), &args, Duration::from_secs(15));
    assert!(log.contains("cannot resolve the master address no-such-host.invalid"), "{log}");

    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let log = fails_quickly(dir.path(), &node_args(2, 0, taken_port, 1, &out, &selftest), Duration::from_secs(5));
    assert!(log.contains(&format!("port {taken_port}")) && log.contains("in use"), "{log}");

    // Node 0 alone: node 1 never comes.
    let mut args = node_args(2, 0, port, 1, &out, &selftest);
    args[9] = "2".into();
    let log = fails_quickly(dir.path(), &args, Duration::from_secs(8));
    assert!(log.contains("node 1 did not join the rendezvous"), "{log}");

    let log = fails_quickly(
        dir.path(),
        &strings(&["--nnodes", "2", "--master-port", "1", "--cpus", "1", "selftest"]),
        Duration::from_secs(5),
    );
    assert!(log.contains("give --master-addr"), "{log}");
}

#[test]
fn nodes_with_different_configs_are_refused_at_the_rendezvous() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 0);
    let out = dir.path().join("mismatch");
    let port = free_port();
    let cfg_arg = cfg.to_str().unwrap();
    let started = Instant::now();
    let node0 = mgrun_command(dir.path(), &node_args(2, 0, port, 1, &out, &[cfg_arg])).spawn().unwrap();
    let node1 = mgrun_command(dir.path(), &node_args(2, 1, port, 1, &out, &["--set", "train.lr=0.01", cfg_arg]))
        .spawn()
        .unwrap();
    let (status0, log0) = finish(node0, Duration::from_secs(60));
    let (status1, log1) = finish(node1, Duration::from_secs(60));
    assert!(!status0.success() && !status1.success(), "node 0:\n{log0}\nnode 1:\n{log1}");
    for log in [&log0, &log1] {
        assert!(log.contains("node 1") && log.contains("runs another job than node 0"), "{log}");
    }
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    // No rank started: nothing trained.
    assert!(!out.join("steps.jsonl").exists());
}

#[test]
fn a_killed_rank_restarts_every_node_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 4);
    let reference = reference_run(dir.path(), &cfg);

    let out = dir.path().join("restarted");
    let port = free_port();
    let cfg_arg = cfg.to_str().unwrap();
    let extra = ["--max-restarts", "1", cfg_arg];
    let (node0, node1) = start_two_nodes(dir.path(), port, 1, &out, &extra);
    let victim = rank_pids(node1.id(), 1)[&1];
    // After the checkpoint of step 4 and before the end.
    wait_for_steps(&out, 6, Duration::from_secs(60));
    let killed_at = Instant::now();
    // SAFETY: plain kill(2) of a child of our child.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    // Recovery: the restarted ranks write their first step record (the log keeps the steps before).
    let killed_at_step = steps_recorded(&out);
    let (status1, log1) = finish(node1, Duration::from_secs(120));
    let (status0, log0) = finish(node0, Duration::from_secs(120));
    let total = killed_at.elapsed();
    assert!(status0.success() && status1.success(), "node 0:\n{log0}\nnode 1:\n{log1}");
    for log in [&log0, &log1] {
        assert!(log.contains("restarting all 2 rank(s) from the newest checkpoint (restart 1 of 1)"), "{log}");
        assert!(log.contains("finished successfully after 1 restart(s)"), "{log}");
        // The job's failures, the root cause last: rank 1 on node 1, killed.
        let summary = &log[log.find("rank failure(s) in 2 attempt(s), root cause last").expect(log)..];
        let last_failure = summary.lines().rfind(|l| l.contains("attempt 0:")).unwrap();
        assert!(last_failure.contains("root cause: rank 1 (node 1") && last_failure.contains("SIGKILL"), "{summary}");
    }
    assert!(log0.contains("resuming from") || log0.contains("resume"), "{log0}");
    assert_same_run(&out, &reference, "killed at step ~6 and restarted");
    eprintln!("kill at step {killed_at_step}: job finished {:.1} s after the kill", total.as_secs_f64());
}

#[test]
fn sigusr1_checkpoints_requeues_and_the_requeued_job_finishes_the_same() {
    let dir = tempfile::tempdir().unwrap();
    // No periodic checkpoints: the preemption writes its own.
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 0);
    let reference = reference_run(dir.path(), &cfg);

    // A stand-in for Slurm's scontrol that records what it was asked.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let record = dir.path().join("scontrol.args");
    std::fs::write(bin.join("scontrol"), format!("#!/bin/sh\necho \"$@\" > {}\n", record.display())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("scontrol"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let out = dir.path().join("preempted");
    let args = strings(&["--cpus", "2", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()]);
    let mut command = mgrun_command(dir.path(), &args);
    // A one-node Slurm batch job, as far as the launcher can tell.
    command.env("PATH", &path).env("SLURM_JOB_ID", "4242").env("SLURM_JOB_NODELIST", "localhost");
    command.env("SLURM_NNODES", "1").env("SLURM_JOB_NUM_NODES", "1");
    let launcher = command.spawn().unwrap();
    wait_for_steps(&out, 5, Duration::from_secs(60));
    let signalled = Instant::now();
    // SAFETY: plain kill(2) of our child.
    unsafe {
        libc::kill(launcher.id() as i32, libc::SIGUSR1);
    }
    let (status, log) = finish(launcher, Duration::from_secs(60));
    let stop_s = signalled.elapsed().as_secs_f64();
    assert_eq!(status.code(), Some(75), "a preempted job exits 75:\n{log}");
    assert!(log.contains("received SIGUSR1; passing it to 2 rank(s)"), "{log}");
    assert!(log.contains("preempted: stopped after step"), "{log}");
    assert!(log.contains("requeued Slurm job 4242"), "{log}");
    assert_eq!(std::fs::read_to_string(&record).unwrap().trim(), "requeue 4242");
    let stopped_at = steps_recorded(&out);
    assert!(stopped_at < STEPS, "the job ran to the end ({stopped_at} steps): the signal came too late");

    // The requeued job: the same command; Slurm sets SLURM_RESTART_COUNT, and mgrun resumes by itself.
    let resumed_at = Instant::now();
    let mut command = mgrun_command(dir.path(), &args);
    command.env("PATH", &path).env("SLURM_JOB_ID", "4242").env("SLURM_JOB_NODELIST", "localhost");
    command.env("SLURM_NNODES", "1").env("SLURM_RESTART_COUNT", "1");
    let (status, log) = finish(command.spawn().unwrap(), Duration::from_secs(120));
    assert!(status.success(), "{log}");
    assert!(log.contains("SLURM_RESTART_COUNT=1: a requeued job resumes"), "{log}");
    assert!(log.contains(&format!("resuming from step {stopped_at}")) || log.contains("resum"), "{log}");
    assert_same_run(&out, &reference, "preempted and requeued");
    eprintln!(
        "SIGUSR1 at step >= 5: checkpoint written and launcher exited {stop_s:.2} s after the signal (step {stopped_at}); \
         requeued run finished in {:.1} s",
        resumed_at.elapsed().as_secs_f64()
    );
}

#[test]
fn sigterm_during_the_preemption_checkpoint_never_corrupts_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 4);
    let reference = reference_run(dir.path(), &cfg);
    let out = dir.path().join("terminated");
    let args = strings(&["--cpus", "2", "--out", out.to_str().unwrap(), "--resume", "auto", cfg.to_str().unwrap()]);
    // SIGUSR1, then SIGTERM (the scheduler's end of the grace period) 0 to 60 ms later, so that it lands
    // before, during or after the preemption checkpoint; each time the job resumes from what is on disk.
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [0u64, 15, 30, 60].into_iter().enumerate() {
        let launcher = mgrun_command(dir.path(), &args).spawn().unwrap();
        let reached = steps_recorded(&out) + 2;
        if reached >= STEPS {
            finish(launcher, Duration::from_secs(60));
            break;
        }
        wait_for_steps(&out, reached, Duration::from_secs(60));
        // SAFETY: plain kill(2) of our child.
        unsafe {
            libc::kill(launcher.id() as i32, libc::SIGUSR1);
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: as above.
        unsafe {
            libc::kill(launcher.id() as i32, libc::SIGTERM);
        }
        let (status, log) = finish(launcher, Duration::from_secs(60));
        assert!(matches!(status.code(), Some(75 | 143) | None), "round {round}: {status}\n{log}");
        assert!(
            !log.contains("skipping invalid checkpoint"),
            "round {round}: a committed checkpoint is corrupt:\n{log}"
        );
        outcomes.push(status.code());
    }
    // A SIGTERM well after the notice is held until the checkpoint is committed: a clean preemption.
    assert!(outcomes.contains(&Some(75)), "no round ended as a clean preemption: {outcomes:?}");
    let (status, log) = finish(mgrun_command(dir.path(), &args).spawn().unwrap(), Duration::from_secs(120));
    assert!(status.success(), "{log}");
    assert!(!log.contains("skipping invalid checkpoint"), "{log}");
    assert_same_run(&out, &reference, "SIGUSR1 then SIGTERM, resumed");
    eprintln!("exit codes of the interrupted rounds: {outcomes:?}");
}

#[test]
fn a_node_whose_launcher_dies_takes_the_job_down_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 4);
    let out = dir.path().join("lost");
    let port = free_port();
    let extra = ["--max-restarts", "1", cfg.to_str().unwrap()];
    let (node0, mut node1) = start_two_nodes(dir.path(), port, 1, &out, &extra);
    let node1_rank = rank_pids(node1.id(), 1)[&1];
    wait_for_steps(&out, 3, Duration::from_secs(60));
    // The whole node goes: its launcher, and with it (PR_SET_PDEATHSIG) its rank.
    let killed = Instant::now();
    node1.kill().unwrap();
    node1.wait().unwrap();
    let (status, log) = finish(node0, Duration::from_secs(90));
    let took = killed.elapsed();
    assert!(!status.success(), "{log}");
    // No restart without the lost node: the job fails, naming it last, as the root cause.
    assert!(!log.contains("restarting all"), "{log}");
    let last_failure = log.lines().rfind(|l| l.contains("attempt 0:")).unwrap_or_default();
    assert!(last_failure.contains("node 1's launcher did not report"), "{log}");
    // The peer's loss is seen at once; then node 0 waits --grace-s (3 s) + 20 s for node 1's report.
    assert!(took < Duration::from_secs(35), "took {took:?}:\n{log}");
    let stat = std::fs::read_to_string(format!("/proc/{node1_rank}/stat")).unwrap_or_default();
    assert!(stat.is_empty() || stat.contains(") Z "), "node 1's rank outlived its launcher: {stat}");
    eprintln!("node 1 lost: node 0's launcher exited {:.1} s later", took.as_secs_f64());
}

#[test]
fn a_preempted_slurm_job_without_scontrol_says_it_cannot_requeue() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 5, 0);
    let out = dir.path().join("no-scontrol");
    let args = strings(&["--cpus", "1", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()]);
    let mut command = mgrun_command(dir.path(), &args);
    // Inside a Slurm job as far as mgrun can tell, but with no scontrol to be found.
    let empty = dir.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    command.env("PATH", &empty).env("SLURM_JOB_ID", "77").env("SLURM_JOB_NODELIST", "localhost");
    let launcher = command.spawn().unwrap();
    wait_for_steps(&out, 3, Duration::from_secs(60));
    // SAFETY: plain kill(2) of our child.
    unsafe {
        libc::kill(launcher.id() as i32, libc::SIGUSR1);
    }
    let (status, log) = finish(launcher, Duration::from_secs(60));
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("the job cannot be requeued") && log.contains("is Slurm's scontrol on PATH?"), "{log}");
    assert!(log.contains("resubmit the job, it resumes with --resume auto"), "{log}");
    assert!(out.join("checkpoints/latest").exists(), "the preemption checkpoint is missing");
}
