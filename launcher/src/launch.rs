//! Spawning and supervising the ranks of one job on this machine (torchrun's role).
//!
//! The launcher joins the rendezvous (launcher 0 hosts the store), starts one worker process per local
//! rank with torchrun's environment contract, copies every rank's output to `<out>/logs/rank<r>.log` and
//! to the console, and tears the whole group down when any rank fails (here or on another node) or when
//! it is itself asked to stop. With `--max-restarts K` it then starts every rank again, from the newest
//! checkpoint, up to K times; after a preemption it requeues the Slurm job.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mgrun_collectives::{CommError, DeviceKind, RankEnv};
use mgrun_trainer::PREEMPTED_EXIT_CODE;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::console::{self, say};
use crate::rendezvous::{
    decide, hostname, Decision, JobStore, LauncherInfo, LauncherReport, LocalOutcome, RankFailure, RendezvousPlan,
};

/// How many of a rank's last stderr lines are kept to explain its failure.
const STDERR_TAIL_LINES: usize = 20;
/// After SIGKILL, how long to wait for the kernel to reap the ranks before giving up on them.
const KILL_REAP_TIMEOUT: Duration = Duration::from_secs(2);
/// Beyond the grace period, how long a launcher waits for the others' reports of an attempt (their
/// teardown, reaping and output draining take a few seconds) before it counts them as lost.
const REPORT_SLACK: Duration = Duration::from_secs(20);
/// How long to wait for the output of exited ranks to drain before reporting.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// One rank started by this launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalRank {
    /// The global rank (`RANK`).
    pub rank: usize,
    /// `LOCAL_RANK`: its index among the ranks of its node.
    pub local_rank: usize,
    /// The GPU it computes on (CUDA ranks).
    pub cuda_device: usize,
}

/// Everything needed to run one job's ranks on this launcher: how many, where, and what each executes.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    pub world_size: usize,
    pub device: DeviceKind,
    /// CUDA ranks sharing each GPU (for the message and `MGRUN_RANKS_PER_GPU`).
    pub ranks_per_gpu: usize,
    /// The ranks this launcher starts.
    pub local: Vec<LocalRank>,
    /// `LOCAL_WORLD_SIZE`: ranks on this node.
    pub local_world_size: usize,
    /// `GROUP_RANK` and `GROUP_WORLD_SIZE`: this node and the number of nodes.
    pub group_rank: usize,
    pub group_world_size: usize,
    pub out_dir: PathBuf,
    /// Arguments given to every worker after the path of this executable (e.g. `worker --out DIR CONFIG`).
    pub worker_args: Vec<OsString>,
    /// The job config the workers read, written before each attempt starts them; `None` for workers
    /// without one.
    pub rank_config: Option<RankConfig>,
    pub rendezvous: RendezvousPlan,
    /// A hash of what must agree across launchers (config, options).
    pub job_hash: String,
    /// Restarts of all ranks after a failure.
    pub max_restarts: usize,
    /// The job `scontrol requeue` requeues after a preemption (inside Slurm).
    pub requeue_target: Option<String>,
    /// Time between SIGTERM and SIGKILL when the group is torn down.
    pub grace: Duration,
}

/// The resolved job config of the ranks: the launcher writes it to `path` before it starts them, after
/// the rendezvous (so that a launcher of another job never overwrites it), for every attempt again.
#[derive(Debug, Clone)]
pub struct RankConfig {
    pub path: PathBuf,
    /// The config of the first attempt.
    pub first: String,
    /// The config of restarts, which resume from the newest checkpoint.
    pub restart: String,
}

impl RankConfig {
    /// Writes the config of `attempt` through a temporary file renamed over `path`: ranks never read a
    /// half-written file, and the launchers of a multi-node job may write the same one on a shared file
    /// system.
    fn write(&self, attempt: usize) -> anyhow::Result<()> {
        let contents = if attempt == 0 { &self.first } else { &self.restart };
        let mut temporary_name = OsString::from(".");
        temporary_name.push(self.path.file_name().unwrap_or(self.path.as_os_str()));
        temporary_name.push(format!(".{}.{}.tmp", hostname(), std::process::id()));
        let temporary = self.path.with_file_name(temporary_name);
        std::fs::write(&temporary, contents).with_context(|| format!("writing {}", temporary.display()))?;
        std::fs::rename(&temporary, &self.path).with_context(|| {
            let _ = std::fs::remove_file(&temporary);
            format!("renaming {} to {}", temporary.display(), self.path.display())
        })
    }
}

/// Runs the job to completion and returns the launcher's exit code: 0 only if every rank exited 0,
/// 128 + signal when the launcher was interrupted, 75 after a preemption, 1 when a rank failed.
pub fn launch(plan: &LaunchPlan) -> anyhow::Result<i32> {
    anyhow::ensure!(plan.world_size > 0, "the number of ranks must be at least 1");
    let logs_dir = plan.out_dir.join("logs");
    std::fs::create_dir_all(&logs_dir).with_context(|| format!("creating the log directory {}", logs_dir.display()))?;

    let me = LauncherInfo {
        hostname: hostname(),
        job_hash: plan.job_hash.clone(),
        local_ranks: plan.local.len(),
        seen_as: String::new(),
    };
    let store = JobStore::join(&plan.rendezvous, &plan.out_dir, me)?;
    let sharing = if plan.device == DeviceKind::Cuda && plan.ranks_per_gpu > 1 {
        format!(" ({} per GPU)", plan.ranks_per_gpu)
    } else {
        String::new()
    };
    let nodes = if plan.rendezvous.launchers > 1 {
        format!(", {} here as {}", plan.local.len(), plan.rendezvous.label(plan.rendezvous.launcher_rank))
    } else {
        String::new()
    };
    println!(
        "mgrun: {} {} rank(s){sharing}{nodes}, out dir {}, store {}:{}",
        plan.world_size,
        plan.device,
        plan.out_dir.display(),
        plan.rendezvous.master_addr,
        store.port
    );

    if plan.rendezvous.launchers > 1 && plan.rendezvous.launcher_rank == 0 {
        // Where each launcher reached the store from: hostnames that resolve differently show here.
        for (rank, info) in store.launchers.iter().enumerate() {
            println!("mgrun:   {}: {} ({})", plan.rendezvous.label(rank), info.hostname, info.seen_as);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the launcher's tokio runtime")?;
    // Registered once, before any child exists, so that no signal slips through a gap between attempts.
    let mut signals = runtime.block_on(async { LauncherSignals::register() })?;
    let mut history: Vec<(usize, Vec<LauncherReport>)> = Vec::new();
    let mut attempt = 0;
    let code = loop {
        // Children are spawned from this (main) thread: PR_SET_PDEATHSIG fires when the *thread* that
        // forked a child exits, so forking from a pool thread could kill ranks early.
        let attempt_env = RankEnv {
            world_size: plan.world_size,
            local_world_size: plan.local_world_size,
            group_rank: plan.group_rank,
            group_world_size: plan.group_world_size,
            restart_count: attempt,
            master_addr: Some(plan.rendezvous.master_addr.clone()),
            master_port: Some(store.port),
            store_token: Some(store.token.clone()),
            store_namespace: store.namespace(attempt),
            job_id: Some(store.job_id.clone()),
            device_kind: plan.device,
            ranks_per_gpu: plan.ranks_per_gpu.max(1),
            ..RankEnv::single_rank()
        };
        if let Some(rank_config) = &plan.rank_config {
            rank_config.write(attempt)?;
        }
        let mine = runtime.block_on(supervise(plan, &attempt_env, &store, &mut signals, &logs_dir))?;
        let reports = store.gather_reports(attempt, &mine, plan.grace + REPORT_SLACK)?;
        let decision = decide(&reports, attempt, plan.max_restarts);
        history.push((attempt, reports));
        match decision {
            Decision::Restart => {
                attempt += 1;
                say!(
                    "mgrun: restarting all {} rank(s) from the newest checkpoint (restart {attempt} of {})",
                    plan.world_size,
                    plan.max_restarts
                );
            }
            Decision::Finished => {
                println!(
                    "mgrun: all {} rank(s) finished successfully{}; logs in {}",
                    plan.world_size,
                    if attempt > 0 { format!(" after {attempt} restart(s)") } else { String::new() },
                    logs_dir.display()
                );
                if attempt > 0 {
                    print_failures(&history);
                }
                break 0;
            }
            Decision::Preempted => break preempted(plan, &store),
            Decision::Failed => {
                // One launcher, one attempt: its report above already ends with the root cause.
                if history.len() > 1 || plan.rendezvous.launchers > 1 {
                    print_failures(&history);
                }
                break 1;
            }
            Decision::Stopped(signal) => {
                if history.iter().any(|(_, reports)| reports.iter().any(|r| !r.failures.is_empty())) {
                    print_failures(&history);
                }
                break 128 + signal;
            }
        }
    };
    let live = history
        .last()
        .map_or(0, |(_, reports)| reports.iter().filter(|report| report.outcome != LocalOutcome::Lost).count());
    store.close(live);
    Ok(code)
}

/// After every rank stopped for preemption with a checkpoint: requeue the Slurm job (launcher 0).
fn preempted(plan: &LaunchPlan, store: &JobStore) -> i32 {
    let label = plan.rendezvous.label(plan.rendezvous.launcher_rank);
    let Some(target) = &plan.requeue_target else {
        say!(
            "mgrun: preempted: every rank stopped after writing a checkpoint; start the job again with --resume auto \
             (and the same --out) to continue"
        );
        return PREEMPTED_EXIT_CODE;
    };
    if store.plan().launcher_rank != 0 {
        say!("mgrun: {label}: preempted; node 0 requeues Slurm job {target}");
        return PREEMPTED_EXIT_CODE;
    }
    match std::process::Command::new("scontrol").args(["requeue", target]).output() {
        Ok(output) if output.status.success() => {
            say!("mgrun: preempted: checkpoint written; requeued Slurm job {target} (it resumes with --resume auto)");
        }
        Ok(output) => say!(
            "mgrun: preempted: checkpoint written, but `scontrol requeue {target}` failed ({}): {}; resubmit the job, \
             it resumes with --resume auto",
            describe_exit(&Ok(output.status)),
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => say!(
            "mgrun: preempted: checkpoint written, but the job cannot be requeued: running `scontrol` failed ({error}; \
             is Slurm's scontrol on PATH?); resubmit the job, it resumes with --resume auto"
        ),
    }
    PREEMPTED_EXIT_CODE
}

/// Every failure of the job, attempt by attempt, each attempt's root cause last and the job's last of all.
fn print_failures(history: &[(usize, Vec<LauncherReport>)]) {
    let failures: usize =
        history.iter().map(|(_, reports)| reports.iter().map(|r| r.failures.len()).sum::<usize>()).sum();
    if failures == 0 {
        return;
    }
    let mut message = format!("mgrun: {failures} rank failure(s) in {} attempt(s), root cause last:\n", history.len());
    for (attempt, reports) in history {
        let mut failures: Vec<&RankFailure> = reports.iter().flat_map(|report| &report.failures).collect();
        // A lost node is where the trouble began; the rest followed from it.
        failures.sort_by_key(|failure| (failure.root_cause, failure.rank == usize::MAX));
        for failure in failures {
            let rank = if failure.rank == usize::MAX { String::new() } else { format!("rank {} ", failure.rank) };
            let host = if failure.hostname.is_empty() { String::new() } else { format!(", {}", failure.hostname) };
            let cause = if failure.root_cause { "root cause: " } else { "" };
            message.push_str(&format!(
                "  attempt {attempt}: {cause}{rank}({}{host}): {}\n",
                failure.launcher, failure.status
            ));
            if !failure.log.is_empty() {
                message.push_str(&format!("    log: {}\n", failure.log));
            }
            for line in &failure.stderr_tail {
                message.push_str(&format!("    {line}\n"));
            }
        }
    }
    let _ = std::io::stderr().lock().write_all(message.as_bytes());
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

    /// Stopped for preemption after its checkpoint: not a failure, and not the end of its peers.
    fn preempted(&self) -> bool {
        matches!(&self.exit, Ok(status) if status.code() == Some(PREEMPTED_EXIT_CODE))
    }
}

/// Why the group is being torn down.
#[derive(Debug, Clone, Copy)]
enum StopReason {
    RankFailed(usize),
    Signal(i32),
    /// Another launcher aborted the attempt.
    Aborted(usize),
}

/// Runs one attempt of the local ranks to their end and reports how it ended. `attempt_env` is the
/// environment every rank of the attempt shares; each rank's own fields are set when it is spawned.
async fn supervise(
    plan: &LaunchPlan,
    attempt_env: &RankEnv,
    store: &JobStore,
    signals: &mut LauncherSignals,
    logs_dir: &Path,
) -> anyhow::Result<LauncherReport> {
    let exe = std::env::current_exe().context("locating the mgrun executable to start the ranks")?;
    let (exit_sender, mut exit_receiver) = mpsc::unbounded_channel::<(usize, Result<ExitStatus, String>)>();
    let attempt = attempt_env.restart_count;
    let mut abort_watch = store.watch_abort(attempt)?;

    let mut ranks: Vec<RankProcess> = Vec::with_capacity(plan.local.len());
    for (index, local) in plan.local.iter().enumerate() {
        match spawn_rank(plan, attempt_env, &exe, index, *local, logs_dir, exit_sender.clone()) {
            Ok(process) => ranks.push(process),
            Err(error) => {
                // Dropping the children (kill_on_drop) is not enough: they are owned by their wait tasks.
                signal_running(&ranks, libc::SIGKILL);
                store.announce_abort(attempt);
                return Err(error);
            }
        }
    }
    drop(exit_sender);

    let mut stop_reason: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let mut running = ranks.len();
    let mut abort_seen = false;
    while running > 0 {
        let next_deadline = kill_at.or(give_up_at);
        tokio::select! {
            biased;
            received = signals.recv() => {
                if matches!(received, libc::SIGUSR1 | libc::SIGUSR2) {
                    // Preemption notice (Slurm's --signal): the ranks checkpoint at their next step boundary.
                    say!("mgrun: received {}; passing it to {running} rank(s)", signal_name(received));
                    signal_running(&ranks, received);
                    continue;
                }
                match stop_reason {
                    None => {
                        say!(
                            "mgrun: received {}; stopping {running} rank(s) (SIGTERM, SIGKILL after {:.1} s)",
                            signal_name(received),
                            plan.grace.as_secs_f64()
                        );
                        stop_reason = Some(StopReason::Signal(received));
                        store.announce_abort(attempt);
                        // The ranks ignore SIGINT (Ctrl-C reaches them from the terminal too): TERM for INT.
                        signal_running(&ranks, if received == libc::SIGINT { libc::SIGTERM } else { received });
                        kill_at = Some(Instant::now() + plan.grace);
                    }
                    Some(_) => {
                        // A second request means "now": skip the rest of the grace period.
                        say!("mgrun: received {} again; killing the remaining ranks", signal_name(received));
                        signal_running(&ranks, libc::SIGKILL);
                        kill_at = None;
                        give_up_at.get_or_insert(Instant::now() + KILL_REAP_TIMEOUT);
                    }
                }
            }
            by = &mut abort_watch.receiver, if !abort_seen => {
                abort_seen = true;
                if let (Ok(by), None) = (by, stop_reason) {
                    say!(
                        "mgrun: {} stopped the job; stopping {running} rank(s) here",
                        plan.rendezvous.label(by)
                    );
                    stop_reason = Some(StopReason::Aborted(by));
                    signal_running(&ranks, libc::SIGTERM);
                    kill_at = Some(Instant::now() + plan.grace);
                }
            }
            Some((index, exit)) = exit_receiver.recv() => {
                running -= 1;
                let outcome = RankOutcome { exit, after_stop_signal: stop_reason.is_some() };
                let failed = !outcome.succeeded() && !outcome.preempted();
                let rank = ranks[index].rank;
                if failed && stop_reason.is_none() {
                    say!(
                        "mgrun: rank {rank} failed ({}); stopping the other {running} rank(s)",
                        describe_exit(&outcome.exit)
                    );
                    stop_reason = Some(StopReason::RankFailed(index));
                    store.announce_abort(attempt);
                    ranks[index].outcome = Some(outcome);
                    signal_running(&ranks, libc::SIGTERM);
                    kill_at = Some(Instant::now() + plan.grace);
                } else {
                    ranks[index].outcome = Some(outcome);
                }
            }
            _ = sleep_until_optional(next_deadline), if next_deadline.is_some() => {
                if kill_at.take().is_some() {
                    say!("mgrun: grace period over; sending SIGKILL to {running} rank(s)");
                    signal_running(&ranks, libc::SIGKILL);
                    give_up_at = Some(Instant::now() + KILL_REAP_TIMEOUT);
                } else {
                    say!("mgrun: {running} rank(s) did not exit after SIGKILL; giving up on them");
                    break;
                }
            }
        }
    }
    drop(abort_watch);

    // Let the exited ranks' last lines reach the logs and the stderr tails before reporting.
    let pumps: Vec<JoinHandle<()>> = ranks.iter_mut().flat_map(|r| std::mem::take(&mut r.output_pumps)).collect();
    let drain = async {
        for pump in pumps {
            let _ = pump.await;
        }
    };
    let _ = tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, drain).await;

    Ok(report(plan, &ranks, stop_reason))
}

async fn sleep_until_optional(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// The signals a launcher handles: SIGINT, SIGTERM and SIGHUP stop the job; SIGUSR1 and SIGUSR2 are
/// passed to the ranks (preemption: checkpoint, then stop).
struct LauncherSignals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    user1: Signal,
    user2: Signal,
}

impl LauncherSignals {
    fn register() -> anyhow::Result<LauncherSignals> {
        let install = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the launcher's {name} handler"))
        };
        Ok(LauncherSignals {
            interrupt: install(SignalKind::interrupt(), "SIGINT")?,
            terminate: install(SignalKind::terminate(), "SIGTERM")?,
            hangup: install(SignalKind::hangup(), "SIGHUP")?,
            user1: install(SignalKind::user_defined1(), "SIGUSR1")?,
            user2: install(SignalKind::user_defined2(), "SIGUSR2")?,
        })
    }

    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            _ = self.hangup.recv() => libc::SIGHUP,
            _ = self.user1.recv() => libc::SIGUSR1,
            _ = self.user2.recv() => libc::SIGUSR2,
        }
    }
}

fn spawn_rank(
    plan: &LaunchPlan,
    attempt_env: &RankEnv,
    exe: &Path,
    index: usize,
    local: LocalRank,
    logs_dir: &Path,
    exit_sender: mpsc::UnboundedSender<(usize, Result<ExitStatus, String>)>,
) -> anyhow::Result<RankProcess> {
    let rank = local.rank;
    let attempt = attempt_env.restart_count;
    let log_path = logs_dir.join(format!("rank{rank}.log"));
    // A restart appends to the log of the attempt before, which holds the failure it restarts from.
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(attempt > 0)
        .truncate(attempt == 0)
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let log = Arc::new(Mutex::new(log_file));
    if attempt > 0 {
        if let Ok(mut file) = log.lock() {
            let _ = writeln!(file, "=== mgrun: restart {attempt} ===");
        }
    }

    let rank_env =
        RankEnv { rank, local_rank: local.local_rank, cuda_device: local.cuda_device, ..attempt_env.clone() };
    let mut command = tokio::process::Command::new(exe);
    command
        .args(&plan.worker_args)
        .envs(rank_env.vars())
        // The ranks' progress reports come here (see progress_display).
        .env(mgrun_trainer::progress::PROGRESS_ENV, "launcher")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if plan.device == DeviceKind::Cpu && std::env::var_os("OMP_NUM_THREADS").is_none() {
        // The node's ranks share its cores (with --slurm-task, across launchers); without a cap each
        // libtorch would start one thread per core.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        command.env("OMP_NUM_THREADS", (cores / plan.local_world_size.max(1)).max(1).to_string());
    }
    if plan.device == DeviceKind::Cuda {
        // cudarc loads NCCL as `libnccl.so`; the ranks find mgrun's link to libtorch's libnccl.so.2.
        match crate::cuda::worker_library_path() {
            Ok(library_path) => {
                command.env("LD_LIBRARY_PATH", library_path);
            }
            Err(why) if index == 0 => say!("mgrun: warning: NCCL: {why}; comm.backend = \"nccl\" will fail"),
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
        let _ = exit_sender.send((index, exit));
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
                // A stopped rank (SIGSTOP, Ctrl-Z) acts on SIGTERM only once continued: at once, not
                // after the grace period.
                if signal == libc::SIGTERM {
                    libc::kill(pid, libc::SIGCONT);
                }
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
                    say!("mgrun: writing the log of rank {rank}: {error}; console output continues");
                    log_failed = true;
                }
            }
        }
        if matches!(stream, Stream::Stdout) && crate::progress_display::take_report(&line) {
            continue;
        }
        // Console errors (closed pipe) must not stop the job.
        let prefixed = format!("[{rank}] {line}");
        match stream {
            Stream::Stdout => console::stdout_line(&prefixed),
            Stream::Stderr => console::stderr_line(&prefixed),
        }
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

/// How many stderr lines of a failed rank the job's summary of failures repeats.
const SUMMARY_TAIL_LINES: usize = 5;

/// This launcher's account of the attempt. When it did not simply finish, prints the outcome of every
/// local rank and, when a rank here failed first, the root cause last (it is what `tail` shows).
fn report(plan: &LaunchPlan, ranks: &[RankProcess], stop_reason: Option<StopReason>) -> LauncherReport {
    let launcher = plan.rendezvous.label(plan.rendezvous.launcher_rank);
    let host = hostname();
    let all_preempted = ranks.iter().all(|process| process.outcome.as_ref().is_some_and(RankOutcome::preempted));
    let all_succeeded = ranks.iter().all(|process| process.outcome.as_ref().is_some_and(RankOutcome::succeeded));
    let finished = |outcome| LauncherReport { launcher: launcher.clone(), outcome, failures: Vec::new() };
    match stop_reason {
        None if all_succeeded => return finished(LocalOutcome::Finished),
        // A SIGTERM after the preemption notice (the scheduler's grace period ending) is held by the
        // ranks until their checkpoint is committed: still a clean preemption.
        None | Some(StopReason::Signal(_)) if all_preempted => return finished(LocalOutcome::Preempted),
        _ => {}
    }

    // A rank that timed out waiting names the rank that stopped making progress (a stopped, hung or
    // deadlocked process exits last, killed by mgrun): that rank is the root cause.
    let first_failed = match stop_reason {
        Some(StopReason::RankFailed(index)) => Some(index),
        _ => None,
    };
    let stalled_rank = first_failed.and_then(|index| {
        let tail = ranks[index].stderr_tail.lock().map(|tail| tail.clone()).unwrap_or_default();
        tail.iter().rev().find_map(|line| CommError::stalled_rank_in(line)).filter(|&rank| rank != ranks[index].rank)
    });
    let root_index = stalled_rank.and_then(|rank| ranks.iter().position(|p| p.rank == rank)).or(first_failed);

    let mut failures = Vec::new();
    let mut message = String::from("mgrun: rank outcomes:\n");
    for (index, process) in ranks.iter().enumerate() {
        let status = match &process.outcome {
            Some(outcome) => {
                let killed_by_us = matches!(&outcome.exit, Ok(status)
                    if matches!(status.signal(), Some(libc::SIGTERM | libc::SIGKILL)));
                let ended_badly = !outcome.succeeded() && !outcome.preempted();
                let suffix = match (outcome.after_stop_signal && ended_badly, killed_by_us) {
                    (true, true) => " (stopped by mgrun)",
                    // It may have failed on its own, e.g. because a peer had died: not the root cause.
                    (true, false) => " (after mgrun began stopping the job)",
                    (false, _) => "",
                };
                let root_cause = root_index == Some(index);
                if root_cause || (ended_badly && !(outcome.after_stop_signal && killed_by_us)) {
                    let tail = process.stderr_tail.lock().map(|tail| tail.clone()).unwrap_or_default();
                    let skip = tail.len().saturating_sub(SUMMARY_TAIL_LINES);
                    failures.push(RankFailure {
                        rank: process.rank,
                        launcher: launcher.clone(),
                        hostname: host.clone(),
                        status: format!("{}{suffix}", describe_exit(&outcome.exit)),
                        log: process.log_path.display().to_string(),
                        stderr_tail: tail.into_iter().skip(skip).collect(),
                        root_cause,
                    });
                }
                format!("{}{suffix}", describe_exit(&outcome.exit))
            }
            None => "still running when mgrun gave up on it".to_string(),
        };
        let pid = process.pid.map(|pid| format!(" (pid {pid})")).unwrap_or_default();
        message.push_str(&format!("  rank {}{pid}: {status}\n", process.rank));
    }

    let outcome = match stop_reason {
        Some(StopReason::RankFailed(index)) => {
            let process = &ranks[index];
            let failed_rank = process.rank;
            let status = process.outcome.as_ref().map(|outcome| describe_exit(&outcome.exit)).unwrap_or_default();
            match stalled_rank {
                Some(stalled) => {
                    let log = root_index
                        .filter(|&root| root != index)
                        .map(|root| format!("\n  log of rank {stalled}: {}", ranks[root].log_path.display()))
                        .unwrap_or_default();
                    message.push_str(&format!(
                        "mgrun: Root Cause: rank {stalled} stopped making progress: rank {failed_rank} failed first \
                         ({status}) after waiting for it for comm.timeout_s{log}\n  log of rank {failed_rank}: {}\n",
                        process.log_path.display()
                    ));
                }
                None => message.push_str(&format!(
                    "mgrun: Root Cause (first failure): rank {failed_rank} failed with {status}\n  log: {}\n",
                    process.log_path.display()
                )),
            }
            let tail = process.stderr_tail.lock().map(|tail| tail.clone()).unwrap_or_default();
            if tail.is_empty() {
                message.push_str(&format!("  rank {failed_rank} wrote nothing to stderr\n"));
            } else {
                message.push_str(&format!("  last {} stderr line(s) of rank {failed_rank}:\n", tail.len()));
                for line in tail {
                    message.push_str(&format!("    {line}\n"));
                }
            }
            LocalOutcome::Failed
        }
        Some(StopReason::Signal(received)) => {
            message.push_str(&format!("mgrun: job stopped by {}\n", signal_name(received)));
            LocalOutcome::Stopped(received)
        }
        Some(StopReason::Aborted(by)) => {
            message.push_str(&format!("mgrun: stopped because {} stopped the job\n", plan.rendezvous.label(by)));
            LocalOutcome::Aborted
        }
        None => {
            // Ranks ended on their own with mixed outcomes (some preempted, some not).
            message.push_str("mgrun: ranks ended inconsistently\n");
            LocalOutcome::Failed
        }
    };
    let _ = std::io::stderr().lock().write_all(message.as_bytes());
    LauncherReport { launcher, outcome, failures }
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

/// `runs/<stem>-<YYYYmmdd-HHMMSS>` in local time.
pub fn default_out_dir(stem: &str) -> PathBuf {
    PathBuf::from("runs").join(format!("{stem}-{}", local_timestamp()))
}

pub fn local_timestamp() -> String {
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
