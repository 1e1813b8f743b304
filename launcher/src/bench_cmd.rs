//! `mgrun bench`: communication (launched ranks), one training step, the sharding model and the data loader.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;

use crate::cli::{BenchCommand, LaunchArgs, StepBenchArgs};
use crate::job::{absolute, launch_job, WorkerCommand};
use crate::{cuda, data_cmd, launch};

/// Runs `mgrun bench <which>`; `top_launch` holds the launch options given before the subcommand.
pub fn run(which: BenchCommand, top_launch: &LaunchArgs, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    match which {
        BenchCommand::Comm { launch, max_mb, json } => bench_comm(launch.or(top_launch), max_mb, json, cuda_load_error),
        BenchCommand::Sharding { batch_per_domain, max_ranks } => {
            // One test domain held out of each dataset's domains, as in a DomainBed sweep.
            let datasets: Vec<(&str, usize)> = mgrun_data::registry::DATASETS
                .iter()
                .map(|spec| (spec.name, spec.domains.len().saturating_sub(1)))
                .collect();
            println!(
                "sharding model: {batch_per_domain} images per domain per step, one test domain held out; \
                 efficiency = mean images per rank / the most any rank computes (the step waits for the busiest \
                 rank)\n"
            );
            print!("{}", mgrun_trainer::sharding::model_table(&datasets, batch_per_domain, max_ranks));
            Ok(0)
        }
        BenchCommand::Data(args) => {
            data_cmd::bench_data(&args)?;
            Ok(0)
        }
        BenchCommand::Step { launch, args } => {
            let launch = launch.or(top_launch);
            let device = match launch.gpus {
                Some(1) => {
                    cuda::check_gpus(1, 1, cuda_load_error)?;
                    tch::Device::Cuda(0)
                }
                Some(n) => anyhow::bail!("bench step: --gpus {n}: the step benchmark runs on one GPU (--gpus 1)"),
                None => {
                    anyhow::ensure!(launch.cpus.unwrap_or(1) == 1, "bench step: runs on one CPU process (--cpus 1)");
                    tch::Device::Cpu
                }
            };
            step_bench(device, args)
        }
    }
}

/// `mgrun bench comm`: launches benchmark ranks (`mgrun bench-worker`) like a job.
fn bench_comm(
    launch: LaunchArgs,
    max_mb: usize,
    json: Option<PathBuf>,
    cuda_load_error: Option<&str>,
) -> anyhow::Result<i32> {
    let out_dir = launch.out.clone().unwrap_or_else(|| launch::default_out_dir("bench-comm"));
    let max_bytes = max_mb.checked_mul(1 << 20).context("--max-mb is too large")?;
    let mut worker_args: Vec<OsString> =
        vec!["bench-worker".into(), "--max-bytes".into(), max_bytes.to_string().into()];
    if let Some(json) = json {
        worker_args.extend(["--json".into(), absolute(&json)?.into()]);
    }
    let agreement = format!("{worker_args:?}");
    launch_job(&launch, out_dir, WorkerCommand { args: worker_args, rank_config: None, agreement }, cuda_load_error)
}

/// `mgrun bench step`: times training steps in this process and prints a markdown table.
fn step_bench(device: tch::Device, args: StepBenchArgs) -> anyhow::Result<i32> {
    use mgrun_trainer::bench_step;
    let config = bench_step::StepBenchConfig {
        device,
        arch: args.arch,
        image_size: args.image_size,
        batch_per_domain: args.batch_per_domain,
        domains: args.domains,
        classes: args.classes,
        width: args.width,
        methods: args.methods.split(',').map(|m| m.trim().to_string()).filter(|m| !m.is_empty()).collect(),
        precisions: bench_step::parse_precisions(&args.precision)?,
        channels_last: args.channels_last,
        steps: args.steps,
        warmup: args.warmup,
        phases: args.phases,
        micro_batch: args.micro_batch,
    };
    println!(
        "bench step: {} {}x{}, {} domains x {} images, {} classes, Adam, on {:?} ({} timed steps after {} warm-up)",
        config.arch,
        config.image_size,
        config.image_size,
        config.domains,
        config.batch_per_domain,
        config.classes,
        device,
        config.steps,
        config.warmup
    );
    if config.precisions.contains(&bench_step::Precision::Bf16) {
        println!("{}", bench_step::check_bf16_autocast(device)?);
    }
    let rows = bench_step::run_step_bench(&config)?;
    print!("{}", bench_step::markdown_table(&rows));
    if let Some(path) = args.json {
        let text = serde_json::to_string_pretty(&rows).context("serialising the step benchmark")?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(0)
}
