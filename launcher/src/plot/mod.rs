//! `mgrun plot RUN_DIR [--out DIR]`: a run's training loss, per-domain accuracy, DSP-Reg sensitivity
//! per layer and step-time breakdown as PNG and SVG; `mgrun plot --compare RUN_DIR...` overlays the
//! loss and test-domain accuracy of several runs.

mod bitmap_text;
pub(crate) mod draw;
mod run_data;

use crate::console::stdout_line;
use anyhow::{bail, Context, Result};
use clap::Args;
use draw::{series_color, Curve, HeatMapFigure, LinesFigure, Panel, StackedBars, StackedBarsFigure, Stroke};
use plotters::prelude::{RGBColor, SeriesLabelPosition};
use run_data::{Evaluation, MetricsWindow, RankTimes, Run, PHASES};
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Args)]
pub struct PlotArgs {
    /// The run directory (a job's --out), or with --compare two or more.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Overlay the runs: loss and test-domain accuracy per run, the legend naming each run directory.
    #[arg(long)]
    pub compare: bool,
    /// Where to write the plots [default: RUN_DIR/plots; with --compare, compare-plots beside the
    /// first RUN_DIR].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Accuracies, with room above 1 for the dots of perfect ones.
const ACCURACY_RANGE: std::ops::Range<f64> = 0.0..1.025;

/// What a plotting pass wrote and what it left out.
#[derive(Debug, Default)]
struct Report {
    written: Vec<PathBuf>,
    /// (plot, why).
    skipped: Vec<(String, String)>,
}

/// Runs `mgrun plot`; `fallback_out` is a `--out` given before the subcommand.
pub fn plot(args: PlotArgs, fallback_out: Option<&Path>) -> Result<i32> {
    if args.compare && args.runs.len() < 2 {
        bail!("--compare needs two or more run directories, got {}", args.runs.len());
    }
    if !args.compare && args.runs.len() != 1 {
        bail!("give one run directory, or --compare to overlay {} runs", args.runs.len());
    }
    let runs = args.runs.iter().map(|dir| Run::read(dir)).collect::<Result<Vec<_>>>()?;
    let out = match args.out.or_else(|| fallback_out.map(Path::to_path_buf)) {
        Some(out) => out,
        None if args.compare => sibling_dir(&args.runs[0], "compare-plots"),
        None => args.runs[0].join("plots"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    for run in &runs {
        for note in &run.notes {
            stdout_line(&format!("note: {note}"));
        }
    }
    let report = if args.compare { compare_plots(&runs, &out)? } else { run_plots(&runs[0], &out)? };
    for path in &report.written {
        stdout_line(&format!("wrote {}", path.display()));
    }
    for (plot, why) in &report.skipped {
        stdout_line(&format!("skipped {plot}: {why}"));
    }
    Ok(0)
}

/// `<parent of dir>/<name>` (`./<name>` for a directory given without a parent).
fn sibling_dir(dir: &Path, name: &str) -> PathBuf {
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(name),
        _ => PathBuf::from(name),
    }
}

/// The name a run goes by in titles and legends: its directory's name.
fn run_name(dir: &Path) -> String {
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dir.display().to_string())
}

/// Legend names for runs: directory names, or the paths as given where two names are the same.
fn run_labels(runs: &[Run]) -> Vec<String> {
    let names: Vec<String> = runs.iter().map(|r| run_name(&r.dir)).collect();
    let unique = names.iter().collect::<BTreeSet<_>>().len() == names.len();
    if unique {
        names
    } else {
        runs.iter().map(|r| r.dir.display().to_string()).collect()
    }
}

/// "ERM on Synthetic" where the records say.
fn method_and_dataset(run: &Run) -> String {
    match (&run.info.algorithm, &run.info.dataset) {
        (Some(algorithm), Some(dataset)) => format!(" ({algorithm} on {dataset})"),
        (Some(one), None) | (None, Some(one)) => format!(" ({one})"),
        (None, None) => String::new(),
    }
}

fn run_plots(run: &Run, out: &Path) -> Result<Report> {
    let mut report = Report::default();
    let name = run_name(&run.dir);

    match loss_figure(run, &name) {
        Some(figure) => report.written.extend(draw::write_png_and_svg(&figure, out, "loss")?),
        None => report.skipped.push(("loss".into(), format!("{} has no steps", run.dir.join("steps.jsonl").display()))),
    }

    if run.evaluations.is_empty() {
        let why = format!("{} has no evaluations", run.dir.join("results.jsonl").display());
        report.skipped.push(("accuracy".into(), why.clone()));
        report.skipped.push(("sensitivity".into(), why));
    } else {
        report.written.extend(draw::write_png_and_svg(&accuracy_figure(run, &name), out, "accuracy")?);
        match sensitivity_figure(run, &name) {
            Some(figure) => report.written.extend(draw::write_png_and_svg(&figure, out, "sensitivity")?),
            None => report.skipped.push((
                "sensitivity".into(),
                format!(
                    "{} records no DSP-Reg sensitivity (dsp_sensitivity or sensitivity_dump){}",
                    run.dir.join("results.jsonl").display(),
                    run.info.algorithm.as_ref().map(|a| format!("; the run's method is {a}")).unwrap_or_default()
                ),
            )),
        }
    }

    match &run.metrics {
        None => report.skipped.push((
            "step_time".into(),
            format!("{} is missing (runs from before mgrun recorded it)", run.dir.join("metrics.jsonl").display()),
        )),
        Some(windows) if windows.is_empty() => report
            .skipped
            .push(("step_time".into(), format!("{} has no windows", run.dir.join("metrics.jsonl").display()))),
        Some(windows) => {
            report.written.extend(draw::write_png_and_svg(&step_time_figure(windows, &name), out, "step_time")?)
        }
    }
    Ok(report)
}

fn compare_plots(runs: &[Run], out: &Path) -> Result<Report> {
    let mut report = Report::default();
    let labels = run_labels(runs);

    let mut loss_curves = Vec::new();
    let mut accuracy_curves = Vec::new();
    let mut without_steps = Vec::new();
    let mut without_evaluations = Vec::new();
    for (index, (run, label)) in runs.iter().zip(&labels).enumerate() {
        let color = series_color(index);
        let losses = finite_points(run.steps.iter().map(|s| (s.step as f64, s.loss)));
        if losses.is_empty() {
            without_steps.push(label.clone());
        } else {
            loss_curves.push(Curve::new(Some(label.clone()), smoothed(&losses), color));
        }

        let test_points = finite_points(run.evaluations.iter().map(|e| (e.step as f64, test_accuracy(run, e))));
        if test_points.is_empty() {
            without_evaluations.push(label.clone());
            continue;
        }
        let test_names: Vec<String> = run.info.test_envs.iter().map(|&i| run.domain_name(i)).collect();
        let mut test_curve = Curve::new(Some(format!("{label} (test: {})", test_names.join(", "))), test_points, color);
        test_curve.width = 3;
        test_curve.dots = true;
        accuracy_curves.push(test_curve);
        let validation =
            finite_points(run.evaluations.iter().map(|e| (e.step as f64, training_validation_accuracy(run, e))));
        let mut validation_curve = Curve::new(None, validation, color);
        validation_curve.stroke = Stroke::Dashed;
        accuracy_curves.push(validation_curve);
    }

    let title_runs = format!("{} runs", runs.len());
    if loss_curves.is_empty() {
        report.skipped.push(("loss".into(), "no run has steps".into()));
    } else {
        let all_losses: Vec<f64> = loss_curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).collect();
        let figure = LinesFigure {
            title: format!("Training loss, {title_runs}"),
            size: (1200, 650),
            panels: vec![Panel {
                x_desc: "step".into(),
                caption: "per-step loss, moving average".into(),
                y_desc: "loss".into(),
                y_range: value_range(&all_losses, 1.0),
                legend_at: SeriesLabelPosition::UpperRight,
                curves: loss_curves,
            }],
        };
        report.written.extend(draw::write_png_and_svg(&figure, out, "loss")?);
    }
    if !without_steps.is_empty() {
        report.skipped.push(("loss of".into(), format!("{} (no steps)", without_steps.join(", "))));
    }

    if accuracy_curves.is_empty() {
        report.skipped.push(("accuracy".into(), "no run has an evaluation with test-domain accuracy".into()));
    } else {
        let figure = LinesFigure {
            title: format!("Test-domain accuracy, {title_runs}"),
            size: (1200, 650),
            panels: vec![Panel {
                x_desc: "step".into(),
                caption: "solid: test domains' accuracy (in splits); dashed: training domains' validation (out splits)"
                    .into(),
                y_desc: "accuracy".into(),
                y_range: ACCURACY_RANGE,
                legend_at: SeriesLabelPosition::LowerRight,
                curves: accuracy_curves,
            }],
        };
        report.written.extend(draw::write_png_and_svg(&figure, out, "accuracy")?);
    }
    if !without_evaluations.is_empty() {
        report.skipped.push(("accuracy of".into(), format!("{} (no evaluations)", without_evaluations.join(", "))));
    }
    Ok(report)
}

/// The points whose values are finite (a diverged step's loss is recorded as null, read as NaN).
fn finite_points(points: impl Iterator<Item = (f64, f64)>) -> Vec<(f64, f64)> {
    points.filter(|p| p.1.is_finite()).collect()
}

/// A centred moving average over about 2% of the points (none below 100 points), which shows the
/// trend under the per-step noise of small batches.
fn smoothed(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let half = points.len() / 100;
    if half == 0 {
        return points.to_vec();
    }
    let mut prefix = vec![0.0; points.len() + 1];
    for (i, p) in points.iter().enumerate() {
        prefix[i + 1] = prefix[i] + p.1;
    }
    (0..points.len())
        .map(|i| {
            let (start, end) = (i.saturating_sub(half), (i + half + 1).min(points.len()));
            (points[i].0, (prefix[end] - prefix[start]) / (end - start) as f64)
        })
        .collect()
}

/// A y range that holds `values` (and 0), with headroom; `default_top` where there are none.
fn value_range(values: &[f64], default_top: f64) -> std::ops::Range<f64> {
    let (low, high) = values.iter().fold((0.0f64, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    if !high.is_finite() || high <= low {
        return low..(low + default_top);
    }
    low..(high + (high - low) * 0.08)
}

/// The `q`-quantile of `values` (0 <= q <= 1).
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(((sorted.len().saturating_sub(1)) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN)
}

fn loss_figure(run: &Run, name: &str) -> Option<LinesFigure> {
    let losses = finite_points(run.steps.iter().map(|s| (s.step as f64, s.loss)));
    if losses.is_empty() {
        return None;
    }
    let trend = smoothed(&losses);
    let validation =
        finite_points(run.evaluations.iter().map(|e| (e.step as f64, e.train_out_loss.unwrap_or(f64::NAN))));
    // The axis stops above the 99th percentile of the raw losses, so that a few early spikes do not
    // flatten the rest of the curve.
    let raw: Vec<f64> = losses.iter().map(|p| p.1).collect();
    let mut shown = vec![quantile(&raw, 0.99)];
    shown.extend(trend.iter().chain(&validation).map(|p| p.1));
    let y_range = value_range(&shown, 1.0);

    let mut curves = Vec::new();
    let smoothing = trend.len() == losses.len() && losses.len() >= 100;
    if smoothing {
        let mut raw_curve = Curve::new(Some("loss per step".into()), losses, series_color(0));
        raw_curve.stroke = Stroke::Faint;
        raw_curve.width = 1;
        curves.push(raw_curve);
    }
    let trend_label = if smoothing { "loss, moving average" } else { "loss per step" };
    let mut trend_curve = Curve::new(Some(trend_label.into()), trend, series_color(0));
    trend_curve.width = 3;
    curves.push(trend_curve);
    if !validation.is_empty() {
        let mut curve =
            Curve::new(Some("validation loss (training domains' out splits)".into()), validation, series_color(1));
        curve.dots = true;
        curves.push(curve);
    }
    Some(LinesFigure {
        title: format!("{name}: training loss{}", method_and_dataset(run)),
        size: (1200, 650),
        panels: vec![Panel {
            x_desc: "step".into(),
            caption: format!("{} steps", run.steps.len()),
            y_desc: "loss".into(),
            y_range,
            legend_at: SeriesLabelPosition::UpperRight,
            curves,
        }],
    })
}

/// The mean in-split accuracy of the test domains (DomainBed reports the test domain's in split).
fn test_accuracy(run: &Run, evaluation: &Evaluation) -> f64 {
    mean_of(run.info.test_envs.iter().map(|&i| evaluation.in_acc.get(i).copied().flatten()))
}

/// The mean out-split (validation) accuracy of the training domains: DomainBed's training-domain
/// validation.
fn training_validation_accuracy(run: &Run, evaluation: &Evaluation) -> f64 {
    let training = (0..evaluation.out_acc.len()).filter(|i| !run.info.test_envs.contains(i));
    mean_of(training.map(|i| evaluation.out_acc[i]))
}

/// The mean of the values, NaN if there are none or one is missing.
fn mean_of(values: impl Iterator<Item = Option<f64>>) -> f64 {
    let values: Option<Vec<f64>> = values.collect();
    match values {
        Some(values) if !values.is_empty() => values.iter().sum::<f64>() / values.len() as f64,
        _ => f64::NAN,
    }
}

fn accuracy_figure(run: &Run, name: &str) -> LinesFigure {
    let test_names: Vec<String> = run.info.test_envs.iter().map(|&i| run.domain_name(i)).collect();
    let panel = |split: &str, caption: &str, accuracy: fn(&Evaluation) -> &Vec<Option<f64>>| {
        let mut curves = Vec::new();
        for domain in 0..run.domain_count() {
            let points = run
                .evaluations
                .iter()
                .filter_map(|e| accuracy(e).get(domain).copied().flatten().map(|a| (e.step as f64, a)))
                .collect::<Vec<_>>();
            if points.is_empty() {
                continue;
            }
            let is_test = run.info.test_envs.contains(&domain);
            let label = if is_test { format!("{} (test)", run.domain_name(domain)) } else { run.domain_name(domain) };
            let mut curve = Curve::new(Some(label), points, series_color(domain));
            // The test domain stands out: thicker, with larger dots.
            curve.width = if is_test { 4 } else { 2 };
            curve.dots = true;
            curves.push(curve);
        }
        for &domain in &run.info.test_envs {
            let Some(swad) = &run.swad else { break };
            if let Some(a) = accuracy(swad).get(domain).copied().flatten() {
                let mut curve = Curve::new(
                    Some(format!("SWAD model: {} (test)", run.domain_name(domain))),
                    vec![(swad.step as f64, a)],
                    series_color(domain),
                );
                curve.stroke = Stroke::Crosses;
                curves.push(curve);
            }
        }
        Panel {
            x_desc: "step".into(),
            caption: format!("{split} split: {caption}"),
            y_desc: "accuracy".into(),
            y_range: ACCURACY_RANGE,
            legend_at: SeriesLabelPosition::LowerRight,
            curves,
        }
    };
    let test = match test_names.len() {
        0 => String::new(),
        1 => format!(", test domain {}", test_names[0]),
        _ => format!(", test domains {}", test_names.join(", ")),
    };
    LinesFigure {
        title: format!("{name}: accuracy per domain{test}{}", method_and_dataset(run)),
        size: (1600, 650),
        panels: vec![
            panel("in", "training data (test domain: held out)", |e| &e.in_acc),
            panel("out", "validation data (test domain: held out)", |e| &e.out_acc),
        ],
    }
}

/// Orders names with their digit runs compared as numbers: `layer2` before `layer10`.
fn natural_order(a: &str, b: &str) -> Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (left, right) = (chunks(a), chunks(b));
    for ((left_digits, l), (right_digits, r)) in left.iter().zip(&right) {
        let order = if *left_digits && *right_digits {
            let (l, r) = (l.trim_start_matches('0'), r.trim_start_matches('0'));
            l.len().cmp(&r.len()).then_with(|| l.cmp(r))
        } else {
            l.cmp(r)
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    left.len().cmp(&right.len()).then_with(|| a.cmp(b))
}

fn sensitivity_figure(run: &Run, name: &str) -> Option<HeatMapFigure> {
    let evaluations: Vec<&Evaluation> = run.evaluations.iter().filter(|e| e.sensitivity.is_some()).collect();
    let mut layers: Vec<String> = evaluations
        .iter()
        .flat_map(|e| e.sensitivity.iter().flat_map(|s| s.keys().cloned()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if layers.is_empty() {
        return None;
    }
    layers.sort_by(|a, b| natural_order(a, b));
    let values = layers
        .iter()
        .map(|layer| {
            evaluations
                .iter()
                .map(|e| e.sensitivity.as_ref().and_then(|s| s.get(layer)).copied().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    Some(HeatMapFigure {
        title: format!(
            "{name}: DSP-Reg sensitivity per layer, mean of s over its parameters{}",
            method_and_dataset(run)
        ),
        rows: layers,
        columns: evaluations.iter().map(|e| e.step).collect(),
        values,
    })
}

/// The parts of a step, bottom to top: the phases inside it, the rest of it, then the checkpoint
/// stalls between steps spread over the window.
/// `mgrun bench scaling`'s figure: images/s and efficiency against the number of ranks, one curve
/// per mode and method, and the step-time breakdown of every point.
pub(crate) fn scaling_figures(points: &[ScalingPoint], out: &Path) -> Result<Vec<PathBuf>> {
    let series: BTreeSet<(String, String)> = points.iter().map(|p| (p.mode.clone(), p.series.clone())).collect();
    let curve = |index: usize, (mode, name): &(String, String), value: &dyn Fn(&ScalingPoint) -> f64| {
        let mut curve = Curve::new(
            Some(format!("{mode} {name}")),
            points
                .iter()
                .filter(|p| &p.mode == mode && &p.series == name)
                .map(|p| (p.ranks as f64, value(p)))
                .filter(|(_, v)| v.is_finite())
                .collect(),
            series_color(index),
        );
        curve.dots = true;
        if mode == "strong" {
            curve.stroke = Stroke::Dashed;
        }
        curve
    };
    let throughput: Vec<Curve> = series.iter().enumerate().map(|(i, s)| curve(i, s, &|p| p.images_per_s)).collect();
    let efficiency: Vec<Curve> =
        series.iter().enumerate().map(|(i, s)| curve(i, s, &|p| p.efficiency.unwrap_or(f64::NAN))).collect();
    let highest = points.iter().map(|p| p.images_per_s).fold(0.0, f64::max);
    let figure = LinesFigure {
        title: "bench scaling: throughput and efficiency (solid: weak, dashed: strong)".into(),
        size: (1600, 650),
        panels: vec![
            Panel {
                x_desc: "ranks".into(),
                caption: "images/s of the job".into(),
                y_desc: "images/s".into(),
                y_range: 0.0..(highest * 1.15).max(1.0),
                legend_at: SeriesLabelPosition::LowerRight,
                curves: throughput,
            },
            Panel {
                x_desc: "ranks".into(),
                caption: "efficiency: images/s over ranks x images/s of 1 rank".into(),
                y_desc: "efficiency".into(),
                y_range: 0.0..1.1,
                legend_at: SeriesLabelPosition::UpperRight,
                curves: efficiency,
            },
        ],
    };
    let mut files = draw::write_png_and_svg(&figure, out, "scaling")?;
    let parts: Vec<(String, RGBColor)> =
        PHASES.iter().enumerate().map(|(i, phase)| (phase.to_string(), series_color(i))).collect();
    let bars = StackedBars {
        caption: "mean over ranks, measured window".into(),
        x_desc: "mode method ranks".into(),
        labels: points
            .iter()
            .map(|p| format!("{} {} {}", &p.mode[..1], p.series.replace(" no overlap", " (off)"), p.ranks))
            .collect(),
        stacks: points.iter().map(|p| p.phase_ms.to_vec()).collect(),
    };
    let breakdown = StackedBarsFigure {
        title: "bench scaling: step time by phase (w = weak, s = strong; (off): comm.overlap = false)".into(),
        // About 120 px per bar, so that the labels do not run into each other.
        size: ((points.len() as u32 * 120 + 500).max(1600), 650),
        parts,
        y_desc: "ms per step".into(),
        panels: vec![(bars, 1.0)],
    };
    files.extend(draw::write_png_and_svg(&breakdown, out, "scaling_step_time")?);
    Ok(files)
}

/// One point of `mgrun bench scaling`, as the figures need it.
pub(crate) struct ScalingPoint {
    pub mode: String,
    /// The method, and "no overlap" for the runs without it.
    pub series: String,
    pub ranks: usize,
    pub images_per_s: f64,
    pub efficiency: Option<f64>,
    /// In the order of `run_data::PHASES`.
    pub phase_ms: [f64; 4],
}

fn step_parts() -> Vec<(String, RGBColor)> {
    let mut parts: Vec<(String, RGBColor)> =
        PHASES.iter().enumerate().map(|(i, phase)| (phase.to_string(), series_color(i))).collect();
    parts.push(("other (rest of the step)".into(), RGBColor(190, 190, 190)));
    parts.push(("checkpoint_stall (window total / steps)".into(), series_color(PHASES.len())));
    parts
}

fn step_stack(rank: &RankTimes) -> Vec<f64> {
    let mut stack = rank.phase_ms.to_vec();
    stack.push(rank.other_ms());
    stack.push(rank.checkpoint_stall_ms_per_step);
    stack
}

fn step_time_figure(windows: &[MetricsWindow], name: &str) -> StackedBarsFigure {
    let mean_over_ranks = |window: &MetricsWindow, value: &dyn Fn(&RankTimes) -> Vec<f64>| {
        let mut mean = Vec::new();
        for rank in &window.ranks {
            let values = value(rank);
            mean.resize(values.len(), 0.0);
            for (m, v) in mean.iter_mut().zip(values) {
                *m += v / window.ranks.len() as f64;
            }
        }
        mean
    };
    let windows_panel = StackedBars {
        caption: "mean over ranks, per evaluation window".into(),
        x_desc: "step at the window's end".into(),
        labels: windows.iter().map(|w| w.step.to_string()).collect(),
        stacks: windows.iter().map(|w| mean_over_ranks(w, &step_stack)).collect(),
    };
    let mut panels = vec![(windows_panel, 0.66)];
    let world_size = windows.iter().map(|w| w.ranks.len()).max().unwrap_or(0);
    let last = windows.last();
    if let Some(last) = last {
        let mut ranks: Vec<&RankTimes> = last.ranks.iter().collect();
        ranks.sort_by_key(|r| r.rank);
        panels.push((
            StackedBars {
                caption: format!("per rank, window ending at step {}", last.step),
                x_desc: "rank".into(),
                labels: ranks.iter().map(|r| r.rank.to_string()).collect(),
                stacks: ranks.iter().map(|r| step_stack(r)).collect(),
            },
            0.34,
        ));
    }
    let mut last_window = Vec::new();
    if let Some(ips) = last.and_then(|w| w.images_per_s) {
        last_window.push(format!("{ips:.0} images/s"));
    }
    let overlapped = last.map(|w| mean_over_ranks(w, &|r| vec![r.comm_overlapped_ms])).and_then(|m| m.first().copied());
    if let Some(overlapped) = overlapped.filter(|ms| *ms > 0.0) {
        // Not stacked: it ran beside backward, inside forward_backward's time.
        last_window.push(format!("{overlapped:.1} ms/step of comm overlapped with backward"));
    }
    let last_window =
        if last_window.is_empty() { String::new() } else { format!("; last window {}", last_window.join(", ")) };
    StackedBarsFigure {
        title: format!(
            "{name}: step time by phase, {world_size} {}{last_window}",
            if world_size == 1 { "rank" } else { "ranks" }
        ),
        size: (1600, 650),
        parts: step_parts(),
        y_desc: "ms per step".into(),
        panels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order_compares_numbers() {
        let mut names = vec!["layer10.weight", "layer2.weight", "conv1.weight", "layer2.bias", "fc.weight"];
        names.sort_by(|a, b| natural_order(a, b));
        assert_eq!(names, ["conv1.weight", "fc.weight", "layer2.bias", "layer2.weight", "layer10.weight"]);
    }

    #[test]
    fn moving_average_keeps_steps() {
        let points: Vec<(f64, f64)> = (0..200).map(|i| (i as f64, (i % 2) as f64)).collect();
        let trend = smoothed(&points);
        assert_eq!(trend.len(), points.len());
        assert_eq!(trend[100].0, 100.0);
        assert!((trend[100].1 - 0.4).abs() < 0.2);
    }

    #[test]
    fn compare_output_is_beside_the_first_run() {
        assert_eq!(sibling_dir(Path::new("runs/a"), "compare-plots"), PathBuf::from("runs/compare-plots"));
        assert_eq!(sibling_dir(Path::new("a"), "compare-plots"), PathBuf::from("compare-plots"));
    }
}
