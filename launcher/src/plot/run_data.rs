//! Reading a run directory for `mgrun plot`: rank 0's `steps.jsonl`, `results.jsonl` (DomainBed's
//! field names), `metrics.jsonl` and DSP-Reg's sensitivity dumps. Every error names the file, and
//! the line where there is one.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One line of `steps.jsonl`.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub step: u64,
    /// NaN where the record holds `null` (serde_json writes a NaN loss as null).
    pub loss: f64,
}

/// One line of `results.jsonl`.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub step: u64,
    /// `env{i}_in_acc` by domain index (None where the record has none).
    pub in_acc: Vec<Option<f64>>,
    /// `env{i}_out_acc` by domain index.
    pub out_acc: Vec<Option<f64>>,
    /// The training domains' validation loss.
    pub train_out_loss: Option<f64>,
    /// Mean DSP-Reg sensitivity per layer (parameter tensor), when the run recorded it.
    pub sensitivity: Option<BTreeMap<String, f64>>,
}

/// The run's identity, from the `args` of its evaluation records.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    pub dataset: Option<String>,
    pub algorithm: Option<String>,
    /// Names by domain index (`env{i}` where the records do not name them).
    pub domains: Vec<String>,
    pub test_envs: Vec<usize>,
}

/// One line of `metrics.jsonl`: one evaluation window.
#[derive(Debug, Clone)]
pub struct MetricsWindow {
    pub step: u64,
    pub images_per_s: Option<f64>,
    pub ranks: Vec<RankTimes>,
}

/// The phases inside a step (`<phase>_ms`, means per step), in the order they are stacked.
pub const PHASES: [&str; 4] = ["data_wait", "forward_backward", "comm", "optimizer"];

/// One rank's step time over a window (ms).
#[derive(Debug, Clone)]
pub struct RankTimes {
    pub rank: usize,
    /// The mean step, [`PHASES`] and the loop's own bookkeeping.
    pub step_ms: f64,
    pub phase_ms: [f64; PHASES.len()],
    /// Checkpoint writes between steps, spread over the window's steps (the record holds the
    /// window's total: they happen every few steps).
    pub checkpoint_stall_ms_per_step: f64,
    /// Communication on another thread, hidden behind backward: part of no stack.
    pub comm_overlapped_ms: f64,
}

impl RankTimes {
    /// The part of the step no phase accounts for (never negative: the means are rounded apart).
    pub fn other_ms(&self) -> f64 {
        (self.step_ms - self.phase_ms.iter().sum::<f64>()).max(0.0)
    }
}

/// Everything `mgrun plot` draws from one run directory.
#[derive(Debug, Clone)]
pub struct Run {
    pub dir: PathBuf,
    pub info: RunInfo,
    pub steps: Vec<StepRecord>,
    /// Evaluations of the trained model, by step (SWAD's record is [`Run::swad`]).
    pub evaluations: Vec<Evaluation>,
    /// The evaluation of the SWAD-averaged model (`"swad": true`), if the run has one.
    pub swad: Option<Evaluation>,
    /// None when the run has no `metrics.jsonl` (runs from before it existed).
    pub metrics: Option<Vec<MetricsWindow>>,
    /// Things the reader passed over, for the command's report.
    pub notes: Vec<String>,
}

impl Run {
    /// Reads the run in `dir`: `steps.jsonl` must exist; `results.jsonl` and `metrics.jsonl` may not
    /// (a run killed before its first evaluation, or from before metrics were recorded).
    pub fn read(dir: &Path) -> Result<Run> {
        if !dir.is_dir() {
            bail!("{} is not a directory (give a run's --out directory)", dir.display());
        }
        let mut notes = Vec::new();
        let steps_path = dir.join("steps.jsonl");
        let steps = read_steps(&steps_path, &mut notes)?;

        let results_path = dir.join("results.jsonl");
        let (info, evaluations, swad) = if results_path.exists() {
            read_results(&results_path, dir, &mut notes)?
        } else {
            notes.push(format!("{} is missing (no evaluation yet)", results_path.display()));
            (RunInfo::default(), Vec::new(), None)
        };

        let metrics_path = dir.join("metrics.jsonl");
        let metrics = if metrics_path.exists() { Some(read_metrics(&metrics_path, &mut notes)?) } else { None };
        Ok(Run { dir: dir.to_path_buf(), info, steps, evaluations, swad, metrics, notes })
    }

    /// The domain name of index `i`.
    pub fn domain_name(&self, i: usize) -> String {
        self.info.domains.get(i).cloned().unwrap_or_else(|| format!("env{i}"))
    }

    /// How many domains the evaluations cover.
    pub fn domain_count(&self) -> usize {
        let recorded = self.evaluations.iter().map(|e| e.in_acc.len().max(e.out_acc.len())).max().unwrap_or(0);
        recorded.max(self.info.domains.len())
    }
}

/// A JSON object and the 1-based line it came from.
struct Line {
    number: usize,
    object: Map<String, Value>,
}

/// The objects of a JSON-lines file. A malformed line is an error naming the file and line, except
/// an unterminated last line, which a run still writing (or killed mid-write) leaves: that one is
/// skipped with a note.
fn read_jsonl(path: &Path, notes: &mut Vec<String>) -> Result<Vec<Line>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let line_count = text.lines().count();
    let mut lines = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let number = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(object)) => lines.push(Line { number, object }),
            Ok(other) => bail!("{}:{number}: expected a JSON object, got {}", path.display(), kind_of(&other)),
            Err(error) if number == line_count && !text.ends_with('\n') => {
                notes.push(format!("{}:{number}: ignored the unfinished last line ({error})", path.display()));
            }
            Err(error) => return Err(anyhow!(error).context(format!("{}:{number}: malformed JSON", path.display()))),
        }
    }
    Ok(lines)
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Field access that names the file, line and key of what is wrong.
struct Fields<'a> {
    path: &'a Path,
    line: &'a Line,
}

impl Fields<'_> {
    fn location(&self) -> String {
        format!("{}:{}", self.path.display(), self.line.number)
    }

    fn step(&self) -> Result<u64> {
        match self.line.object.get("step") {
            Some(value) => value
                .as_u64()
                .ok_or_else(|| anyhow!("{}: \"step\" must be a whole number >= 0, got {value}", self.location())),
            None => bail!("{}: no \"step\"", self.location()),
        }
    }

    /// A number that must be present; `null` (a NaN written by serde_json) reads as NaN.
    fn required_number(&self, key: &str) -> Result<f64> {
        match self.line.object.get(key) {
            None => bail!("{}: no {key:?}", self.location()),
            Some(value) => Ok(self.optional_number_of(key, value)?.unwrap_or(f64::NAN)),
        }
    }

    /// A number that may be missing or null.
    fn optional_number(&self, key: &str) -> Result<Option<f64>> {
        match self.line.object.get(key) {
            None => Ok(None),
            Some(value) => self.optional_number_of(key, value),
        }
    }

    fn optional_number_of(&self, key: &str, value: &Value) -> Result<Option<f64>> {
        match value {
            Value::Null => Ok(None),
            Value::Number(n) => Ok(n.as_f64()),
            other => bail!("{}: {key:?} must be a number, got {}", self.location(), kind_of(other)),
        }
    }
}

fn read_steps(path: &Path, notes: &mut Vec<String>) -> Result<Vec<StepRecord>> {
    let mut by_step = BTreeMap::new();
    for line in read_jsonl(path, notes)? {
        let fields = Fields { path, line: &line };
        let step = fields.step()?;
        let loss = fields.required_number("loss")?;
        // A resumed run rewrites the steps after its checkpoint; the later record is the one kept.
        by_step.insert(step, StepRecord { step, loss });
    }
    Ok(by_step.into_values().collect())
}

type Results = (RunInfo, Vec<Evaluation>, Option<Evaluation>);

fn read_results(path: &Path, run_dir: &Path, notes: &mut Vec<String>) -> Result<Results> {
    let mut info = RunInfo::default();
    let mut by_step = BTreeMap::new();
    let mut swad = None;
    for line in read_jsonl(path, notes)? {
        let fields = Fields { path, line: &line };
        if let Some(args) = line.object.get("args") {
            info = run_info(args).with_context(|| format!("{}: \"args\"", fields.location()))?;
        }
        let evaluation = evaluation(&fields, run_dir)?;
        if line.object.get("swad").and_then(Value::as_bool) == Some(true) {
            swad = Some(evaluation);
        } else {
            by_step.insert(evaluation.step, evaluation);
        }
    }
    Ok((info, by_step.into_values().collect(), swad))
}

fn run_info(args: &Value) -> Result<RunInfo> {
    let text = |key: &str| args.get(key).and_then(Value::as_str).map(str::to_string);
    let domains = match args.get("domains") {
        Some(Value::Array(names)) => names
            .iter()
            .map(|n| n.as_str().map(str::to_string).ok_or_else(|| anyhow!("\"domains\" must hold names, got {n}")))
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    let test_envs = match args.get("test_envs") {
        Some(Value::Array(envs)) => envs
            .iter()
            .map(|e| e.as_u64().map(|i| i as usize).ok_or_else(|| anyhow!("\"test_envs\" must hold indices, got {e}")))
            .collect::<Result<_>>()?,
        _ => Vec::new(),
    };
    Ok(RunInfo { dataset: text("dataset"), algorithm: text("algorithm"), domains, test_envs })
}

fn evaluation(fields: &Fields<'_>, run_dir: &Path) -> Result<Evaluation> {
    let step = fields.step()?;
    let mut in_acc = Vec::new();
    let mut out_acc = Vec::new();
    for (key, value) in &fields.line.object {
        let Some((index, split)) = accuracy_key(key) else { continue };
        let accuracies = if split == "in" { &mut in_acc } else { &mut out_acc };
        if accuracies.len() <= index {
            accuracies.resize(index + 1, None);
        }
        accuracies[index] = fields.optional_number_of(key, value)?;
    }
    let sensitivity = match fields.line.object.get("dsp_sensitivity") {
        Some(layers) => {
            Some(summary_sensitivity(layers).with_context(|| format!("{}: \"dsp_sensitivity\"", fields.location()))?)
        }
        None => match fields.line.object.get("sensitivity_dump").and_then(Value::as_str) {
            Some(dump) => Some(
                dump_sensitivity(Path::new(dump), run_dir)
                    .with_context(|| format!("{}: reading its \"sensitivity_dump\" {dump}", fields.location()))?,
            ),
            None => None,
        },
    };
    Ok(Evaluation { step, in_acc, out_acc, train_out_loss: fields.optional_number("tr_outloss")?, sensitivity })
}

/// `env{i}_in_acc` / `env{i}_out_acc` as (i, "in" | "out").
fn accuracy_key(key: &str) -> Option<(usize, &str)> {
    let rest = key.strip_prefix("env")?;
    let (index, split) = rest.strip_suffix("_acc")?.split_once('_')?;
    let split = match split {
        "in" | "out" => split,
        _ => return None,
    };
    Some((index.parse().ok()?, split))
}

/// The per-layer means of DSP-Reg's `dsp_sensitivity` summary (`{"layer": {"mean": ..}, ..}`).
fn summary_sensitivity(layers: &Value) -> Result<BTreeMap<String, f64>> {
    let layers = layers.as_object().ok_or_else(|| anyhow!("expected an object of layers, got {}", kind_of(layers)))?;
    layers
        .iter()
        .map(|(name, summary)| {
            // null: a NaN mean (serde_json's NaN).
            let mean = match summary.get("mean") {
                Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(Value::Null) => f64::NAN,
                _ => bail!("layer {name:?}: no numeric \"mean\" in {summary}"),
            };
            Ok((name.clone(), mean))
        })
        .collect()
}

/// The mean of every tensor of a sensitivity dump. The record holds the path the run wrote; a run
/// directory that was moved since still has the file under its own `sensitivity/`.
fn dump_sensitivity(recorded: &Path, run_dir: &Path) -> Result<BTreeMap<String, f64>> {
    let moved = recorded.file_name().map(|name| run_dir.join("sensitivity").join(name));
    let path = match moved {
        Some(moved) if !recorded.exists() && moved.exists() => moved,
        _ => recorded.to_path_buf(),
    };
    let tensors = tch::Tensor::read_safetensors(&path).with_context(|| format!("reading {}", path.display()))?;
    tensors
        .into_iter()
        .map(|(name, tensor)| {
            let mean = tensor
                .f_mean(tch::Kind::Double)
                .and_then(|m| m.f_double_value(&[]))
                .with_context(|| format!("{}: tensor {name:?}", path.display()))?;
            Ok((name, mean))
        })
        .collect()
}

fn read_metrics(path: &Path, notes: &mut Vec<String>) -> Result<Vec<MetricsWindow>> {
    let mut by_step = BTreeMap::new();
    for line in read_jsonl(path, notes)? {
        let fields = Fields { path, line: &line };
        let step = fields.step()?;
        let ranks = match line.object.get("ranks") {
            Some(Value::Array(ranks)) => ranks,
            Some(other) => bail!("{}: \"ranks\" must be an array, got {}", fields.location(), kind_of(other)),
            None => bail!("{}: no \"ranks\"", fields.location()),
        };
        let window_steps = fields.optional_number("window_steps")?;
        let ranks = ranks
            .iter()
            .enumerate()
            .map(|(position, rank)| {
                rank_times(rank, position, window_steps)
                    .with_context(|| format!("{}: \"ranks\"[{position}]", fields.location()))
            })
            .collect::<Result<Vec<_>>>()?;
        let images_per_s = fields.optional_number("images_per_s")?;
        by_step.insert(step, MetricsWindow { step, images_per_s, ranks });
    }
    let windows: Vec<MetricsWindow> = by_step.into_values().collect();
    let ranks: BTreeSet<usize> = windows.iter().flat_map(|w| w.ranks.iter().map(|r| r.rank)).collect();
    if windows.iter().any(|w| w.ranks.len() != ranks.len()) {
        notes.push(format!("{}: not every window has all {} ranks", path.display(), ranks.len()));
    }
    Ok(windows)
}

/// One rank's entry of a metrics window. A phase it lacks (or holds as null, a NaN) counts as 0 ms;
/// a missing `step_ms` is the sum of the phases; the window's steps are the rank's `steps`, else the
/// line's `window_steps`.
fn rank_times(entry: &Value, position: usize, window_steps: Option<f64>) -> Result<RankTimes> {
    let entry = entry.as_object().ok_or_else(|| anyhow!("expected an object, got {}", kind_of(entry)))?;
    let number = |key: &str| -> Result<Option<f64>> {
        match entry.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(other) => bail!("{key:?} must be a number, got {}", kind_of(other)),
        }
    };
    let mut phase_ms = [0.0; PHASES.len()];
    for (ms, phase) in phase_ms.iter_mut().zip(PHASES) {
        *ms = number(&format!("{phase}_ms"))?.unwrap_or(0.0);
    }
    let rank = match entry.get("rank") {
        Some(r) => r.as_u64().map(|r| r as usize).ok_or_else(|| anyhow!("\"rank\" must be an index, got {r}"))?,
        None => position,
    };
    let step_ms = number("step_ms")?.unwrap_or_else(|| phase_ms.iter().sum());
    let steps = number("steps")?.or(window_steps).unwrap_or(1.0).max(1.0);
    Ok(RankTimes {
        rank,
        step_ms,
        phase_ms,
        checkpoint_stall_ms_per_step: number("checkpoint_stall_ms")?.unwrap_or(0.0) / steps,
        comm_overlapped_ms: number("comm_overlapped_ms")?.unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_keys() {
        assert_eq!(accuracy_key("env0_in_acc"), Some((0, "in")));
        assert_eq!(accuracy_key("env12_out_acc"), Some((12, "out")));
        assert_eq!(accuracy_key("env0_out_loss"), None);
        assert_eq!(accuracy_key("envx_in_acc"), None);
        assert_eq!(accuracy_key("tr_outloss"), None);
    }
}
