//! `mgrun sweep --estimate`: what a sweep will cost, from times measured on this machine, before
//! anything is written or submitted. The measuring (a step benchmark, image loading) is the
//! launcher's; this module holds the cost model and the table.
//!
//! One run on `ranks` ranks (one per GPU, or CPU ranks on one node) takes
//! `steps x step_s x share + eval_s` seconds of wall time:
//! - `step_s`: one training step of every training domain's `batch_per_domain` images (the run's own
//!   batch size: hyperparameter seeds draw it), measured in one process, or interpolated between
//!   two measured batch sizes ([`interpolate_step_s`]); `share`: the busiest rank's share of those
//!   images under the job's sharding plan (the step waits for it; 1 on one rank). Communication
//!   between ranks is not modelled;
//! - `eval_s`: [`eval_passes`] evaluations, each of the busiest rank's strided share of every
//!   domain's in and out split ([`eval_images_per_rank`]), at a measured time per image.
//!
//! GPU-hours (or CPU-hours) are wall hours x ranks. Start-up, checkpoints and data-loading stalls
//! are not counted: the figure is an estimate.

use crate::plan::RunSpec;
use anyhow::{bail, Result};
use std::fmt::Write as _;

/// What the hours are counted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Gpu,
    Cpu,
}

impl Resource {
    pub fn unit(self) -> &'static str {
        match self {
            Resource::Gpu => "GPU",
            Resource::Cpu => "CPU",
        }
    }
}

/// The cost of one run of one algorithm on one test-domain set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunCost {
    /// Seconds of one training step, measured in one process.
    pub measured_step_s: f64,
    /// The busiest rank's share of a step's images (1 on one rank).
    pub share: f64,
    /// Seconds of all the run's evaluations.
    pub eval_s: f64,
}

impl RunCost {
    /// Wall hours of one run of `steps` steps.
    pub fn wall_hours(&self, steps: u64) -> f64 {
        (steps as f64 * self.measured_step_s * self.share + self.eval_s) / 3600.0
    }
}

/// The runs of one algorithm on one test-domain set; the times are means over those runs (their
/// hyperparameters, the batch size among them, differ).
#[derive(Debug, Clone, PartialEq)]
pub struct AlgorithmCost {
    pub algorithm: String,
    pub runs: usize,
    /// Mean seconds of one training step, measured in one process.
    pub measured_step_s: f64,
    /// Mean seconds of a run's evaluations.
    pub eval_s: f64,
    /// Mean wall hours of a run.
    pub wall_hours: f64,
}

/// One row of the table: a test-domain set and its runs, algorithm by algorithm.
#[derive(Debug, Clone, PartialEq)]
pub struct TestSetCost {
    pub test_envs: Vec<usize>,
    /// The test domains' names, `a + b` for a pair.
    pub label: String,
    pub algorithms: Vec<AlgorithmCost>,
}

impl TestSetCost {
    pub fn runs(&self) -> usize {
        self.algorithms.iter().map(|a| a.runs).sum()
    }
}

/// The estimate of a whole sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub steps: u64,
    /// Ranks of every run (GPUs, or CPU ranks).
    pub ranks: usize,
    pub resource: Resource,
    pub rows: Vec<TestSetCost>,
}

impl Estimate {
    /// Groups `runs` by test-domain set (in sweep order) and algorithm; `cost` gives each run's cost.
    pub fn new(
        runs: &[RunSpec],
        domains: &[String],
        steps: u64,
        ranks: usize,
        resource: Resource,
        mut cost: impl FnMut(&RunSpec) -> Result<RunCost>,
    ) -> Result<Estimate> {
        if ranks == 0 {
            bail!("an estimate needs at least one rank per run");
        }
        let mut rows: Vec<TestSetCost> = Vec::new();
        for run in runs {
            let run_cost = cost(run)?;
            let index = match rows.iter().position(|r| r.test_envs == run.test_envs) {
                Some(index) => index,
                None => {
                    let names: Vec<&str> =
                        run.test_envs.iter().map(|&e| domains.get(e).map_or("?", String::as_str)).collect();
                    rows.push(TestSetCost {
                        test_envs: run.test_envs.clone(),
                        label: names.join(" + "),
                        algorithms: Vec::new(),
                    });
                    rows.len() - 1
                }
            };
            let algorithms = &mut rows[index].algorithms;
            let position = match algorithms.iter().position(|a| a.algorithm == run.algorithm) {
                Some(position) => position,
                None => {
                    algorithms.push(AlgorithmCost {
                        algorithm: run.algorithm.clone(),
                        runs: 0,
                        measured_step_s: 0.0,
                        eval_s: 0.0,
                        wall_hours: 0.0,
                    });
                    algorithms.len() - 1
                }
            };
            // Running means.
            let entry = &mut algorithms[position];
            entry.runs += 1;
            let n = entry.runs as f64;
            entry.measured_step_s += (run_cost.measured_step_s - entry.measured_step_s) / n;
            entry.eval_s += (run_cost.eval_s - entry.eval_s) / n;
            entry.wall_hours += (run_cost.wall_hours(steps) - entry.wall_hours) / n;
        }
        Ok(Estimate { steps, ranks, resource, rows })
    }

    pub fn runs(&self) -> usize {
        self.rows.iter().map(TestSetCost::runs).sum()
    }

    /// GPU- or CPU-hours of a row's runs.
    pub fn row_hours(&self, row: &TestSetCost) -> f64 {
        row.algorithms.iter().map(|a| a.runs as f64 * a.wall_hours * self.ranks as f64).sum()
    }

    /// GPU- or CPU-hours of the whole sweep.
    pub fn total_hours(&self) -> f64 {
        self.rows.iter().map(|row| self.row_hours(row)).sum()
    }

    /// The markdown table: one row per test-domain set, per-algorithm means where they differ, and
    /// the total.
    pub fn table(&self) -> String {
        let unit = self.resource.unit();
        let mut out = format!(
            "| test domain(s) | runs | steps | measured s/step | eval s/run | est. h/run | {unit}-hours |\n\
             |---|---:|---:|---:|---:|---:|---:|\n"
        );
        for row in &self.rows {
            let cell = |value: &dyn Fn(&AlgorithmCost) -> f64| per_algorithm(&row.algorithms, value);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                row.label,
                row.runs(),
                self.steps,
                cell(&|a| a.measured_step_s),
                cell(&|a| a.eval_s),
                cell(&|a| a.wall_hours),
                significant(self.row_hours(row))
            );
        }
        let _ = writeln!(out, "| total | {} | | | | | {} |", self.runs(), significant(self.total_hours()));
        out
    }
}

/// Step seconds at `batch` images per domain, on the line through two measured points
/// `(batch_lo, s_lo)` and `(batch_hi, s_hi)` (one point when they coincide); never below zero.
pub fn interpolate_step_s(batch: usize, (batch_lo, s_lo): (usize, f64), (batch_hi, s_hi): (usize, f64)) -> f64 {
    if batch_hi == batch_lo {
        return s_lo;
    }
    let slope = (s_hi - s_lo) / (batch_hi as f64 - batch_lo as f64);
    (s_lo + slope * (batch as f64 - batch_lo as f64)).max(0.0)
}

/// A value of every algorithm of a row: one number when they agree (as printed), else
/// `erm 0.01234, sam 0.02468`.
fn per_algorithm(algorithms: &[AlgorithmCost], value: &dyn Fn(&AlgorithmCost) -> f64) -> String {
    let texts: Vec<String> = algorithms.iter().map(|a| significant(value(a))).collect();
    if texts.windows(2).all(|w| w[0] == w[1]) {
        return texts.into_iter().next().unwrap_or_default();
    }
    algorithms.iter().zip(texts).map(|(a, t)| format!("{} {t}", a.algorithm)).collect::<Vec<_>>().join(", ")
}

/// Evaluations of a run of `steps` steps, as the trainer does them: after step 0, after every step
/// `s` with `s % every_steps == 0`, and after the last step.
pub fn eval_passes(steps: u64, every_steps: u64) -> u64 {
    if steps == 0 {
        return 0;
    }
    let every = every_steps.max(1);
    let last = steps - 1;
    last / every + 1 + u64::from(!last.is_multiple_of(every))
}

/// Images the busiest rank scores in one evaluation: each rank takes every `ranks`-th image of each
/// split (rank 0 starts first, so it has the most).
pub fn eval_images_per_rank(split_sizes: impl IntoIterator<Item = usize>, ranks: usize) -> usize {
    split_sizes.into_iter().map(|n| n.div_ceil(ranks.max(1))).sum()
}

/// `x` with four significant digits (no exponent): `0.003123`, `12.35`, `1235`.
pub fn significant(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let decimals = (3 - x.abs().log10().floor() as i32).max(0) as usize;
    format!("{x:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{expand, SweepOptions};
    use crate::registry::RegistryVersion;

    #[test]
    fn eval_passes_match_the_trainers_schedule() {
        // The trainer's condition, step by step.
        for steps in 1..40u64 {
            for every in 1..12u64 {
                let expected = (0..steps).filter(|s| s % every == 0 || s + 1 == steps).count() as u64;
                assert_eq!(eval_passes(steps, every), expected, "steps {steps}, every {every}");
            }
        }
        assert_eq!(eval_passes(5001, 300), 18);
    }

    #[test]
    fn eval_images_are_the_busiest_ranks_strided_share() {
        assert_eq!(eval_images_per_rank([10, 3], 1), 13);
        assert_eq!(eval_images_per_rank([10, 3], 4), 3 + 1);
        assert_eq!(eval_images_per_rank([0, 1], 2), 1);
    }

    #[test]
    fn significant_digits() {
        assert_eq!(significant(0.0031234), "0.003123");
        assert_eq!(significant(12.3456), "12.35");
        assert_eq!(significant(123456.0), "123456");
        assert_eq!(significant(0.0), "0");
    }

    #[test]
    fn interpolation_runs_through_the_measured_points() {
        assert_eq!(interpolate_step_s(8, (8, 0.1), (8, 0.1)), 0.1);
        assert!((interpolate_step_s(20, (10, 0.1), (30, 0.3)) - 0.2).abs() < 1e-12);
        assert!((interpolate_step_s(30, (10, 0.1), (30, 0.3)) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn rows_count_runs_per_test_set_and_hours_add_up() {
        let options = SweepOptions {
            dataset: "pacs".into(),
            domains: ["art_painting", "cartoon", "photo", "sketch"].map(String::from).to_vec(),
            algorithms: vec!["erm".into(), "sam".into()],
            n_hparams_from: 1,
            n_hparams: 4,
            n_trials: 2,
            test_pairs: true,
            test_domains: Vec::new(),
            registry: RegistryVersion::Published,
        };
        let runs = expand(&options, &toml::Table::new()).unwrap();
        let mut asked = 0;
        let estimate = Estimate::new(&runs, &options.domains, 1000, 2, Resource::Gpu, |run| {
            asked += 1;
            // sam's steps cost twice erm's; the first hparams seed's half of the others.
            let step = if run.algorithm == "sam" { 0.2 } else { 0.1 } * if run.hparams_seed == 1 { 0.5 } else { 1.0 };
            Ok(RunCost { measured_step_s: step, share: 0.5, eval_s: 36.0 })
        })
        .unwrap();
        assert_eq!(asked, runs.len());
        assert_eq!(estimate.rows.len(), 10);
        assert_eq!(estimate.rows[1].label, "art_painting + cartoon");
        for row in &estimate.rows {
            assert_eq!(row.runs(), 3 * 2 * 2);
        }
        assert_eq!(estimate.runs(), runs.len());
        // Means over the 6 runs of each algorithm: s/step (0.05 + 2 x 0.1) / 3 for erm, twice that for sam.
        let erm = &estimate.rows[0].algorithms[0];
        assert!((erm.measured_step_s - 0.25 / 3.0).abs() < 1e-12);
        // erm: (1000 x s x 0.5 + 36) / 3600 h a run; sam: (1000 x 2s x 0.5 + 36) / 3600; x 6 runs each x 2 GPUs.
        let row_hours = 6.0 * 2.0 * ((500.0 * 0.25 / 3.0 + 36.0) + (1000.0 * 0.25 / 3.0 + 36.0)) / 3600.0;
        assert!((estimate.row_hours(&estimate.rows[0]) - row_hours).abs() < 1e-12);
        assert!((estimate.total_hours() - 10.0 * row_hours).abs() < 1e-9);
        let table = estimate.table();
        assert!(table.contains("| GPU-hours |"), "{table}");
        assert!(table.contains("| art_painting | 12 | 1000 | erm 0.08333, sam 0.1667 | 36.00 |"), "{table}");
        assert!(table.contains(&format!("| total | 120 | | | | | {} |", significant(10.0 * row_hours))), "{table}");
    }
}
