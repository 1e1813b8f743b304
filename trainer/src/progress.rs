//! Rank 0's progress line: step, loss, throughput and ETA, at most every few seconds.

use std::time::{Duration, Instant};

pub struct Progress {
    enabled: bool,
    total_steps: u64,
    images_per_step: usize,
    every: Duration,
    started: Instant,
    last_print: Instant,
    window_start: Instant,
    window_steps: u64,
}

impl Progress {
    pub fn new(enabled: bool, total_steps: u64, images_per_step: usize, every_s: f64) -> Self {
        let now = Instant::now();
        Self {
            enabled,
            total_steps,
            images_per_step,
            every: Duration::from_secs_f64(every_s.max(0.0)),
            started: now,
            last_print: now,
            window_start: now,
            window_steps: 0,
        }
    }

    /// Called after each step (0-based `step`).
    pub fn step(&mut self, step: u64, loss: f64) {
        self.window_steps += 1;
        let done = step + 1;
        let last = done == self.total_steps;
        if !self.enabled || (self.last_print.elapsed() < self.every && !last && step != 0) {
            return;
        }
        let window = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let img_s = self.window_steps as f64 * self.images_per_step as f64 / window;
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        let eta = Duration::from_secs_f64(per_step * (self.total_steps - done) as f64);
        println!(
            "step {done}/{total} | loss {loss:.4} | {img_s:.0} img/s | elapsed {el} | ETA {eta}",
            total = self.total_steps,
            el = fmt_duration(self.started.elapsed()),
            eta = fmt_duration(eta),
        );
        self.last_print = Instant::now();
        self.window_start = self.last_print;
        self.window_steps = 0;
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
