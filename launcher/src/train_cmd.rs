//! `mgrun [LAUNCH OPTIONS] CONFIG`: a training job. The config (with `--set` and `--resume`) is loaded,
//! checked and its paths resolved here, once, before any rank starts; every rank runs `mgrun worker` on
//! the one file the launcher writes, `<out>/config.resolved.toml`.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;
use mgrun_checkpoint::Resume;
use mgrun_trainer::JobConfig;

use crate::cli::Cli;
use crate::job::{absolute, default_out_dir, launch_job, WorkerCommand};
use crate::launch::RankConfig;
use crate::progress_display::{self, ProgressMode};
use crate::run_dir::RunDirPolicy;

/// The file in the output directory that holds the job's resolved config, which the ranks read.
const RESOLVED_CONFIG: &str = "config.resolved.toml";

/// Starts the training job of `cli` (which has no subcommand) and returns the launcher's exit code.
pub fn launch_training(cli: Cli, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    let config = cli.config.context("no CONFIG given")?;
    anyhow::ensure!(!config.is_dir(), "config {} is a directory; give the job's TOML file", config.display());
    anyhow::ensure!(config.is_file(), "config file {} does not exist", config.display());
    let slurm_restarts = std::env::var("SLURM_RESTART_COUNT").ok().and_then(|v| v.parse::<u64>().ok());
    let resume = match (&cli.resume, slurm_restarts) {
        (Some(resume), _) => Some(match resume.parse::<Resume>()? {
            Resume::Path(path) => Resume::Path(absolute(&path)?),
            other => other,
        }),
        (None, Some(count)) if count > 0 => {
            println!("mgrun: SLURM_RESTART_COUNT={count}: a requeued job resumes from its newest checkpoint");
            Some(Resume::Auto)
        }
        _ => None,
    };
    // A typo in the config fails here, once and at once, instead of in every rank.
    let mut job = JobConfig::load(&config, &cli.overrides)?;
    job.check_pretrained().with_context(|| format!("config {}", config.display()))?;
    check_batch_memory(&job).with_context(|| format!("config {}", config.display()))?;
    if let Some(warning) = job.dsp_anchor_warning() {
        crate::console::say!("mgrun: {warning}");
    }
    // Domain and test-domain names from the directory listing alone (the ranks list the images). The
    // synthetic dataset is made by the first rank when its root is missing.
    if job.data.dataset != "synthetic" || job.data.root.exists() {
        mgrun_data::Dataset::check_domains(&job.data).with_context(|| format!("config {}", config.display()))?;
    }
    if let Some(dir) = &job.checkpoint.dir {
        // Found now, not at the first checkpoint hours later.
        check_writable(dir).with_context(|| format!("config {}: key `checkpoint.dir`", config.display()))?;
    }
    if let Some(resume) = &resume {
        job.checkpoint.resume = resume.clone();
    }
    job.checkpoint.extend |= cli.extend;
    if cli.launch.ranks_per_gpu.unwrap_or(1) > 1 && job.comm.backend == mgrun_collectives::BackendChoice::Nccl {
        anyhow::bail!(
            "config {}: comm.backend = \"nccl\" cannot run with --ranks-per-gpu {}: NCCL refuses two ranks of \
             one communicator on the same GPU; use comm.backend = \"tcp\" or \"auto\" (TCP through pinned host \
             memory) to share GPUs",
            config.display(),
            cli.launch.ranks_per_gpu.unwrap_or(1)
        );
    }
    let stem = config.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or("job".into());
    let out_dir = match &cli.launch.out {
        Some(out) => out.clone(),
        None => default_out_dir(&cli.launch, &stem)?,
    };
    anyhow::ensure!(
        !(resume == Some(Resume::Auto)
            && cli.launch.out.is_none()
            && job.checkpoint.dir.is_none()
            && std::env::var_os("SLURM_JOB_ID").is_none()),
        "--resume auto looks for checkpoints in the run's output directory: give the run's --out DIR \
         (or set checkpoint.dir)"
    );
    let agreement = toml::to_string(&job).context("serialising the resolved config")?;
    let job_for_checks = job.clone();
    let traced = job.trace.enabled;
    // Restarted ranks continue from the newest checkpoint, whatever the first start resumed from.
    let mut restart_job = job.clone();
    restart_job.checkpoint.resume = Resume::Auto;
    // Relative paths in the config mean relative to where `mgrun` was started.
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let rank_config = RankConfig {
        path: out_dir.join(RESOLVED_CONFIG),
        first: resolved_toml(job, &cwd)?,
        restart: resolved_toml(restart_job, &cwd)?,
    };
    let worker_args: Vec<OsString> =
        vec!["worker".into(), "--out".into(), out_dir.clone().into(), rank_config.path.clone().into()];
    let run_dir = RunDirPolicy { resume: resume.is_some(), overwrite: cli.overwrite };
    let (check_job, config_path) = (job_for_checks, config.clone());
    let check_world_size: Box<dyn Fn(usize) -> anyhow::Result<()>> = Box::new(move |world_size| {
        check_job.check_world_size(world_size).with_context(|| format!("config {}", config_path.display()))
    });
    let worker = WorkerCommand {
        args: worker_args,
        rank_config: Some(rank_config),
        agreement,
        run_dir: Some(run_dir),
        check_world_size: Some(check_world_size),
    };
    progress_display::start(ProgressMode::choose(cli.quiet));
    let launched = launch_job(&cli.launch, out_dir.clone(), worker, cuda_load_error);
    progress_display::clear();
    if traced && is_first_node(&cli.launch) {
        merge_traces(&out_dir);
    }
    launched
}

/// The launcher of node 0 merges the traces (every node's ranks write to the shared run directory).
fn is_first_node(launch: &crate::cli::LaunchArgs) -> bool {
    let slurm_node = std::env::var("SLURM_NODEID").ok().and_then(|n| n.parse::<usize>().ok());
    launch.node_rank.or(slurm_node).unwrap_or(0) == 0
}

/// `<out>/trace/rank<N>.json` into `<out>/trace.json`, also after a failed or stopped job (what
/// the ranks wrote until then is what shows why). A failure to merge is reported, not fatal: the
/// rank files stay.
fn merge_traces(out_dir: &Path) {
    let (dir, file) = (out_dir.join(mgrun_trainer::TRACE_DIR), out_dir.join(mgrun_trainer::TRACE_FILE));
    match mgrun_telemetry::trace::merge(&dir, &file) {
        Ok((0, _)) => {}
        Ok((ranks, events)) => println!(
            "trace: {events} events of {ranks} rank(s) in {} (open in https://ui.perfetto.dev or chrome://tracing)",
            file.display()
        ),
        Err(error) => crate::console::say!("mgrun: merging the traces in {}: {error:#}", dir.display()),
    }
}

/// Refuses a batch that cannot fit before any rank allocates it (a typo such as
/// `data.batch_per_domain=1e9` otherwise aborts every rank with "memory allocation failed" naming no
/// key). The bound is low on purpose: one training domain's images of one step in f32, times the
/// steps the loader queues (`data.prefetch`) plus the one training and the one being built, against
/// the memory available on this machine.
fn check_batch_memory(job: &JobConfig) -> anyhow::Result<()> {
    let Some(available) = available_memory_bytes() else { return Ok(()) };
    let per_image = 3.0 * (job.data.image_size as f64).powi(2) * 4.0;
    let needed = job.data.batch_per_domain as f64 * per_image * (job.data.prefetch as f64 + 2.0);
    if needed > available as f64 {
        anyhow::bail!(
            "key `data.batch_per_domain`: {} images of {}x{} px per domain and step need at least {:.1} GB per rank \
             (with data.prefetch = {} queued steps), more than the {:.1} GB this machine has available; lower \
             data.batch_per_domain, data.image_size or data.prefetch",
            job.data.batch_per_domain,
            job.data.image_size,
            job.data.image_size,
            needed / 1e9,
            job.data.prefetch,
            available as f64 / 1e9
        );
    }
    Ok(())
}

/// Creates `dir` if needed and writes and removes a probe file in it.
fn check_writable(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let probe = dir.join(format!(".mgrun-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{} is not writable (writing {})", dir.display(), probe.display()))?;
    std::fs::remove_file(&probe).with_context(|| format!("removing {}", probe.display()))
}

/// `MemAvailable` of /proc/meminfo (None where it cannot be read).
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `job` with its paths resolved against `cwd`, as the TOML the ranks load.
fn resolved_toml(mut job: JobConfig, cwd: &Path) -> anyhow::Result<String> {
    job.resolve_paths(cwd);
    toml::to_string_pretty(&job).context("serialising the resolved config")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks load what the launcher wrote: every shipped config survives the trip through TOML.
    #[test]
    fn resolved_configs_load_back_unchanged() {
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let dir = tempfile::tempdir().unwrap();
        let mut checked = 0;
        for entry in std::fs::read_dir(&configs).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let overrides = ["checkpoint.resume=\"auto\"".to_string()];
            let job = JobConfig::load(&path, &overrides).unwrap();
            let written = dir.path().join(RESOLVED_CONFIG);
            std::fs::write(&written, resolved_toml(job.clone(), Path::new("/base")).unwrap()).unwrap();
            let mut expected = job;
            expected.resolve_paths(Path::new("/base"));
            assert_eq!(JobConfig::load(&written, &[]).unwrap(), expected, "{}", path.display());
            checked += 1;
        }
        assert!(checked > 0, "no configs in {}", configs.display());
    }
}
