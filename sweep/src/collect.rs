//! DomainBed's result collection: records from `results.jsonl` files, the three model-selection
//! methods (`model_selection.py`) and the per-dataset and average tables (`collect_results.py`),
//! with the same tie-breaking, grouping and mean +- standard error.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One evaluation record of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub dataset: String,
    pub algorithm: String,
    pub test_envs: Vec<usize>,
    pub hparams_seed: i64,
    pub trial_seed: i64,
    pub step: i64,
    /// `env{i}_in_acc` / `env{i}_out_acc` for i = 0, 1, ... (as many as the record has, like
    /// DomainBed's `itertools.count` loop).
    pub in_acc: Vec<f64>,
    pub out_acc: Vec<f64>,
    /// `args.domains` (mgrun's domain names), when present.
    pub domains: Option<Vec<String>>,
    /// The evaluation of a run's SWAD model (`"swad": true`) rather than of the model at `step`.
    pub swad: bool,
}

impl Record {
    /// Parses one results.jsonl line; `origin` names it in errors.
    pub fn parse(value: &Value, origin: &str) -> Result<Record> {
        let args = value.get("args").with_context(|| format!("{origin}: no `args`"))?;
        let text = |key: &str| -> Result<String> {
            args.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{origin}: no args.{key}"))
        };
        let int = |v: Option<&Value>, key: &str| -> Result<i64> {
            v.and_then(Value::as_i64).with_context(|| format!("{origin}: `{key}` is missing or not an integer"))
        };
        let test_envs: Vec<usize> = args
            .get("test_envs")
            .and_then(Value::as_array)
            .with_context(|| format!("{origin}: no args.test_envs list"))?
            .iter()
            .map(|e| {
                e.as_u64().map(|e| e as usize).with_context(|| format!("{origin}: args.test_envs: {e} is not an index"))
            })
            .collect::<Result<_>>()?;
        if test_envs.is_empty() {
            bail!("{origin}: args.test_envs is empty");
        }
        let mut in_acc = Vec::new();
        let mut out_acc = Vec::new();
        for i in 0.. {
            let Some(out) = value.get(format!("env{i}_out_acc")) else { break };
            let out = out.as_f64().with_context(|| format!("{origin}: env{i}_out_acc is not a number"))?;
            let inn = value
                .get(format!("env{i}_in_acc"))
                .and_then(Value::as_f64)
                .with_context(|| format!("{origin}: env{i}_out_acc without a numeric env{i}_in_acc"))?;
            in_acc.push(inn);
            out_acc.push(out);
        }
        if let Some(&bad) = test_envs.iter().find(|&&e| e >= in_acc.len()) {
            bail!("{origin}: test env {bad} but accuracies for {} envs only", in_acc.len());
        }
        let domains = args.get("domains").and_then(Value::as_array).map(|names| {
            names.iter().map(|n| n.as_str().map(str::to_string).unwrap_or_else(|| n.to_string())).collect()
        });
        Ok(Record {
            dataset: text("dataset")?,
            algorithm: text("algorithm")?,
            test_envs,
            hparams_seed: int(args.get("hparams_seed"), "args.hparams_seed")?,
            trial_seed: int(args.get("trial_seed"), "args.trial_seed")?,
            step: int(value.get("step"), "step")?,
            in_acc,
            out_acc,
            domains,
            swad: value.get("swad").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    fn n_envs(&self) -> usize {
        self.out_acc.len()
    }
}

/// Every record of every `results.jsonl` under `dir` (any depth), files in sorted path order.
pub fn load_records(dir: &Path) -> Result<Vec<Record>> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mut files = Vec::new();
    find_results(dir, &mut files)?;
    files.sort();
    let mut records = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let origin = format!("{}:{}", file.display(), i + 1);
            let value: Value = serde_json::from_str(line).with_context(|| format!("{origin}: invalid JSON"))?;
            records.push(Record::parse(&value, &origin)?);
        }
    }
    Ok(records)
}

/// The records that model selection sees: the evaluations of the trained models (`swad = false`,
/// DomainBed's protocol), or, with `swad`, each run's SWAD model alone where the run has one (the
/// SWAD paper's protocol: the averaged model is the run's result).
pub fn select_models(records: Vec<Record>, swad: bool) -> Vec<Record> {
    if !swad {
        return records.into_iter().filter(|r| !r.swad).collect();
    }
    let run = |r: &Record| (r.dataset.clone(), r.algorithm.clone(), r.test_envs.clone(), r.hparams_seed, r.trial_seed);
    let with_swad: std::collections::HashSet<_> = records.iter().filter(|r| r.swad).map(run).collect();
    records.into_iter().filter(|r| r.swad || !with_swad.contains(&run(r))).collect()
}

fn find_results(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.is_dir() {
            find_results(&path, out)?;
        } else if path.file_name().is_some_and(|n| n == "results.jsonl") {
            out.push(path);
        }
    }
    Ok(())
}

/// DomainBed's model-selection methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// `IIDAccuracySelectionMethod`: argmax over steps and hparams of the mean training-domain
    /// out-split accuracy.
    TrainingDomain,
    /// `LeaveOneOutSelectionMethod`: the held-out training domain's in-split accuracy of the
    /// pair runs, averaged, per step.
    LeaveOneOut,
    /// `OracleSelectionMethod`: the last step's test-domain out-split accuracy.
    Oracle,
}

impl Selection {
    pub const ALL: [Selection; 3] = [Selection::TrainingDomain, Selection::LeaveOneOut, Selection::Oracle];

    /// DomainBed's name of the method.
    pub fn name(self) -> &'static str {
        match self {
            Selection::TrainingDomain => "training-domain validation set",
            Selection::LeaveOneOut => "leave-one-domain-out cross-validation",
            Selection::Oracle => "test-domain validation set (oracle)",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Acc {
    val: f64,
    test: f64,
}

/// Python's `max(items, key=...)`: the first of the largest (a NaN in front is never replaced).
fn argmax_first(items: impl IntoIterator<Item = Acc>) -> Option<Acc> {
    items.into_iter().fold(None, |best, a| match best {
        Some(b) if a.val > b.val => Some(a),
        Some(b) => Some(b),
        None => Some(a),
    })
}

/// Groups in first-appearance order (DomainBed's `Q.group`).
fn group_by<'a, K: PartialEq + Copy>(records: &[&'a Record], key: impl Fn(&Record) -> K) -> Vec<(K, Vec<&'a Record>)> {
    let mut groups: Vec<(K, Vec<&Record>)> = Vec::new();
    for &r in records {
        let k = key(r);
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, members)) => members.push(r),
            None => groups.push((k, vec![r])),
        }
    }
    groups
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn run_acc(selection: Selection, records: &[&Record]) -> Option<Acc> {
    let singles: Vec<&Record> = records.iter().copied().filter(|r| r.test_envs.len() == 1).collect();
    match selection {
        Selection::TrainingDomain => argmax_first(singles.iter().map(|r| {
            let test_env = r.test_envs[0];
            let val: Vec<f64> = (0..r.n_envs()).filter(|&i| i != test_env).map(|i| r.out_acc[i]).collect();
            Acc { val: mean(&val), test: r.in_acc[test_env] }
        })),
        Selection::Oracle => {
            let test_env = singles.first()?.test_envs[0];
            // sorted(step)[-1] with a stable sort: the last of the records with the largest step.
            let last = singles.iter().copied().reduce(|best, r| if r.step >= best.step { r } else { best })?;
            Some(Acc { val: last.out_acc[test_env], test: last.in_acc[test_env] })
        }
        Selection::LeaveOneOut => {
            argmax_first(group_by(records, |r| r.step).into_iter().filter_map(|(_, step)| loo_step_acc(&step)))
        }
    }
}

fn loo_step_acc(records: &[&Record]) -> Option<Acc> {
    let singles: Vec<&Record> = records.iter().copied().filter(|r| r.test_envs.len() == 1).collect();
    let [single] = singles.as_slice() else { return None };
    let test_env = single.test_envs[0];
    let n_envs = records[0].n_envs();
    let mut val_accs = vec![-1.0; n_envs];
    for r in records.iter().filter(|r| r.test_envs.len() == 2) {
        let val_env = r.test_envs.iter().copied().find(|&e| e != test_env)?;
        if val_env < n_envs {
            val_accs[val_env] = r.in_acc[val_env];
        }
    }
    val_accs.remove(test_env);
    if val_accs.contains(&-1.0) || n_envs < 2 {
        return None;
    }
    Some(Acc { val: val_accs.iter().sum::<f64>() / (n_envs - 1) as f64, test: single.in_acc[test_env] })
}

/// `SelectionMethod.sweep_acc`: the test accuracy of the hparams seed with the best validation
/// accuracy (the last of equals, as DomainBed's stable ascending sort then `[-1]`).
fn sweep_acc(selection: Selection, records: &[&Record]) -> Option<f64> {
    let nan_low = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    group_by(records, |r| r.hparams_seed)
        .into_iter()
        .filter_map(|(_, run)| run_acc(selection, &run))
        .reduce(|best, a| if nan_low(a.val) >= nan_low(best.val) { a } else { best })
        .map(|a| a.test)
}

/// A table cell: mean and standard error over trials, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub mean: f64,
    pub err: f64,
}

/// `format_mean`: 100 * mean, 100 * np.std(x / sqrt(n)) (population standard deviation).
pub fn mean_and_error(values: &[f64]) -> Option<Cell> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let scaled: Vec<f64> = values.iter().map(|v| v / n.sqrt()).collect();
    let m = mean(&scaled);
    let var = scaled.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n;
    Some(Cell { mean: 100.0 * mean(values), err: 100.0 * var.sqrt() })
}

/// One row: an algorithm, its cells and the average of the cell means (None = "X").
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub algorithm: String,
    pub cells: Vec<Option<Cell>>,
    pub avg: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Dataset name, or `Averages`.
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Row>,
}

/// All tables of one selection method: one per dataset, then the averages over datasets.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionTables {
    pub selection: Selection,
    pub datasets: Vec<Table>,
    pub averages: Table,
}

/// DomainBed's algorithm order (7df6f06's `ALGORITHMS`); mgrun's other methods follow in the order of
/// `mgrun_methods::METHODS`, and any others in order of appearance.
const DOMAINBED_ALGORITHMS: &[&str] = &[
    "ERM", "IRM", "GroupDRO", "Mixup", "MLDG", "CORAL", "MMD", "DANN", "CDANN", "MTL", "SagNet", "ARM", "VREx", "RSC",
];
/// Sort key of a table row: DomainBed's algorithms, then mgrun's, then `usize::MAX` (a stable sort
/// keeps the rest in order of appearance).
fn algorithm_order(algorithm: &str) -> usize {
    let mgrun = || mgrun_methods::METHODS.iter().position(|m| m.domainbed_name == algorithm);
    match DOMAINBED_ALGORITHMS.iter().position(|k| *k == algorithm) {
        Some(i) => i,
        None => mgrun().map_or(usize::MAX, |i| DOMAINBED_ALGORITHMS.len() + i),
    }
}

/// DomainBed's dataset order; others (DomainBed would drop them) follow sorted by name.
const DOMAINBED_DATASETS: &[&str] = &[
    "Debug28",
    "Debug224",
    "ColoredMNIST",
    "RotatedMNIST",
    "VLCS",
    "PACS",
    "OfficeHome",
    "TerraIncognita",
    "DomainNet",
];

/// DomainBed's column labels (`ENVIRONMENTS`) of its datasets.
fn domainbed_environments(dataset: &str) -> Option<&'static [&'static str]> {
    Some(match dataset {
        "VLCS" => &["C", "L", "S", "V"],
        "PACS" => &["A", "C", "P", "S"],
        "OfficeHome" => &["A", "C", "P", "R"],
        "TerraIncognita" => &["L100", "L38", "L43", "L46"],
        "DomainNet" => &["clip", "info", "paint", "quick", "real", "sketch"],
        _ => return None,
    })
}

/// (trial_seed, dataset, algorithm, test_env), DomainBed's grouping of records.
type GroupKey<'a> = (i64, &'a str, &'a str, usize);

struct Group<'a> {
    trial_seed: i64,
    dataset: &'a str,
    algorithm: &'a str,
    test_env: usize,
    sweep_acc: f64,
}

/// DomainBed's `print_results_tables` as data.
pub fn tables(records: &[Record], selection: Selection) -> SelectionTables {
    // get_grouped_records: a pair record belongs to both of its test envs' groups.
    let mut grouped: Vec<(GroupKey, Vec<&Record>)> = Vec::new();
    for r in records {
        for &test_env in &r.test_envs {
            let key = (r.trial_seed, r.dataset.as_str(), r.algorithm.as_str(), test_env);
            match grouped.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(r),
                None => grouped.push((key, vec![r])),
            }
        }
    }
    let groups: Vec<Group> = grouped
        .iter()
        .filter_map(|((trial_seed, dataset, algorithm, test_env), members)| {
            sweep_acc(selection, members).map(|acc| Group {
                trial_seed: *trial_seed,
                dataset,
                algorithm,
                test_env: *test_env,
                sweep_acc: acc,
            })
        })
        .collect();

    let mut algorithms: Vec<&str> = Vec::new();
    for r in records {
        if !algorithms.contains(&r.algorithm.as_str()) {
            algorithms.push(&r.algorithm);
        }
    }
    algorithms.sort_by_key(|a| algorithm_order(a));
    let unique: BTreeSet<&str> = records.iter().map(|r| r.dataset.as_str()).collect();
    let mut datasets: Vec<&str> = unique.into_iter().collect();
    datasets.sort_by_key(|d| DOMAINBED_DATASETS.iter().position(|k| k == d).unwrap_or(usize::MAX));

    let mut dataset_tables = Vec::new();
    for &dataset in &datasets {
        let of_dataset: Vec<&Record> = records.iter().filter(|r| r.dataset == dataset).collect();
        let n_envs = of_dataset.iter().map(|r| r.n_envs()).max().unwrap_or(0);
        let columns: Vec<String> = match domainbed_environments(dataset) {
            Some(labels) if labels.len() == n_envs => labels.iter().map(|s| s.to_string()).collect(),
            _ => match of_dataset.iter().find_map(|r| r.domains.clone()) {
                Some(names) if names.len() == n_envs => names,
                _ => (0..n_envs).map(|i| format!("env{i}")).collect(),
            },
        };
        let rows = algorithms
            .iter()
            .map(|&algorithm| {
                let cells: Vec<Option<Cell>> = (0..n_envs)
                    .map(|test_env| {
                        let accs: Vec<f64> = groups
                            .iter()
                            .filter(|g| g.dataset == dataset && g.algorithm == algorithm && g.test_env == test_env)
                            .map(|g| g.sweep_acc)
                            .collect();
                        mean_and_error(&accs)
                    })
                    .collect();
                Row { algorithm: algorithm.to_string(), avg: average_of_means(&cells), cells }
            })
            .collect();
        dataset_tables.push(Table { title: dataset.to_string(), columns, rows });
    }

    let rows = algorithms
        .iter()
        .map(|&algorithm| {
            let cells: Vec<Option<Cell>> = datasets
                .iter()
                .map(|&dataset| {
                    let of: Vec<&Group> =
                        groups.iter().filter(|g| g.algorithm == algorithm && g.dataset == dataset).collect();
                    let mut trials: Vec<i64> = Vec::new();
                    for g in &of {
                        if !trials.contains(&g.trial_seed) {
                            trials.push(g.trial_seed);
                        }
                    }
                    let trial_means: Vec<f64> = trials
                        .iter()
                        .map(|t| {
                            let accs: Vec<f64> =
                                of.iter().filter(|g| g.trial_seed == *t).map(|g| g.sweep_acc).collect();
                            mean(&accs)
                        })
                        .collect();
                    mean_and_error(&trial_means)
                })
                .collect();
            Row { algorithm: algorithm.to_string(), avg: average_of_means(&cells), cells }
        })
        .collect();
    let averages = Table { title: "Averages".into(), columns: datasets.iter().map(|d| d.to_string()).collect(), rows };
    SelectionTables { selection, datasets: dataset_tables, averages }
}

fn average_of_means(cells: &[Option<Cell>]) -> Option<f64> {
    let means: Option<Vec<f64>> = cells.iter().map(|c| c.map(|c| c.mean)).collect();
    means.filter(|m| !m.is_empty()).map(|m| m.iter().sum::<f64>() / m.len() as f64)
}

fn cell_text(cell: Option<Cell>, latex: bool) -> String {
    match cell {
        None => "X".into(),
        Some(c) if latex => format!("{:.1} $\\pm$ {:.1}", c.mean, c.err),
        Some(c) => format!("{:.1} +/- {:.1}", c.mean, c.err),
    }
}

fn avg_text(avg: Option<f64>) -> String {
    avg.map(|a| format!("{a:.1}")).unwrap_or_else(|| "X".into())
}

fn table_cells(table: &Table, latex: bool) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec!["Algorithm".to_string()];
    header.extend(table.columns.iter().cloned());
    header.push("Avg".into());
    let body = table
        .rows
        .iter()
        .map(|row| {
            let mut line = vec![row.algorithm.clone()];
            line.extend(row.cells.iter().map(|&c| cell_text(c, latex)));
            line.push(avg_text(row.avg));
            line
        })
        .collect();
    (header, body)
}

/// All selection methods' tables as markdown.
pub fn render_markdown(records: usize, all: &[SelectionTables]) -> String {
    let mut s = format!("Total records: {records}\n");
    for sel in all {
        let _ = write!(s, "\n## Model selection: {}\n", sel.selection.name());
        for table in sel.datasets.iter().chain(std::iter::once(&sel.averages)) {
            let title =
                if table.title == "Averages" { "Averages".to_string() } else { format!("Dataset: {}", table.title) };
            let _ = write!(s, "\n### {title}\n\n");
            let (header, body) = table_cells(table, false);
            let _ = writeln!(s, "| {} |", header.join(" | "));
            let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
            for line in body {
                let _ = writeln!(s, "| {} |", line.join(" | "));
            }
        }
    }
    s
}

fn latex_escape(text: &str) -> String {
    text.replace('\\', "\\textbackslash{}").replace('%', "\\%").replace('_', "\\_").replace('&', "\\&")
}

/// All selection methods' tables as a LaTeX document (booktabs, as DomainBed's `results.tex`).
pub fn render_latex(records: usize, all: &[SelectionTables]) -> String {
    let mut s = String::from("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{adjustbox}\n");
    s += "\\begin{document}\n\\section{Full DomainBed results}\n";
    let _ = writeln!(s, "% Total records: {records}");
    for sel in all {
        let _ = write!(s, "\n\\subsection{{Model selection: {}}}\n", sel.selection.name());
        for table in sel.datasets.iter().chain(std::iter::once(&sel.averages)) {
            let _ = write!(s, "\n\\subsubsection{{{}}}\n\n", latex_escape(&table.title));
            let (header, body) = table_cells(table, true);
            s += "\\begin{center}\n\\adjustbox{max width=\\textwidth}{%\n";
            let _ = writeln!(s, "\\begin{{tabular}}{{l{}}}", "c".repeat(header.len() - 1));
            s += "\\toprule\n";
            let bold: Vec<String> = header.iter().map(|h| format!("\\textbf{{{}}}", latex_escape(h))).collect();
            let _ = writeln!(s, "{} \\\\", bold.join(" & "));
            s += "\\midrule\n";
            for line in body {
                let cells: Vec<String> =
                    line.iter().enumerate().map(|(i, c)| if i == 0 { latex_escape(c) } else { c.clone() }).collect();
                let _ = writeln!(s, "{} \\\\", cells.join(" & "));
            }
            s += "\\bottomrule\n\\end{tabular}}\n\\end{center}\n";
        }
    }
    s += "\\end{document}\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swad_records_are_left_out_or_stand_for_their_run() {
        let record = |trial_seed: i64, step: i64, swad: bool| Record {
            dataset: "PACS".into(),
            algorithm: "ERM".into(),
            test_envs: vec![0],
            hparams_seed: 0,
            trial_seed,
            step,
            in_acc: vec![0.5; 2],
            out_acc: vec![0.5; 2],
            domains: None,
            swad,
        };
        // Trial 0 has a SWAD model, trial 1 does not.
        let records = vec![record(0, 0, false), record(0, 100, false), record(0, 100, true), record(1, 100, false)];
        let plain = select_models(records.clone(), false);
        assert_eq!(plain.len(), 3);
        assert!(plain.iter().all(|r| !r.swad));
        let swad = select_models(records, true);
        assert_eq!(swad, vec![record(0, 100, true), record(1, 100, false)]);
    }

    #[test]
    fn standard_error_uses_the_population_deviation() {
        let c = mean_and_error(&[0.8, 0.9, 0.7]).unwrap();
        assert!((c.mean - 80.0).abs() < 1e-9);
        // np.std([.8,.9,.7]) = sqrt(2/3)*0.1 = 0.0816497; / sqrt(3) = 0.0471405.
        assert!((c.err - 4.714045207910317).abs() < 1e-9, "{}", c.err);
        assert!(mean_and_error(&[]).is_none());
    }

    #[test]
    fn rows_follow_domainbed_then_the_method_list() {
        let mut rows = vec!["Other", "DSPReg", "VREx", "SAM", "ERM"];
        rows.sort_by_key(|a| algorithm_order(a));
        assert_eq!(rows, ["ERM", "VREx", "SAM", "DSPReg", "Other"]);
    }

    #[test]
    fn argmax_keeps_the_first_maximum() {
        let a = |val, test| Acc { val, test };
        assert_eq!(argmax_first([a(1.0, 1.0), a(2.0, 2.0), a(2.0, 3.0)]).unwrap().test, 2.0);
    }
}
