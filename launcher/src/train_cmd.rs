//! `mgrun [LAUNCH OPTIONS] CONFIG`: a training job. The config is loaded and checked here, once, before
//! any rank starts; every rank runs `mgrun worker`.

use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;

use crate::cli::Cli;
use crate::job::{absolute, default_out_dir, launch_job, WorkerCommand};

/// Starts the training job of `cli` (which has no subcommand) and returns the launcher's exit code.
pub fn launch_training(cli: Cli, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    let config = cli.config.context("no CONFIG given")?;
    anyhow::ensure!(config.is_file(), "config file {} does not exist", config.display());
    let mut overrides = cli.overrides.clone();
    let slurm_restarts = std::env::var("SLURM_RESTART_COUNT").ok().and_then(|v| v.parse::<u64>().ok());
    let resume = match (&cli.resume, slurm_restarts) {
        (Some(resume), _) => Some(resume.clone()),
        (None, Some(count)) if count > 0 => {
            println!("mgrun: SLURM_RESTART_COUNT={count}: a requeued job resumes from its newest checkpoint");
            Some("auto".to_string())
        }
        _ => None,
    };
    if let Some(resume) = &resume {
        let value = match resume.as_str() {
            "auto" | "none" => resume.clone(),
            path => absolute(Path::new(path))?.to_string_lossy().into_owned(),
        };
        // TOML string syntax, so that any path survives the override parser.
        overrides.push(format!("checkpoint.resume={}", toml_string(&value)));
    }
    // A typo in the config fails here, once and at once, instead of in every rank.
    let job = mgrun_trainer::JobConfig::load(&config, &overrides)?;
    if cli.launch.ranks_per_gpu.unwrap_or(1) > 1 && job.comm.backend == "nccl" {
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
        !(resume.as_deref() == Some("auto")
            && cli.launch.out.is_none()
            && job.checkpoint.dir.is_none()
            && std::env::var_os("SLURM_JOB_ID").is_none()),
        "--resume auto looks for checkpoints in the run's output directory: give the run's --out DIR \
         (or set checkpoint.dir)"
    );
    let mut worker_args: Vec<OsString> = vec!["worker".into(), "--out".into(), out_dir.clone().into()];
    for key_value in &overrides {
        worker_args.extend(["--set".into(), key_value.into()]);
    }
    worker_args.push(config.into());
    let worker = WorkerCommand {
        args: worker_args,
        restart_args: Some(vec!["--set".into(), format!("checkpoint.resume={}", toml_string("auto")).into()]),
        agreement: toml::to_string(&job).context("serialising the resolved config")?,
    };
    launch_job(&cli.launch, out_dir, worker, cuda_load_error)
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}
