//! Run records, one component of the training loop, written by rank 0: `steps.jsonl` (one record
//! per step), `results.jsonl` (one record per evaluation, with DomainBed's field names, so that its
//! `collect_results` and `mgrun collect` read them) and the methods' sensitivity dumps. After a resume
//! both files keep the records of the steps before the checkpoint and continue.

use crate::config::JobConfig;
use anyhow::{Context, Result};
use mgrun_collectives::RankEnv;
use mgrun_data::Dataset;
use mgrun_methods::{Method, StepStats};
use mgrun_models::Model;
use mgrun_telemetry::WindowSummary;
use serde_json::{json, Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

pub struct RunRecords {
    /// Rank 0's outputs; `None` on the other ranks, where recording is a no-op.
    files: Option<RecordFiles>,
    window: WindowMeans,
    steps_per_epoch: f64,
    /// The `hparams` and `args` fields of every results record.
    identity: Map<String, Value>,
}

struct RecordFiles {
    steps: JsonlWriter,
    results: JsonlWriter,
    metrics: JsonlWriter,
    sensitivity_dir: PathBuf,
}

impl RunRecords {
    /// Opens the records of the run in `out_dir` (rank 0) that starts at `start_step`: on resume, the
    /// records of earlier steps are kept, and the running means since the last evaluation before the
    /// checkpoint continue.
    pub fn open(
        config: &JobConfig,
        env: &RankEnv,
        dataset: &Dataset,
        out_dir: &Path,
        start_step: u64,
    ) -> Result<RunRecords> {
        let batch = config.data.batch_per_domain;
        let mut records = RunRecords {
            files: None,
            window: WindowMeans::default(),
            steps_per_epoch: steps_per_epoch(dataset, batch),
            identity: Map::new(),
        };
        if env.rank != 0 {
            return Ok(records);
        }
        let (steps, kept) = reopen_jsonl(&out_dir.join("steps.jsonl"), start_step)?;
        let every = config.eval.every_steps;
        let last_eval = (start_step > 0).then(|| (start_step - 1) / every * every);
        for record in kept.iter().filter(|r| last_eval.is_some_and(|e| r["step"].as_u64().is_some_and(|s| s > e))) {
            for (k, v) in record.as_object().into_iter().flatten().filter(|(k, _)| k.as_str() != "step") {
                records.window.add(k, v.as_f64().unwrap_or(0.0));
            }
            records.window.finish_step();
        }
        let results = reopen_jsonl(&out_dir.join("results.jsonl"), start_step)?.0;
        let metrics = reopen_jsonl(&out_dir.join(METRICS_FILE), start_step)?.0;
        records.files = Some(RecordFiles { steps, results, metrics, sensitivity_dir: out_dir.join("sensitivity") });
        records.identity.insert("hparams".into(), run_hparams(config)?);
        records.identity.insert("args".into(), run_args(config, env, dataset, out_dir));
        Ok(records)
    }

    /// Records one step's statistics (and its time, in seconds).
    pub fn step(&mut self, step: u64, stats: &StepStats, step_time: f64) -> Result<()> {
        self.window.add("loss", stats.loss);
        self.window.add("step_time", step_time);
        for (k, v) in &stats.extra {
            self.window.add(k, *v);
        }
        self.window.finish_step();
        let Some(files) = self.files.as_mut() else { return Ok(()) };
        let mut record = json!({"step": step, "loss": stats.loss, "step_time": step_time});
        for (k, v) in &stats.extra {
            record[k] = json!(v);
        }
        files.steps.write(&record)
    }

    /// Records an evaluation after `step`: the accuracies, the training domains' validation loss
    /// (`tr_outloss`, swad's name), the means of the steps since the last one, memory, the method's
    /// summaries and its sensitivity dump, and the run's identity.
    pub fn evaluation(
        &mut self,
        step: u64,
        accuracy: &[DomainAccuracy],
        train_out_loss: f64,
        method: &dyn Method,
        model: &dyn Model,
    ) -> Result<()> {
        let Some(files) = self.files.as_mut() else { return Ok(()) };
        let mut record = Map::new();
        record.insert("step".into(), json!(step));
        record.insert("epoch".into(), json!(step as f64 / self.steps_per_epoch));
        record.extend(self.window.take());
        record.insert("mem_gb".into(), json!(peak_memory_gb()));
        insert_accuracy(&mut record, accuracy, train_out_loss);
        let summaries = method.summaries(model);
        for (name, value) in &summaries {
            if let Some(value) = value.as_f64() {
                metrics::gauge!("mgrun_method_summary", "summary" => name.clone()).set(value);
            }
        }
        record.extend(summaries);
        if let Some(tensors) = method.evaluation_dump(model)? {
            let dir = &files.sensitivity_dir;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(format!("step{step:06}.safetensors"));
            let named: Vec<(String, tch::Tensor)> =
                tensors.into_iter().map(|(n, t)| (n, t.to_device(tch::Device::Cpu))).collect();
            tch::Tensor::write_safetensors(&named, &path).with_context(|| format!("writing {}", path.display()))?;
            record.insert("sensitivity_dump".into(), json!(path));
        }
        record.extend(self.identity.clone());
        files.results.write(&Value::Object(record))
    }
}

/// `env{i}_in_acc` / `env{i}_out_acc` (DomainBed's names) and `tr_outloss` into `record`.
fn insert_accuracy(record: &mut Map<String, Value>, accuracy: &[DomainAccuracy], train_out_loss: f64) {
    for a in accuracy {
        record.insert(format!("env{}_in_acc", a.domain), json!(a.in_acc));
        record.insert(format!("env{}_out_acc", a.domain), json!(a.out_acc));
    }
    // JSON has no NaN (a run without training domains' out splits).
    if train_out_loss.is_finite() {
        record.insert("tr_outloss".into(), json!(train_out_loss));
    }
}

impl RunRecords {
    /// Records every rank's step-time breakdown since the last evaluation (`metrics.jsonl`, one line
    /// per evaluation; `ranks` in rank order, with each rank's GPU memory when on a GPU).
    pub fn metrics(&mut self, step: u64, ranks: &[(WindowSummary, Option<f64>)]) -> Result<()> {
        let Some(files) = self.files.as_mut() else { return Ok(()) };
        let per_rank: Vec<Value> = ranks.iter().enumerate().map(|(r, (s, gpu))| s.to_json(r, *gpu)).collect();
        let window_steps = ranks.first().map_or(0.0, |(s, _)| s.steps);
        let images_per_s: f64 = ranks.iter().map(|(s, _)| s.images_per_s).filter(|x| x.is_finite()).sum();
        let loss = ranks.first().map_or(f64::NAN, |(s, _)| s.loss);
        let record = json!({
            "step": step,
            "window_steps": window_steps,
            "world_size": ranks.len(),
            "images_per_s": images_per_s,
            "loss": if loss.is_finite() { json!(loss) } else { Value::Null },
            "ranks": per_rank,
        });
        files.metrics.write(&record)
    }

    /// Records the evaluation of the SWAD model at the end of the run (its last trained step is
    /// `step`), marked `"swad": true`, with the segments it averages.
    pub fn swad(
        &mut self,
        step: u64,
        accuracy: &[DomainAccuracy],
        train_out_loss: f64,
        summary: &crate::swad::SwadSummary,
    ) -> Result<()> {
        let Some(files) = self.files.as_mut() else { return Ok(()) };
        let mut record = Map::new();
        record.insert("step".into(), json!(step));
        record.insert("epoch".into(), json!(step as f64 / self.steps_per_epoch));
        record.insert("swad".into(), json!(true));
        insert_accuracy(&mut record, accuracy, train_out_loss);
        let segments: Vec<Value> = summary.segments.iter().map(|s| json!([s.start_step, s.end_step])).collect();
        record.insert("swad_segments".into(), json!(segments));
        record.insert("swad_n_averaged".into(), json!(summary.n_averaged));
        record.insert("swad_converge_step".into(), json!(summary.converge_step));
        if summary.threshold.is_finite() {
            record.insert("swad_threshold".into(), json!(summary.threshold));
        }
        record.insert("swad_early_stop".into(), json!(summary.early_stopped));
        record.insert("swad_converged".into(), json!(!summary.last_segment_only));
        record.extend(self.identity.clone());
        files.results.write(&Value::Object(record))
    }
}

/// DomainBed's epoch: steps per pass over the smallest training domain's in split.
fn steps_per_epoch(dataset: &Dataset, batch: usize) -> f64 {
    let domains = dataset.domains();
    let smallest = dataset.train_domains().iter().map(|&d| domains[d].in_split.len()).min().unwrap_or(0);
    (smallest as f64 / batch as f64).max(1e-9)
}

/// The run's identity with DomainBed's `args` field names. Names follow `mgrun_sweep::registry`
/// (`domainbed_dataset_name` / `domainbed_algorithm_name`), which derives the run seeds from them,
/// so that DomainBed's collect_results (and `mgrun collect`) group runs as it does.
fn run_args(config: &JobConfig, env: &RankEnv, dataset: &Dataset, out_dir: &Path) -> Value {
    let dataset_name = mgrun_sweep::registry::domainbed_dataset_name(&config.data.dataset);
    let algorithm = mgrun_sweep::registry::domainbed_algorithm_name(&config.method.name);
    json!({
        "dataset": dataset_name,
        "data_dir": config.data.root,
        "algorithm": algorithm,
        "test_envs": dataset.test_domains(),
        "domains": dataset.domains().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        "holdout_fraction": config.data.holdout_fraction,
        "hparams_seed": config.train.hparams_seed,
        "trial_seed": config.data.split_seed,
        "seed": config.train.seed,
        "steps": config.train.steps,
        "checkpoint_freq": config.eval.every_steps,
        "output_dir": out_dir,
        "task": "domain_generalization",
        "world_size": env.world_size,
        "arch": config.model.arch,
        // data.on_corrupt = "skip": how many images were left out and the first of them (the full
        // list is <out>/skipped.txt).
        "skipped_images": dataset.skipped().len(),
        "skipped_first": dataset.skipped().iter().take(SKIPPED_LISTED).collect::<Vec<_>>(),
    })
}

/// Every rank's step-time breakdown, one line per evaluation (see `RunRecords::metrics`).
pub const METRICS_FILE: &str = "metrics.jsonl";

/// How many skipped images the console and the records name (all of them go to skipped.txt).
pub const SKIPPED_LISTED: usize = 10;

/// DomainBed's `hparams` names for the shared hyperparameters and the swept method ones (as
/// `mgrun sweep` names them), plus mgrun's full `[method]` table under `method`.
fn run_hparams(config: &JobConfig) -> Result<Value> {
    let method = serde_json::to_value(&config.method).context("serialising the method config")?;
    let mut hparams = json!({
        "lr": config.train.lr,
        "batch_size": config.data.batch_per_domain,
        "resnet_dropout": config.model.dropout,
        "weight_decay": config.train.weight_decay,
        "optimizer": config.train.optimizer,
        "data_augmentation": config.data.augment,
        "class_balanced": false,
        "resnet18": config.model.arch == "resnet18",
        "freeze_bn": config.model.freeze_bn,
    });
    for (name, value) in config.method.searched_values()? {
        hparams[name] = value;
    }
    hparams["method"] = method;
    Ok(hparams)
}

/// Opens a JSONL output for appending after a resume at `start_step`: the records of earlier
/// steps are kept (a record a killed run wrote past the checkpoint is dropped), via a temporary
/// file renamed over the old one so that a crash here loses nothing. Returns the kept records.
fn reopen_jsonl(path: &Path, start_step: u64) -> Result<(JsonlWriter, Vec<Value>)> {
    let kept: Vec<Value> = if start_step > 0 && path.exists() {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|r| r["step"].as_u64().is_some_and(|s| s < start_step))
            .collect()
    } else {
        Vec::new()
    };
    let tmp = path.with_extension("jsonl.tmp");
    let mut writer = JsonlWriter::create(&tmp)?;
    for record in &kept {
        writer.write(record)?;
    }
    // The open file follows the rename.
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok((writer, kept))
}

struct JsonlWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl JsonlWriter {
    fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), out: BufWriter::new(file) })
    }

    fn write(&mut self, record: &Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, record).with_context(|| format!("writing {}", self.path.display()))?;
        self.out.write_all(b"\n").with_context(|| format!("writing {}", self.path.display()))?;
        // Flushed per record so that a crash loses nothing already reported.
        self.out.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Accuracy of one domain's in/out splits.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainAccuracy {
    pub domain: usize,
    pub name: String,
    pub is_test: bool,
    pub in_acc: f64,
    pub out_acc: f64,
}

/// Running means of the step records between two evaluations (DomainBed averages its
/// checkpoint_vals the same way).
#[derive(Default)]
struct WindowMeans {
    sums: Map<String, Value>,
    count: usize,
}

impl WindowMeans {
    fn add(&mut self, key: &str, value: f64) {
        let slot = self.sums.entry(key.to_string()).or_insert(json!(0.0));
        *slot = json!(slot.as_f64().unwrap_or(0.0) + value);
    }
    fn finish_step(&mut self) {
        self.count += 1;
    }
    /// The means since the last call, then resets.
    fn take(&mut self) -> Map<String, Value> {
        let n = self.count.max(1) as f64;
        let out = self.sums.iter().map(|(k, v)| (k.clone(), json!(v.as_f64().unwrap_or(0.0) / n))).collect();
        self.sums.clear();
        self.count = 0;
        out
    }
}

/// The per-domain accuracy table printed at the end of a run.
pub fn accuracy_table(accs: &[DomainAccuracy]) -> String {
    let width = accs.iter().map(|a| a.name.len()).max().unwrap_or(6).max(6);
    let mut s = format!("{:<width$}  {:<5}  {:>7}  {:>7}\n", "domain", "role", "in_acc", "out_acc");
    for a in accs {
        let role = if a.is_test { "test" } else { "train" };
        s.push_str(&format!("{:<width$}  {:<5}  {:>7.4}  {:>7.4}\n", a.name, role, a.in_acc, a.out_acc));
    }
    s
}

/// Peak resident memory of this process in GB (VmHWM), for the `mem_gb` field.
pub fn peak_memory_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()).map(|kb| kb / (1024.0 * 1024.0))
            })
        })
        .unwrap_or(0.0)
}
