//! The run directory (`--out`) belongs to one job at a time, and a run in it is not overwritten by
//! accident: the launcher of rank 0 holds an exclusive lock on `<out>/.mgrun.lock` for the job's
//! life, and a directory that already holds a run is refused unless the job resumes it (`--resume`)
//! or replaces it (`--overwrite`).
//!
//! The lock is `flock(2)`: released when the launcher exits however it exits, so a killed job never
//! leaves a stale lock. On a shared file system it holds where the file system supports `flock` (NFSv4
//! and Lustre with `flock` mounts do); only the node that starts rank 0 takes it.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = ".mgrun.lock";

/// The outputs of a run that `--overwrite` removes (nothing else in the directory is touched).
const RUN_OUTPUTS: &[&str] = &[
    "steps.jsonl",
    "results.jsonl",
    "model.safetensors",
    "model_swad.safetensors",
    "skipped.txt",
    "checkpoints",
    "logs",
    "sensitivity",
];

/// What the job may do with a run already in its directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunDirPolicy {
    /// `--resume` (or a Slurm requeue): the run continues.
    pub resume: bool,
    /// `--overwrite`: the run's outputs are removed first.
    pub overwrite: bool,
}

/// Held for the job's life; dropping it releases the directory.
#[derive(Debug)]
pub struct RunDirLock {
    _file: File,
}

/// Takes `out_dir` for this job (see the module docs).
pub fn claim(out_dir: &Path, policy: RunDirPolicy) -> Result<RunDirLock> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating the run directory {}", out_dir.display()))?;
    let path = out_dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this process owns for the call's duration.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "--out {}: another mgrun job is running there ({}); wait for it to end or use another --out",
                out_dir.display(),
                holder.trim()
            );
        }
        return Err(error).with_context(|| format!("locking {}", path.display()));
    }
    let holder = format!(
        "pid {} on {} since {}\n",
        std::process::id(),
        crate::rendezvous::hostname(),
        crate::launch::local_timestamp()
    );
    file.set_len(0)
        .and_then(|_| file.rewind())
        .and_then(|_| file.write_all(holder.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;

    if !policy.resume {
        if let Some(run) = existing_run(out_dir) {
            if !policy.overwrite {
                bail!(
                    "--out {} holds {run}: continue it with --resume auto, replace it with --overwrite (its results, \
                     logs, checkpoints and model are deleted), or use another --out",
                    out_dir.display()
                );
            }
            for output in RUN_OUTPUTS.iter().map(|o| out_dir.join(o)).filter(|p| p.exists()) {
                remove(&output)?;
            }
            println!("mgrun: --overwrite: removed the outputs of {run} in {}", out_dir.display());
        }
    }
    Ok(RunDirLock { _file: file })
}

/// A description of the run in `out_dir`, if there is one.
fn existing_run(out_dir: &Path) -> Option<String> {
    if out_dir.join("model.safetensors").exists() {
        return Some("a finished run (model.safetensors)".into());
    }
    let started: Vec<&str> =
        ["steps.jsonl", "results.jsonl", "checkpoints"].into_iter().filter(|o| out_dir.join(o).exists()).collect();
    (!started.is_empty()).then(|| format!("an unfinished run ({})", started.join(", ")))
}

fn remove(path: &PathBuf) -> Result<()> {
    let result = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
    result.with_context(|| format!("--overwrite: removing {}", path.display()))
}
