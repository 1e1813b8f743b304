//! The command line: `mgrun [LAUNCH OPTIONS] CONFIG` starts a training job; subcommands run benchmarks,
//! dataset tools, sweeps, plots, and (hidden) the ranks the launcher spawns.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::plot;
use crate::selftest::SelftestArgs;
use crate::sweep_cmd;

/// Distributed domain-generalization training: `mgrun [--gpus N | --cpus N] CONFIG`.
#[derive(Debug, Parser)]
#[command(name = "mgrun", version, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(flatten)]
    pub launch: LaunchArgs,
    /// Config override `a.b=value`; repeatable, applied in order.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue from a checkpoint: `auto` (the newest valid one in the run's checkpoint.dir,
    /// default <out>/checkpoints; give the run's --out) or the PATH of a checkpoint or checkpoint root.
    #[arg(long, value_name = "auto|PATH")]
    pub resume: Option<String>,
    /// With --resume: continue a run with a changed train.steps (every other setting must match the
    /// checkpoint's); schedules that depend on the total follow the new value.
    #[arg(long, requires = "resume")]
    pub extend: bool,
    /// Replace the run already in --out: its results, logs, checkpoints and model are deleted first
    /// (without it, such a directory is refused unless the job resumes it).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// No progress bar or progress lines (errors, evaluations and the summary still print).
    #[arg(long)]
    pub quiet: bool,
    /// The job's TOML config.
    #[arg(required = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Where and how many ranks run.
#[derive(Debug, Clone, Default, Args)]
pub struct LaunchArgs {
    /// N GPU ranks: one per GPU on the first N visible GPUs (honours CUDA_VISIBLE_DEVICES), or
    /// --ranks-per-gpu per GPU.
    #[arg(long, value_name = "N", conflicts_with = "cpus")]
    pub gpus: Option<usize>,
    /// Let K ranks share each GPU (rank r on GPU r / K), to check multi-rank runs on fewer GPUs; needs
    /// the TCP backend, since NCCL refuses two ranks on one GPU [default: 1].
    #[arg(long, value_name = "K", requires = "gpus")]
    pub ranks_per_gpu: Option<usize>,
    /// N CPU ranks (the default is 1).
    #[arg(long, value_name = "N")]
    pub cpus: Option<usize>,
    /// Output directory (default: runs/<config stem>-<YYYYmmdd-HHMMSS>).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Nodes of a multi-node job: start `mgrun` once on every node, each with its --node-rank
    /// (torchrun's static rendezvous) [default: 1, or the Slurm allocation's nodes under srun].
    #[arg(long, value_name = "N")]
    pub nnodes: Option<usize>,
    /// This node's rank among the --nnodes nodes; node 0 hosts the rendezvous store [default: 0].
    #[arg(long, value_name = "R")]
    pub node_rank: Option<usize>,
    /// Host of node 0, where every node and rank reaches the store [default: 127.0.0.1; under Slurm the
    /// allocation's first node]. With it, the store listens on all interfaces.
    #[arg(long, value_name = "HOST")]
    pub master_addr: Option<String>,
    /// Port of the rendezvous store on node 0 [default: any free port on one node; under Slurm one
    /// derived from the job id].
    #[arg(long, visible_alias = "port", value_name = "P")]
    pub master_port: Option<u16>,
    /// Seconds every node has to reach the store and join before the job fails [default: 300].
    #[arg(long, value_name = "SECONDS")]
    pub rdzv_timeout_s: Option<f64>,
    /// When a rank fails, stop all ranks and start them again from the newest checkpoint, up to K times.
    #[arg(long, value_name = "K")]
    pub max_restarts: Option<usize>,
    /// Under `srun`, this task is one rank (`srun --ntasks-per-node=G mgrun --slurm-task ...`), instead of
    /// one launcher per node that starts the node's ranks.
    #[arg(long)]
    pub slurm_task: bool,
    /// Seconds between SIGTERM and SIGKILL when the ranks are stopped [default: 3].
    #[arg(long, value_name = "SECONDS")]
    pub grace_s: Option<f64>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    /// PNG and SVG plots of a run: training loss, per-domain accuracy, DSP-Reg sensitivity per layer,
    /// step-time breakdown; `--compare` overlays the loss and test-domain accuracy of several runs.
    Plot(plot::PlotArgs),
    /// Launch diagnostic ranks that exercise the launcher (tests).
    #[command(hide = true)]
    Selftest(SelftestArgs),
    /// One training rank (spawned by the launcher), on the resolved config the launcher wrote.
    #[command(hide = true)]
    Worker {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
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
pub enum BenchCommand {
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
        // Boxed: the step benchmark's options would make every command as large as they are.
        #[command(flatten)]
        args: Box<StepBenchArgs>,
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
    /// Weak and strong scaling of real training jobs on 1, 2, 4 ... CPU ranks: throughput,
    /// efficiency and the step-time breakdown per world size (from each job's metrics.jsonl).
    Scaling(crate::bench_scaling::ScalingArgs),
}

#[derive(Debug, clap::Args)]
pub struct DataBenchArgs {
    /// The job's TOML config (its `[data]` section is used); or give --root.
    #[arg(required_unless_present = "root", conflicts_with = "root")]
    pub config: Option<PathBuf>,
    /// Dataset root in the DomainBed layout, instead of a config.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Loader worker threads [default: the config's data.num_workers, or 1 with --root].
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Images to time.
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub images: usize,
    /// Output size of the training transform [default: the config's, or 224].
    #[arg(long, value_name = "PX")]
    pub image_size: Option<i64>,
    /// Also write the result as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
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
pub struct StepBenchArgs {
    #[arg(long, default_value = "resnet50")]
    pub arch: String,
    #[arg(long, value_name = "PX", default_value_t = 224)]
    pub image_size: i64,
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub batch_per_domain: usize,
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub domains: usize,
    #[arg(long, value_name = "N", default_value_t = 345)]
    pub classes: usize,
    /// Channel width of small_cnn.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub width: i64,
    /// Comma-separated methods.
    #[arg(long, default_value = "erm,dsp_reg,sam")]
    pub methods: String,
    /// Comma-separated precisions (fp32, bf16).
    #[arg(long, default_value = "fp32,bf16")]
    pub precision: String,
    /// Channels-last convolutions [default: on GPU, off on CPU].
    #[arg(long, value_name = "BOOL")]
    pub channels_last: Option<bool>,
    /// Timed steps per (method, precision).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first (cuDNN autotuning, allocator warm-up).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub warmup: usize,
    /// Also time the phases of the ERM step.
    #[arg(long)]
    pub phases: bool,
    /// Deterministic mode with micro-batches of M images (train.micro_batch): its cost on one rank.
    #[arg(long, value_name = "M")]
    pub micro_batch: Option<usize>,
    /// Time rank 0's share of a job of W ranks (W = --domains: one domain per rank), without its
    /// communication.
    #[arg(long, value_name = "W", default_value_t = 1)]
    pub ranks: usize,
    /// Then run the same steps in PyTorch eager (bench/pytorch_step.py, with foreach and with fused
    /// Adam) in this command and print mgrun's ratio against both, per method and per phase.
    #[arg(long)]
    pub vs_pytorch: bool,
    /// Alternate mgrun's and PyTorch's runs this many times and report the medians (noisy machines).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rounds: usize,
    /// Python with torch and torchvision for --vs-pytorch [default: $MGRUN_PYTHON, else python3].
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Also write the rows as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DatagenCommand {
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
    /// RotatedMNIST-like domains from scikit-learn's handwritten digits: the scans rotated by 0-75
    /// degrees, six domains, 10 classes (`data.dataset = "rotated_digits"`).
    #[command(name = "rotated_digits", alias = "rotated-digits")]
    RotatedDigits(DigitsArgs),
    /// ColoredMNIST-like domains from scikit-learn's handwritten digits: a binary label with 25% noise
    /// and a colour that agrees with it 90%, 80% and then only 10% of the time, three domains
    /// (`data.dataset = "colored_digits"`).
    #[command(name = "colored_digits", alias = "colored-digits")]
    ColoredDigits(DigitsArgs),
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

#[derive(Debug, clap::Args)]
pub struct DigitsArgs {
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// scikit-learn's `digits.csv.gz` [default: found through --python's scikit-learn]
    #[arg(long, value_name = "FILE")]
    pub source: Option<PathBuf>,
    /// Python with scikit-learn installed [default: $MGRUN_PYTHON, else python3]
    #[arg(long, value_name = "PYTHON")]
    pub python: Option<PathBuf>,
    /// Seeds the deal of scans to domains and the colour and label noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_name = "PX", default_value_t = 28)]
    pub image_size: u32,
}

impl LaunchArgs {
    /// These options, with the ones not given here taken from `fallback` (flags before the subcommand).
    pub fn or(self, fallback: &LaunchArgs) -> LaunchArgs {
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
