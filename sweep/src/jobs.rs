//! Writing a sweep to disk (one directory per run, as DomainBed's `Job`) and launching it: locally
//! one run after another, or as a Slurm job array.
//!
//! Layout of a sweep directory `OUT`:
//! - `OUT/<run>/config.toml`: the base config with the run's overrides, `OUT/<run>/run.json`: its
//!   DomainBed args, hyperparameters and command; the trainer then writes `results.jsonl` there and
//!   the launcher a `done` marker when the run succeeded.
//! - `OUT/sweep.json` (options and runs), `OUT/runs.txt` (one run directory a line) and
//!   `OUT/commands.txt` (the matching command lines).

use crate::plan::{RunSpec, SweepOptions};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The marker a finished run leaves in its directory (DomainBed's name).
pub const DONE_FILE: &str = "done";

/// How a run is launched: `exe launch_args... --out DIR DIR/config.toml`.
#[derive(Debug, Clone)]
pub struct Launcher {
    pub exe: PathBuf,
    /// E.g. `["--gpus", "1"]`.
    pub launch_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    NotLaunched,
    Incomplete,
    Done,
}

/// A run as written to disk.
#[derive(Debug, Clone)]
pub struct WrittenRun {
    pub name: String,
    pub dir: PathBuf,
    /// Program and arguments.
    pub argv: Vec<String>,
    pub state: RunState,
}

impl WrittenRun {
    /// The command line for a shell, marking the run done when it succeeds.
    pub fn shell_line(&self) -> String {
        let argv: Vec<String> = self.argv.iter().map(|a| shell_quote(a)).collect();
        format!("{} && touch {}", argv.join(" "), shell_quote(&self.dir.join(DONE_FILE).to_string_lossy()))
    }
}

pub fn run_state(dir: &Path) -> RunState {
    if dir.join(DONE_FILE).exists() {
        RunState::Done
    } else if dir.join("results.jsonl").exists() {
        RunState::Incomplete
    } else {
        RunState::NotLaunched
    }
}

/// POSIX single-quoting, only where needed.
pub fn shell_quote(text: &str) -> String {
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Writes every run directory and the sweep files under `out` (made absolute by the caller).
/// A finished run keeps its directory untouched, but only if its config is the one this sweep
/// would write: a changed base config must not silently mix with old results.
pub fn write_sweep(
    out: &Path,
    options: &SweepOptions,
    base: &toml::Table,
    runs: &[RunSpec],
    launcher: &Launcher,
) -> Result<Vec<WrittenRun>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating sweep directory {}", out.display()))?;
    let mut written = Vec::with_capacity(runs.len());
    let mut manifest_runs = Vec::with_capacity(runs.len());
    for run in runs {
        let dir = out.join(&run.name);
        let config_path = dir.join("config.toml");
        let config_text = toml::to_string_pretty(&run.config(base)?)
            .with_context(|| format!("run {}: serialising its config", run.name))?;
        let mut argv = vec![launcher.exe.to_string_lossy().into_owned()];
        argv.extend(launcher.launch_args.iter().cloned());
        argv.extend(["--out".into(), dir.to_string_lossy().into_owned(), config_path.to_string_lossy().into_owned()]);
        let state = run_state(&dir);
        if state == RunState::Done {
            let old = std::fs::read_to_string(&config_path).unwrap_or_default();
            if old != config_text {
                bail!(
                    "run {} is done but its {} differs from what this sweep would write \
                     (the base config or the options changed): use another --out or remove that run",
                    dir.display(),
                    config_path.display()
                );
            }
        } else {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(&config_path, &config_text).with_context(|| format!("writing {}", config_path.display()))?;
        }
        let record = json!({
            "name": run.name,
            "args": run.args(options),
            "hparams": run.hparams_json(),
            "overrides": run.overrides.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "command": argv,
        });
        if state != RunState::Done {
            let path = dir.join("run.json");
            let text = serde_json::to_string_pretty(&record).context("serialising run.json")?;
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        manifest_runs.push(record);
        written.push(WrittenRun { name: run.name.clone(), dir, argv, state });
    }
    let manifest = json!({ "options": options, "runs": manifest_runs });
    write_text(&out.join("sweep.json"), &serde_json::to_string_pretty(&manifest).context("serialising sweep.json")?)?;
    let dirs: Vec<String> = written.iter().map(|w| w.dir.to_string_lossy().into_owned()).collect();
    write_text(&out.join("runs.txt"), &(dirs.join("\n") + "\n"))?;
    let lines: Vec<String> = written.iter().map(WrittenRun::shell_line).collect();
    write_text(&out.join("commands.txt"), &(lines.join("\n") + "\n"))?;
    Ok(written)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// A Slurm job-array script: task `i` runs line `i + 1` of `OUT/commands.txt` unless that run is
/// already done. `directives` are extra `#SBATCH` options (e.g. `--gres=gpu:1`).
pub fn slurm_script(out: &Path, n_runs: usize, directives: &[String]) -> Result<String> {
    if n_runs == 0 {
        bail!("no runs to put in a Slurm array");
    }
    let out_q = shell_quote(&out.to_string_lossy());
    let mut s = String::from("#!/bin/bash\n");
    s += "#SBATCH --job-name=mgrun-sweep\n";
    s += &format!("#SBATCH --array=0-{}\n", n_runs - 1);
    s += &format!("#SBATCH --output={}/slurm-%A_%a.out\n", out.to_string_lossy());
    for d in directives {
        s += &format!("#SBATCH {d}\n");
    }
    s += "# Generated by `mgrun sweep`; submit with `sbatch` (add partition/account/time directives above).\n";
    s += "set -euo pipefail\n";
    s += &format!("SWEEP_DIR={out_q}\n");
    s += "LINE=$((SLURM_ARRAY_TASK_ID + 1))\n";
    s += "RUN_DIR=$(sed -n \"${LINE}p\" \"$SWEEP_DIR/runs.txt\")\n";
    s += "COMMAND=$(sed -n \"${LINE}p\" \"$SWEEP_DIR/commands.txt\")\n";
    s += &format!("if [ -e \"$RUN_DIR/{DONE_FILE}\" ]; then echo \"$RUN_DIR is done\"; exit 0; fi\n");
    s += "echo \"$COMMAND\"\n";
    s += "eval \"$COMMAND\"\n";
    Ok(s)
}

/// Outcome of [`run_locally`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LocalSummary {
    pub ran: usize,
    pub skipped: usize,
    /// Names of the runs that failed.
    pub failed: Vec<String>,
}

/// Runs the runs one after another (DomainBed's `local` launcher), skipping those already done and
/// marking each successful one done. A failed run is reported and the sweep goes on.
pub fn run_locally(runs: &[WrittenRun]) -> Result<LocalSummary> {
    let mut summary = LocalSummary::default();
    for (i, run) in runs.iter().enumerate() {
        if run_state(&run.dir) == RunState::Done {
            summary.skipped += 1;
            continue;
        }
        println!("sweep: [{}/{}] {}", i + 1, runs.len(), run.name);
        let (program, args) = run.argv.split_first().context("empty command")?;
        let status = Command::new(program)
            .args(args)
            .status()
            .with_context(|| format!("run {}: starting {program}", run.name))?;
        summary.ran += 1;
        if status.success() {
            let done = run.dir.join(DONE_FILE);
            std::fs::write(&done, "done").with_context(|| format!("writing {}", done.display()))?;
        } else {
            eprintln!("sweep: run {} failed ({status}); its outputs are in {}", run.name, run.dir.display());
            summary.failed.push(run.name.clone());
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_spaces_and_quotes() {
        assert_eq!(shell_quote("/a/b-c.toml"), "/a/b-c.toml");
        assert_eq!(shell_quote("Real World"), "'Real World'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
