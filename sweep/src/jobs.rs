//! Writing a sweep to disk (one directory per run, as DomainBed's `Job`) and launching it: locally
//! one run after another, or as a Slurm job array.
//!
//! Layout of a sweep directory `OUT`:
//! - `OUT/<run>/config.toml`: the base config with the run's overrides, `OUT/<run>/run.json`: its
//!   DomainBed args, hyperparameters and command; the trainer then writes `results.jsonl` and its
//!   checkpoints there, and whoever ran the command (`--run`, the Slurm script, a `commands.txt`
//!   line) a `done` marker once the command succeeded.
//! - `OUT/sweep.json` (options and runs), `OUT/runs.txt` (one run directory a line) and
//!   `OUT/commands.txt` (the matching shell lines, each marking its run done when it succeeds).
//!
//! Every run's command resumes (`--resume auto --out RUN_DIR`): run again after a kill, a preemption
//! or a requeue, it continues from the run's newest checkpoint, and starts at step 0 when there is
//! none.

use crate::plan::{RunSpec, SweepOptions};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The marker a finished run leaves in its directory (DomainBed's name).
pub const DONE_FILE: &str = "done";

/// The arguments that make every run's command resume from its newest checkpoint, if any.
pub const RESUME_ARGS: [&str; 2] = ["--resume", "auto"];

/// Seconds before the time limit at which the Slurm script asks for SIGUSR1, unless told otherwise.
pub const DEFAULT_SIGNAL_LEAD_S: u32 = 90;

/// The exit status of an mgrun job whose ranks stopped for preemption after writing a checkpoint
/// (the launcher's `PREEMPTED_EXIT_CODE`, `EX_TEMPFAIL`).
pub const PREEMPTED_EXIT_STATUS: i32 = 75;

/// How a run is launched: `exe launch_args... --resume auto --out DIR DIR/config.toml`.
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
    /// The command line for a shell (a `commands.txt` line), marking the run done when it succeeds.
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
        argv.extend(RESUME_ARGS.map(String::from));
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

/// What the Slurm array script asks of Slurm beyond one task per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmOptions {
    /// Extra `#SBATCH` options, e.g. `--gres=gpu:1`.
    pub directives: Vec<String>,
    /// Seconds before the time limit at which Slurm sends SIGUSR1 (`--signal=B:USR1@N`).
    pub signal_lead_s: u32,
}

impl Default for SlurmOptions {
    fn default() -> Self {
        Self { directives: Vec::new(), signal_lead_s: DEFAULT_SIGNAL_LEAD_S }
    }
}

/// A Slurm job-array script for `runs` (written under `out`): task `i` runs run `i` (line `i + 1`
/// of `OUT/runs.txt` and `OUT/commands.txt`), unless that run is already done, and marks it done
/// only when its command exits 0. Preemption works as the script's header says: Slurm signals the
/// batch shell, which passes SIGUSR1 on to mgrun; mgrun checkpoints, requeues the task itself and
/// exits with 75; the requeued task resumes the run (`--resume auto`). The commands are part of the
/// script, so that a requeued task runs what was submitted even if the sweep is written again.
pub fn slurm_script(out: &Path, runs: &[WrittenRun], options: &SlurmOptions) -> Result<String> {
    if runs.is_empty() {
        bail!("no runs to put in a Slurm array");
    }
    // sbatch takes sig_time in 0..=65535; 0 would signal at the time limit itself, too late to checkpoint.
    if !(1..=65535).contains(&options.signal_lead_s) {
        bail!("--signal-lead-s {}: must be 1..65535 seconds", options.signal_lead_s);
    }
    let lead = options.signal_lead_s;
    let mut s = String::from("#!/bin/bash\n");
    s += "#SBATCH --job-name=mgrun-sweep\n";
    s += &format!("#SBATCH --array=0-{}\n", runs.len() - 1);
    s += &format!("#SBATCH --output={}/slurm-%A_%a.out\n", out.to_string_lossy());
    // A requeued task appends to its log instead of truncating what the preempted attempt wrote.
    s += "#SBATCH --open-mode=append\n";
    s += "#SBATCH --requeue\n";
    s += &format!("#SBATCH --signal=B:USR1@{lead}\n");
    for d in &options.directives {
        s += &format!("#SBATCH {d}\n");
    }
    s += &format!(
        r#"# Generated by `mgrun sweep --slurm`: one array task per run of the sweep in {out} ({n} runs).
# Submit with `sbatch THIS_FILE`; add partition, account and time directives above.
#
# Preemption and requeue (the time limit, or a preemption with a grace period):
# - {lead} s before the end, Slurm sends SIGUSR1 to this script (`B:`: the batch shell only; mgrun
#   runs in the batch step, not under srun, so no other process would get it); the script passes it
#   on to mgrun.
# - On SIGUSR1, mgrun's ranks write a checkpoint at their next step boundary; mgrun then requeues
#   this array task itself (`scontrol requeue <SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>`) and exits
#   with status {preempted}. This script never requeues, and marks a run done only when its command
#   exits 0 (never after {preempted}, or any other failure).
# - Every command carries `--resume auto --out RUN_DIR`: the requeued task continues from the run's
#   newest checkpoint (a run without one starts at step 0). A task whose run is done exits 0 at once.
# - SIGTERM (the end of the job) reaches every process of the job, mgrun included; the script does
#   not pass it on, it waits for mgrun, which finishes committing its checkpoint first.
set -euo pipefail
"#,
        out = out.to_string_lossy(),
        n = runs.len(),
        preempted = PREEMPTED_EXIT_STATUS,
    );
    s += "case \"${SLURM_ARRAY_TASK_ID:?is not set: submit this script with sbatch}\" in\n";
    for (i, run) in runs.iter().enumerate() {
        let argv: Vec<String> = run.argv.iter().map(|a| shell_quote(a)).collect();
        s += &format!("{i})\n    RUN_DIR={}\n", shell_quote(&run.dir.to_string_lossy()));
        s += &format!("    set -- {}\n    ;;\n", argv.join(" "));
    }
    s += "*)\n    echo \"sweep: no run for array task $SLURM_ARRAY_TASK_ID (0-";
    s += &format!("{})\" >&2\n    exit 2\n    ;;\nesac\n", runs.len() - 1);
    s += &format!(
        r#"if [ -e "$RUN_DIR/{DONE_FILE}" ]; then
    echo "sweep: $RUN_DIR is done"
    exit 0
fi
child=
preempted=0
# USR1 before mgrun has started is passed on as soon as it has.
trap 'preempted=1; if [ -n "$child" ]; then kill -USR1 "$child" 2>/dev/null || true; fi' USR1
trap 'echo "sweep: SIGTERM: waiting for mgrun to stop" >&2' TERM
echo "sweep: task $SLURM_ARRAY_TASK_ID (restart ${{SLURM_RESTART_COUNT:-0}}): $*"
"$@" &
child=$!
if [ "$preempted" = 1 ]; then kill -USR1 "$child" 2>/dev/null || true; fi
# `wait` returns early when a trapped signal arrives: wait again until mgrun has exited.
while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null && continue
    # mgrun has ended; if it did while a trap cut `wait` short, ask for its own status again.
    if [ "$status" -gt 128 ]; then
        status=0
        wait "$child" || status=$?
    fi
    break
done
if [ "$status" -eq 0 ]; then
    printf done > "$RUN_DIR/{DONE_FILE}"
    echo "sweep: $RUN_DIR is done"
elif [ "$status" -eq {PREEMPTED_EXIT_STATUS} ]; then
    echo "sweep: $RUN_DIR was preempted after a checkpoint (status {PREEMPTED_EXIT_STATUS}); inside Slurm mgrun has requeued this task" >&2
else
    echo "sweep: $RUN_DIR failed (status $status); it is not marked done" >&2
fi
exit "$status"
"#
    );
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
/// marking each successful one done. A failed (or preempted) run is reported and the sweep goes on;
/// running the sweep again resumes it from its newest checkpoint.
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
        } else if status.code() == Some(PREEMPTED_EXIT_STATUS) {
            eprintln!(
                "sweep: run {} was preempted after writing a checkpoint; run the sweep again to resume it from {}",
                run.name,
                run.dir.display()
            );
            summary.failed.push(run.name.clone());
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
    use std::process::Output;
    use std::time::{Duration, Instant};

    /// A stand-in for mgrun: records its arguments in `$FAKE_LOG`, then, by `$FAKE_MODE`, succeeds,
    /// fails as a preempted job (75), or waits for SIGUSR1 and then exits 75 as mgrun does.
    const FAKE_MGRUN: &str = r#"#!/bin/bash
echo "args: $*" >> "$FAKE_LOG"
case "$FAKE_MODE" in
ok) exit 0 ;;
preempted) exit 75 ;;
wait_usr1)
    trap 'echo "got SIGUSR1" >> "$FAKE_LOG"; exit 75' USR1
    touch "$FAKE_LOG.ready"
    for _ in $(seq 600); do sleep 0.05; done
    exit 3
    ;;
esac
exit 9
"#;

    struct Fixture {
        _tmp: tempfile::TempDir,
        out: PathBuf,
        log: PathBuf,
        runs: Vec<WrittenRun>,
        script: PathBuf,
    }

    /// Two runs in a sweep directory whose "mgrun" is [`FAKE_MGRUN`], and their Slurm script.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("sweep dir");
        let exe = tmp.path().join("fake-mgrun");
        std::fs::write(&exe, FAKE_MGRUN).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let launcher = Launcher { exe, launch_args: vec!["--cpus".into(), "1".into()] };
        let runs: Vec<WrittenRun> = ["erm-test0-hp00-trial0", "erm-test1-hp00-trial0"]
            .iter()
            .map(|name| {
                let dir = out.join(name);
                std::fs::create_dir_all(&dir).unwrap();
                let mut argv = vec![launcher.exe.to_string_lossy().into_owned()];
                argv.extend(launcher.launch_args.iter().cloned());
                argv.extend(RESUME_ARGS.map(String::from));
                argv.extend(["--out".into(), dir.to_string_lossy().into_owned()]);
                argv.push(dir.join("config.toml").to_string_lossy().into_owned());
                WrittenRun { name: name.to_string(), dir, argv, state: RunState::NotLaunched }
            })
            .collect();
        let options = SlurmOptions { directives: vec!["--gres=gpu:1".into()], signal_lead_s: 120 };
        let script = tmp.path().join("sweep.sbatch");
        std::fs::write(&script, slurm_script(&out, &runs, &options).unwrap()).unwrap();
        let log = tmp.path().join("fake.log");
        Fixture { _tmp: tmp, out, log, runs, script }
    }

    impl Fixture {
        fn task(&self, task: usize, mode: &str) -> Command {
            let mut command = Command::new("bash");
            command
                .arg(&self.script)
                .env("SLURM_ARRAY_TASK_ID", task.to_string())
                .env("FAKE_MODE", mode)
                .env("FAKE_LOG", &self.log);
            command
        }

        fn run_task(&self, task: usize, mode: &str) -> Output {
            self.task(task, mode).output().unwrap()
        }

        fn done(&self, task: usize) -> bool {
            self.runs[task].dir.join(DONE_FILE).exists()
        }

        fn log(&self) -> String {
            std::fs::read_to_string(&self.log).unwrap_or_default()
        }
    }

    fn said(output: &Output) -> String {
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
    }

    #[test]
    fn slurm_script_asks_for_requeue_and_an_early_signal_and_resumes_every_run() {
        let f = fixture();
        let text = std::fs::read_to_string(&f.script).unwrap();
        for directive in [
            "#SBATCH --array=0-1\n",
            "#SBATCH --requeue\n",
            "#SBATCH --signal=B:USR1@120\n",
            "#SBATCH --open-mode=append\n",
            "#SBATCH --gres=gpu:1\n",
        ] {
            assert!(text.contains(directive), "missing {directive:?} in\n{text}");
        }
        assert!(text.contains(&format!("#SBATCH --output={}/slurm-%A_%a.out", f.out.display())), "{text}");
        // Every #SBATCH line comes before the first command, or sbatch ignores it.
        let first_command = text.lines().position(|l| !l.starts_with('#')).unwrap();
        assert!(text.lines().skip(first_command).all(|l| !l.starts_with("#SBATCH")), "{text}");
        for run in &f.runs {
            let dir = shell_quote(&run.dir.to_string_lossy());
            assert!(text.contains(&format!("--resume auto --out {dir} ")), "{text}");
        }
        // The header documents the contract; the script itself never requeues.
        assert!(text.contains("scontrol requeue <SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>"), "{text}");
        assert!(text.lines().filter(|l| !l.starts_with('#')).all(|l| !l.contains("scontrol")), "{text}");
        // `done` is written in the success branch only.
        let write = text.find("printf done >").unwrap();
        let success = text.find("if [ \"$status\" -eq 0 ]; then").unwrap();
        let other = text.find("elif [ \"$status\" -eq 75 ]").unwrap();
        assert!(success < write && write < other, "{text}");
        assert_eq!(text.matches("printf done >").count(), 1);
        assert!(slurm_script(&f.out, &f.runs, &SlurmOptions { signal_lead_s: 0, ..SlurmOptions::default() }).is_err());
        assert!(slurm_script(&f.out, &[], &SlurmOptions::default()).is_err());
    }

    #[test]
    fn slurm_task_marks_done_only_on_success_and_skips_done_runs() {
        let f = fixture();
        // A preempted run (75): no marker, status 75 passed on.
        let preempted = f.run_task(1, "preempted");
        assert_eq!(preempted.status.code(), Some(75), "{}", said(&preempted));
        assert!(!f.done(1));
        assert!(said(&preempted).contains("was preempted after a checkpoint"), "{}", said(&preempted));
        // Any other failure: no marker either.
        assert_eq!(f.run_task(1, "other").status.code(), Some(9));
        assert!(!f.done(1));
        // The requeued task runs the same command again; this time it succeeds.
        let ok = f.run_task(1, "ok");
        assert!(ok.status.success(), "{}", said(&ok));
        assert!(f.done(1) && !f.done(0));
        let dir = f.runs[1].dir.to_string_lossy().into_owned();
        assert!(f.log().contains(&format!("--cpus 1 --resume auto --out {dir} {dir}/config.toml")), "{}", f.log());
        // Once done, a task (e.g. requeued after its run finished) exits 0 without running anything.
        let calls = f.log().lines().count();
        let again = f.run_task(1, "preempted");
        assert!(again.status.success(), "{}", said(&again));
        assert!(said(&again).contains("is done"), "{}", said(&again));
        assert_eq!(f.log().lines().count(), calls, "a done run ran again");
        // A task id outside the array is an error.
        assert_eq!(f.run_task(2, "ok").status.code(), Some(2));
    }

    #[test]
    fn slurm_task_passes_sigusr1_on_to_mgrun_and_waits_for_it() {
        let f = fixture();
        let mut child = f.task(0, "wait_usr1").stdout(std::process::Stdio::piped()).spawn().unwrap();
        let ready = f.log.with_extension("log.ready");
        let started = Instant::now();
        while !ready.exists() {
            assert!(started.elapsed() < Duration::from_secs(20), "the fake mgrun never started");
            std::thread::sleep(Duration::from_millis(20));
        }
        // What Slurm does with --signal=B:USR1@N: signal the batch shell only.
        let kill = Command::new("kill").args(["-USR1", &child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(75), "log:\n{}", f.log());
        assert!(f.log().contains("got SIGUSR1"), "{}", f.log());
        assert!(!f.done(0));
    }

    #[test]
    fn quoting_survives_spaces_and_quotes() {
        assert_eq!(shell_quote("/a/b-c.toml"), "/a/b-c.toml");
        assert_eq!(shell_quote("Real World"), "'Real World'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
