//! Progress, at most every few seconds: step, loss, throughput and ETA.
//!
//! Under the launcher (which sets [`PROGRESS_ENV`]) every rank reports a machine-readable line
//! ([`PROGRESS_PREFIX`] and JSON) with its own step-time means: the launcher draws the bar (or plain
//! lines) from rank 0's and names a straggler from the others'. Run without a launcher (`srun`
//! tasks of `--slurm-task`), rank 0 prints the plain line itself.

use mgrun_telemetry::{Phase, StepTimes};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Marks a rank's progress report on its stdout.
pub const PROGRESS_PREFIX: &str = "mgrun-progress ";
/// Set (to `launcher`) by the launcher for the ranks whose output it reads.
pub const PROGRESS_ENV: &str = "MGRUN_PROGRESS";

/// One rank's progress report: the numbers are means over the steps since its last report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProgressReport {
    pub rank: usize,
    /// Steps done (1-based).
    pub step: u64,
    pub total: u64,
    pub loss: f64,
    /// The job's images per second (every rank's images), from this rank's step times.
    pub images_per_s: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
    pub step_ms: f64,
    pub data_wait_ms: f64,
    pub comm_ms: f64,
}

impl ProgressReport {
    /// The plain progress line.
    pub fn line(&self) -> String {
        format!(
            "step {done}/{total} | loss {loss:.4} | {img_s:.0} img/s | elapsed {el} | ETA {eta}",
            done = self.step,
            total = self.total,
            loss = self.loss,
            img_s = self.images_per_s,
            el = fmt_duration(Duration::from_secs_f64(self.elapsed_s.max(0.0))),
            eta = fmt_duration(Duration::from_secs_f64(self.eta_s.max(0.0))),
        )
    }
}

pub struct Progress {
    rank: usize,
    /// A launcher reads the reports; otherwise rank 0 prints plain lines and the others nothing.
    to_launcher: bool,
    total_steps: u64,
    images_per_step: usize,
    every: Duration,
    started: Instant,
    last_print: Instant,
    window_steps: u64,
    window_times: [f64; 3],
}

impl Progress {
    pub fn new(rank: usize, total_steps: u64, images_per_step: usize, every_s: f64) -> Self {
        let now = Instant::now();
        Self {
            rank,
            to_launcher: std::env::var(PROGRESS_ENV).is_ok_and(|v| v == "launcher"),
            total_steps,
            images_per_step,
            every: Duration::from_secs_f64(every_s.max(0.0)),
            started: now,
            last_print: now,
            window_steps: 0,
            window_times: [0.0; 3],
        }
    }

    /// Called after each step (0-based `step`) with its breakdown.
    pub fn step(&mut self, step: u64, loss: f64, times: &StepTimes) {
        self.window_steps += 1;
        for (sum, value) in
            self.window_times.iter_mut().zip([times.total, times.get(Phase::DataWait), times.get(Phase::Comm)])
        {
            *sum += value;
        }
        let done = step + 1;
        let last = done == self.total_steps;
        if !(self.to_launcher || self.rank == 0) || (self.last_print.elapsed() < self.every && !last && step != 0) {
            return;
        }
        let n = self.window_steps.max(1) as f64;
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        let report = ProgressReport {
            rank: self.rank,
            step: done,
            total: self.total_steps,
            loss,
            // From the steps' own times: an evaluation in the window does not lower it.
            images_per_s: self.window_steps as f64 * self.images_per_step as f64 / self.window_times[0].max(1e-9),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            eta_s: per_step * (self.total_steps - done) as f64,
            step_ms: self.window_times[0] * 1e3 / n,
            data_wait_ms: self.window_times[1] * 1e3 / n,
            comm_ms: self.window_times[2] * 1e3 / n,
        };
        if self.to_launcher {
            match serde_json::to_string(&report) {
                Ok(json) => println!("{PROGRESS_PREFIX}{json}"),
                Err(_) => println!("{}", report.line()),
            }
        } else {
            println!("{}", report.line());
        }
        self.last_print = Instant::now();
        self.window_steps = 0;
        self.window_times = [0.0; 3];
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}
