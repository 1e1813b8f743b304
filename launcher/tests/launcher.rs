//! End-to-end tests of the `mgrun` launcher with its hidden `selftest` ranks.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MGRUN: &str = env!("CARGO_BIN_EXE_mgrun");

fn mgrun() -> Command {
    let mut command = Command::new(MGRUN);
    command.env_remove("OMP_NUM_THREADS").stdin(Stdio::null());
    command
}

struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs mgrun to completion (killing it after `limit`).
fn run_mgrun(args: &[&str], limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = mgrun().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout_reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap());
    let stderr_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let status = wait_with_limit(&mut child, limit);
    let elapsed = start.elapsed();
    Finished { status, stdout: stdout_reader.join().unwrap(), stderr: stderr_reader.join().unwrap(), elapsed }
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("mgrun did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `mgrun LAUNCH --out OUT selftest SELFTEST`.
fn selftest_args<'a>(launch: &[&'a str], out: &'a Path, selftest: &[&'a str]) -> Vec<&'a str> {
    [launch, &["--out", path_str(out), "selftest"], selftest].concat()
}

fn process_exists(pid: u32) -> bool {
    // A zombie still answers kill(pid, 0); /proc/<pid>/stat says whether it is one.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

fn assert_gone_soon(pids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|pid| process_exists(*pid)) {
        assert!(Instant::now() < deadline, "rank processes still alive: {pids:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running mgrun whose console output is watched line by line.
struct Watched {
    child: Child,
    stdout_lines: mpsc::Receiver<String>,
    stderr_reader: std::thread::JoinHandle<String>,
}

fn start_watched(args: &[&str], own_process_group: bool) -> Watched {
    let mut command = mgrun();
    command.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    if own_process_group {
        command.process_group(0);
    }
    let mut child = command.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (sender, stdout_lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if sender.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let stderr_reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    Watched { child, stdout_lines, stderr_reader }
}

impl Watched {
    /// Waits until all `world_size` ranks passed the store barrier; returns their pids by rank.
    fn wait_for_ranks(&self, world_size: usize) -> Vec<u32> {
        let mut pids = vec![0u32; world_size];
        let mut passed = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while passed < world_size {
            let line = self
                .stdout_lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("ranks did not all pass the barrier in time");
            if let Some((rank, pid)) = parse_hello(&line) {
                pids[rank] = pid;
            }
            if line.contains("passed the barrier") {
                passed += 1;
            }
        }
        assert!(pids.iter().all(|pid| *pid != 0), "{pids:?}");
        pids
    }
}

/// `[r] selftest rank r of N: hello on stdout (pid P)` -> (r, P).
fn parse_hello(line: &str) -> Option<(usize, u32)> {
    let rest = line.split_once("selftest rank ")?.1;
    let (rank, rest) = rest.split_once(" of ")?;
    let pid = rest.split_once("(pid ")?.1.strip_suffix(')')?;
    Some((rank.parse().ok()?, pid.parse().ok()?))
}

#[test]
fn three_ranks_succeed_with_logs_and_prefixed_console() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let finished = run_mgrun(&selftest_args(&["--cpus", "3"], &out, &[]), Duration::from_secs(30));
    assert!(finished.status.success(), "{}\n{}", finished.stdout, finished.stderr);
    assert!(finished.stdout.contains(path_str(&out)), "out dir not printed: {}", finished.stdout);
    for rank in 0..3 {
        let log = std::fs::read_to_string(out.join(format!("logs/rank{rank}.log"))).unwrap();
        assert!(log.contains(&format!("selftest rank {rank} of 3: hello on stdout")), "{log}");
        assert!(log.contains(&format!("selftest rank {rank} of 3: hello on stderr")), "{log}");
        assert!(log.contains(&format!("selftest rank {rank}: done")), "{log}");
        assert!(!log.contains("[0]") && !log.contains("selftest rank 9"), "log mixes ranks: {log}");
        for other in (0..3).filter(|other| *other != rank) {
            assert!(!log.contains(&format!("selftest rank {other} ")), "rank{rank}.log has rank {other}: {log}");
        }
        assert!(finished.stdout.contains(&format!("[{rank}] selftest rank {rank} of 3: hello on stdout")));
        assert!(finished.stderr.contains(&format!("[{rank}] selftest rank {rank} of 3: hello on stderr")));
    }
}

#[test]
fn workers_get_the_torchrun_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let finished = run_mgrun(
        &["--cpus", "3", "--port", &port, "--out", path_str(&out), "selftest", "--run-ms", "0"],
        Duration::from_secs(30),
    );
    assert!(finished.status.success(), "{}", finished.stderr);
    let cores = std::thread::available_parallelism().unwrap().get();
    let mut job_ids = Vec::new();
    for rank in 0..3 {
        let log = std::fs::read_to_string(out.join(format!("logs/rank{rank}.log"))).unwrap();
        let env_line = log.lines().find_map(|line| line.strip_prefix("selftest env ")).unwrap();
        let env: HashMap<&str, &str> = env_line.split(' ').filter_map(|pair| pair.split_once('=')).collect();
        let expected = [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", "3".to_string()),
            ("LOCAL_WORLD_SIZE", "3".to_string()),
            ("GROUP_RANK", "0".to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.clone()),
            ("MGRUN_DEVICE", "cpu".to_string()),
            ("OMP_NUM_THREADS", (cores / 3).max(1).to_string()),
            ("MGRUN_STORE_TOKEN", "<set>".to_string()),
        ];
        for (name, value) in expected {
            assert_eq!(env.get(name).copied(), Some(value.as_str()), "rank {rank} {name}: {env_line}");
        }
        job_ids.push(env["MGRUN_JOB_ID"].to_string());
    }
    assert!(job_ids[0].len() >= 8 && job_ids.iter().all(|id| *id == job_ids[0]), "{job_ids:?}");
}

#[test]
fn rank_killed_by_sigkill_stops_the_job_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = selftest_args(
        &["--cpus", "3"],
        &out,
        &["--fail-rank", "1", "--fail-how", "sigkill", "--fail-after-ms", "300", "--run-ms", "60000"],
    );
    let finished = run_mgrun(&args, Duration::from_secs(30));
    assert!(!finished.status.success());
    // Failure happens ~0.5 s in; healthy ranks die on SIGTERM at once.
    assert!(finished.elapsed < Duration::from_secs(10), "took {:?}", finished.elapsed);
    let root_cause = finished.stderr.split("Root Cause").nth(1).expect(&finished.stderr);
    assert!(root_cause.contains("rank 1"), "{root_cause}");
    assert!(root_cause.contains("killed by signal 9 (SIGKILL)"), "{root_cause}");
    assert!(root_cause.contains("selftest rank 1: killing itself with SIGKILL"), "{root_cause}");
}

#[test]
fn rank_exit_code_and_last_stderr_line_are_reported_last() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = selftest_args(&["--cpus", "2"], &out, &["--fail-rank", "0", "--run-ms", "60000"]);
    let finished = run_mgrun(&args, Duration::from_secs(30));
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stderr);
    assert!(finished.elapsed < Duration::from_secs(10), "took {:?}", finished.elapsed);
    let root_cause = finished.stderr.split("Root Cause").nth(1).expect(&finished.stderr);
    assert!(root_cause.contains("rank 0 failed with exit code 3"), "{root_cause}");
    let last_line = finished.stderr.trim_end().lines().last().unwrap();
    assert_eq!(last_line.trim(), "selftest rank 0: failing on purpose with exit code 3");
    assert!(finished.stderr.contains("rank 1 (pid"), "{}", finished.stderr);
}

#[test]
fn max_restarts_starts_every_rank_again_with_the_restart_count() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Rank 1 fails in the first attempt only; the restart succeeds.
    let args = selftest_args(
        &["--cpus", "2", "--max-restarts", "2"],
        &out,
        &["--fail-rank", "1", "--fail-attempts", "1", "--run-ms", "200"],
    );
    let finished = run_mgrun(&args, Duration::from_secs(30));
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(finished.stderr.contains("restarting all 2 rank(s) from the newest checkpoint (restart 1 of 2)"));
    assert!(finished.stdout.contains("all 2 rank(s) finished successfully after 1 restart(s)"), "{}", finished.stdout);
    // The second attempt's ranks know it, and have their own store keys.
    let env_lines: Vec<&str> = finished.stdout.lines().filter(|l| l.contains("selftest env")).collect();
    assert_eq!(env_lines.len(), 4, "{}", finished.stdout);
    assert_eq!(env_lines.iter().filter(|l| l.contains(" MGRUN_RESTART_COUNT=1 ")).count(), 2);
    let namespaces: std::collections::BTreeSet<&str> =
        env_lines.iter().filter_map(|l| l.split(" MGRUN_STORE_NAMESPACE=").nth(1)?.split(' ').next()).collect();
    assert_eq!(namespaces.len(), 2, "one store namespace per attempt: {namespaces:?}");
    // The log of the failed rank keeps both attempts.
    let log = std::fs::read_to_string(out.join("logs/rank1.log")).unwrap();
    assert!(log.contains("failing on purpose") && log.contains("=== mgrun: restart 1 ==="), "{log}");
    // The summary still names the failure that caused the restart.
    assert!(finished.stderr.contains("attempt 0: root cause: rank 1"), "{}", finished.stderr);
}

#[test]
fn restarts_run_out_and_every_failure_is_listed_root_cause_last() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let args = selftest_args(&["--cpus", "2", "--max-restarts", "1"], &out, &["--fail-rank", "0", "--run-ms", "60000"]);
    let finished = run_mgrun(&args, Duration::from_secs(30));
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stderr);
    assert!(finished.elapsed < Duration::from_secs(15), "took {:?}", finished.elapsed);
    let summary =
        finished.stderr.split("rank failure(s) in 2 attempt(s), root cause last:").nth(1).expect(&finished.stderr);
    let attempts: Vec<&str> = summary.lines().filter(|l| l.trim_start().starts_with("attempt")).collect();
    assert_eq!(attempts.len(), 2, "{summary}");
    assert!(attempts[0].contains("attempt 0: root cause: rank 0") && attempts[0].contains("exit code 3"), "{summary}");
    assert!(attempts[1].contains("attempt 1: root cause: rank 0"), "{summary}");
    let last_line = finished.stderr.trim_end().lines().last().unwrap();
    assert_eq!(last_line.trim(), "selftest rank 0: failing on purpose with exit code 3");
}

#[test]
fn sigusr1_is_passed_to_the_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let watched = start_watched(&["--cpus", "2", "--out", path_str(&out), "selftest", "--run-ms", "60000"], false);
    let pids = watched.wait_for_ranks(2);
    let mut child = watched.child;
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    // The launcher itself does not stop for it; the selftest ranks do not handle it, so its default
    // action ends them, which shows that they received it.
    let status = wait_with_limit(&mut child, Duration::from_secs(20));
    let stderr = watched.stderr_reader.join().unwrap();
    assert!(stderr.contains("received SIGUSR1; passing it to 2 rank(s)"), "{stderr}");
    assert!(stderr.contains("killed by signal 10 (SIGUSR1)"), "the ranks must have received SIGUSR1: {stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_gone_soon(&pids);
}

#[test]
fn rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Rank 1 ignores the SIGTERM that mgrun forwards: mgrun must escalate to SIGKILL after --grace-s.
    let watched = start_watched(
        &[
            "--cpus",
            "2",
            "--grace-s",
            "1",
            "--out",
            path_str(&out),
            "selftest",
            "--fail-rank",
            "1",
            "--fail-how",
            "hang",
            "--run-ms",
            "60000",
        ],
        false,
    );
    let pids = watched.wait_for_ranks(2);
    std::thread::sleep(Duration::from_millis(200)); // rank 1 now ignores SIGTERM
    let start = Instant::now();
    let mut child = watched.child;
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_with_limit(&mut child, Duration::from_secs(10));
    let elapsed = start.elapsed();
    let stderr = watched.stderr_reader.join().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5), "took {elapsed:?}: {stderr}");
    assert!(stderr.contains("rank 1 (pid") && stderr.contains("killed by signal 9 (SIGKILL)"), "{stderr}");
    assert!(stderr.contains("job stopped by SIGTERM"), "{stderr}");
    assert_gone_soon(&pids);
}

#[test]
fn sigterm_to_mgrun_stops_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let watched = start_watched(&["--cpus", "3", "--out", path_str(&out), "selftest", "--run-ms", "60000"], false);
    let pids = watched.wait_for_ranks(3);
    assert!(pids.iter().all(|pid| process_exists(*pid)));
    let mut child = watched.child;
    // SAFETY: kill(2) on a child of this test.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_with_limit(&mut child, Duration::from_secs(10));
    let stderr = watched.stderr_reader.join().unwrap();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert_gone_soon(&pids);
    assert_eq!(stderr.matches("killed by signal 15 (SIGTERM) (stopped by mgrun)").count(), 3, "{stderr}");
}

#[test]
fn ctrl_c_to_the_process_group_is_one_clean_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    // Like a terminal: SIGINT goes to the launcher and every rank in its process group.
    let watched = start_watched(&["--cpus", "2", "--out", path_str(&out), "selftest", "--run-ms", "60000"], true);
    let pids = watched.wait_for_ranks(2);
    let mut child = watched.child;
    // SAFETY: killpg(2) on the process group this test created for mgrun.
    unsafe { libc::killpg(child.id() as i32, libc::SIGINT) };
    let status = wait_with_limit(&mut child, Duration::from_secs(10));
    let stderr = watched.stderr_reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("received SIGINT"), "{stderr}");
    // The ranks ignored the terminal's SIGINT and were stopped by the launcher's SIGTERM instead.
    assert_eq!(stderr.matches("killed by signal 15 (SIGTERM) (stopped by mgrun)").count(), 2, "{stderr}");
    assert!(!stderr.contains("Root Cause"), "{stderr}");
    assert_gone_soon(&pids);
}

#[test]
fn ranks_die_with_a_sigkilled_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let watched = start_watched(&["--cpus", "2", "--out", path_str(&out), "selftest", "--run-ms", "60000"], false);
    let pids = watched.wait_for_ranks(2);
    let mut child = watched.child;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_gone_soon(&pids);
}

#[test]
fn gpus_on_a_machine_without_them_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let finished = run_mgrun(&selftest_args(&["--gpus", "64"], &out, &[]), Duration::from_secs(60));
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stderr);
    let cpu_only = finished.stderr.contains(
        "--gpus 64: CUDA is not available on this machine (no driver / libtorch_cuda not loadable); use --cpus N",
    );
    let too_few = finished.stderr.contains("--gpus 64: 64 GPU(s) needed but only ");
    assert!(cpu_only || too_few, "{}", finished.stderr);
    assert!(!out.exists(), "nothing may be started or created");
    assert!(finished.elapsed < Duration::from_secs(20), "took {:?}", finished.elapsed);
}

#[test]
fn nccl_on_shared_gpus_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("job.toml");
    std::fs::write(&config, "[data]\nroot = \"data\"\n[comm]\nbackend = \"nccl\"\n").unwrap();
    let out = dir.path().join("run");
    let finished = run_mgrun(
        &["--gpus", "3", "--ranks-per-gpu", "3", "--out", path_str(&out), path_str(&config)],
        Duration::from_secs(30),
    );
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stderr);
    assert!(finished.stderr.contains("NCCL refuses two ranks"), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("comm.backend") && finished.stderr.contains("--ranks-per-gpu 3"),
        "{}",
        finished.stderr
    );
    assert!(!out.exists(), "nothing may be started or created");
}

#[test]
fn missing_config_is_named() {
    let finished = run_mgrun(&["--cpus", "2", "/nonexistent/job.toml"], Duration::from_secs(10));
    assert!(!finished.status.success());
    assert!(finished.stderr.contains("config file /nonexistent/job.toml does not exist"), "{}", finished.stderr);
}

#[test]
fn bench_comm_runs_its_ranks_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = dir.path().join("run");
    let args = ["bench", "comm", "--cpus", "2", "--max-mb", "1", "--out", path_str(&out), "--json", path_str(&json)];
    let finished = run_mgrun(&args, Duration::from_secs(60));
    assert!(finished.status.success(), "{}\n{}", finished.stdout, finished.stderr);
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(results["world_size"], 2, "{results}");
    assert!(out.join("logs/rank1.log").is_file());
}

#[test]
fn datagen_synthetic_writes_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synthetic");
    let args = ["datagen", "synthetic", "--out", path_str(&out), "--images-per-class", "2", "--seed", "7"];
    let finished = run_mgrun(&args, Duration::from_secs(60));
    assert!(finished.status.success(), "{}", finished.stderr);
    let images = walk_files(&out).into_iter().filter(|path| path.extension().is_some_and(|ext| ext == "jpg")).count();
    // 4 domains x 5 classes x 2 images (the data crate's documented layout).
    assert_eq!(images, 40, "{}", finished.stdout);
}

fn walk_files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_failing_training_worker_is_the_root_cause() {
    let dir = tempfile::tempdir().unwrap();
    // A valid config whose domains have no images: the launcher's own checks (config, domain
    // directories) pass and the ranks fail when they list the images.
    let root = dir.path().join("data");
    for domain in ["a", "b"] {
        std::fs::create_dir_all(root.join(domain).join("class0")).unwrap();
    }
    let config = dir.path().join("broken.toml");
    std::fs::write(&config, format!("[data]\ndataset = \"folder\"\nroot = \"{}\"\n", root.display())).unwrap();
    let out = dir.path().join("run");
    let finished = run_mgrun(&["--cpus", "2", "--out", path_str(&out), path_str(&config)], Duration::from_secs(60));
    assert_eq!(finished.status.code(), Some(1), "{}", finished.stderr);
    let root_cause = finished.stderr.split("Root Cause").nth(1).expect(&finished.stderr);
    assert!(root_cause.contains("failed with exit code 1"), "{root_cause}");
    // The worker's own error message (printed by `mgrun worker`) is among the reported stderr lines.
    assert!(root_cause.contains("mgrun: error:"), "{root_cause}");
    assert!(out.join("logs/rank0.log").is_file() && out.join("logs/rank1.log").is_file());
}
