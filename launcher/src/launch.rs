//! Spawning and supervising the ranks of one job on this machine (torchrun's role).
//!
//! The launcher hosts the rendezvous store, starts one worker process per rank with torchrun's environment
//! contract, copies every rank's output to `<out>/logs/rank<r>.log` and to the console, and tears the whole
//! group down when any rank fails or when it is itself asked to stop.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mgrun_collectives::store::StoreServer;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How many of a rank's last stderr lines are kept to explain its failure.
const STDERR_TAIL_LINES: usize = 20;
/// After SIGKILL, how long to wait for the kernel to reap the ranks before giving up on them.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to wait for the output of exited ranks to drain before reporting.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The value of `MGRUN_DEVICE` that workers read.
    pub fn env_value(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

/// Everything needed to run one job: how many ranks, where, and what each rank executes.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub world_size: usize,
    pub device: DeviceKind,
    /// CUDA ranks sharing each GPU: rank r computes on GPU r / ranks_per_gpu.
    pub ranks_per_gpu: usize,
    pub out_dir: PathBuf,
    /// Arguments given to every worker after the path of this executable (e.g. `worker --out DIR CONFIG`).
    pub worker_args: Vec<OsString>,
    /// Where the rendezvous store listens.
    pub store_bind: SocketAddr,
    /// The address workers use to reach the store (`MASTER_ADDR`).
    pub master_addr: String,
    /// Time between SIGTERM and SIGKILL when the group is torn down.
    pub grace: Duration,
}

/// Runs the job to completion and returns the launcher's exit code: 0 only if every rank exited 0,
/// 128 + signal when the launcher was interrupted, 1 when a rank failed.
pub fn launch(plan: &LaunchPlan) -> anyhow::Result<i32> {
    anyhow::ensure!(plan.world_size > 0, "the number of ranks must be at least 1");
    let logs_dir = plan.out_dir.join("logs");
    std::fs::create_dir_all(&logs_dir).with_context(|| format!("creating the log directory {}", logs_dir.display()))?;

    let token = random_hex(16);
    let job_id = random_hex(8);
    let server = StoreServer::start(plan.store_bind, token.clone())
        .with_context(|| format!("starting the rendezvous store on {}", plan.store_bind))?;
    let master_port = server.addr().port();
    let sharing = if plan.device == DeviceKind::Cuda && plan.ranks_per_gpu > 1 {
        format!(" ({} per GPU on {} GPU(s))", plan.ranks_per_gpu, plan.world_size.div_ceil(plan.ranks_per_gpu))
    } else {
        String::new()
    };
    println!(
        "mgrun: {} {} rank(s){sharing}, out dir {}, store {}:{}",
        plan.world_size,
        plan.device.env_value(),
        plan.out_dir.display(),
        plan.master_addr,
        master_port
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the launcher's tokio runtime")?;
    // Children are spawned from this (main) thread: PR_SET_PDEATHSIG fires when the *thread* that forked
    // a child exits, so forking from a pool thread could kill ranks early.
    let rank_env = RankEnv { master_addr: plan.master_addr.clone(), master_port, token, job_id };
    let result = runtime.block_on(supervise(plan, &rank_env, &logs_dir));
    server.shutdown();
    result
}

/// Values shared by every rank's environment.
struct RankEnv {
    master_addr: String,
    master_port: u16,
    token: String,
    job_id: String,
}

/// What the supervisor knows about one running (or finished) rank.
struct RankProcess {
    rank: usize,
    pid: Option<u32>,
    log_path: PathBuf,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    output_pumps: Vec<JoinHandle<()>>,
    outcome: Option<RankOutcome>,
}

struct RankOutcome {
    exit: Result<ExitStatus, String>,
    /// The rank ended after the launcher had started tearing the group down.
    after_stop_signal: bool,
}

impl RankOutcome {
    fn succeeded(&self) -> bool {
        matches!(&self.exit, Ok(status) if status.success())
    }
}

/// Why the group is being torn down.
#[derive(Debug, Clone, Copy)]
enum StopReason {
    RankFailed(usize),
    Signal(i32),
}

async fn supervise(plan: &LaunchPlan, rank_env: &RankEnv, logs_dir: &Path) -> anyhow::Result<i32> {
    // Register the handlers before any child exists, so no signal can slip through the gap.
    let mut stop_signals = StopSignals::register()?;
    let exe = std::env::current_exe().context("locating the mgrun executable to start the ranks")?;
    let (exit_sender, mut exit_receiver) = mpsc::unbounded_channel::<(usize, Result<ExitStatus, String>)>();

    let mut ranks: Vec<RankProcess> = Vec::with_capacity(plan.world_size);
    for rank in 0..plan.world_size {
        match spawn_rank(plan, rank_env, &exe, rank, logs_dir, exit_sender.clone()) {
            Ok(process) => ranks.push(process),
            Err(error) => {
                // Dropping the children (kill_on_drop) is not enough: they are owned by their wait tasks.
                signal_running(&ranks, libc::SIGKILL);
                return Err(error);
            }
        }
    }
    drop(exit_sender);

    let mut stop_reason: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let mut running = ranks.len();
    while running > 0 {
        let next_deadline = kill_at.or(give_up_at);
        tokio::select! {
            biased;
            received = stop_signals.recv() => {
                match stop_reason {
                    None => {
                        eprintln!(
                            "mgrun: received {}; stopping {running} rank(s) (SIGTERM, SIGKILL after {:.1} s)",
                            signal_name(received),
                            plan.grace.as_secs_f64()
                        );
                        stop_reason = Some(StopReason::Signal(received));
                        signal_running(&ranks, libc::SIGTERM);
                        kill_at = Some(Instant::now() + plan.grace);
                    }
                    Some(_) => {
                        // A second request means "now": skip the rest of the grace period.
                        eprintln!("mgrun: received {} again; killing the remaining ranks", signal_name(received));
                        signal_running(&ranks, libc::SIGKILL);
                        kill_at = None;
                        give_up_at.get_or_insert(Instant::now() + KILL_REAP_TIMEOUT);
                    }
                }
            }
            Some((rank, exit)) = exit_receiver.recv() => {
                running -= 1;
                let outcome = RankOutcome { exit, after_stop_signal: stop_reason.is_some() };
                let failed = !outcome.succeeded();
                if failed && stop_reason.is_none() {
                    eprintln!(
                        "mgrun: rank {rank} failed ({}); stopping the other {running} rank(s)",
                        describe_exit(&outcome.exit)
                    );
                    stop_reason = Some(StopReason::RankFailed(rank));
                    ranks[rank].outcome = Some(outcome);
                    signal_running(&ranks, libc::SIGTERM);
                    kill_at = Some(Instant::now() + plan.grace);
                } else {
                    ranks[rank].outcome = Some(outcome);
                }
            }
            _ = sleep_until_optional(next_deadline), if next_deadline.is_some() => {
                if kill_at.take().is_some() {
                    eprintln!("mgrun: grace period over; sending SIGKILL to {running} rank(s)");
                    signal_running(&ranks, libc::SIGKILL);
                    give_up_at = Some(Instant::now() + KILL_REAP_TIMEOUT);
                } else {
                    eprintln!("mgrun: {running} rank(s) did not exit after SIGKILL; giving up on them");
                    break;
                }
            }
        }
    }

    // Let the exited ranks' last lines reach the logs and the stderr tails before reporting.
    let pumps: Vec<JoinHandle<()>> = ranks.iter_mut().flat_map(|r| std::mem::take(&mut r.output_pumps)).collect();
    let drain = async {
        for pump in pumps {
            let _ = pump.await;
        }
    };
    let _ = tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, drain).await;

    Ok(report(&ranks, stop_reason, &plan.out_dir))
}

async fn sleep_until_optional(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// SIGINT, SIGTERM and SIGHUP all ask the launcher to stop the job.
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl StopSignals {
    fn register() -> anyhow::Result<StopSignals> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the launcher's {name} handler"))
        };
        Ok(StopSignals {
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
        }
    }
}

fn spawn_rank(
    plan: &LaunchPlan,
    rank_env: &RankEnv,
    exe: &Path,
    rank: usize,
    logs_dir: &Path,
    exit_sender: mpsc::UnboundedSender<(usize, Result<ExitStatus, String>)>,
) -> anyhow::Result<RankProcess> {
    let log_path = logs_dir.join(format!("rank{rank}.log"));
    let log_file = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log_file));

    let mut command = tokio::process::Command::new(exe);
    command
        .args(&plan.worker_args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("WORLD_SIZE", plan.world_size.to_string())
        .env("LOCAL_WORLD_SIZE", plan.world_size.to_string())
        .env("GROUP_RANK", "0")
        .env("GROUP_WORLD_SIZE", "1")
        .env("TORCHELASTIC_RESTART_COUNT", "0")
        .env("MASTER_ADDR", &rank_env.master_addr)
        .env("MASTER_PORT", rank_env.master_port.to_string())
        .env("MGRUN_STORE_TOKEN", &rank_env.token)
        .env("MGRUN_DEVICE", plan.device.env_value())
        .env("MGRUN_JOB_ID", &rank_env.job_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if plan.device == DeviceKind::Cpu && std::env::var_os("OMP_NUM_THREADS").is_none() {
        // Ranks share the cores; without a cap each libtorch would start one thread per core.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        command.env("OMP_NUM_THREADS", (cores / plan.world_size).max(1).to_string());
    }
    if plan.device == DeviceKind::Cuda {
        command
            .env("MGRUN_CUDA_DEVICE", (rank / plan.ranks_per_gpu.max(1)).to_string())
            .env("MGRUN_RANKS_PER_GPU", plan.ranks_per_gpu.max(1).to_string());
        // cudarc loads NCCL as `libnccl.so`; the ranks find mgrun's link to libtorch's libnccl.so.2.
        match crate::cuda::worker_library_path() {
            Ok(library_path) => {
                command.env("LD_LIBRARY_PATH", library_path);
            }
            Err(why) if rank == 0 => eprintln!("mgrun: warning: NCCL: {why}; comm.backend = \"nccl\" will fail"),
            Err(_) => {}
        }
    }
    let launcher_pid = std::process::id();
    // SAFETY: the closure runs between fork and exec and only calls async-signal-safe functions
    // (prctl, getppid, signal) without allocating.
    unsafe {
        command.pre_exec(move || {
            // Never outlive the launcher, even when it is SIGKILLed.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before prctl took effect.
            if libc::getppid() as u32 != launcher_pid {
                return Err(std::io::Error::other("the launcher exited while this rank was starting"));
            }
            // Ctrl-C at the terminal reaches the whole foreground process group; only the launcher
            // handles it, and stops the ranks with SIGTERM in an orderly way.
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child =
        command.spawn().with_context(|| format!("starting rank {rank} ({} {:?})", exe.display(), plan.worker_args))?;
    let pid = child.id();

    let stderr_tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
    let mut output_pumps = Vec::with_capacity(2);
    if let Some(stdout) = child.stdout.take() {
        output_pumps.push(tokio::spawn(pump_lines(stdout, rank, Stream::Stdout, log.clone(), None)));
    }
    if let Some(stderr) = child.stderr.take() {
        let tail = Some(stderr_tail.clone());
        output_pumps.push(tokio::spawn(pump_lines(stderr, rank, Stream::Stderr, log, tail)));
    }
    tokio::spawn(async move {
        let exit = child.wait().await.map_err(|error| format!("waiting for rank {rank}: {error}"));
        let _ = exit_sender.send((rank, exit));
    });

    Ok(RankProcess { rank, pid, log_path, stderr_tail, output_pumps, outcome: None })
}

/// Sends `signal` to every rank that has not been seen to exit.
fn signal_running(ranks: &[RankProcess], signal: i32) {
    for process in ranks.iter().filter(|process| process.outcome.is_none()) {
        if let Some(pid) = process.pid.and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: plain kill(2); the pid belongs to a child that has not been reaped yet.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Copies a rank's output line by line to its log file and to the console with a `[rank] ` prefix.
async fn pump_lines<R: AsyncRead + Unpin>(
    reader: R,
    rank: usize,
    stream: Stream,
    log: Arc<Mutex<File>>,
    stderr_tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let mut reader = BufReader::new(reader);
    let mut buffer = Vec::new();
    let mut log_failed = false;
    loop {
        buffer.clear();
        match reader.read_until(b'\n', &mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        while matches!(buffer.last(), Some(b'\n' | b'\r')) {
            buffer.pop();
        }
        let line = String::from_utf8_lossy(&buffer);

        if let Ok(mut file) = log.lock() {
            if let Err(error) = writeln!(file, "{line}") {
                if !log_failed {
                    eprintln!("mgrun: writing the log of rank {rank}: {error}; console output continues");
                    log_failed = true;
                }
            }
        }
        // Console errors (closed pipe) must not stop the job.
        let _ = match stream {
            Stream::Stdout => writeln!(std::io::stdout().lock(), "[{rank}] {line}"),
            Stream::Stderr => writeln!(std::io::stderr().lock(), "[{rank}] {line}"),
        };
        if let Some(tail) = &stderr_tail {
            if let Ok(mut tail) = tail.lock() {
                if tail.len() == STDERR_TAIL_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.into_owned());
            }
        }
    }
}

/// Prints the outcome of every rank, the root cause last (it is what `tail` shows), and returns the exit code.
fn report(ranks: &[RankProcess], stop_reason: Option<StopReason>, out_dir: &Path) -> i32 {
    let all_succeeded = ranks.iter().all(|process| process.outcome.as_ref().is_some_and(RankOutcome::succeeded));
    if stop_reason.is_none() && all_succeeded {
        println!(
            "mgrun: all {} rank(s) finished successfully; logs in {}",
            ranks.len(),
            out_dir.join("logs").display()
        );
        return 0;
    }

    let mut message = String::from("mgrun: rank outcomes:\n");
    for process in ranks {
        let status = match &process.outcome {
            Some(outcome) => {
                let killed_by_us = matches!(&outcome.exit, Ok(status)
                    if matches!(status.signal(), Some(libc::SIGTERM | libc::SIGKILL)));
                let suffix = match (outcome.after_stop_signal && !outcome.succeeded(), killed_by_us) {
                    (true, true) => " (stopped by mgrun)",
                    // It may have failed on its own, e.g. because a peer had died: not the root cause.
                    (true, false) => " (after mgrun began stopping the job)",
                    (false, _) => "",
                };
                format!("{}{suffix}", describe_exit(&outcome.exit))
            }
            None => "still running when mgrun gave up on it".to_string(),
        };
        let pid = process.pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        message.push_str(&format!("  rank {}{pid}: {status}\n", process.rank));
    }

    let exit_code = match stop_reason {
        Some(StopReason::RankFailed(failed_rank)) => {
            let process = &ranks[failed_rank];
            let status = process.outcome.as_ref().map(|outcome| describe_exit(&outcome.exit)).unwrap_or_default();
            message.push_str(&format!(
                "mgrun: Root Cause (first failure): rank {failed_rank} failed with {status}\n  log: {}\n",
                process.log_path.display()
            ));
            let tail = process.stderr_tail.lock().map(|tail| tail.clone()).unwrap_or_default();
            if tail.is_empty() {
                message.push_str(&format!("  rank {failed_rank} wrote nothing to stderr\n"));
            } else {
                message.push_str(&format!("  last {} stderr line(s) of rank {failed_rank}:\n", tail.len()));
                for line in tail {
                    message.push_str(&format!("    {line}\n"));
                }
            }
            1
        }
        Some(StopReason::Signal(received)) => {
            message.push_str(&format!("mgrun: job stopped by {}\n", signal_name(received)));
            128 + received
        }
        None => {
            // Unreachable in practice: a failing rank always becomes the stop reason.
            message.push_str("mgrun: job failed\n");
            1
        }
    };
    let _ = std::io::stderr().lock().write_all(message.as_bytes());
    exit_code
}

/// "exit code 3", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(exit: &Result<ExitStatus, String>) -> String {
    match exit {
        Ok(status) => {
            if let Some(code) = status.code() {
                format!("exit code {code}")
            } else if let Some(signal) = status.signal() {
                let core = if status.core_dumped() { ", core dumped" } else { "" };
                format!("killed by signal {signal} ({}){core}", signal_name(signal))
            } else {
                status.to_string()
            }
        }
        Err(error) => error.clone(),
    }
}

pub fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

fn random_hex(bytes: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..bytes).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

/// `runs/<stem>-<YYYYmmdd-HHMMSS>` in local time.
pub fn default_out_dir(stem: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("{stem}-{}", local_timestamp()))
}

fn local_timestamp() -> String {
    // SAFETY: time(NULL) and localtime_r with a zeroed, caller-owned tm are always sound.
    let tm = unsafe {
        let now = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return format!("{now}");
        }
        tm
    };
    format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions_name_code_and_signal() {
        assert_eq!(describe_exit(&Ok(ExitStatus::from_raw(3 << 8))), "exit code 3");
        assert_eq!(describe_exit(&Ok(ExitStatus::from_raw(libc::SIGKILL))), "killed by signal 9 (SIGKILL)");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(64), "signal 64");
    }

    #[test]
    fn default_out_dir_has_stem_and_timestamp() {
        let dir = default_out_dir("quickstart");
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        assert!(dir.starts_with("runs"));
        let stamp = name.strip_prefix("quickstart-").unwrap_or_default();
        assert_eq!(stamp.len(), 15, "{name}");
        assert_eq!(stamp.as_bytes()[8], b'-');
        assert!(stamp.chars().filter(|c| *c != '-').all(|c| c.is_ascii_digit()), "{name}");
    }
}
