//! `mgrun sweep` (DomainBed's sweep: run directories, then local runs or a Slurm array) and
//! `mgrun collect` (DomainBed's result tables). The logic lives in `mgrun-sweep`; this module
//! resolves the base config and the dataset's domains, which need the trainer and data crates.

use anyhow::{bail, Context, Result};
use clap::Args;
use mgrun_sweep::{RegistryVersion, RunState, Selection, SweepOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Args)]
pub struct SweepArgs {
    /// The base job config; its values are the defaults (hparams seed 0).
    pub config: PathBuf,
    /// Methods to sweep, comma-separated (erm, sam, dsp_reg).
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
    /// Write a Slurm job-array script to FILE (one array task per run).
    #[arg(long, value_name = "FILE", conflicts_with = "run")]
    pub slurm: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct CollectArgs {
    /// A sweep directory (every results.jsonl below it is read).
    pub dir: PathBuf,
    /// LaTeX instead of markdown.
    #[arg(long)]
    pub latex: bool,
}

fn absolute(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    Ok(std::env::current_dir().context("reading the current directory")?.join(path))
}

pub fn sweep(args: SweepArgs) -> Result<i32> {
    anyhow::ensure!(args.config.is_file(), "config file {} does not exist", args.config.display());
    let mut config = mgrun_trainer::JobConfig::load(&args.config, &args.overrides)?;
    config.resolve_paths(&std::env::current_dir().context("reading the current directory")?);
    let domains = domain_names(&config)?;
    let base = match toml::Value::try_from(&config).context("serialising the resolved base config")? {
        toml::Value::Table(table) => table,
        _ => bail!("the resolved base config is not a table"),
    };
    let options = SweepOptions {
        dataset: config.data.dataset.clone(),
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
        let directives: Vec<String> = args.gpus.map(|n| format!("--gres=gpu:{n}")).into_iter().collect();
        let script = mgrun_sweep::slurm_script(&out, written.len(), &directives)?;
        std::fs::write(script_path, script).with_context(|| format!("writing {}", script_path.display()))?;
        make_executable(script_path)?;
        println!(
            "sweep: Slurm array script in {}; submit it with `sbatch {}`",
            script_path.display(),
            script_path.display()
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

/// The dataset's domains in environment order, as training opens them (the synthetic dataset is
/// generated first when it is missing, as the worker would).
fn domain_names(config: &mgrun_trainer::JobConfig) -> Result<Vec<String>> {
    if config.data.dataset == "synthetic" && !config.data.root.exists() {
        let options = mgrun_data::synthetic::SyntheticOptions {
            out: config.data.root.clone(),
            ..mgrun_data::synthetic::SyntheticOptions::default()
        };
        println!("data.root {} is missing: generating the synthetic dataset there", config.data.root.display());
        mgrun_data::synthetic::generate(&options)?;
    }
    let dataset = mgrun_data::Dataset::open(&config.data)
        .with_context(|| format!("opening the dataset at {}", config.data.root.display()))?;
    Ok(dataset.domains().iter().map(|d| d.name.clone()).collect())
}

pub fn collect(args: CollectArgs) -> Result<i32> {
    let records = mgrun_sweep::load_records(&args.dir)?;
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
