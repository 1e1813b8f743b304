//! `mgrun`: launches a distributed training job (one rank per GPU or N CPU ranks) and runs its workers.
//!
//! The same executable is both the launcher and, through hidden subcommands, every rank it spawns.

mod cuda;
mod launch;
mod methods_cmd;
mod placement;
mod rendezvous;
mod selftest;
mod slurm;
mod sweep_cmd;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use mgrun_collectives::DeviceKind;

use crate::launch::LaunchPlan;
use crate::selftest::SelftestArgs;

/// Seconds between SIGTERM and SIGKILL when ranks are stopped, unless `--grace-s` says otherwise.
const DEFAULT_GRACE_S: f64 = 3.0;

/// Distributed domain-generalization training: `mgrun [--gpus N | --cpus N] CONFIG`.
#[derive(Debug, Parser)]
#[command(name = "mgrun", version, subcommand_negates_reqs = true)]
struct Cli {
    #[command(flatten)]
    launch: LaunchArgs,
    /// Config override `a.b=value`; repeatable, applied in order.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue from a checkpoint: `auto` (the newest valid one in the run's checkpoint.dir,
    /// default <out>/checkpoints; give the run's --out) or the PATH of a checkpoint or checkpoint root.
    #[arg(long, value_name = "auto|PATH")]
    resume: Option<String>,
    /// The job's TOML config.
    #[arg(required = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where and how many ranks run.
#[derive(Debug, Clone, Default, Args)]
struct LaunchArgs {
    /// N GPU ranks: one per GPU on the first N visible GPUs (honours CUDA_VISIBLE_DEVICES), or
    /// --ranks-per-gpu per GPU.
    #[arg(long, value_name = "N", conflicts_with = "cpus")]
    gpus: Option<usize>,
    /// Let K ranks share each GPU (rank r on GPU r / K), to check multi-rank runs on fewer GPUs; needs
    /// the TCP backend, since NCCL refuses two ranks on one GPU [default: 1].
    #[arg(long, value_name = "K", requires = "gpus")]
    ranks_per_gpu: Option<usize>,
    /// N CPU ranks (the default is 1).
    #[arg(long, value_name = "N")]
    cpus: Option<usize>,
    /// Output directory (default: runs/<config stem>-<YYYYmmdd-HHMMSS>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Nodes of a multi-node job: start `mgrun` once on every node, each with its --node-rank
    /// (torchrun's static rendezvous) [default: 1, or the Slurm allocation's nodes under srun].
    #[arg(long, value_name = "N")]
    nnodes: Option<usize>,
    /// This node's rank among the --nnodes nodes; node 0 hosts the rendezvous store [default: 0].
    #[arg(long, value_name = "R")]
    node_rank: Option<usize>,
    /// Host of node 0, where every node and rank reaches the store [default: 127.0.0.1; under Slurm the
    /// allocation's first node]. With it, the store listens on all interfaces.
    #[arg(long, value_name = "HOST")]
    master_addr: Option<String>,
    /// Port of the rendezvous store on node 0 [default: any free port on one node; under Slurm one
    /// derived from the job id].
    #[arg(long, visible_alias = "port", value_name = "P")]
    master_port: Option<u16>,
    /// Seconds every node has to reach the store and join before the job fails [default: 300].
    #[arg(long, value_name = "SECONDS")]
    rdzv_timeout_s: Option<f64>,
    /// When a rank fails, stop all ranks and start them again from the newest checkpoint, up to K times.
    #[arg(long, value_name = "K")]
    max_restarts: Option<usize>,
    /// Under `srun`, this task is one rank (`srun --ntasks-per-node=G mgrun --slurm-task ...`), instead of
    /// one launcher per node that starts the node's ranks.
    #[arg(long)]
    slurm_task: bool,
    /// Seconds between SIGTERM and SIGKILL when the ranks are stopped [default: 3].
    #[arg(long, value_name = "SECONDS")]
    grace_s: Option<f64>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// Dataset checks: `mgrun data inspect CONFIG`.
    Data {
        #[command(subcommand)]
        which: DataCommand,
    },
    /// Dataset generation.
    Datagen {
        #[command(subcommand)]
        which: DatagenCommand,
    },
    /// List the training methods, their hyperparameters and defaults (`[method.<name>]` keys).
    Methods,
    /// DomainBed's sweep: run directories for every test domain (and pair), hparams seed and trial;
    /// then runs them here (--run), writes a Slurm job array (--slurm FILE) or estimates their cost (--estimate).
    Sweep(sweep_cmd::SweepArgs),
    /// DomainBed's result tables (training-domain, leave-one-domain-out and oracle selection) of a sweep.
    Collect(sweep_cmd::CollectArgs),
    /// Launch diagnostic ranks that exercise the launcher (tests).
    #[command(hide = true)]
    Selftest(SelftestArgs),
    /// One training rank (spawned by the launcher).
    #[command(hide = true)]
    Worker {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        config: PathBuf,
    },
    /// One communication-benchmark rank (spawned by `mgrun bench comm`).
    #[command(hide = true)]
    BenchWorker {
        #[arg(long)]
        max_bytes: usize,
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// One diagnostic rank (spawned by `mgrun selftest`).
    #[command(hide = true)]
    SelftestWorker(SelftestArgs),
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// All-reduce time and bandwidth across N ranks: TCP backend for --cpus, NCCL for --gpus.
    Comm {
        #[command(flatten)]
        launch: LaunchArgs,
        /// Largest message size in MiB.
        #[arg(long, value_name = "M", default_value_t = 64)]
        max_mb: usize,
        /// Write the results as JSON to FILE (rank 0).
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
    /// Time of one training step (model, method, Adam) on random inputs, in this process, on
    /// GPU 0 (`--gpus 1`) or the CPU (`--cpus 1`); prints a markdown table.
    Step {
        #[command(flatten)]
        launch: LaunchArgs,
        #[command(flatten)]
        args: StepBenchArgs,
    },
    /// Images per rank and modelled step-time efficiency of the sharding plan for W = 1..8 ranks
    /// and the DomainBed datasets' numbers of training domains (the first plan against the balanced one).
    Sharding {
        /// Images per domain per step (DomainBed's 32).
        #[arg(long, value_name = "B", default_value_t = 32)]
        batch_per_domain: usize,
        /// Largest number of ranks.
        #[arg(long, value_name = "W", default_value_t = 8)]
        max_ranks: usize,
    },
    /// Images/s of the training data loader (decode + DomainBed's training transform), in total and per
    /// worker thread, on a config's dataset or a directory of `<domain>/<class>/<image>` files.
    Data(DataBenchArgs),
}

#[derive(Debug, clap::Args)]
struct DataBenchArgs {
    /// The job's TOML config (its `[data]` section is used); or give --root.
    #[arg(required_unless_present = "root", conflicts_with = "root")]
    config: Option<PathBuf>,
    /// Dataset root in the DomainBed layout, instead of a config.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Loader worker threads [default: the config's data.num_workers, or 1 with --root].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Images to time.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    images: usize,
    /// Output size of the training transform [default: the config's, or 224].
    #[arg(long, value_name = "PX")]
    image_size: Option<i64>,
    /// Also write the result as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Check a dataset tree before training: domains, per-domain image and class counts against the published
    /// ones, empty domains/classes, and every image decoded (unreadable or truncated files).
    Inspect {
        /// The job's TOML config (its `[data]` section is used).
        config: PathBuf,
        /// Config override `a.b=value`; repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Also write DomainBed's splits `{"<domain>": {"in": [...], "out": [...]}}` (paths relative to the
        /// dataset root) to FILE.
        #[arg(long, value_name = "FILE")]
        splits: Option<PathBuf>,
        /// Trial seed of the splits (default: the config's `data.split_seed`).
        #[arg(long, value_name = "N")]
        trial_seed: Option<u64>,
        /// Decoding threads (default: all cores).
        #[arg(long, value_name = "N")]
        threads: Option<usize>,
    },
}

/// `mgrun bench step` options (defaults: the DomainBed ResNet-50 step of the GPU benchmark).
#[derive(Debug, Args)]
struct StepBenchArgs {
    #[arg(long, default_value = "resnet50")]
    arch: String,
    #[arg(long, value_name = "PX", default_value_t = 224)]
    image_size: i64,
    #[arg(long, value_name = "N", default_value_t = 32)]
    batch_per_domain: usize,
    #[arg(long, value_name = "K", default_value_t = 3)]
    domains: usize,
    #[arg(long, value_name = "N", default_value_t = 345)]
    classes: usize,
    /// Channel width of small_cnn.
    #[arg(long, value_name = "N", default_value_t = 64)]
    width: i64,
    /// Comma-separated methods.
    #[arg(long, default_value = "erm,dsp_reg,sam")]
    methods: String,
    /// Comma-separated precisions (fp32, bf16).
    #[arg(long, default_value = "fp32,bf16")]
    precision: String,
    /// Channels-last convolutions [default: on GPU, off on CPU].
    #[arg(long, value_name = "BOOL")]
    channels_last: Option<bool>,
    /// Timed steps per (method, precision).
    #[arg(long, value_name = "N", default_value_t = 20)]
    steps: usize,
    /// Untimed steps first (cuDNN autotuning, allocator warm-up).
    #[arg(long, value_name = "N", default_value_t = 5)]
    warmup: usize,
    /// Also time the phases of the ERM step.
    #[arg(long)]
    phases: bool,
    /// Deterministic mode with micro-batches of M images (train.micro_batch): its cost on one rank.
    #[arg(long, value_name = "M")]
    micro_batch: Option<usize>,
    /// Also write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum DatagenCommand {
    /// A small multi-domain image dataset in the DomainBed folder layout.
    Synthetic {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, value_name = "N")]
        images_per_class: Option<usize>,
        #[arg(long, value_name = "PX")]
        image_size: Option<u32>,
    },
    /// A small tree in the layout of a DomainBed dataset (pacs, vlcs, office_home, terra_incognita,
    /// domain_net; DomainNet with official split lists), for tests and trying configs without the download.
    Layout {
        /// The `data.dataset` name whose layout to write.
        dataset: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Classes per domain (the first ones of the dataset's class list).
        #[arg(long, value_name = "N", default_value_t = 3)]
        classes: usize,
        #[arg(long, value_name = "N", default_value_t = 5)]
        images_per_class: usize,
        #[arg(long, value_name = "PX", default_value_t = 24)]
        image_size: u32,
    },
}

fn main() -> ExitCode {
    // Before anything touches tch, in every mode, so that workers see the GPUs too.
    let cuda_load_error = cuda::load_torch_cuda();
    let cli = Cli::parse();
    match run(cli, cuda_load_error.as_deref()) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => {
            eprintln!("mgrun: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    match cli.command {
        None => {
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
        Some(command) => {
            if let Some(config) = &cli.config {
                anyhow::bail!("unexpected CONFIG {} together with a subcommand", config.display());
            }
            run_command(command, &cli.launch, cuda_load_error)
        }
    }
}

fn run_command(command: Command, top_launch: &LaunchArgs, cuda_load_error: Option<&str>) -> anyhow::Result<i32> {
    match command {
        Command::Bench { which: BenchCommand::Comm { launch, max_mb, json } } => {
            let launch = launch.or(top_launch);
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
                WorkerCommand { args: worker_args, restart_args: None, agreement },
                cuda_load_error,
            )
        }
        Command::Bench { which: BenchCommand::Sharding { batch_per_domain, max_ranks } } => {
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
        Command::Bench { which: BenchCommand::Data(args) } => {
            bench_data(&args)?;
            Ok(0)
        }
        Command::Bench { which: BenchCommand::Step { launch, args } } => {
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
        Command::Datagen { which: DatagenCommand::Synthetic { out, seed, images_per_class, image_size } } => {
            let defaults = mgrun_data::synthetic::SyntheticOptions::default();
            let options = mgrun_data::synthetic::SyntheticOptions {
                out: out.clone(),
                seed: seed.unwrap_or(defaults.seed),
                images_per_class: images_per_class.unwrap_or(defaults.images_per_class),
                image_size: image_size.unwrap_or(defaults.image_size),
            };
            let summary = mgrun_data::synthetic::generate(&options)
                .with_context(|| format!("generating the synthetic dataset in {}", out.display()))?;
            println!("{summary}");
            Ok(0)
        }
        Command::Data { which: DataCommand::Inspect { config, overrides, splits, trial_seed, threads } } => {
            data_inspect(&config, &overrides, splits.as_deref(), trial_seed, threads)
        }
        Command::Datagen { which: DatagenCommand::Layout { dataset, out, classes, images_per_class, image_size } } => {
            let spec = mgrun_data::registry::spec(&dataset).with_context(|| {
                let known: Vec<&str> = mgrun_data::registry::DATASETS.iter().map(|d| d.name).collect();
                format!("unknown dataset '{dataset}' (known: {})", known.join(", "))
            })?;
            let options =
                mgrun_data::registry::SampleTreeOptions { out: out.clone(), classes, images_per_class, image_size };
            let written = mgrun_data::registry::write_sample_tree(spec, &options)?;
            println!("wrote {written} images in the {dataset} layout to {}", out.display());
            Ok(0)
        }
        Command::Sweep(args) => sweep_cmd::sweep(args),
        Command::Collect(args) => sweep_cmd::collect(args),
        Command::Methods => {
            methods_cmd::print_methods()?;
            Ok(0)
        }
        Command::Selftest(args) => {
            let out_dir = top_launch.out.clone().unwrap_or_else(|| launch::default_out_dir("selftest"));
            let mut worker_args: Vec<OsString> = vec!["selftest-worker".into()];
            worker_args.extend(args.to_args().into_iter().map(OsString::from));
            let agreement = format!("{worker_args:?}");
            let worker = WorkerCommand { args: worker_args, restart_args: Some(Vec::new()), agreement };
            launch_job(top_launch, out_dir, worker, cuda_load_error)
        }
        Command::Worker { out, overrides, config } => {
            let outcome = mgrun_trainer::run_worker(&mgrun_trainer::WorkerArgs { config, overrides, out_dir: out })?;
            Ok(outcome.exit_code())
        }
        Command::BenchWorker { max_bytes, json } => {
            mgrun_collectives::bench::bench_worker_main(max_bytes, json.as_deref())?;
            Ok(0)
        }
        Command::SelftestWorker(args) => {
            selftest::selftest_worker_main(&args)?;
            Ok(0)
        }
    }
}

/// `mgrun bench data`: the training loader's throughput, printed and optionally written as JSON.
fn bench_data(args: &DataBenchArgs) -> anyhow::Result<()> {
    let mut data = match (&args.config, &args.root) {
        (Some(config), _) => {
            let mut job = mgrun_trainer::JobConfig::load(config, &[])?;
            job.resolve_paths(&std::env::current_dir().context("reading the current directory")?);
            job.data
        }
        (None, Some(root)) => mgrun_data::DataConfig {
            root: root.clone(),
            dataset: "folder".into(),
            num_workers: 1,
            ..mgrun_data::DataConfig::default()
        },
        (None, None) => anyhow::bail!("give a CONFIG or --root DIR"),
    };
    data.num_workers = args.workers.unwrap_or(data.num_workers).max(1);
    data.image_size = args.image_size.unwrap_or(data.image_size);
    data.augment = true;
    let result = mgrun_data::bench_loader(&data, args.images)?;
    println!(
        "mgrun loader: {} images in {:.2} s with {} worker thread(s): {:.1} img/s total, {:.1} img/s per thread \
         (decode + DomainBed training transform at {} px, {})",
        result.images,
        result.seconds,
        result.workers,
        result.images_per_second(),
        result.images_per_second_per_worker(),
        data.image_size,
        data.root.display()
    );
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "workers": result.workers, "images": result.images, "seconds": result.seconds,
            "images_per_s": result.images_per_second(),
            "images_per_s_per_worker": result.images_per_second_per_worker(),
            "image_size": data.image_size,
        });
        std::fs::write(path, json.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `mgrun data inspect`: prints the report; exit status 1 when the tree has problems.
fn data_inspect(
    config: &Path,
    overrides: &[String],
    splits: Option<&Path>,
    trial_seed: Option<u64>,
    threads: Option<usize>,
) -> anyhow::Result<i32> {
    let mut job = mgrun_trainer::JobConfig::load(config, overrides)?;
    job.resolve_paths(&std::env::current_dir().context("reading the current directory")?);
    if let Some(seed) = trial_seed {
        job.data.split_seed = seed;
    }
    let threads = threads.unwrap_or_else(mgrun_data::inspect::default_threads);
    let report = mgrun_data::inspect::inspect(&job.data, threads)?;
    print!("{report}");
    if let Some(failure) = report.failure() {
        eprintln!("{failure}");
        return Ok(1);
    }
    if let Some(path) = splits {
        let unreadable: Vec<PathBuf> = report.unreadable.iter().map(|b| b.path.clone()).collect();
        let dataset = mgrun_data::Dataset::open_excluding(&job.data, &unreadable)?;
        mgrun_data::inspect::write_splits(&dataset, path)?;
        println!("wrote the in/out splits of trial seed {} to {}", job.data.split_seed, path.display());
    }
    Ok(0)
}

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

impl LaunchArgs {
    /// These options, with the ones not given here taken from `fallback` (flags before the subcommand).
    fn or(self, fallback: &LaunchArgs) -> LaunchArgs {
        let device_given = self.gpus.is_some() || self.cpus.is_some();
        LaunchArgs {
            gpus: if device_given { self.gpus } else { fallback.gpus },
            ranks_per_gpu: if device_given { self.ranks_per_gpu } else { fallback.ranks_per_gpu },
            cpus: if device_given { self.cpus } else { fallback.cpus },
            out: self.out.or_else(|| fallback.out.clone()),
            nnodes: self.nnodes.or(fallback.nnodes),
            node_rank: self.node_rank.or(fallback.node_rank),
            master_addr: self.master_addr.or_else(|| fallback.master_addr.clone()),
            master_port: self.master_port.or(fallback.master_port),
            rdzv_timeout_s: self.rdzv_timeout_s.or(fallback.rdzv_timeout_s),
            max_restarts: self.max_restarts.or(fallback.max_restarts),
            slurm_task: self.slurm_task || fallback.slurm_task,
            grace_s: self.grace_s.or(fallback.grace_s),
        }
    }
}

/// What the ranks of a job run, and what must agree across the launchers of a multi-node job.
struct WorkerCommand {
    args: Vec<OsString>,
    /// Added to `args` when the ranks are restarted after a failure (resume from the newest checkpoint).
    restart_args: Option<Vec<OsString>>,
    /// Text whose hash every launcher compares at the rendezvous (the resolved config, say).
    agreement: String,
}

fn launch_job(
    launch: &LaunchArgs,
    out_dir: PathBuf,
    worker: WorkerCommand,
    cuda_load_error: Option<&str>,
) -> anyhow::Result<i32> {
    let ranks_per_gpu = launch.ranks_per_gpu.unwrap_or(1);
    let slurm = placement::SlurmContext::from_env()?;
    let request = placement::PlacementRequest {
        gpus: launch.gpus,
        cpus: launch.cpus,
        ranks_per_gpu,
        nnodes: launch.nnodes,
        node_rank: launch.node_rank,
        master_addr: launch.master_addr.clone(),
        master_port: launch.master_port,
        rdzv_timeout_s: launch.rdzv_timeout_s,
        slurm_task: launch.slurm_task,
    };
    let place = placement::place(&request, slurm.as_ref())?;
    if place.device == DeviceKind::Cuda {
        let gpus_here = place.local.iter().map(|rank| rank.cuda_device + 1).max().unwrap_or(1);
        if launch.slurm_task {
            cuda::check_gpus(gpus_here, 1, cuda_load_error)?;
        } else {
            cuda::check_gpus(place.per_node, ranks_per_gpu, cuda_load_error)?;
        }
    }
    if !place.source.is_empty() {
        println!("mgrun: {}", place.source);
    }
    let grace_s = launch.grace_s.unwrap_or(DEFAULT_GRACE_S);
    anyhow::ensure!(
        grace_s.is_finite() && grace_s >= 0.0,
        "--grace-s must be a non-negative number of seconds, got {grace_s}"
    );
    let job_hash = {
        use sha2::Digest;
        let described = format!(
            "{}\n{:?} {} per node, {} ranks, ranks per GPU {ranks_per_gpu}\nout {}\n",
            worker.agreement,
            place.device,
            place.per_node,
            place.world_size,
            out_dir.display()
        );
        let digest = sha2::Sha256::digest(described.as_bytes());
        digest.iter().take(8).map(|byte| format!("{byte:02x}")).collect::<String>()
    };
    let plan = LaunchPlan {
        world_size: place.world_size,
        device: place.device,
        ranks_per_gpu,
        local: place.local,
        local_world_size: place.local_world_size,
        group_rank: place.group_rank,
        group_world_size: place.group_world_size,
        out_dir,
        worker_args: worker.args,
        restart_args: worker.restart_args,
        rendezvous: place.rendezvous,
        job_hash,
        max_restarts: launch.max_restarts.unwrap_or(0),
        requeue_target: place.requeue_target,
        grace: Duration::from_secs_f64(grace_s),
    };
    launch::launch(&plan)
}

/// `runs/<stem>-slurm<job id>` inside Slurm (the same on every node, and again after a requeue), else
/// `runs/<stem>-<time>` on one node; several nodes need a shared `--out`.
fn default_out_dir(launch: &LaunchArgs, stem: &str) -> anyhow::Result<PathBuf> {
    if let Ok(job_id) = std::env::var("SLURM_JOB_ID") {
        return Ok(PathBuf::from("runs").join(format!("{stem}-slurm{job_id}")));
    }
    anyhow::ensure!(
        launch.nnodes.unwrap_or(1) == 1,
        "--nnodes > 1: give --out DIR, the same directory (on a shared file system) on every node"
    );
    Ok(launch::default_out_dir(stem))
}

/// Workers share the launcher's working directory, but an absolute path survives a worker that changes it.
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}
