//! What every fault case checks: how mgrun exited and how fast, whether the message names the culprit,
//! that no process of the case is left behind and that no file of an earlier run was lost.

use mgrun_tests::mgrun_bin;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// An mgrun command run to its end (or killed as a hang).
pub struct Invocation {
    pub status: ExitStatus,
    pub seconds: f64,
    /// stdout and stderr, interleaved as written.
    pub log: String,
}

impl Invocation {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// A clean refusal: exit code 1 (not a panic's 101, not a signal) within `limit_s`, with every
    /// `needle` in the output and no Rust panic or raw `Os { .. }` error in it.
    pub fn assert_refused(&self, needles: &[&str], limit_s: f64) {
        assert_eq!(self.status.code(), Some(1), "expected exit code 1, got {:?}:\n{}", self.status, self.log);
        self.assert_within(limit_s);
        self.assert_says(needles);
        assert!(!self.log.contains("panicked"), "a panic:\n{}", self.log);
        assert!(!self.log.contains("Os {"), "a raw I/O error:\n{}", self.log);
    }

    pub fn assert_within(&self, limit_s: f64) {
        assert!(self.seconds < limit_s, "took {:.1} s (limit {limit_s} s):\n{}", self.seconds, self.log);
    }

    pub fn assert_says(&self, needles: &[&str]) {
        for needle in needles {
            assert!(self.log.contains(needle), "expected {needle:?} in:\n{}", self.log);
        }
    }
}

/// Starts mgrun with `args` in `cwd`, its output going to `log` (a file, so that nothing blocks on a pipe).
pub fn spawn(args: &[&str], cwd: &Path, log: &Path) -> Child {
    let file = File::create(log).unwrap();
    Command::new(mgrun_bin())
        .args(args)
        .current_dir(cwd)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap()
}

/// Waits for `child` started at `started`; past `limit` it is killed and the case fails as a hang.
pub fn finish(mut child: Child, started: Instant, log: &Path, limit: Duration) -> Invocation {
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hang: still running after {limit:?}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let seconds = started.elapsed().as_secs_f64();
    Invocation { status, seconds, log: std::fs::read_to_string(log).unwrap_or_default() }
}

/// Runs mgrun with `args` in `cwd` to its end; a run past `limit` fails the case as a hang.
pub fn invoke(args: &[&str], cwd: &Path, limit: Duration) -> Invocation {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = cwd.join(format!(".invocation{n}.log"));
    let started = Instant::now();
    finish(spawn(args, cwd, &log), started, &log, limit)
}

/// The default bound on one invocation of a fault case: a refusal takes seconds, a small run tens.
pub const LIMIT: Duration = Duration::from_secs(120);

/// Processes still alive whose working directory is inside `dir` (every process of a case runs there):
/// `(pid, command line)`. Zombies are dead and not counted.
pub fn processes_in(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let in_dir = std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir));
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if in_dir && !zombie && pid != std::process::id() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Fails when a process of the case outlives it by more than a few seconds (teardown is asynchronous
/// for ranks orphaned by a killed launcher).
pub fn assert_no_leftovers(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_in(dir);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for (pid, _) in &left {
                unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
            }
            panic!("processes left behind: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file below a directory with its contents, to check that a refused or failed invocation lost
/// or changed none of them.
pub struct Files(BTreeMap<PathBuf, Vec<u8>>);

impl Files {
    pub fn of(dir: &Path) -> Files {
        let mut files = BTreeMap::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    files.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
                }
            }
        }
        Files(files)
    }

    /// The contents `path` had.
    pub fn read(&self, path: &Path) -> Option<&Vec<u8>> {
        self.0.get(path)
    }

    /// Every file is still there with the same bytes, except `changing` ones (appended logs).
    pub fn assert_kept(&self, changing: &[&str]) {
        for (path, before) in &self.0 {
            if changing.iter().any(|c| path.to_string_lossy().contains(c)) {
                continue;
            }
            let now = std::fs::read(path).unwrap_or_else(|e| panic!("{} was lost: {e}", path.display()));
            assert!(&now == before, "{} was changed", path.display());
        }
    }
}

/// The signal that ended a process, or its exit code, as a short text.
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => format!("{status:?}"),
    }
}
