//! The launcher's view of its ranks' progress reports (see `mgrun_trainer::progress`): an
//! `indicatif` bar on a terminal, plain periodic lines when the output is a file or under Slurm,
//! nothing with `--quiet`. Every rank reports its own step-time means, so the launcher can name the
//! node's straggler: in data-parallel training every rank's step takes as long as the slowest one's,
//! and the others spend the difference waiting in collectives, so the straggler is the rank that is
//! busy (not waiting) the longest.

use indicatif::{ProgressBar, ProgressStyle};
use mgrun_trainer::progress::{ProgressReport, PROGRESS_PREFIX};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bar,
    Lines,
    Quiet,
}

impl ProgressMode {
    /// A bar when a person watches a terminal; lines in log files and Slurm output files.
    pub fn choose(quiet: bool) -> ProgressMode {
        if quiet {
            ProgressMode::Quiet
        } else if std::io::stderr().is_terminal() && std::env::var_os("SLURM_JOB_ID").is_none() {
            ProgressMode::Bar
        } else {
            ProgressMode::Lines
        }
    }
}

struct Display {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    ranks: BTreeMap<usize, ProgressReport>,
}

static DISPLAY: Mutex<Option<Display>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Display>> {
    DISPLAY.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sets how progress is shown for the job this launcher runs.
pub fn start(mode: ProgressMode) {
    *lock() = Some(Display { mode, bar: None, ranks: BTreeMap::new() });
}

/// Runs `write` (a console write) so that it appears above the bar, not through it.
pub fn above_bar(write: impl FnOnce()) {
    let bar = lock().as_ref().and_then(|d| d.bar.clone());
    match bar {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// Takes `line` if it is a rank's progress report (and shows it); false for any other line.
pub fn take_report(line: &str) -> bool {
    let Some(json) = line.strip_prefix(PROGRESS_PREFIX) else { return false };
    let Ok(report) = serde_json::from_str::<ProgressReport>(json) else { return false };
    let mut guard = lock();
    let Some(display) = guard.as_mut() else { return false };
    display.ranks.insert(report.rank, report.clone());
    if report.rank != 0 || display.mode == ProgressMode::Quiet {
        return true;
    }
    let hint = straggler_hint(&display.ranks);
    match display.mode {
        ProgressMode::Bar => {
            let bar = display.bar.get_or_insert_with(|| new_bar(report.total));
            bar.set_position(report.step);
            bar.set_message(format!(
                "loss {:.4} | {:.0} img/s | ETA {}{}",
                report.loss,
                report.images_per_s,
                mgrun_trainer::progress::fmt_duration(std::time::Duration::from_secs_f64(report.eta_s.max(0.0))),
                hint.map(|h| format!(" | {h}")).unwrap_or_default()
            ));
            if report.step >= report.total {
                // The rank's summary line follows; a finished bar would leave the cursor on its line.
                bar.finish_and_clear();
                display.bar = None;
            }
        }
        ProgressMode::Lines => {
            let line = format!("[0] {}{}", report.line(), hint.map(|h| format!(" | {h}")).unwrap_or_default());
            drop(guard);
            crate::console::stdout_line(&line);
        }
        ProgressMode::Quiet => {}
    }
    true
}

/// Clears a bar left by an attempt that stopped early (failure, preemption), so that what follows
/// is printed on a clean line.
pub fn clear() {
    if let Some(bar) = lock().as_mut().and_then(|d| d.bar.take()) {
        bar.abandon();
    }
}

fn new_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{bar:30.cyan/blue} step {pos}/{len} | {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style.progress_chars("=> "));
    bar
}

/// Names the rank that is busy (step time less its wait in collectives) the longest, when it is
/// 15% above the node's median: the others wait for it.
pub fn straggler_hint(ranks: &BTreeMap<usize, ProgressReport>) -> Option<String> {
    if ranks.len() < 2 {
        return None;
    }
    let busy = |r: &ProgressReport| (r.step_ms - r.comm_ms).max(0.0);
    let mut sorted: Vec<f64> = ranks.values().map(busy).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let slowest = ranks.values().max_by(|a, b| busy(a).total_cmp(&busy(b)))?;
    let excess = busy(slowest) / median.max(1e-9) - 1.0;
    (excess > 0.15 && busy(slowest) - median > 1.0).then(|| {
        format!(
            "straggler: rank {} busy {:.0} ms/step (+{:.0}% over the median; data wait {:.0} ms)",
            slowest.rank,
            busy(slowest),
            excess * 100.0,
            slowest.data_wait_ms
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rank: usize, step_ms: f64, comm_ms: f64) -> ProgressReport {
        ProgressReport {
            rank,
            step: 5,
            total: 10,
            loss: 1.0,
            images_per_s: 100.0,
            elapsed_s: 1.0,
            eta_s: 1.0,
            step_ms,
            data_wait_ms: 3.0,
            comm_ms,
        }
    }

    #[test]
    fn the_rank_the_others_wait_for_is_named() {
        // Every rank's step takes 100 ms; ranks 0, 1 and 3 wait 40 ms for rank 2.
        let ranks: BTreeMap<usize, ProgressReport> =
            [report(0, 100.0, 45.0), report(1, 100.0, 40.0), report(2, 100.0, 2.0), report(3, 100.0, 42.0)]
                .into_iter()
                .map(|r| (r.rank, r))
                .collect();
        let hint = straggler_hint(&ranks).expect("a straggler");
        assert!(hint.starts_with("straggler: rank 2 busy 98 ms/step"), "{hint}");
        // Balanced ranks: no hint.
        let balanced: BTreeMap<usize, ProgressReport> =
            [report(0, 100.0, 10.0), report(1, 100.0, 12.0)].into_iter().map(|r| (r.rank, r)).collect();
        assert_eq!(straggler_hint(&balanced), None);
    }

    #[test]
    fn only_progress_lines_are_taken() {
        start(ProgressMode::Quiet);
        assert!(!take_report("step 3/10 | loss 1.0"));
        assert!(!take_report("mgrun-progress {not json"));
        let line = format!("{PROGRESS_PREFIX}{}", serde_json::to_string(&report(1, 10.0, 1.0)).expect("json"));
        assert!(take_report(&line));
    }
}
