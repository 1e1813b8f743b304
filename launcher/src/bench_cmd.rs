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
        BenchCommand::Scaling(args) => crate::bench_scaling::run(&args),
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
    launch_job(
        &launch,
        out_dir,
        WorkerCommand { args: worker_args, rank_config: None, agreement, run_dir: None, check_world_size: None },
        cuda_load_error,
    )
}

/// `mgrun bench step`: times training steps in this process and prints a markdown table.
fn step_bench(device: tch::Device, args: Box<StepBenchArgs>) -> anyhow::Result<i32> {
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
        ranks: args.ranks,
    };
    if args.vs_pytorch && (config.ranks != 1 || config.micro_batch.is_some() || config.arch == "small_cnn") {
        anyhow::bail!("bench step --vs-pytorch: PyTorch runs the whole batch of a torchvision ResNet (no --ranks, --micro-batch or small_cnn)");
    }
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
    let reference = if args.vs_pytorch {
        let python = args
            .python
            .clone()
            .or_else(|| std::env::var_os("MGRUN_PYTHON").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("python3"));
        Some(PytorchReference::new(python)?)
    } else {
        None
    };
    // Alternating rounds, and within a round each method on both sides one after the other, so that a
    // slow spell of a shared machine hits both sides of a pair alike.
    let (mut rounds, mut torch_rounds) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        if args.rounds > 1 {
            println!("round {} of {}", round + 1, args.rounds);
        }
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for method in &config.methods {
            let one = bench_step::StepBenchConfig { methods: vec![method.clone()], ..config.clone() };
            ours.extend(bench_step::run_step_bench(&one)?);
            if let Some(reference) = &reference {
                theirs.extend(reference.run(&one)?);
            }
        }
        rounds.push(ours);
        torch_rounds.push(theirs);
    }
    let rows = bench_step::median_rows(&rounds);
    println!("\nmedians of {} round(s)", args.rounds.max(1));
    print!("{}", bench_step::markdown_table(&rows));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&rows).context("serialising the step benchmark")?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.vs_pytorch {
        println!(
            "\nmgrun against PyTorch eager on the same shapes (speed = PyTorch time / mgrun time: the median of the \
             rounds' ratios [their range])\n"
        );
        print!("{}", bench_step::pytorch_comparison(&rounds, &torch_rounds));
    }
    Ok(0)
}

/// The reference script, built into the binary so that `--vs-pytorch` runs from any directory.
const PYTORCH_STEP_SCRIPT: &str = include_str!("../../bench/pytorch_step.py");

/// bench/pytorch_step.py, written once into a temporary directory (removed on drop), and the Python
/// that runs it.
struct PytorchReference {
    python: PathBuf,
    dir: tempfile::TempDir,
    script: PathBuf,
}

impl PytorchReference {
    fn new(python: PathBuf) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mgrun-pytorch-step-")
            .tempdir()
            .context("creating a temporary directory")?;
        let script = dir.path().join("pytorch_step.py");
        std::fs::write(&script, PYTORCH_STEP_SCRIPT).with_context(|| format!("writing {}", script.display()))?;
        Ok(Self { python, dir, script })
    }

    /// The steps of `config` in PyTorch, once with foreach and once with fused Adam; the script's
    /// output goes to the console, its rows are returned.
    fn run(
        &self,
        config: &mgrun_trainer::bench_step::StepBenchConfig,
    ) -> anyhow::Result<Vec<mgrun_trainer::bench_step::PytorchStepRow>> {
        let (python, script) = (&self.python, &self.script);
        let json = self.dir.path().join("rows.json");
        let device = if config.device.is_cuda() { "cuda" } else { "cpu" };
        let channels_last = config.channels_last.unwrap_or(config.device.is_cuda());
        let precisions: Vec<String> = config.precisions.iter().map(ToString::to_string).collect();
        let mut command = std::process::Command::new(python);
        command.arg(script).args(["--device", device, "--arch", &config.arch, "--optimizers", "foreach,fused"]);
        command.args(["--image-size", &config.image_size.to_string()]);
        command.args(["--batch-per-domain", &config.batch_per_domain.to_string()]);
        command.args(["--domains", &config.domains.to_string(), "--classes", &config.classes.to_string()]);
        command.args(["--methods", &config.methods.join(","), "--precision", &precisions.join(",")]);
        command.args(["--channels-last", if channels_last { "true" } else { "false" }]);
        command.args(["--steps", &config.steps.to_string(), "--warmup", &config.warmup.to_string()]);
        if config.phases {
            command.arg("--phases");
        }
        command.arg("--json").arg(&json);
        let status = command.status().with_context(|| {
            format!("running {} (set --python or MGRUN_PYTHON to a Python with torch)", python.display())
        })?;
        if !status.success() {
            anyhow::bail!("{} {} failed ({status})", python.display(), script.display());
        }
        let text = std::fs::read_to_string(&json).with_context(|| format!("reading {}", json.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))
    }
}
