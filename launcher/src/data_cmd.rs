//! `mgrun data inspect`, `mgrun bench data` and `mgrun datagen`: checking, timing and generating datasets.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cli::{DataBenchArgs, DatagenCommand, DigitsArgs};
use crate::console::say;
use mgrun_data::digits::{DigitsKind, DigitsOptions};

/// `mgrun bench data`: the training loader's throughput, printed and optionally written as JSON.
pub fn bench_data(args: &DataBenchArgs) -> anyhow::Result<()> {
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
pub fn inspect(
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
        say!("{failure}");
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

/// `mgrun datagen synthetic` and `mgrun datagen layout`: write a small dataset and say what was written.
pub fn datagen(which: DatagenCommand) -> anyhow::Result<i32> {
    match which {
        DatagenCommand::Synthetic { out, seed, images_per_class, image_size } => {
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
        }
        DatagenCommand::RotatedDigits(args) => digits(DigitsKind::Rotated, args)?,
        DatagenCommand::ColoredDigits(args) => digits(DigitsKind::Colored, args)?,
        DatagenCommand::Layout { dataset, out, classes, images_per_class, image_size } => {
            let spec = mgrun_data::registry::spec(&dataset).with_context(|| {
                let known: Vec<&str> = mgrun_data::registry::DATASETS.iter().map(|d| d.name).collect();
                format!("unknown dataset '{dataset}' (known: {})", known.join(", "))
            })?;
            let options =
                mgrun_data::registry::SampleTreeOptions { out: out.clone(), classes, images_per_class, image_size };
            let written = mgrun_data::registry::write_sample_tree(spec, &options)?;
            println!("wrote {written} images in the {dataset} layout to {}", out.display());
        }
    }
    Ok(0)
}

/// `mgrun datagen rotated_digits|colored_digits`.
fn digits(kind: DigitsKind, args: DigitsArgs) -> anyhow::Result<()> {
    let source = match args.source {
        Some(source) => source,
        None => sklearn_digits_file(args.python)?,
    };
    let options = DigitsOptions { kind, out: args.out.clone(), source, seed: args.seed, image_size: args.image_size };
    let started = std::time::Instant::now();
    let summary = mgrun_data::digits::generate(&options)
        .with_context(|| format!("generating {} in {}", kind.name(), args.out.display()))?;
    let domains: Vec<String> = summary.per_domain.iter().map(|(d, n)| format!("{d} {n}")).collect();
    println!(
        "{}: {} PNG images ({}x{} px) from {} written to {} in {:.1} s; images per domain: {}",
        kind.name(),
        summary.images,
        args.image_size,
        args.image_size,
        options.source.display(),
        args.out.display(),
        started.elapsed().as_secs_f64(),
        domains.join(", ")
    );
    Ok(())
}

/// The digits file that scikit-learn ships, found by asking `python` (or $MGRUN_PYTHON, or python3).
fn sklearn_digits_file(python: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let python = python
        .or_else(|| std::env::var_os("MGRUN_PYTHON").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("python3"));
    let script =
        "import os, sklearn.datasets as d; print(os.path.join(os.path.dirname(d.__file__), 'data', 'digits.csv.gz'))";
    let output = std::process::Command::new(&python).args(["-c", script]).output().with_context(|| {
        format!("running {} to find scikit-learn's digits (give --source FILE or --python)", python.display())
    })?;
    if !output.status.success() {
        anyhow::bail!(
            "{} cannot import scikit-learn ({}); `make venv` installs it, or give --source path/to/digits.csv.gz",
            python.display(),
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or("no message")
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}
