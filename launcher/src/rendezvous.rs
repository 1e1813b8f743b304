//! The launchers' rendezvous (torchrun's static rendezvous): launcher 0 hosts the store, every launcher
//! joins it within `--rdzv-timeout-s`, and the launchers agree through it on the job, on aborting an
//! attempt when any of them sees a failure, and on what happens next (restart, requeue, stop).
//!
//! A launcher is one per node (`--nnodes`), or one per rank under `srun --slurm-task`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mgrun_collectives::store::{StoreClient, StoreServer};
use serde::{Deserialize, Serialize};

/// Environment variable that carries the store's token to the launchers of other nodes (instead of the
/// token file) and to the ranks; never put on a command line.
const TOKEN_ENV: &str = mgrun_collectives::rank_env::var::STORE_TOKEN;
/// How long launcher 0 keeps the store up at the end for the other launchers to read the outcome.
const FINAL_BARRIER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one probe of the store's port may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a launcher looks in the store for an abort of the current attempt by another launcher.
const ABORT_POLL: Duration = Duration::from_millis(250);

/// Where this launcher stands among the launchers of the job.
#[derive(Debug, Clone)]
pub struct RendezvousPlan {
    /// Number of launchers (nodes, or Slurm tasks with `--slurm-task`).
    pub launchers: usize,
    pub launcher_rank: usize,
    /// "node" or "task": how messages name a launcher.
    pub launcher_kind: &'static str,
    /// The host the other launchers and every rank use to reach the store (`MASTER_ADDR`).
    pub master_addr: String,
    /// The store's port; 0 picks a free one (single launcher only).
    pub master_port: u16,
    /// Listen on all interfaces (other hosts connect) instead of loopback only.
    pub listen_on_all: bool,
    pub timeout: Duration,
}

impl RendezvousPlan {
    pub fn label(&self, launcher_rank: usize) -> String {
        format!("{} {launcher_rank}", self.launcher_kind)
    }
}

/// What each launcher tells the others when it joins: checked for agreement before any rank starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LauncherInfo {
    pub hostname: String,
    /// A hash of the resolved job config and the launch options that must agree across launchers.
    pub job_hash: String,
    pub local_ranks: usize,
    /// The address of this launcher as the store's host sees it.
    #[serde(default)]
    pub seen_as: String,
}

/// The joined rendezvous: the store (hosted here on launcher 0) and the job's shared identity.
pub struct JobStore {
    plan: RendezvousPlan,
    client: StoreClient,
    /// Kept alive for the job on launcher 0.
    server: Option<StoreServer>,
    pub token: String,
    pub job_id: String,
    /// The port the store listens on (the real one when `master_port` was 0).
    pub port: u16,
    /// Every launcher's info, by launcher rank.
    pub launchers: Vec<LauncherInfo>,
    token_file: Option<PathBuf>,
}

impl JobStore {
    /// Starts (launcher 0) or reaches the store, then waits for every launcher and checks that they
    /// run the same job. Fails within `plan.timeout`, naming the address tried or the launchers missing.
    pub fn join(plan: &RendezvousPlan, out_dir: &Path, mut me: LauncherInfo) -> Result<JobStore> {
        let label = plan.label(plan.launcher_rank);
        if plan.launcher_rank >= plan.launchers {
            bail!(
                "{} rank {} is out of range: the job has {} {}s (ranks 0..{})",
                plan.launcher_kind,
                plan.launcher_rank,
                plan.launchers,
                plan.launcher_kind,
                plan.launchers - 1
            );
        }
        let deadline = Instant::now() + plan.timeout;
        let env_token = std::env::var(TOKEN_ENV).ok().filter(|token| !token.is_empty());
        // Other hosts read the token from a file only the user can read, in the shared output directory.
        let token_file =
            (env_token.is_none() && plan.launchers > 1).then(|| out_dir.join(".mgrun").join("store-token"));
        let mut token = env_token.clone().unwrap_or_else(|| random_hex(16));

        let mut server = None;
        let mut port = plan.master_port;
        if plan.launcher_rank == 0 {
            if let Some(path) = &token_file {
                write_private(path, &token)?;
            }
            let ip =
                if plan.listen_on_all { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) };
            let bind = SocketAddr::new(ip, plan.master_port);
            let started = StoreServer::start(bind, token.clone()).map_err(|error| {
                anyhow::anyhow!(
                    "{label}: cannot start the rendezvous store on port {} (--master-port): {error}{}",
                    plan.master_port,
                    if error.to_string().contains("in use") {
                        "; another job (or an earlier run still shutting down) uses it: pick another port"
                    } else {
                        ""
                    }
                )
            })?;
            port = started.addr().port();
            server = Some(started);
        } else if plan.master_port == 0 {
            bail!("{label}: --master-port is required when --nnodes > 1 (node 0's store port)");
        }

        let addr = join_host_port(&plan.master_addr, port);
        let resolved: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .with_context(|| format!("{label}: cannot resolve the master address {addr} (--master-addr)"))?
            .collect();
        let resolved_text = resolved.iter().map(|a| a.ip().to_string()).collect::<Vec<_>>().join(", ");
        let mut store_reachable = false;
        let mut last_error = String::from("no attempt made");
        let client = loop {
            let expired = Instant::now() >= deadline;
            if let (Some(path), true) = (&token_file, plan.launcher_rank > 0) {
                match std::fs::read_to_string(path) {
                    Ok(text) => token = text.trim().to_string(),
                    Err(error) => {
                        // Tell an unreachable store from a token file that is not there (yet).
                        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
                        match resolved.iter().find_map(|a| TcpStream::connect_timeout(a, left.min(PROBE_TIMEOUT)).ok())
                        {
                            Some(_) => store_reachable = true,
                            None => last_error = "connection refused or timed out".to_string(),
                        }
                        if !expired {
                            std::thread::sleep(Duration::from_millis(200));
                            continue;
                        }
                        if store_reachable {
                            bail!(
                                "{label}: node 0 did not write the store token {} within {:.0} s (--rdzv-timeout-s): \
                                 {error}; is --out on a file system every node shares (or set {TOKEN_ENV} on every node)?",
                                path.display(),
                                plan.timeout.as_secs_f64()
                            );
                        }
                        bail!("{}", unreachable(&label, &addr, &resolved_text, plan.timeout, &last_error));
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match StoreClient::connect(&addr, &token, left.min(Duration::from_secs(2))) {
                Ok(client) => break client,
                // A stale token file from an earlier run, or a store not started yet: try again.
                Err(error) if !expired => {
                    last_error = error.to_string();
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(error) => bail!("{}", unreachable(&label, &addr, &resolved_text, plan.timeout, &error.to_string())),
            }
        };
        // Attempts and the workers use their own (namespaced) connections; this one is the launcher's.
        let seen_as = client.socket_addrs().map(|(local, _)| local.ip().to_string()).unwrap_or_default();
        me.seen_as = seen_as.clone();
        if plan.launchers > 1 {
            println!(
                "mgrun: {label} ({}) joined the rendezvous store at {addr} (resolved to {resolved_text}) as {seen_as}",
                me.hostname
            );
        }

        let claims = client.add(&format!("rdzv/claim/{}", plan.launcher_rank), 1)?;
        if claims > 1 {
            bail!("{label}: another launcher already joined as {label}: give every node its own --node-rank");
        }
        let job_id = if plan.launcher_rank == 0 {
            let job_id = random_hex(8);
            client.set("rdzv/job_id", job_id.as_bytes())?;
            job_id
        } else {
            String::from_utf8_lossy(&wait_key(&client, "rdzv/job_id", deadline)?.unwrap_or_default()).into_owned()
        };
        client.set(&format!("rdzv/launcher/{}", plan.launcher_rank), &serde_json::to_vec(&me)?)?;
        let mut launchers = Vec::with_capacity(plan.launchers);
        let mut missing = Vec::new();
        for rank in 0..plan.launchers {
            match wait_key(&client, &format!("rdzv/launcher/{rank}"), deadline)? {
                Some(bytes) => launchers.push(
                    serde_json::from_slice::<LauncherInfo>(&bytes)
                        .with_context(|| format!("{label}: malformed rendezvous record of {}", plan.label(rank)))?,
                ),
                None => missing.push(rank),
            }
        }
        if !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|rank| plan.label(*rank)).collect();
            bail!(
                "{label}: {} did not join the rendezvous at {addr} within {:.0} s (--rdzv-timeout-s); every node must \
                 start mgrun with the same --nnodes, --master-addr and --master-port",
                names.join(", "),
                plan.timeout.as_secs_f64()
            );
        }
        let agreement = check_agreement(plan, &launchers);
        // Launcher 0 hosts the store: it waits until every launcher has checked the records, so that
        // one that finds a mismatch and exits never cuts the others short of the same finding.
        client.add("rdzv/checked", 1)?;
        if plan.launcher_rank == 0 {
            while client.add("rdzv/checked", 0)? < plan.launchers as i64 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        agreement?;
        Ok(JobStore { plan: plan.clone(), client, server, token, job_id, port, launchers, token_file })
    }

    pub fn plan(&self) -> &RendezvousPlan {
        &self.plan
    }

    /// The namespace of attempt `attempt`'s keys: the ranks of a restart never see the keys of the
    /// attempt before.
    pub fn namespace(&self, attempt: usize) -> String {
        format!("{}/attempt{attempt}/", self.job_id)
    }

    /// Tells the other launchers to stop attempt `attempt` (ignored when already told).
    pub fn announce_abort(&self, attempt: usize) {
        if self.plan.launchers > 1 {
            let _ = self.client.set(&format!("attempt{attempt}/abort"), self.plan.launcher_rank.to_string().as_bytes());
        }
    }

    /// Watches for another launcher's abort of `attempt`; the receiver yields the aborting launcher's rank.
    pub fn watch_abort(&self, attempt: usize) -> Result<AbortWatch> {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        if self.plan.launchers > 1 {
            let client = self.client.try_clone().context("a second connection to the store for abort watching")?;
            let stop = stop.clone();
            let key = format!("attempt{attempt}/abort");
            let me = self.plan.launcher_rank;
            std::thread::Builder::new()
                .name("mgrun-abort-watch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match client.get_within(&key, ABORT_POLL) {
                            Ok(Some(value)) => {
                                let by = String::from_utf8_lossy(&value).parse::<usize>().unwrap_or(usize::MAX);
                                if by != me {
                                    let _ = sender.send(by);
                                }
                                return;
                            }
                            Ok(None) => {}
                            // The store is gone: launcher 0 ended; the ranks' own errors tell the rest.
                            Err(_) => return,
                        }
                    }
                })
                .context("starting the abort watcher")?;
        }
        Ok(AbortWatch { receiver, stop })
    }

    /// Publishes this launcher's report of `attempt` and returns every launcher's, by launcher rank.
    /// A launcher that does not report within `wait` (its ranks' teardown takes at most the grace
    /// period and the reaping) is reported as lost.
    pub fn gather_reports(&self, attempt: usize, mine: &LauncherReport, wait: Duration) -> Result<Vec<LauncherReport>> {
        if self.plan.launchers == 1 {
            return Ok(vec![mine.clone()]);
        }
        let key = |rank: usize| format!("attempt{attempt}/report/{rank}");
        self.client.set(&key(self.plan.launcher_rank), &serde_json::to_vec(mine)?)?;
        let deadline = Instant::now() + wait;
        let mut reports = Vec::with_capacity(self.plan.launchers);
        for rank in 0..self.plan.launchers {
            let report = match wait_key(&self.client, &key(rank), deadline) {
                Ok(Some(bytes)) => serde_json::from_slice(&bytes)
                    .with_context(|| format!("malformed report of {} for attempt {attempt}", self.plan.label(rank)))?,
                Ok(None) | Err(_) => LauncherReport::lost(&self.plan.label(rank), wait),
            };
            reports.push(report);
        }
        Ok(reports)
    }

    /// The end of the job: launcher 0 waits (briefly) until the `live` launchers (those that reported
    /// the last attempt) have read the outcome, then stops the store; the token file goes with it.
    pub fn close(self, live: usize) {
        if self.plan.launchers > 1 {
            let _ = self.client.add("final/read", 1);
            if self.server.is_some() {
                let deadline = Instant::now() + FINAL_BARRIER_TIMEOUT;
                while Instant::now() < deadline {
                    let count = self.client.add("final/read", 0).unwrap_or(0);
                    if count >= live as i64 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        if let (Some(path), Some(_)) = (&self.token_file, &self.server) {
            let _ = std::fs::remove_file(path);
        }
        if let Some(server) = self.server {
            server.shutdown();
        }
    }
}

/// Stops the abort watcher's thread when dropped.
pub struct AbortWatch {
    pub receiver: tokio::sync::oneshot::Receiver<usize>,
    stop: Arc<AtomicBool>,
}

impl Drop for AbortWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How one launcher's ranks ended an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LocalOutcome {
    Finished,
    /// Every rank stopped for preemption after the checkpoint.
    Preempted,
    /// A rank here failed.
    Failed,
    /// Stopped because another launcher aborted the attempt.
    Aborted,
    /// Stopped by a signal to this launcher (the user or the scheduler).
    Stopped(i32),
    /// The launcher did not report (its node died, or it hangs).
    Lost,
}

/// A failed rank, as every launcher's final summary lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RankFailure {
    pub rank: usize,
    pub launcher: String,
    pub hostname: String,
    pub status: String,
    pub log: String,
    pub stderr_tail: Vec<String>,
    /// The first failure of its attempt (the others followed from it).
    pub root_cause: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LauncherReport {
    pub launcher: String,
    pub outcome: LocalOutcome,
    pub failures: Vec<RankFailure>,
}

impl LauncherReport {
    fn lost(label: &str, waited: Duration) -> LauncherReport {
        LauncherReport {
            launcher: label.to_string(),
            outcome: LocalOutcome::Lost,
            failures: vec![RankFailure {
                rank: usize::MAX,
                launcher: label.to_string(),
                hostname: String::new(),
                status: format!("{label}'s launcher did not report within {:.0} s (node lost?)", waited.as_secs_f64()),
                log: String::new(),
                stderr_tail: Vec::new(),
                root_cause: true,
            }],
        }
    }
}

/// What the launchers do after an attempt, the same on every launcher since all decide from the same reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Finished,
    Restart,
    Preempted,
    Failed,
    Stopped(i32),
}

pub fn decide(reports: &[LauncherReport], attempt: usize, max_restarts: usize) -> Decision {
    let outcomes: Vec<LocalOutcome> = reports.iter().map(|report| report.outcome).collect();
    if let Some(signal) = outcomes.iter().find_map(|o| if let LocalOutcome::Stopped(s) = o { Some(*s) } else { None }) {
        return Decision::Stopped(signal);
    }
    if outcomes.iter().any(|o| matches!(o, LocalOutcome::Failed | LocalOutcome::Aborted | LocalOutcome::Lost)) {
        // A lost launcher's node cannot take part in a restart of a static job.
        let lost = outcomes.contains(&LocalOutcome::Lost);
        return if attempt < max_restarts && !lost { Decision::Restart } else { Decision::Failed };
    }
    if outcomes.contains(&LocalOutcome::Preempted) {
        return Decision::Preempted;
    }
    Decision::Finished
}

fn check_agreement(plan: &RendezvousPlan, launchers: &[LauncherInfo]) -> Result<()> {
    let first = &launchers[0];
    for (rank, info) in launchers.iter().enumerate().skip(1) {
        if info.job_hash != first.job_hash {
            bail!(
                "{} ({}) runs another job than {} ({}): the resolved config and launch options differ (hash {} vs {}); \
                 give every node the same config, overrides and --gpus/--cpus",
                plan.label(rank),
                info.hostname,
                plan.label(0),
                first.hostname,
                info.job_hash,
                first.job_hash
            );
        }
        if info.local_ranks != first.local_ranks && plan.launcher_kind == "node" {
            bail!(
                "{} ({}) starts {} rank(s) but {} starts {}: every node must run the same number of ranks",
                plan.label(rank),
                info.hostname,
                info.local_ranks,
                plan.label(0),
                first.local_ranks
            );
        }
    }
    Ok(())
}

fn unreachable(label: &str, addr: &str, resolved: &str, timeout: Duration, error: &str) -> String {
    format!(
        "{label}: could not reach the rendezvous store at {addr} (resolved to {resolved}) within {:.0} s \
         (--rdzv-timeout-s): {error}. Is node 0's launcher running, and are --master-addr and --master-port right?",
        timeout.as_secs_f64()
    )
}

/// Waits for `key` until `deadline`; `Ok(None)` when it is still unset then.
fn wait_key(client: &StoreClient, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>> {
    let left = deadline.saturating_duration_since(Instant::now());
    Ok(client.get_within(key, left)?)
}

/// "host:port", with brackets around a bare IPv6 literal.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Writes `text` to a new file only the user can read (the store token).
fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A file left by an earlier run may be readable by others: replace it, never reuse its mode.
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating the store token file {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..bytes).map(|_| format!("{:02x}", rng.gen::<u8>())).collect()
}

/// This machine's host name (for messages).
pub fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    if ok {
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "unknown-host".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: LocalOutcome) -> LauncherReport {
        LauncherReport { launcher: "node 0".into(), outcome, failures: Vec::new() }
    }

    #[test]
    fn decisions_follow_the_worst_outcome() {
        use LocalOutcome::*;
        let all = |outcomes: &[LocalOutcome]| outcomes.iter().map(|o| report(*o)).collect::<Vec<_>>();
        assert_eq!(decide(&all(&[Finished, Finished]), 0, 0), Decision::Finished);
        assert_eq!(decide(&all(&[Failed, Aborted]), 0, 1), Decision::Restart);
        assert_eq!(decide(&all(&[Failed, Aborted]), 1, 1), Decision::Failed);
        assert_eq!(decide(&all(&[Aborted, Lost]), 0, 3), Decision::Failed);
        assert_eq!(decide(&all(&[Preempted, Preempted]), 0, 1), Decision::Preempted);
        // A signal to any launcher is the user's or the scheduler's word: no restart.
        assert_eq!(decide(&all(&[Stopped(15), Aborted]), 0, 5), Decision::Stopped(15));
    }

    #[test]
    fn ipv6_literals_get_brackets() {
        assert_eq!(join_host_port("10.0.0.1", 29500), "10.0.0.1:29500");
        assert_eq!(join_host_port("::1", 80), "[::1]:80");
        assert_eq!(join_host_port("node-01", 1), "node-01:1");
    }
}
