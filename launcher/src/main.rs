//! `mgrun`: launches a distributed training job (one rank per GPU or N CPU ranks) and runs its workers.
//!
//! The same executable is both the launcher and, through hidden subcommands, every rank it spawns.

mod cuda;
mod launch;
mod selftest;

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::launch::{DeviceKind, LaunchPlan};
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
    /// The job's TOML config.
    #[arg(required = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Where and how many ranks run.
#[derive(Debug, Clone, Default, Args)]
struct LaunchArgs {
    /// One rank per GPU, on the first N visible GPUs (honours CUDA_VISIBLE_DEVICES).
    #[arg(long, value_name = "N", conflicts_with = "cpus")]
    gpus: Option<usize>,
    /// N CPU ranks (the default is 1).
    #[arg(long, value_name = "N")]
    cpus: Option<usize>,
    /// Output directory (default: runs/<config stem>-<YYYYmmdd-HHMMSS>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Port of the rendezvous store (default: any free port).
    #[arg(long, value_name = "P")]
    port: Option<u16>,
    /// Address other hosts use to reach this launcher; the store then listens on all interfaces.
    #[arg(long, value_name = "ADDR")]
    host_addr: Option<IpAddr>,
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
    /// Dataset generation.
    Datagen {
        #[command(subcommand)]
        which: DatagenCommand,
    },
    /// List the training methods, their hyperparameters and defaults (`[method.<name>]` keys).
    Methods,
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
    /// All-reduce bandwidth of the CPU backend across N ranks.
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
            // A typo in the config fails here, once and at once, instead of in every rank.
            mgrun_trainer::JobConfig::load(&config, &cli.overrides)?;
            let stem = config.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or("job".into());
            let out_dir = cli.launch.out.clone().unwrap_or_else(|| launch::default_out_dir(&stem));
            let mut worker_args: Vec<OsString> = vec!["worker".into(), "--out".into(), out_dir.clone().into()];
            for key_value in &cli.overrides {
                worker_args.extend(["--set".into(), key_value.into()]);
            }
            worker_args.push(config.into());
            launch_job(&cli.launch, out_dir, worker_args, cuda_load_error)
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
            launch_job(&launch, out_dir, worker_args, cuda_load_error)
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
        Command::Methods => {
            for info in mgrun_methods::registry::describe() {
                println!("{}: {}", info.name, info.summary);
                for (key, default, doc) in &info.hyperparameters {
                    println!("    {key} = {default}    # {doc}");
                }
            }
            Ok(0)
        }
        Command::Selftest(args) => {
            let out_dir = top_launch.out.clone().unwrap_or_else(|| launch::default_out_dir("selftest"));
            let mut worker_args: Vec<OsString> = vec!["selftest-worker".into()];
            worker_args.extend(args.to_args().into_iter().map(OsString::from));
            launch_job(top_launch, out_dir, worker_args, cuda_load_error)
        }
        Command::Worker { out, overrides, config } => {
            mgrun_trainer::run_worker(&mgrun_trainer::WorkerArgs { config, overrides, out_dir: out })?;
            Ok(0)
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

impl LaunchArgs {
    /// These options, with the ones not given here taken from `fallback` (flags before the subcommand).
    fn or(self, fallback: &LaunchArgs) -> LaunchArgs {
        let device_given = self.gpus.is_some() || self.cpus.is_some();
        LaunchArgs {
            gpus: if device_given { self.gpus } else { fallback.gpus },
            cpus: if device_given { self.cpus } else { fallback.cpus },
            out: self.out.or_else(|| fallback.out.clone()),
            port: self.port.or(fallback.port),
            host_addr: self.host_addr.or(fallback.host_addr),
            grace_s: self.grace_s.or(fallback.grace_s),
        }
    }
}

fn launch_job(
    launch: &LaunchArgs,
    out_dir: PathBuf,
    worker_args: Vec<OsString>,
    cuda_load_error: Option<&str>,
) -> anyhow::Result<i32> {
    let (world_size, device) = match (launch.gpus, launch.cpus) {
        (Some(gpus), _) => {
            anyhow::ensure!(gpus > 0, "--gpus must be at least 1");
            cuda::check_gpus(gpus, cuda_load_error)?;
            (gpus, DeviceKind::Cuda)
        }
        (None, Some(cpus)) => {
            anyhow::ensure!(cpus > 0, "--cpus must be at least 1");
            (cpus, DeviceKind::Cpu)
        }
        (None, None) => (1, DeviceKind::Cpu),
    };
    let grace_s = launch.grace_s.unwrap_or(DEFAULT_GRACE_S);
    anyhow::ensure!(
        grace_s.is_finite() && grace_s >= 0.0,
        "--grace-s must be a non-negative number of seconds, got {grace_s}"
    );
    let (bind_ip, master_addr) = match launch.host_addr {
        Some(host_addr) => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), host_addr.to_string()),
        None => (IpAddr::V4(Ipv4Addr::LOCALHOST), Ipv4Addr::LOCALHOST.to_string()),
    };
    let plan = LaunchPlan {
        world_size,
        device,
        out_dir,
        worker_args,
        store_bind: SocketAddr::new(bind_ip, launch.port.unwrap_or(0)),
        master_addr,
        grace: Duration::from_secs_f64(grace_s),
    };
    launch::launch(&plan)
}

/// Workers share the launcher's working directory, but an absolute path survives a worker that changes it.
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}
