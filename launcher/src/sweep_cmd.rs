//! `mgrun sweep` (DomainBed's sweep: run directories, then local runs or a Slurm array; or, with
//! `--estimate`, only its measured cost) and `mgrun collect` (DomainBed's result tables). The logic
//! lives in `mgrun-sweep`; this module resolves the base config and the dataset's domains, and
//! measures the estimate's times, which need the trainer and data crates.

use crate::job::absolute;
use anyhow::{bail, Context, Result};
use clap::Args;
use mgrun_sweep::estimate::{eval_images_per_rank, eval_passes, interpolate_step_s, significant};
use mgrun_sweep::{Estimate, RegistryVersion, Resource, RunCost, RunSpec, RunState, Selection, SweepOptions};
use mgrun_trainer::bench_step::{run_step_bench, StepBenchConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

// The sweep's Slurm script and `--run` tell a preempted run (checkpoint written, task requeued) by
// the launcher's exit status.
const _: () = assert!(mgrun_sweep::jobs::PREEMPTED_EXIT_STATUS == mgrun_trainer::PREEMPTED_EXIT_CODE);

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// The base job config; its values are the defaults (hparams seed 0).
    pub config: PathBuf,
    /// Methods to sweep, comma-separated (names from `mgrun methods`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub algorithms: Vec<String>,
    /// Hyperparameter seeds n_hparams_from..n_hparams per test-domain set.
    #[arg(long, default_value_t = 20)]
    pub n_hparams: u64,
    #[arg(long, default_value_t = 0)]
    pub n_hparams_from: u64,
    /// Trial seeds 0..n_trials (split seeds; hyperparameters are redrawn per trial as in DomainBed).
    #[arg(long, default_value_t = 3)]
    pub n_trials: u64,
    /// Also every pair of test domains (needed by leave-one-domain-out selection).
    #[arg(long)]
    pub test_pairs: bool,
    /// Only these test domains (names or indices, comma-separated), not every one as DomainBed does:
    /// a smaller sweep for a benchmark that holds out one domain.
    #[arg(long, value_delimiter = ',', value_name = "DOMAINS")]
    pub test_domains: Vec<String>,
    /// DomainBed registry to draw from: `published` (7df6f06) or `current`.
    #[arg(long, default_value = "published")]
    pub hparams_registry: RegistryVersion,
    /// Sweep directory [default: sweeps/<config stem>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Base config override `a.b=value`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Each run on N GPUs.
    #[arg(long, value_name = "N", conflicts_with = "cpus")]
    pub gpus: Option<usize>,
    /// Each run on N CPU ranks.
    #[arg(long, value_name = "N")]
    pub cpus: Option<usize>,
    /// Run the runs here, one after another, skipping those with a `done` marker.
    #[arg(long)]
    pub run: bool,
    /// Write a Slurm job-array script to FILE (one array task per run; requeued on preemption, each
    /// run resuming from its newest checkpoint).
    #[arg(long, value_name = "FILE", conflicts_with = "run")]
    pub slurm: Option<PathBuf>,
    /// With --slurm: Slurm sends SIGUSR1 this many seconds before the time limit (`--signal=B:USR1@N`);
    /// mgrun then checkpoints, requeues the array task and exits with 75.
    #[arg(
        long,
        value_name = "N",
        default_value_t = mgrun_sweep::jobs::DEFAULT_SIGNAL_LEAD_S,
        value_parser = clap::value_parser!(u32).range(1..=65535)
    )]
    pub signal_lead_s: u32,
    /// Print the number of runs and the estimated GPU-hours (--gpus) or CPU-hours per test domain and in
    /// total, from a short step benchmark measured on this machine (GPU 0 with --gpus); writes nothing.
    #[arg(long, conflicts_with_all = ["run", "slurm"])]
    pub estimate: bool,
    /// The most runs a sweep may expand to (a guard against typos such as --n-hparams 1e9).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_RUNS)]
    pub max_runs: u64,
}

/// `--max-runs`' default: DomainBed's full sweep of one dataset is 20 x 3 x 11 (test sets with pairs)
/// x its methods; this leaves room for several methods.
pub const DEFAULT_MAX_RUNS: u64 = 20_000;

/// The number of runs `args` expands to for `domains` domains, refused above --max-runs before any
/// of them is built.
fn check_sweep_size(args: &SweepArgs, domains: usize) -> Result<u64> {
    let domains = if args.test_domains.is_empty() { domains } else { args.test_domains.len().min(domains) };
    let test_sets = domains as u64 + if args.test_pairs { (domains * domains.saturating_sub(1) / 2) as u64 } else { 0 };
    let runs = (args.algorithms.len() as u64)
        .saturating_mul(args.n_hparams.saturating_sub(args.n_hparams_from))
        .saturating_mul(args.n_trials)
        .saturating_mul(test_sets);
    if runs > args.max_runs {
        bail!(
            "--n-hparams {} (from {}) x --n-trials {} x {} algorithm(s) x {test_sets} test-domain set(s) make {runs} runs, \
             more than --max-runs {}: lower --n-hparams / --n-trials, or raise --max-runs if this is meant",
            args.n_hparams,
            args.n_hparams_from,
            args.n_trials,
            args.algorithms.len(),
            args.max_runs
        );
    }
    Ok(runs)
}

#[derive(Debug, Clone, Args)]
pub struct CollectArgs {
    /// A sweep directory (every results.jsonl below it is read).
    pub dir: PathBuf,
    /// LaTeX instead of markdown.
    #[arg(long)]
    pub latex: bool,
    /// Each run's result is its SWAD model (runs with `[swad] enabled`), as the SWAD paper reports;
    /// by default SWAD records are left out and the trained models are selected as DomainBed does.
    #[arg(long)]
    pub swad: bool,
}

pub fn sweep(args: SweepArgs) -> Result<i32> {
    anyhow::ensure!(args.config.is_file(), "config file {} does not exist", args.config.display());
    let mut config = mgrun_trainer::JobConfig::load(&args.config, &args.overrides)?;
    config.check_pretrained().with_context(|| format!("config {}", args.config.display()))?;
    config.resolve_paths(&std::env::current_dir().context("reading the current directory")?);
    let dataset = open_dataset(&config)?;
    let domains: Vec<String> = dataset.domains().iter().map(|d| d.name.clone()).collect();
    check_sweep_size(&args, domains.len())?;
    let base = match toml::Value::try_from(&config).context("serialising the resolved base config")? {
        toml::Value::Table(table) => table,
        _ => bail!("the resolved base config is not a table"),
    };
    let test_domains = args
        .test_domains
        .iter()
        .map(|wanted| {
            domains
                .iter()
                .position(|d| d == wanted)
                .or_else(|| wanted.parse().ok().filter(|&i| i < domains.len()))
                .with_context(|| {
                    format!(
                        "--test-domains: '{wanted}' is not a domain of the dataset (domains: {})",
                        domains.join(", ")
                    )
                })
        })
        .collect::<Result<Vec<usize>>>()?;
    let options = SweepOptions {
        dataset: config.data.dataset.clone(),
        test_domains,
        domains,
        algorithms: args.algorithms.clone(),
        n_hparams_from: args.n_hparams_from,
        n_hparams: args.n_hparams,
        n_trials: args.n_trials,
        test_pairs: args.test_pairs,
        registry: args.hparams_registry,
    };
    let runs = mgrun_sweep::expand(&options, &base)?;
    let stem = args.config.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or("sweep".into());
    let out = absolute(&args.out.clone().unwrap_or_else(|| PathBuf::from("sweeps").join(stem)))?;
    if args.estimate {
        return estimate(&args, &config, &base, &dataset, &options, &runs, &out);
    }
    let mut launch_args = Vec::new();
    if let Some(n) = args.gpus {
        launch_args.extend(["--gpus".to_string(), n.to_string()]);
    }
    if let Some(n) = args.cpus {
        launch_args.extend(["--cpus".to_string(), n.to_string()]);
    }
    let exe = std::env::current_exe().context("locating the mgrun executable")?;
    let launcher = mgrun_sweep::Launcher { exe, launch_args };
    let written = mgrun_sweep::write_sweep(&out, &options, &base, &runs, &launcher)?;
    // Every run's config must load: a bad override fails the sweep now, not run 317 of 360.
    for run in &written {
        mgrun_trainer::JobConfig::load(&run.dir.join("config.toml"), &[])
            .with_context(|| format!("run {}", run.name))?;
    }
    let count = |state| written.iter().filter(|w| w.state == state).count();
    println!(
        "sweep: {} runs in {} ({} done, {} incomplete, {} not launched); {} domains: {}",
        written.len(),
        out.display(),
        count(RunState::Done),
        count(RunState::Incomplete),
        count(RunState::NotLaunched),
        options.domains.len(),
        options.domains.join(", ")
    );
    if let Some(script_path) = &args.slurm {
        let slurm = mgrun_sweep::SlurmOptions {
            directives: args.gpus.map(|n| format!("--gres=gpu:{n}")).into_iter().collect(),
            signal_lead_s: args.signal_lead_s,
        };
        let script = mgrun_sweep::slurm_script(&out, &written, &slurm)?;
        std::fs::write(script_path, script).with_context(|| format!("writing {}", script_path.display()))?;
        make_executable(script_path)?;
        println!(
            "sweep: Slurm array script in {}; submit it with `sbatch {}` (SIGUSR1 {} s before the time limit: \
             checkpoint, requeue, resume)",
            script_path.display(),
            script_path.display(),
            args.signal_lead_s
        );
    } else if args.run {
        let summary = mgrun_sweep::run_locally(&written)?;
        println!(
            "sweep: ran {}, skipped {} already done, {} failed{}",
            summary.ran,
            summary.skipped,
            summary.failed.len(),
            if summary.failed.is_empty() { String::new() } else { format!(": {}", summary.failed.join(", ")) }
        );
        println!("sweep: tables with `mgrun collect {}`", out.display());
        return Ok(if summary.failed.is_empty() { 0 } else { 1 });
    } else {
        println!(
            "sweep: run them with --run, as a Slurm array with --slurm FILE, or from {}",
            out.join("commands.txt").display()
        );
    }
    Ok(0)
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", path.display()))
}

/// The dataset as training opens it, domains in environment order (the synthetic dataset is
/// generated first when it is missing, as the worker would).
fn open_dataset(config: &mgrun_trainer::JobConfig) -> Result<mgrun_data::Dataset> {
    if config.data.dataset == "synthetic" && !config.data.root.exists() {
        let options = mgrun_data::synthetic::SyntheticOptions {
            out: config.data.root.clone(),
            ..mgrun_data::synthetic::SyntheticOptions::default()
        };
        println!("data.root {} is missing: generating the synthetic dataset there", config.data.root.display());
        mgrun_data::synthetic::generate(&options)?;
    }
    mgrun_data::Dataset::open(&config.data)
        .with_context(|| format!("opening the dataset at {}", config.data.root.display()))
}

/// Warm-up and timed steps of each step benchmark of `--estimate`.
const ESTIMATE_WARMUP_STEPS: usize = 2;
const ESTIMATE_TIMED_STEPS: usize = 5;
/// At most this many images are loaded to time the evaluation's image loading.
const ESTIMATE_LOAD_IMAGES: usize = 64;

/// `mgrun sweep --estimate`: measures here a few training steps of every swept algorithm (for each
/// number of training domains the sweep's test-domain sets leave, at the smallest and the largest
/// batch size its hyperparameter seeds draw), ERM's forward pass and the loading of evaluation
/// images, and prints the sweep's runs and GPU- or CPU-hours per test-domain set
/// ([`mgrun_sweep::estimate`] has the model). Writes nothing under the sweep directory.
fn estimate(
    args: &SweepArgs,
    config: &mgrun_trainer::JobConfig,
    base: &toml::Table,
    dataset: &mgrun_data::Dataset,
    options: &SweepOptions,
    runs: &[RunSpec],
    out: &Path,
) -> Result<i32> {
    let (device, resource, ranks) = match args.gpus {
        Some(n) => {
            ensure_gpu_visible(n)?;
            (tch::Device::Cuda(0), Resource::Gpu, n)
        }
        None => (tch::Device::Cpu, Resource::Cpu, args.cpus.unwrap_or(1)),
    };
    anyhow::ensure!(ranks >= 1, "--gpus/--cpus must be at least 1");
    let threads = (!device.is_cuda()).then(|| config.train.threads_per_rank(true, ranks));
    if let Some(threads) = threads {
        tch::set_num_threads(threads as i32);
    }
    let n_domains = dataset.domains().len();
    // Every run's batch size (hyperparameter seeds other than 0 draw data.batch_per_domain), and for
    // each number of training domains (one, or two with --test-pairs) the smallest and largest.
    let batches: Vec<usize> = runs.iter().map(|run| run_batch_per_domain(run, base)).collect::<Result<_>>()?;
    let mut batch_range: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    for (run, &batch) in runs.iter().zip(&batches) {
        let range = batch_range.entry(n_domains - run.test_envs.len()).or_insert((batch, batch));
        *range = (range.0.min(batch), range.1.max(batch));
    }
    println!(
        "sweep --estimate: {} runs = {} test-domain set(s) x {} algorithm(s) x {} hparams seed(s) x {} trial(s); \
         measuring {} training step(s) after {} warm-up per algorithm and batch size on {}",
        runs.len(),
        runs.iter().map(|r| &r.test_envs).collect::<std::collections::BTreeSet<_>>().len(),
        options.algorithms.len(),
        options.n_hparams - options.n_hparams_from,
        options.n_trials,
        ESTIMATE_TIMED_STEPS,
        ESTIMATE_WARMUP_STEPS,
        if device.is_cuda() { "GPU 0" } else { "the CPU" }
    );
    let started = Instant::now();
    let (step_s, forward_s) = measure_steps(config, dataset, device, &options.algorithms, &batch_range)?;
    let (load_first_s, load_again_s) = time_eval_loading(dataset, config)?;
    let measured_in = started.elapsed().as_secs_f64();

    let passes = eval_passes(config.train.steps, config.eval.every_steps);
    let eval_images =
        eval_images_per_rank(dataset.domains().iter().flat_map(|d| [d.in_split.len(), d.out_split.len()]), ranks);
    // The first evaluation decodes every image; the later ones read the dataset's cache when it fits
    // in data.cache_mb (the second load measures whichever happens).
    let eval_s = eval_images as f64
        * (passes as f64 * forward_s + load_first_s + passes.saturating_sub(1) as f64 * load_again_s);
    // The busiest rank's share of a step's images, by (training domains, batch per domain).
    let mut shares: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for (run, &batch) in runs.iter().zip(&batches) {
        let train_domains = n_domains - run.test_envs.len();
        if let std::collections::btree_map::Entry::Vacant(entry) = shares.entry((train_domains, batch)) {
            let mut run_config = config.clone();
            run_config.data.batch_per_domain = batch;
            let plan = mgrun_trainer::sharding::job_plan(&run_config, ranks, train_domains).with_context(|| {
                format!("the sharding plan of {train_domains} training domains x {batch} images on {ranks} rank(s)")
            })?;
            let busiest = (0..ranks).map(|rank| plan.images(rank)).max().unwrap_or(0);
            entry.insert(busiest as f64 / (train_domains * batch) as f64);
        }
    }
    let estimate = Estimate::new(runs, &options.domains, config.train.steps, ranks, resource, |run| {
        let train_domains = n_domains - run.test_envs.len();
        let batch = run_batch_per_domain(run, base)?;
        let (lo, hi) = *batch_range.get(&train_domains).context("no measured batch sizes")?;
        let measured = |b: usize| -> Result<f64> {
            step_s
                .get(&(train_domains, run.algorithm.clone(), b))
                .copied()
                .with_context(|| format!("no step time of {} at {b} images per domain was measured", run.algorithm))
        };
        Ok(RunCost {
            measured_step_s: interpolate_step_s(batch, (lo, measured(lo)?), (hi, measured(hi)?)),
            share: *shares.get(&(train_domains, batch)).context("no sharding plan")?,
            eval_s,
        })
    })?;

    let unit = resource.unit();
    println!();
    print!("{}", estimate.table());
    println!();
    let per_run = match (resource, threads) {
        (Resource::Gpu, _) => format!("{ranks} GPU(s) per run"),
        (Resource::Cpu, Some(threads)) => format!("{ranks} CPU rank(s) per run, {threads} thread(s) each"),
        (Resource::Cpu, None) => format!("{ranks} CPU rank(s) per run"),
    };
    let share_text = if ranks == 1 {
        "1 on one rank".to_string()
    } else {
        let (lo, hi) = shares.values().fold((f64::INFINITY, 0.0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        let range = if significant(lo) == significant(hi) {
            significant(lo)
        } else {
            format!("{}-{}", significant(lo), significant(hi))
        };
        format!("{range} on {ranks} ranks; communication is not counted")
    };
    println!(
        "{unit}-hours = runs x est. h/run x {per_run}; est. h/run = (steps x measured s/step x share + eval s/run) \
         / 3600, share = the busiest rank's share of a step's images ({share_text}); s/step and h/run are means over \
         a row's runs."
    );
    let ranges: Vec<String> = batch_range
        .iter()
        .map(|(k, (lo, hi))| {
            let images = if lo == hi { lo.to_string() } else { format!("{lo} and {hi}") };
            format!("{k} training domains x {images} images")
        })
        .collect();
    let interpolated = if batch_range.values().any(|(lo, hi)| lo != hi) {
        " (the hparams seeds draw the batch size: other sizes are interpolated linearly)"
    } else {
        ""
    };
    println!(
        "measured s/step: one training step in one process, of {}{interpolated}. eval s/run: {passes} evaluations \
         (after step 0, every {} steps and after the last) x {eval_images} images per rank (every domain's in and \
         out split) x ({} ms forward, ERM's training-mode forward pass per image, an upper bound for evaluation \
         without gradients; {} ms loading an image the first time, {} ms after).",
        ranges.join(", "),
        config.eval.every_steps,
        significant(forward_s * 1e3),
        significant(load_first_s * 1e3),
        significant(load_again_s * 1e3)
    );
    println!(
        "total: {} runs, {} {unit}-hours (an estimate: start-up, checkpoints and data-loading stalls are not counted)",
        estimate.runs(),
        significant(estimate.total_hours())
    );
    println!(
        "measured on {}: {} {}x{} px, {} class(es), {}{}, {} warm-up + {} timed steps per algorithm and batch \
         size, in {measured_in:.1} s",
        device_description(device, threads),
        config.model.arch,
        config.data.image_size,
        config.data.image_size,
        dataset.num_classes(),
        config.train.precision,
        if config.train.deterministic {
            format!(", deterministic micro-batches of {}", config.train.micro_batch)
        } else {
            String::new()
        },
        ESTIMATE_WARMUP_STEPS,
        ESTIMATE_TIMED_STEPS
    );
    let done = runs.iter().filter(|r| mgrun_sweep::jobs::run_state(&out.join(&r.name)) == RunState::Done).count();
    if done > 0 {
        println!("already done in {}: {done} of these runs (the estimate counts every run)", out.display());
    }
    println!("nothing was written; without --estimate, `mgrun sweep` writes the runs to {}", out.display());
    Ok(0)
}

/// Seconds of one training step by (training domains, algorithm, batch per domain).
type StepTimes = BTreeMap<(usize, String, usize), f64>;

/// The step times of every algorithm at both ends of each `batch_range` (training domains ->
/// smallest and largest batch per domain), and ERM's forward seconds per image (its step's forward
/// phase).
fn measure_steps(
    config: &mgrun_trainer::JobConfig,
    dataset: &mgrun_data::Dataset,
    device: tch::Device,
    algorithms: &[String],
    batch_range: &BTreeMap<usize, (usize, usize)>,
) -> Result<(StepTimes, f64)> {
    let mut step_s = StepTimes::new();
    let mut forward_s_per_image = None;
    for (&train_domains, &(lo, hi)) in batch_range {
        let measured_batches = if lo == hi { vec![lo] } else { vec![lo, hi] };
        for batch in measured_batches {
            let time_forward = forward_s_per_image.is_none();
            let mut methods = algorithms.to_vec();
            if time_forward && !methods.iter().any(|m| m == "erm") {
                // Only for its phases, which time the evaluation's forward pass.
                methods.push("erm".to_string());
            }
            let bench = StepBenchConfig {
                device,
                arch: config.model.arch.clone(),
                image_size: config.data.image_size,
                batch_per_domain: batch,
                domains: train_domains,
                classes: dataset.num_classes(),
                width: config.model.width,
                methods,
                precisions: vec![config.train.precision],
                channels_last: Some(config.train.channels_last_on(device)),
                steps: ESTIMATE_TIMED_STEPS,
                warmup: ESTIMATE_WARMUP_STEPS,
                phases: time_forward,
                micro_batch: config.train.deterministic.then_some(config.train.micro_batch),
                ranks: 1,
            };
            let rows = run_step_bench(&bench).with_context(|| {
                format!("measuring a training step of {train_domains} training domains x {batch} images")
            })?;
            for row in rows {
                if time_forward && row.method == "erm" {
                    let forward_ms = row
                        .phases_ms
                        .iter()
                        .find(|(phase, _)| phase == "eval forward")
                        .map(|(_, ms)| *ms)
                        .context("the step benchmark measured no evaluation forward pass")?;
                    forward_s_per_image = Some(forward_ms / 1e3 / (train_domains * batch) as f64);
                }
                step_s.insert((train_domains, row.method, batch), row.ms_per_step / 1e3);
            }
        }
    }
    let forward_s = forward_s_per_image.context("no forward pass was measured")?;
    Ok((step_s, forward_s))
}

/// A run's `data.batch_per_domain`: the base config's, or the one its hyperparameter seed drew.
fn run_batch_per_domain(run: &RunSpec, base: &toml::Table) -> Result<usize> {
    let config = run.config(base)?;
    let batch = config
        .get("data")
        .and_then(|data| data.get("batch_per_domain"))
        .and_then(toml::Value::as_integer)
        .with_context(|| format!("run {}: no data.batch_per_domain", run.name))?;
    usize::try_from(batch)
        .ok()
        .filter(|&b| b > 0)
        .with_context(|| format!("run {}: data.batch_per_domain {batch}", run.name))
}

/// `--estimate --gpus N` measures on GPU 0: fail at once, and say what to do, when there is none.
fn ensure_gpu_visible(requested: usize) -> Result<()> {
    if tch::Cuda::device_count() > 0 {
        return Ok(());
    }
    let detail = crate::cuda::load_torch_cuda().map(|error| format!(" [{error}]")).unwrap_or_default();
    bail!(
        "sweep --estimate --gpus {requested}: the estimate measures a training step on GPU 0, but no GPU is visible \
         here (no CUDA driver, or libtorch_cuda cannot be loaded); run it on a machine with a GPU, or estimate \
         CPU-hours with --cpus N{detail}"
    )
}

/// Seconds to load one evaluation image (resized and normalised, as the evaluator loads them): the
/// first time, and again (from the dataset's cache of decoded images when it fits, else decoded again).
fn time_eval_loading(dataset: &mgrun_data::Dataset, config: &mgrun_trainer::JobConfig) -> Result<(f64, f64)> {
    let Some((index, domain)) = dataset.domains().iter().enumerate().max_by_key(|(_, d)| d.len()) else {
        return Ok((0.0, 0.0));
    };
    let count = ESTIMATE_LOAD_IMAGES.min(config.eval.batch_size.max(1));
    let images: Vec<usize> = domain.in_split.iter().chain(&domain.out_split).take(count).copied().collect();
    if images.is_empty() {
        return Ok((0.0, 0.0));
    }
    let time = || -> Result<f64> {
        let started = Instant::now();
        let (_x, _y) = mgrun_data::load_eval_batch(dataset, index, &images, config.data.image_size)
            .with_context(|| format!("loading evaluation images of domain {}", domain.name))?;
        Ok(started.elapsed().as_secs_f64() / images.len() as f64)
    };
    let first = time()?;
    Ok((first, time()?))
}

/// The device that measured the estimate, for its last line.
fn device_description(device: tch::Device, threads: Option<usize>) -> String {
    match device {
        tch::Device::Cuda(index) => {
            let name = gpu_name().unwrap_or_else(|| "name unknown (nvidia-smi gave none)".to_string());
            format!("GPU {index} ({name})")
        }
        _ => {
            let model = std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find(|line| line.starts_with("model name"))
                        .and_then(|line| line.split_once(':'))
                        .map(|(_, name)| name.trim().to_string())
                })
                .unwrap_or_else(|| "model unknown".to_string());
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            let threads = threads.unwrap_or(cores);
            format!("the CPU ({model}, {cores} logical cores; {threads} thread(s) per rank)")
        }
    }
}

/// The name of CUDA device 0 (the first of CUDA_VISIBLE_DEVICES when set), from nvidia-smi.
fn gpu_name() -> Option<String> {
    let output = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=index,uuid,name", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|output| output.status.success())?;
    let first_visible = std::env::var("CUDA_VISIBLE_DEVICES")
        .ok()
        .and_then(|value| value.split(',').next().map(|v| v.trim().to_string()))
        .filter(|v| !v.is_empty());
    String::from_utf8_lossy(&output.stdout).lines().find_map(|line| {
        let fields: Vec<&str> = line.splitn(3, ',').map(str::trim).collect();
        let [index, uuid, name] = fields[..] else { return None };
        let is_first = match &first_visible {
            Some(visible) => visible == index || uuid.starts_with(visible.as_str()),
            None => index == "0",
        };
        is_first.then(|| name.to_string())
    })
}

pub fn collect(args: CollectArgs) -> Result<i32> {
    let records = mgrun_sweep::select_models(mgrun_sweep::load_records(&args.dir)?, args.swad);
    if records.is_empty() {
        bail!("no results.jsonl records under {}", args.dir.display());
    }
    let all: Vec<_> = Selection::ALL.iter().map(|&s| mgrun_sweep::tables(&records, s)).collect();
    let (text, file) = if args.latex {
        (mgrun_sweep::render_latex(records.len(), &all), "results.tex")
    } else {
        (mgrun_sweep::render_markdown(records.len(), &all), "results.md")
    };
    print!("{text}");
    let path = args.dir.join(file);
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(0)
}
