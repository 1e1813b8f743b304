//! mgrun on a real Slurm: `make test` starts a local one (scripts/slurm-local.sh: slurmctld and two
//! slurmd node names on this machine), and these tests submit the README's example batch scripts with
//! `sbatch`: a 2-rank CPU job, a job across two nodes, one Slurm task per rank, a preempted job
//! (SIGUSR1 by `scancel --signal`) that requeues itself and resumes, and a job whose rank is killed and
//! restarts from its checkpoint. Each must end with the same model as an uninterrupted local run.
//!
//! When Slurm is not running, every test fails and says so: they never pass without a Slurm.

use mgrun_tests::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const STEPS: usize = 16;
/// The longest a test job may take, queueing and a requeue included.
const JOB_LIMIT: Duration = Duration::from_secs(240);

/// One job at a time: the local cluster has few CPUs, and timings stay readable.
static SERIAL: Mutex<()> = Mutex::new(());

fn slurm_command(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(output) => (
            output.status.success(),
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr)),
        ),
        Err(error) => (false, format!("cannot run {program}: {error}")),
    }
}

/// The idle node names of the local Slurm, or a failure that says Slurm is missing.
fn slurm_nodes() -> Vec<String> {
    let (ok, out) = slurm_command("sinfo", &["-h", "-N", "-o", "%N %t"]);
    assert!(
        ok,
        "Slurm is not running here, so the Slurm tests cannot run (they do not pass without it): start it with \
         `bash scripts/slurm-local.sh start` (make test does). sinfo said:\n{out}"
    );
    let nodes: Vec<String> = out.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect();
    assert!(!nodes.is_empty(), "Slurm has no nodes:\n{out}");
    nodes
}

/// The uninterrupted local one-rank run: what every Slurm job must reproduce bit for bit.
fn reference(dir: &Path, cfg: &Path) -> (Vec<(u64, f64)>, Params) {
    let out = dir.join("reference");
    let mut command = Command::new(mgrun_bin());
    command.args(["--cpus", "1", "--out", out.to_str().unwrap(), cfg.to_str().unwrap()]).current_dir(dir);
    for name in ["SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT", "SLURM_NNODES", "SLURM_JOB_NODELIST"] {
        command.env_remove(name);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "reference run: {}{}", text(&output.stdout), text(&output.stderr));
    run_outputs(&out)
}

fn assert_same_run(out_dir: &Path, reference: &(Vec<(u64, f64)>, Params), what: &str, log: &str) {
    let (losses, params) = run_outputs(out_dir);
    assert_eq!(losses, reference.0, "{what}: per-step losses differ from the local run\n{log}");
    for (name, values) in &params {
        assert!(values == &reference.1[name], "{what}: parameter {name} differs from the local run\n{log}");
    }
}

/// Submits an example script from the repository root with extra sbatch options; returns the job id.
fn submit(dir: &Path, script: &str, sbatch_options: &[&str], out_dir: &Path, cfg: &Path, extra_env: &str) -> String {
    let script = workspace_root().join("examples/slurm").join(script);
    let export = format!("ALL,MGRUN={},OUT={}{extra_env}", mgrun_bin().display(), out_dir.display());
    let log = dir.join("slurm-%j.out");
    let mut args = vec!["--parsable".to_string(), format!("--export={export}"), format!("--output={}", log.display())];
    args.extend(sbatch_options.iter().map(|o| o.to_string()));
    args.push(script.display().to_string());
    args.push(cfg.display().to_string());
    let output = Command::new("sbatch").args(&args).current_dir(workspace_root()).output().unwrap();
    let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "sbatch {args:?} failed:\n{said}");
    said.trim().split(';').next().unwrap_or_default().to_string()
}

/// `scontrol show job` fields of a job, by name.
fn job_fields(job: &str) -> BTreeMap<String, String> {
    let (_, out) = slurm_command("scontrol", &["show", "job", "-o", job]);
    out.split_whitespace()
        .filter_map(|field| field.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// Waits until the job has ended for good (not requeued, not pending); returns its fields.
fn wait_for_end(job: &str, dir: &Path) -> BTreeMap<String, String> {
    let deadline = Instant::now() + JOB_LIMIT;
    loop {
        let fields = job_fields(job);
        let state = fields.get("JobState").cloned().unwrap_or_default();
        if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"].contains(&state.as_str()) {
            return fields;
        }
        if Instant::now() > deadline {
            let _ = slurm_command("scancel", &[job]);
            panic!("job {job} still {state} after {JOB_LIMIT:?}:\n{}", job_log(dir, job));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn job_log(dir: &Path, job: &str) -> String {
    std::fs::read_to_string(dir.join(format!("slurm-{job}.out"))).unwrap_or_else(|e| format!("(no job log: {e})"))
}

/// Waits until Slurm has requeued `job` once (`Restarts=1`); returns the time since `since`.
fn wait_for_requeue(job: &str, since: Instant, log: impl Fn() -> String) -> Duration {
    let deadline = Instant::now() + JOB_LIMIT;
    while job_fields(job).get("Restarts").map(String::as_str) != Some("1") {
        assert!(Instant::now() < deadline, "job {job} was not requeued: {:?}\n{}", job_fields(job), log());
        std::thread::sleep(Duration::from_millis(100));
    }
    since.elapsed()
}

fn wait_for_steps(out_dir: &Path, steps: usize, job: &str, dir: &Path) {
    let deadline = Instant::now() + JOB_LIMIT;
    while steps_recorded(out_dir) < steps {
        assert!(Instant::now() < deadline, "job {job} did not reach step {steps}:\n{}", job_log(dir, job));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_two_rank_cpu_job_runs_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    slurm_nodes();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 9, 0);
    let expected = reference(dir.path(), &cfg);
    let out = dir.path().join("two-ranks");
    let job = submit(dir.path(), "cpu.sbatch", &[], &out, &cfg, "");
    let fields = wait_for_end(&job, dir.path());
    let log = job_log(dir.path(), &job);
    assert_eq!(fields["JobState"], "COMPLETED", "{log}");
    assert!(log.contains(&format!("Slurm job {job}, node 0 of 1")), "{log}");
    assert!(log.contains("2 cpu rank(s)") && log.contains("all 2 rank(s) finished successfully"), "{log}");
    assert_same_run(&out, &expected, "Slurm, 1 node x 2 ranks", &log);
}

#[test]
fn a_job_across_two_node_names_runs_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nodes = slurm_nodes();
    assert!(nodes.len() >= 2, "the local Slurm has one node name ({nodes:?}); scripts/slurm-local.sh starts two");
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 9, 0);
    let expected = reference(dir.path(), &cfg);
    let out = dir.path().join("two-nodes");
    let job = submit(dir.path(), "cpu.sbatch", &["--nodes=2"], &out, &cfg, ",RANKS_PER_NODE=1");
    let fields = wait_for_end(&job, dir.path());
    let log = job_log(dir.path(), &job);
    assert_eq!(fields["JobState"], "COMPLETED", "{log}");
    for node in 0..2 {
        assert!(log.contains(&format!("Slurm job {job}, node {node} of 2")), "{log}");
    }
    assert!(log.contains("node 1") && log.contains("joined the rendezvous store"), "{log}");
    assert_same_run(&out, &expected, "Slurm, 2 nodes x 1 rank", &log);
}

#[test]
fn one_slurm_task_per_rank_runs_end_to_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    slurm_nodes();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 9, 0);
    let expected = reference(dir.path(), &cfg);
    let out = dir.path().join("tasks");
    let job = submit(dir.path(), "cpu-task-per-rank.sbatch", &[], &out, &cfg, "");
    let fields = wait_for_end(&job, dir.path());
    let log = job_log(dir.path(), &job);
    assert_eq!(fields["JobState"], "COMPLETED", "{log}");
    for task in 0..2 {
        assert!(log.contains(&format!("Slurm job {job}, task {task} of 2")), "{log}");
    }
    assert_same_run(&out, &expected, "Slurm, a task per rank", &log);
}

#[test]
fn a_preempted_job_checkpoints_requeues_and_resumes_to_the_same_model() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    slurm_nodes();
    let dir = tempfile::tempdir().unwrap();
    // No periodic checkpoint: the one written on SIGUSR1 is the only one.
    let cfg = tiny_erm_job(dir.path(), STEPS, 9, 0);
    let expected = reference(dir.path(), &cfg);
    let out = dir.path().join("preempted");
    let job = submit(dir.path(), "cpu.sbatch", &[], &out, &cfg, "");
    wait_for_steps(&out, 4, &job, dir.path());
    let signalled = Instant::now();
    let (ok, said) = slurm_command("scancel", &["--signal=USR1", &job]);
    assert!(ok, "scancel --signal=USR1 {job}: {said}");
    // The requeued job waits for Slurm's credential expiry before it starts again (AuthInfo=cred_expire,
    // 10 s in scripts/slurm-local.sh against 120 s by default); no `scontrol update StartTime=now`,
    // which can revoke the job's credential when it lands in the second of the requeue.
    let requeued = wait_for_requeue(&job, signalled, || job_log(dir.path(), &job));
    let fields = wait_for_end(&job, dir.path());
    let recovered = signalled.elapsed();
    let log = job_log(dir.path(), &job);
    assert_eq!(fields["JobState"], "COMPLETED", "{log}");
    assert_eq!(fields.get("Restarts").map(String::as_str), Some("1"), "the job must have been requeued once\n{log}");
    assert!(log.contains("received SIGUSR1") && log.contains("preempted: stopped after step"), "{log}");
    assert!(log.contains(&format!("requeued Slurm job {job}")), "{log}");
    assert!(log.contains("resuming from"), "the requeued job must resume from the checkpoint\n{log}");
    assert_same_run(&out, &expected, "Slurm, preempted and requeued", &log);
    eprintln!(
        "preemption: SIGUSR1 to requeued {:.1} s, to the end of the requeued job {:.1} s",
        requeued.as_secs_f64(),
        recovered.as_secs_f64()
    );
}

#[test]
fn a_killed_rank_restarts_from_its_checkpoint_with_max_restarts_1() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    slurm_nodes();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 9, 4);
    let expected = reference(dir.path(), &cfg);
    let out = dir.path().join("killed");
    let job = submit(dir.path(), "cpu.sbatch", &[], &out, &cfg, "");
    wait_for_steps(&out, 6, &job, dir.path());
    // Rank 1 of this job: a worker process whose command line names this run's out dir.
    let victim = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(" worker --out ")
                && cmdline.contains(out.to_str().unwrap())
                && process_env(*pid, "RANK").as_deref() == Some("1")
        })
        .unwrap_or_else(|| panic!("no rank 1 of job {job} found:\n{}", job_log(dir.path(), &job)));
    let killed = Instant::now();
    // SAFETY: plain kill(2) of the job's rank process.
    unsafe {
        libc::kill(victim as i32, libc::SIGKILL);
    }
    let fields = wait_for_end(&job, dir.path());
    let recovered = killed.elapsed();
    let log = job_log(dir.path(), &job);
    assert_eq!(fields["JobState"], "COMPLETED", "{log}");
    assert!(log.contains("restarting all 2 rank(s) from the newest checkpoint (restart 1 of 1)"), "{log}");
    assert!(log.contains("root cause: rank 1") && log.contains("SIGKILL"), "{log}");
    assert_same_run(&out, &expected, "Slurm, a rank killed and restarted", &log);
    eprintln!("kill: SIGKILL of rank 1 to the end of the job: {:.1} s", recovered.as_secs_f64());
}

#[test]
fn a_sweep_array_task_is_preempted_requeued_resumed_and_done_runs_are_skipped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    slurm_nodes();
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_erm_job(dir.path(), STEPS, 9, 0);
    let sweep = dir.path().join("sweep");
    let script = dir.path().join("array.sbatch");
    let args = [
        "sweep",
        cfg.to_str().unwrap(),
        "--algorithms",
        "erm",
        "--n-hparams",
        "1",
        "--n-trials",
        "1",
        "--cpus",
        "1",
        "--out",
        sweep.to_str().unwrap(),
        "--slurm",
        script.to_str().unwrap(),
    ];
    let written = run_mgrun(&args, dir.path());
    assert!(written.status.success(), "{}{}", text(&written.stdout), text(&written.stderr));
    let runs: Vec<PathBuf> =
        std::fs::read_to_string(sweep.join("runs.txt")).unwrap().lines().map(PathBuf::from).collect();
    assert_eq!(runs.len(), 4, "one run per test domain");

    let submitted = Command::new("sbatch").arg("--parsable").arg(&script).current_dir(dir.path()).output().unwrap();
    assert!(submitted.status.success(), "{}", text(&submitted.stderr));
    let array = text(&submitted.stdout).trim().split(';').next().unwrap_or_default().to_string();
    let task0 = format!("{array}_0");
    let task0_log = || std::fs::read_to_string(sweep.join(format!("slurm-{array}_0.out"))).unwrap_or_default();
    wait_for_steps(&runs[0], 4, &task0, dir.path());
    // `B:USR1`: the signal goes to the batch shell, which passes it on to mgrun.
    let (ok, said) = slurm_command("scancel", &["--signal=USR1", "--batch", &task0]);
    assert!(ok, "scancel --signal=USR1 --batch {task0}: {said}");
    wait_for_requeue(&task0, Instant::now(), task0_log);
    // The whole array ends: every run done.
    let deadline = Instant::now() + JOB_LIMIT;
    while runs.iter().any(|run| !run.join("done").exists())
        || !slurm_command("squeue", &["-h", "-j", &array]).1.trim().is_empty()
    {
        assert!(Instant::now() < deadline, "the array did not finish:\n{}", task0_log());
        std::thread::sleep(Duration::from_millis(250));
    }
    let log = task0_log();
    assert!(
        log.contains("preempted: stopped after step") && log.contains(&format!("requeued Slurm job {task0}")),
        "{log}"
    );
    assert!(log.contains("restart 1") && log.contains("resuming from"), "{log}");

    // The preempted run ends exactly as the same run uninterrupted.
    let expected = reference(dir.path(), &runs[0].join("config.toml"));
    assert_same_run(&runs[0], &expected, "sweep run preempted in Slurm", &log);

    // Submitted again, every task finds its run done and exits at once.
    let again =
        Command::new("sbatch").arg("--wait").arg("--parsable").arg(&script).current_dir(dir.path()).output().unwrap();
    assert!(again.status.success(), "{}", text(&again.stderr));
    let array = text(&again.stdout).trim().split(';').next().unwrap_or_default().to_string();
    for task in 0..runs.len() {
        let log = std::fs::read_to_string(sweep.join(format!("slurm-{array}_{task}.out"))).unwrap_or_default();
        assert!(log.contains("is done") && !log.contains("sweep: task"), "task {task} ran again:\n{log}");
    }
}
