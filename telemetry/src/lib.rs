//! What a rank is doing, measured: the phases of every step (data wait, forward+backward,
//! communication per collective kind and bytes, optimizer, evaluation, checkpoint stall), images/s,
//! loss, gradient norm, method statistics, loader queue depth and memory.
//!
//! One recorder per process, reached through free functions (like the `metrics` crate's own
//! recorder), so that the communicator, the optimizer and the loop record without being threaded
//! through each other. Three outlets:
//! - the `metrics` crate, scraped over HTTP when `[metrics] prometheus` is set ([`prometheus`]);
//! - [`take_window`]: the means since the last evaluation, which rank 0 gathers into `metrics.jsonl`;
//! - a Chrome trace per rank ([`trace`]), merged into one file by the launcher.
//!
//! Before [`init`] every call is a cheap no-op, so benchmarks and tests that never call it pay
//! nothing.

pub mod comm;
pub mod prometheus;
pub mod trace;

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use trace::TraceWriter;

/// The parts of a step (and the work between steps) that the step-time breakdown separates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the loader's next batch.
    DataWait,
    /// What the method's update spends outside communication and the optimizer.
    ForwardBackward,
    /// Collectives the training thread waits for (a collective running on another thread, under
    /// backward, counts as overlapped instead).
    Comm,
    Optimizer,
    Evaluation,
    /// The training loop's wait for a checkpoint (the copy to host; the write is in the background).
    Checkpoint,
}

impl Phase {
    pub const ALL: [Phase; 6] =
        [Phase::DataWait, Phase::ForwardBackward, Phase::Comm, Phase::Optimizer, Phase::Evaluation, Phase::Checkpoint];

    pub fn name(self) -> &'static str {
        match self {
            Phase::DataWait => "data_wait",
            Phase::ForwardBackward => "forward_backward",
            Phase::Comm => "comm",
            Phase::Optimizer => "optimizer",
            Phase::Evaluation => "evaluation",
            Phase::Checkpoint => "checkpoint_stall",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The collectives counted separately (time and bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveKind {
    AllReduce,
    Broadcast,
    AllGather,
    Barrier,
    Split,
}

impl CollectiveKind {
    pub const ALL: [CollectiveKind; 5] = [
        CollectiveKind::AllReduce,
        CollectiveKind::Broadcast,
        CollectiveKind::AllGather,
        CollectiveKind::Barrier,
        CollectiveKind::Split,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::Barrier => "barrier",
            CollectiveKind::Split => "split",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What [`init`] sets up for this process.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub rank: usize,
    /// Write a Chrome trace of the first `trace_steps` steps to this file.
    pub trace_file: Option<PathBuf>,
    pub trace_steps: u64,
}

/// Starts recording for this process; the calling thread is the training thread (see [`Phase::Comm`]).
pub fn init(options: &Options) -> anyhow::Result<()> {
    let trace = match &options.trace_file {
        Some(path) => Some(TraceWriter::create(path, options.rank)?),
        None => None,
    };
    TRAINING_THREAD.with(|t| t.set(true));
    let mut recorder = lock();
    *recorder = Some(Recorder {
        trace,
        trace_steps: options.trace_steps,
        step: None,
        step_started: None,
        current: StepAccumulator::default(),
        window: Window::default(),
    });
    Ok(())
}

/// Marks the calling thread as one that runs collectives alongside the training thread: its
/// collectives are overlapped communication, not a phase the step waits in.
pub fn mark_background_thread() {
    TRAINING_THREAD.with(|t| t.set(false));
}

/// Times `phase` until the returned guard is dropped.
pub fn phase(phase: Phase) -> Span {
    Span { started: Instant::now(), what: SpanKind::Phase(phase) }
}

/// Times a collective of `kind` moving `bytes` (this rank's tensor) until the guard is dropped.
pub fn collective(kind: CollectiveKind, bytes: usize) -> Span {
    Span { started: Instant::now(), what: SpanKind::Collective(kind, bytes) }
}

/// Step `step` begins (its data wait included).
pub fn step_begin(step: u64) {
    if let Some(recorder) = lock().as_mut() {
        recorder.step = Some(step);
        recorder.step_started = Some((Instant::now(), wall_us()));
        recorder.current = StepAccumulator::default();
    }
}

/// What the loop knows of a finished step.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// Seconds in the method's update (forward, backward, communication and optimizer).
    pub update_s: f64,
    /// Images this rank computed.
    pub images: usize,
    pub loss: f64,
    pub grad_norm: Option<f64>,
    /// The method's per-step scalars (`sam_grad_norm`, `dsp_lambda`, ...).
    pub method_stats: Vec<(String, f64)>,
    pub loader_queue_depth: Option<usize>,
}

/// One step's breakdown, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub total: f64,
    pub phases: [f64; 6],
    /// Communication that ran on another thread during the step (overlapped with backward).
    pub comm_overlapped: f64,
}

impl StepTimes {
    pub fn get(&self, phase: Phase) -> f64 {
        self.phases[phase.index()]
    }
}

/// Ends the step begun by [`step_begin`]: forward+backward is the update's time less the
/// communication and optimizer time spent inside it. Records the step's metrics and adds it to the
/// window.
pub fn step_end(report: &StepReport) -> StepTimes {
    let started = Instant::now();
    let mut guard = lock();
    let Some(recorder) = guard.as_mut() else { return StepTimes::default() };
    let acc = std::mem::take(&mut recorder.current);
    let (step_start, step_start_wall) = recorder.step_started.take().unwrap_or((started, wall_us()));
    let mut times = StepTimes {
        total: step_start.elapsed().as_secs_f64(),
        phases: acc.phases,
        comm_overlapped: acc.comm_overlapped,
    };
    let inside_update = acc.phases[Phase::Comm.index()] + acc.phases[Phase::Optimizer.index()];
    times.phases[Phase::ForwardBackward.index()] = (report.update_s - inside_update).max(0.0);

    metrics::counter!("mgrun_steps_total").increment(1);
    metrics::histogram!("mgrun_step_seconds").record(times.total);
    for phase in [Phase::DataWait, Phase::ForwardBackward, Phase::Comm, Phase::Optimizer] {
        metrics::histogram!("mgrun_step_phase_seconds", "phase" => phase.name()).record(times.get(phase));
    }
    metrics::histogram!("mgrun_comm_overlapped_seconds").record(times.comm_overlapped);
    let images_per_s = report.images as f64 / times.total.max(1e-12);
    metrics::gauge!("mgrun_images_per_second").set(images_per_s);
    metrics::gauge!("mgrun_loss").set(report.loss);
    if let Some(norm) = report.grad_norm {
        metrics::gauge!("mgrun_grad_norm").set(norm);
    }
    for (name, value) in &report.method_stats {
        metrics::gauge!("mgrun_method_stat", "stat" => name.clone()).set(*value);
    }
    if let Some(depth) = report.loader_queue_depth {
        metrics::gauge!("mgrun_loader_queue_depth").set(depth as f64);
    }

    let step = recorder.step.take().unwrap_or(0);
    if let Some(trace) = recorder.trace.as_mut().filter(|_| step < recorder.trace_steps) {
        // The method's update as one span (its collectives and optimizer nest inside it).
        let update_us = (report.update_s * 1e6) as u64;
        trace.complete("update", "phase", wall_us().saturating_sub(update_us), update_us, serde_json::Value::Null);
        let duration_us = (times.total * 1e6) as u64;
        trace.complete(
            "step",
            "step",
            step_start_wall,
            duration_us,
            serde_json::json!({"step": step, "loss": report.loss, "images": report.images}),
        );
    }
    let w = &mut recorder.window;
    w.steps += 1;
    w.step_s += times.total;
    for (sum, value) in w.phases.iter_mut().zip(times.phases) {
        *sum += value;
    }
    w.comm_overlapped_s += times.comm_overlapped;
    for (sum, bytes) in w.comm_bytes.iter_mut().zip(acc.comm_bytes) {
        *sum += bytes as f64;
    }
    w.images += report.images as f64;
    w.loss += report.loss;
    if let Some(norm) = report.grad_norm {
        w.grad_norm += norm;
        w.grad_norms += 1;
    }
    if let Some(depth) = report.loader_queue_depth {
        w.queue_depth += depth as f64;
        w.queue_depths += 1;
    }
    w.overhead_s += acc.overhead_s + started.elapsed().as_secs_f64();
    times
}

/// Adds time outside the steps (evaluation, checkpoint stall) to the window and the metrics.
pub fn record_between_steps(phase: Phase, seconds: f64) {
    metrics::histogram!(match phase {
        Phase::Evaluation => "mgrun_evaluation_seconds",
        _ => "mgrun_checkpoint_stall_seconds",
    })
    .record(seconds);
    if let Some(recorder) = lock().as_mut() {
        recorder.window.between_steps[phase.index()] += seconds;
    }
}

/// The means over the steps since the last call (the evaluation window) of one rank.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowSummary {
    pub steps: f64,
    pub step_ms: f64,
    pub data_wait_ms: f64,
    pub forward_backward_ms: f64,
    pub comm_ms: f64,
    pub comm_overlapped_ms: f64,
    pub optimizer_ms: f64,
    /// Totals over the window, not means: they happen every few steps.
    pub checkpoint_stall_ms: f64,
    pub evaluation_ms: f64,
    pub images_per_s: f64,
    pub loss: f64,
    /// NaN when no step reported one.
    pub grad_norm: f64,
    pub loader_queue_depth: f64,
    /// Bytes of this rank's tensors per step, by [`CollectiveKind`].
    pub comm_bytes_per_step: [f64; 5],
    pub host_rss_gb: f64,
    /// Time the recorder itself took per step.
    pub telemetry_ms: f64,
}

/// The number of values of [`WindowSummary::to_values`], for gathering across ranks.
pub const SUMMARY_VALUES: usize = 20;

impl WindowSummary {
    pub fn to_values(&self) -> [f64; SUMMARY_VALUES] {
        let b = self.comm_bytes_per_step;
        [
            self.steps,
            self.step_ms,
            self.data_wait_ms,
            self.forward_backward_ms,
            self.comm_ms,
            self.comm_overlapped_ms,
            self.optimizer_ms,
            self.checkpoint_stall_ms,
            self.evaluation_ms,
            self.images_per_s,
            self.loss,
            self.grad_norm,
            self.loader_queue_depth,
            b[0],
            b[1],
            b[2],
            b[3],
            b[4],
            self.host_rss_gb,
            self.telemetry_ms,
        ]
    }

    pub fn from_values(v: &[f64]) -> WindowSummary {
        let at = |i: usize| v.get(i).copied().unwrap_or(f64::NAN);
        WindowSummary {
            steps: at(0),
            step_ms: at(1),
            data_wait_ms: at(2),
            forward_backward_ms: at(3),
            comm_ms: at(4),
            comm_overlapped_ms: at(5),
            optimizer_ms: at(6),
            checkpoint_stall_ms: at(7),
            evaluation_ms: at(8),
            images_per_s: at(9),
            loss: at(10),
            grad_norm: at(11),
            loader_queue_depth: at(12),
            comm_bytes_per_step: [at(13), at(14), at(15), at(16), at(17)],
            host_rss_gb: at(18),
            telemetry_ms: at(19),
        }
    }

    /// The JSON object of one rank in `metrics.jsonl`.
    pub fn to_json(&self, rank: usize, gpu_mem_gb: Option<f64>) -> serde_json::Value {
        let finite = |x: f64| if x.is_finite() { serde_json::json!(x) } else { serde_json::Value::Null };
        let bytes: serde_json::Map<String, serde_json::Value> = CollectiveKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), serde_json::json!(self.comm_bytes_per_step[k.index()])))
            .collect();
        serde_json::json!({
            "rank": rank,
            "steps": self.steps,
            "step_ms": finite(self.step_ms),
            "data_wait_ms": finite(self.data_wait_ms),
            "forward_backward_ms": finite(self.forward_backward_ms),
            "comm_ms": finite(self.comm_ms),
            "comm_overlapped_ms": finite(self.comm_overlapped_ms),
            "optimizer_ms": finite(self.optimizer_ms),
            "checkpoint_stall_ms": finite(self.checkpoint_stall_ms),
            "evaluation_ms": finite(self.evaluation_ms),
            "images_per_s": finite(self.images_per_s),
            "loss": finite(self.loss),
            "grad_norm": finite(self.grad_norm),
            "loader_queue_depth": finite(self.loader_queue_depth),
            "comm_bytes_per_step": bytes,
            "host_rss_gb": finite(self.host_rss_gb),
            "gpu_mem_gb": gpu_mem_gb.map_or(serde_json::Value::Null, |g| serde_json::json!(g)),
            "telemetry_ms": finite(self.telemetry_ms),
        })
    }
}

/// This rank's window summary, and a fresh window; flushes the trace.
pub fn take_window() -> WindowSummary {
    let rss = host_rss_gb();
    let mut guard = lock();
    let Some(recorder) = guard.as_mut() else { return WindowSummary::default() };
    if let Some(trace) = recorder.trace.as_mut() {
        trace.flush();
    }
    let w = std::mem::take(&mut recorder.window);
    let n = w.steps.max(1) as f64;
    let ms = |s: f64| s * 1e3 / n;
    metrics::gauge!("mgrun_host_rss_bytes").set(rss * 1e9);
    WindowSummary {
        steps: w.steps as f64,
        step_ms: ms(w.step_s),
        data_wait_ms: ms(w.phases[Phase::DataWait.index()]),
        forward_backward_ms: ms(w.phases[Phase::ForwardBackward.index()]),
        comm_ms: ms(w.phases[Phase::Comm.index()]),
        comm_overlapped_ms: ms(w.comm_overlapped_s),
        optimizer_ms: ms(w.phases[Phase::Optimizer.index()]),
        checkpoint_stall_ms: w.between_steps[Phase::Checkpoint.index()] * 1e3,
        evaluation_ms: w.between_steps[Phase::Evaluation.index()] * 1e3,
        images_per_s: w.images / w.step_s.max(1e-12),
        loss: w.loss / n,
        grad_norm: if w.grad_norms > 0 { w.grad_norm / w.grad_norms as f64 } else { f64::NAN },
        loader_queue_depth: if w.queue_depths > 0 { w.queue_depth / w.queue_depths as f64 } else { f64::NAN },
        comm_bytes_per_step: w.comm_bytes.map(|b| b / n),
        host_rss_gb: rss,
        telemetry_ms: ms(w.overhead_s),
    }
}

/// Writes out what the trace holds (at the end of a run).
pub fn flush() {
    if let Some(trace) = lock().as_mut().and_then(|r| r.trace.as_mut()) {
        trace.flush();
    }
}

/// The resident set size of this process in GB (0 where /proc is missing).
pub fn host_rss_gb() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * if page > 0 { page as f64 } else { 4096.0 } / 1e9
}

/// A timed phase or collective; recorded when dropped.
pub struct Span {
    started: Instant,
    what: SpanKind,
}

enum SpanKind {
    Phase(Phase),
    Collective(CollectiveKind, usize),
}

impl Drop for Span {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        // From here on the time is the recorder's own (reported as `telemetry_ms`).
        let recording = Instant::now();
        let on_training_thread = TRAINING_THREAD.with(Cell::get);
        if let SpanKind::Collective(kind, bytes) = self.what {
            // Recorded even before init: a scrape during start-up shows the rendezvous traffic.
            metrics::histogram!("mgrun_comm_seconds", "kind" => kind.name()).record(elapsed.as_secs_f64());
            metrics::counter!("mgrun_comm_bytes_total", "kind" => kind.name()).increment(bytes as u64);
        }
        let mut guard = lock();
        let Some(recorder) = guard.as_mut() else { return };
        let seconds = elapsed.as_secs_f64();
        match self.what {
            SpanKind::Phase(phase) => recorder.current.phases[phase.index()] += seconds,
            SpanKind::Collective(kind, bytes) => {
                if on_training_thread {
                    recorder.current.phases[Phase::Comm.index()] += seconds;
                } else {
                    recorder.current.comm_overlapped += seconds;
                }
                recorder.current.comm_bytes[kind.index()] += bytes as u64;
            }
        }
        let tracing = recorder.step.is_some_and(|s| s < recorder.trace_steps);
        if let Some(trace) = recorder.trace.as_mut().filter(|_| tracing) {
            // The event's arguments are built only for the steps that are traced.
            let (name, category, args) = match self.what {
                SpanKind::Phase(phase) => (phase.name(), "phase", serde_json::Value::Null),
                SpanKind::Collective(kind, bytes) => {
                    (kind.name(), "comm", serde_json::json!({"bytes": bytes, "overlapped": !on_training_thread}))
                }
            };
            let end_us = wall_us();
            let duration_us = elapsed.as_micros() as u64;
            trace.complete(name, category, end_us.saturating_sub(duration_us), duration_us, args);
        }
        recorder.current.overhead_s += recording.elapsed().as_secs_f64();
    }
}

thread_local! {
    static TRAINING_THREAD: Cell<bool> = const { Cell::new(true) };
}

static RECORDER: Mutex<Option<Recorder>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Recorder>> {
    // A panic while recording leaves plain numbers behind: keep using them.
    RECORDER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Recorder {
    trace: Option<TraceWriter>,
    trace_steps: u64,
    step: Option<u64>,
    step_started: Option<(Instant, u64)>,
    current: StepAccumulator,
    window: Window,
}

#[derive(Default)]
struct StepAccumulator {
    phases: [f64; 6],
    comm_overlapped: f64,
    comm_bytes: [u64; 5],
    overhead_s: f64,
}

#[derive(Default)]
struct Window {
    steps: u64,
    step_s: f64,
    phases: [f64; 6],
    between_steps: [f64; 6],
    comm_overlapped_s: f64,
    comm_bytes: [f64; 5],
    images: f64,
    loss: f64,
    grad_norm: f64,
    grad_norms: u64,
    queue_depth: f64,
    queue_depths: u64,
    overhead_s: f64,
}

/// Microseconds since the Unix epoch: one clock for every rank of a node, so that their traces line up.
pub fn wall_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test owns the process-wide recorder (tests run on threads of one process).
    #[test]
    fn steps_split_into_phases_and_windows_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let trace_file = dir.path().join("rank0.json");
        init(&Options { rank: 0, trace_file: Some(trace_file.clone()), trace_steps: 1 }).expect("init");
        for step in 0..2 {
            step_begin(step);
            {
                let _wait = phase(Phase::DataWait);
                std::thread::sleep(Duration::from_millis(4));
            }
            let update = Instant::now();
            {
                let _comm = collective(CollectiveKind::AllReduce, 1000);
                std::thread::sleep(Duration::from_millis(3));
            }
            std::thread::spawn(|| {
                mark_background_thread();
                let _comm = collective(CollectiveKind::AllReduce, 500);
                std::thread::sleep(Duration::from_millis(2));
            })
            .join()
            .expect("comm thread");
            {
                let _opt = phase(Phase::Optimizer);
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(5));
            let times = step_end(&StepReport {
                update_s: update.elapsed().as_secs_f64(),
                images: 10,
                loss: 1.5,
                grad_norm: Some(2.0),
                ..StepReport::default()
            });
            assert!(times.get(Phase::DataWait) >= 0.004, "{times:?}");
            assert!(times.get(Phase::Comm) >= 0.003 && times.get(Phase::Comm) < 0.005, "{times:?}");
            assert!(times.comm_overlapped >= 0.002, "{times:?}");
            // 5 ms of its own plus the 2 ms of the background thread it waited for.
            assert!(times.get(Phase::ForwardBackward) >= 0.007, "{times:?}");
            assert!(times.total >= times.get(Phase::DataWait) + times.get(Phase::ForwardBackward));
        }
        record_between_steps(Phase::Evaluation, 0.5);
        let window = take_window();
        assert_eq!(window.steps, 2.0);
        assert_eq!(window.comm_bytes_per_step[CollectiveKind::AllReduce.index()], 1500.0);
        assert_eq!(window.evaluation_ms, 500.0);
        assert_eq!(window.grad_norm, 2.0);
        assert!(window.loader_queue_depth.is_nan());
        assert!(window.images_per_s > 0.0 && window.images_per_s < 10.0 / 0.014);
        // Bits, not ==: the queue depth is NaN.
        let round_trip = WindowSummary::from_values(&window.to_values()).to_values().map(f64::to_bits);
        assert_eq!(round_trip, window.to_values().map(f64::to_bits));
        // The next window starts empty.
        assert_eq!(take_window().steps, 0.0);
        // Only step 0 is traced (trace_steps = 1): 1 step, 1 update, 2 phases, 2 collectives.
        let events = trace::read_events(&trace_file).expect("trace");
        assert_eq!(events.iter().filter(|e| e["name"] == "step").count(), 1, "{events:?}");
        assert_eq!(events.iter().filter(|e| e["name"] == "update").count(), 1, "{events:?}");
        assert_eq!(events.iter().filter(|e| e["cat"] == "comm").count(), 2, "{events:?}");
        assert!(events.iter().any(|e| e["args"]["overlapped"] == true));
    }
}
