//! SWAD (Cha et al. 2021), a trainer feature that works with every method: the parameters are
//! averaged uniformly at every step inside the segments between two evaluations, and the segments
//! are averaged over the valley of the training domains' validation loss, which khanrc/swad's
//! `LossValley` (`domainbed/swad.py`) detects. Training stops early when the valley ends.
//!
//! [`LossValley`] is the decision logic alone, on segment records; [`Swad`] applies its decisions to
//! the flat parameter tensors. The parameters are identical on every rank after each step and the
//! validation loss is identical too (all-reduced, then rank 0's bits broadcast), so every rank keeps
//! its own copy and takes the same decisions without further communication.

use crate::config::SwadConfig;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, VecDeque};
use tch::{Device, Kind, Tensor};

/// A finished segment as the valley sees it: the steps it averaged and the validation loss at its end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentRecord {
    /// Segments are numbered from 0 in the order they end.
    pub id: u64,
    pub start_step: u64,
    pub end_step: u64,
    pub end_loss: f64,
}

/// One operation on the final average, as swad.py performs them on its `AveragedModel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AverageUpdate {
    /// `AveragedModel(segment)`: the average becomes a copy of the segment's with `n_averaged` 0,
    /// so that the next [`AverageUpdate::Add`] replaces it rather than averaging with it.
    StartFrom(u64),
    /// `update_parameters(segment)`: the segment joins the uniform average of segments.
    Add(u64),
}

/// What the valley concluded at one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ValleyDecision {
    /// Not converged yet: fewer than `n_converge` segments, or the oldest of them is not the lowest.
    Waiting,
    /// Converged at this evaluation: the valley's loss threshold is set.
    Converged { converge_step: u64, threshold: f64 },
    /// Converged, but the smoothing window still starts before the convergence step.
    Pending,
    /// The valley continues: the window's oldest segment joined the average.
    Continues,
    /// The valley ended (every loss in the smoothing window is above the threshold): stop training.
    Dead,
    /// Evaluated after the valley ended (swad.py ignores the segment).
    AfterDead,
}

impl ValleyDecision {
    /// The decision's name, as tests/reference/swad_valley.py writes it.
    pub fn name(&self) -> &'static str {
        match self {
            ValleyDecision::Waiting => "wait",
            ValleyDecision::Converged { .. } => "converge",
            ValleyDecision::Pending => "pending",
            ValleyDecision::Continues => "add",
            ValleyDecision::Dead => "dead",
            ValleyDecision::AfterDead => "after_dead",
        }
    }
}

/// The model SWAD returns at the end of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalChoice {
    /// The run never converged: swad.py returns the last segment's average.
    LastSegment(u64),
    /// The valley's average, after these leftover updates (segments still in the smoothing window
    /// whose forward minimum is under the threshold, when the valley had not ended).
    Averaged(Vec<AverageUpdate>),
}

/// khanrc/swad's `LossValley` decisions, transcribed rule for rule (including its quirks, which
/// tests/reference/swad_valley.py reproduces from swad.py): convergence once the oldest of the last
/// `n_converge` segments has the lowest loss; then each evaluation adds the smoothing window's oldest
/// segment while the window's minimum loss stays under the threshold, and ends the valley otherwise.
#[derive(Debug, Clone, PartialEq)]
pub struct LossValley {
    n_converge: usize,
    n_tolerance: usize,
    tolerance_ratio: f64,
    /// The last max(n_converge, n_tolerance) segments: swad.py's `converge_Q` is the last
    /// `n_converge` of them and `smooth_Q` the last `n_tolerance` (two deques appended together).
    window: VecDeque<SegmentRecord>,
    /// The end step of the segment the run converged at.
    converge_step: Option<u64>,
    threshold: f64,
    dead: bool,
}

impl LossValley {
    pub fn new(config: &SwadConfig) -> LossValley {
        LossValley {
            n_converge: config.n_converge.max(1),
            n_tolerance: config.n_tolerance.max(1),
            tolerance_ratio: config.tolerance_ratio,
            window: VecDeque::new(),
            converge_step: None,
            threshold: f64::NAN,
            dead: false,
        }
    }

    pub fn is_dead(&self) -> bool {
        self.dead
    }

    pub fn converge_step(&self) -> Option<u64> {
        self.converge_step
    }

    /// The valley's loss threshold (NaN before convergence).
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The segments still in the window, oldest first (their averages are still needed).
    pub fn window(&self) -> impl Iterator<Item = &SegmentRecord> {
        self.window.iter()
    }

    fn converge_queue(&self) -> Vec<SegmentRecord> {
        self.window.iter().skip(self.window.len().saturating_sub(self.n_converge)).copied().collect()
    }

    fn smooth_queue(&self) -> VecDeque<SegmentRecord> {
        self.window.iter().skip(self.window.len().saturating_sub(self.n_tolerance)).copied().collect()
    }

    /// Takes the segment that ended at an evaluation (swad.py's `update_and_evaluate`), pushing the
    /// operations on the final average to `updates`.
    pub fn observe(&mut self, segment: SegmentRecord, updates: &mut Vec<AverageUpdate>) -> ValleyDecision {
        if self.dead {
            return ValleyDecision::AfterDead;
        }
        self.window.push_back(segment);
        while self.window.len() > self.n_converge.max(self.n_tolerance) {
            self.window.pop_front();
        }
        let Some(converge_step) = self.converge_step else { return self.try_converge(updates) };
        let smooth = self.smooth_queue();
        if smooth[0].end_step < converge_step {
            return ValleyDecision::Pending;
        }
        if min_loss(smooth.iter()) > self.threshold {
            self.dead = true;
            return ValleyDecision::Dead;
        }
        updates.push(AverageUpdate::Add(smooth[0].id));
        ValleyDecision::Continues
    }

    fn try_converge(&mut self, updates: &mut Vec<AverageUpdate>) -> ValleyDecision {
        let converge = self.converge_queue();
        if converge.len() < self.n_converge {
            return ValleyDecision::Waiting;
        }
        // np.argmin: the first of equal minima.
        let min_idx = (0..converge.len())
            .reduce(|best, i| if converge[i].end_loss < converge[best].end_loss { i } else { best })
            .unwrap_or(0);
        if min_idx != 0 {
            return ValleyDecision::Waiting;
        }
        let converge_step = converge[0].end_step;
        self.converge_step = Some(converge_step);
        updates.push(AverageUpdate::StartFrom(converge[0].id));
        let losses: Vec<f64> = converge.iter().map(|s| s.end_loss).collect();
        self.threshold = numpy_sum(&losses) / losses.len() as f64 * (1.0 + self.tolerance_ratio);
        if self.n_tolerance < self.n_converge {
            for segment in &converge[1..=self.n_converge - self.n_tolerance] {
                updates.push(AverageUpdate::Add(segment.id));
            }
        } else if self.n_tolerance > self.n_converge {
            // The smoothing window up to the converged segment (when it is full): averaging starts
            // after its last segment above the threshold. swad.py then skips one more segment
            // (`Q[start_idx + 1:]`); kept as published.
            let smooth = self.smooth_queue();
            let head: Vec<SegmentRecord> =
                smooth.iter().take(self.n_tolerance - self.n_converge + 1).copied().collect();
            let start_idx = (0..head.len()).rev().find(|&i| head[i].end_loss > self.threshold).map_or(0, |i| i + 1);
            for segment in head.iter().skip(start_idx + 1) {
                updates.push(AverageUpdate::Add(segment.id));
            }
        }
        ValleyDecision::Converged { converge_step, threshold: self.threshold }
    }

    /// The final model (swad.py's `get_final_model`); `None` when no segment ever ended.
    pub fn finish(&self) -> Option<FinalChoice> {
        let Some(_) = self.converge_step else {
            return self.window.back().map(|last| FinalChoice::LastSegment(last.id));
        };
        let mut leftovers = Vec::new();
        if !self.dead {
            // The window's oldest segment was added at the last evaluation.
            let mut smooth = self.smooth_queue();
            smooth.pop_front();
            while !smooth.is_empty() && min_loss(smooth.iter()) <= self.threshold {
                if let Some(segment) = smooth.pop_front() {
                    leftovers.push(AverageUpdate::Add(segment.id));
                }
            }
        }
        Some(FinalChoice::Averaged(leftovers))
    }
}

fn min_loss<'a>(segments: impl Iterator<Item = &'a SegmentRecord>) -> f64 {
    segments.map(|s| s.end_loss).fold(f64::INFINITY, f64::min)
}

/// numpy's float64 sum (pairwise summation, 8 accumulators, blocks of 128), so that the threshold
/// has the bits `np.mean` gives it in swad.py.
fn numpy_sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 8 {
        return values.iter().fold(-0.0, |acc, v| acc + v);
    }
    if n <= 128 {
        let mut r = [0f64; 8];
        r.copy_from_slice(&values[..8]);
        let full = n - n % 8;
        for block in values[8..full].chunks_exact(8) {
            for (acc, v) in r.iter_mut().zip(block) {
                *acc += v;
            }
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for v in &values[full..] {
            res += v;
        }
        return res;
    }
    let mut half = n / 2;
    half -= half % 8;
    numpy_sum(&values[..half]) + numpy_sum(&values[half..])
}

/// A uniform running average of flat parameter tensors with torch's `AveragedModel` arithmetic:
/// the first value is copied, then `mean += (x - mean) / (n + 1)`.
struct RunningAverage {
    mean: Tensor,
    count: u64,
}

impl RunningAverage {
    fn starting_from(values: &Tensor) -> RunningAverage {
        RunningAverage { mean: values.detach().copy(), count: 0 }
    }

    fn add(&mut self, values: &Tensor) {
        let _no_grad = tch::no_grad_guard();
        if self.count == 0 {
            self.mean.copy_(values);
        } else {
            let delta = (values - &self.mean) / (self.count + 1) as f64;
            self.mean += delta;
        }
        self.count += 1;
    }
}

/// What the run's SWAD model averaged, for its record and log line.
#[derive(Debug, Clone, PartialEq)]
pub struct SwadSummary {
    /// The averaged segments in the order they were added (a segment can be added twice, as in
    /// swad.py); the converged segment alone when none was added after it.
    pub segments: Vec<SegmentRecord>,
    /// How many segment averages the final average holds (swad.py's `n_averaged`).
    pub n_averaged: u64,
    pub converge_step: Option<u64>,
    pub threshold: f64,
    /// The valley ended and training stopped early.
    pub early_stopped: bool,
    /// Never converged: the model is the last segment's average.
    pub last_segment_only: bool,
}

/// SWAD's state in a run: the current segment's average, the averages of the segments in the
/// valley's window, and the final average.
pub struct Swad {
    valley: LossValley,
    /// The average of the steps since the last evaluation (`None` right after one).
    segment: Option<RunningAverage>,
    segment_start: u64,
    next_id: u64,
    /// The averages of the segments in the valley's window, by id.
    window_params: BTreeMap<u64, Tensor>,
    final_average: Option<RunningAverage>,
    /// The segments in the final average, in the order they were added.
    averaged: Vec<SegmentRecord>,
    device: Device,
}

/// Checkpoint names, under the trainer's `swad.` prefix.
const SEGMENT_MEAN: &str = "segment_mean";
const FINAL_MEAN: &str = "final_mean";
const WINDOW_PREFIX: &str = "window.";
const SCALARS: &str = "scalars";
const STATE_VERSION: f64 = 1.0;

impl Swad {
    pub fn new(config: &SwadConfig, device: Device) -> Swad {
        Swad {
            valley: LossValley::new(config),
            segment: None,
            segment_start: 0,
            next_id: 0,
            window_params: BTreeMap::new(),
            final_average: None,
            averaged: Vec::new(),
            device,
        }
    }

    pub fn valley(&self) -> &LossValley {
        &self.valley
    }

    /// Adds the parameters after `step` to the current segment's average.
    pub fn after_step(&mut self, step: u64, flat_params: &Tensor) {
        match &mut self.segment {
            Some(segment) => segment.add(flat_params),
            None => {
                let mut segment = RunningAverage::starting_from(flat_params);
                segment.add(flat_params);
                self.segment = Some(segment);
                self.segment_start = step;
            }
        }
    }

    /// Ends the current segment at the evaluation after `step`, whose training-domain validation
    /// loss was `train_out_loss`, and lets the valley decide; a new segment starts.
    pub fn after_evaluation(&mut self, step: u64, train_out_loss: f64) -> Result<ValleyDecision> {
        let Some(segment) = self.segment.take() else {
            bail!("SWAD: evaluation after step {step} ended an empty segment");
        };
        let record = SegmentRecord {
            id: self.next_id,
            start_step: self.segment_start,
            end_step: step,
            end_loss: train_out_loss,
        };
        self.next_id += 1;
        if self.valley.is_dead() {
            return Ok(ValleyDecision::AfterDead);
        }
        self.window_params.insert(record.id, segment.mean);
        let mut updates = Vec::new();
        let decision = self.valley.observe(record, &mut updates);
        self.apply(&updates)?;
        let kept: Vec<u64> = self.valley.window().map(|s| s.id).collect();
        self.window_params.retain(|id, _| kept.contains(id));
        Ok(decision)
    }

    fn record_of(&self, id: u64) -> Result<SegmentRecord> {
        self.valley
            .window()
            .find(|s| s.id == id)
            .copied()
            .with_context(|| format!("SWAD: segment {id} is not in the valley's window"))
    }

    fn params_of(&self, id: u64) -> Result<&Tensor> {
        self.window_params.get(&id).with_context(|| format!("SWAD: no average kept for segment {id}"))
    }

    fn apply(&mut self, updates: &[AverageUpdate]) -> Result<()> {
        for update in updates {
            match *update {
                AverageUpdate::StartFrom(id) => {
                    self.final_average = Some(RunningAverage::starting_from(self.params_of(id)?));
                    // Listed until the first added segment replaces it.
                    self.averaged = vec![self.record_of(id)?];
                }
                AverageUpdate::Add(id) => {
                    let record = self.record_of(id)?;
                    let params = self.params_of(id)?.shallow_clone();
                    let average =
                        self.final_average.as_mut().context("SWAD: a segment was added before convergence")?;
                    if average.count == 0 {
                        self.averaged.clear();
                    }
                    average.add(&params);
                    self.averaged.push(record);
                }
            }
        }
        Ok(())
    }

    /// The SWAD model's flat parameters (leftover segments added as swad.py does) and what they
    /// average. Ends SWAD for the run.
    pub fn finish(&mut self) -> Result<(Tensor, SwadSummary)> {
        let choice = self.valley.finish().context("SWAD: no evaluation ended a segment")?;
        let mut summary = SwadSummary {
            segments: Vec::new(),
            n_averaged: 0,
            converge_step: self.valley.converge_step(),
            threshold: self.valley.threshold(),
            early_stopped: self.valley.is_dead(),
            last_segment_only: false,
        };
        let params = match choice {
            FinalChoice::LastSegment(id) => {
                summary.segments.push(self.record_of(id)?);
                summary.n_averaged = 1;
                summary.last_segment_only = true;
                self.params_of(id)?.copy()
            }
            FinalChoice::Averaged(leftovers) => {
                self.apply(&leftovers)?;
                let average = self.final_average.as_ref().context("SWAD: converged without an average")?;
                summary.segments = self.averaged.clone();
                summary.n_averaged = average.count;
                average.mean.copy()
            }
        };
        Ok((params, summary))
    }

    /// The state to checkpoint (names without the trainer's prefix). Flat tensors keep the
    /// parameters' layout, so the checkpoint shards them over the ranks like the parameters.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        let mut scalars = vec![STATE_VERSION, self.next_id as f64];
        match &self.segment {
            Some(segment) => {
                scalars.extend([segment.count as f64, self.segment_start as f64]);
                tensors.push((SEGMENT_MEAN.to_string(), segment.mean.shallow_clone()));
            }
            None => scalars.extend([0.0, 0.0]),
        }
        match &self.final_average {
            Some(average) => {
                scalars.extend([1.0, average.count as f64]);
                tensors.push((FINAL_MEAN.to_string(), average.mean.shallow_clone()));
            }
            None => scalars.extend([0.0, 0.0]),
        }
        scalars.push(self.valley.converge_step.map_or(-1.0, |s| s as f64));
        scalars.push(self.valley.threshold);
        scalars.push(if self.valley.dead { 1.0 } else { 0.0 });
        for records in [self.valley.window.iter().collect::<Vec<_>>(), self.averaged.iter().collect()] {
            scalars.push(records.len() as f64);
            for r in records {
                scalars.extend([r.id as f64, r.start_step as f64, r.end_step as f64, r.end_loss]);
            }
        }
        for (id, params) in &self.window_params {
            tensors.push((format!("{WINDOW_PREFIX}{id}"), params.shallow_clone()));
        }
        tensors.push((SCALARS.to_string(), Tensor::from_slice(&scalars)));
        tensors
    }

    /// Restores [`Swad::state`] (names without the trainer's prefix).
    pub fn load_state(&mut self, tensors: &[(String, Tensor)]) -> Result<()> {
        let get =
            |name: &str| -> Result<Tensor> {
                tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t.to_device(self.device)).with_context(|| {
                    format!("SWAD state: no tensor {name:?} (was the checkpoint written without SWAD?)")
                })
            };
        let scalars = get(SCALARS)?;
        let scalars: Vec<f64> =
            Vec::<f64>::try_from(scalars.to_kind(Kind::Double).reshape([-1])).context("SWAD state: reading scalars")?;
        let mut reader = ScalarReader { values: &scalars, at: 0 };
        let version = reader.next()?;
        if version != STATE_VERSION {
            bail!("SWAD state: version {version}, expected {STATE_VERSION}");
        }
        self.next_id = reader.next()? as u64;
        let (segment_count, segment_start) = (reader.next()? as u64, reader.next()? as u64);
        self.segment = if segment_count > 0 {
            Some(RunningAverage { mean: get(SEGMENT_MEAN)?, count: segment_count })
        } else {
            None
        };
        self.segment_start = segment_start;
        let (has_final, final_count) = (reader.next()? != 0.0, reader.next()? as u64);
        self.final_average =
            if has_final { Some(RunningAverage { mean: get(FINAL_MEAN)?, count: final_count }) } else { None };
        let converge_step = reader.next()?;
        self.valley.converge_step = (converge_step >= 0.0).then_some(converge_step as u64);
        self.valley.threshold = reader.next()?;
        self.valley.dead = reader.next()? != 0.0;
        self.valley.window = reader.records()?.into();
        self.averaged = reader.records()?;
        if reader.at != scalars.len() {
            bail!("SWAD state: {} scalars, expected {}", scalars.len(), reader.at);
        }
        self.window_params.clear();
        for id in self.valley.window.iter().map(|s| s.id).collect::<Vec<_>>() {
            self.window_params.insert(id, get(&format!("{WINDOW_PREFIX}{id}"))?);
        }
        Ok(())
    }
}

struct ScalarReader<'a> {
    values: &'a [f64],
    at: usize,
}

impl ScalarReader<'_> {
    fn next(&mut self) -> Result<f64> {
        let value = *self.values.get(self.at).context("SWAD state: the scalars end early")?;
        self.at += 1;
        Ok(value)
    }

    fn records(&mut self) -> Result<Vec<SegmentRecord>> {
        let count = self.next()? as usize;
        (0..count)
            .map(|_| {
                Ok(SegmentRecord {
                    id: self.next()? as u64,
                    start_step: self.next()? as u64,
                    end_step: self.next()? as u64,
                    end_loss: self.next()?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valley(n_converge: usize, n_tolerance: usize) -> LossValley {
        LossValley::new(&SwadConfig { enabled: true, n_converge, n_tolerance, tolerance_ratio: 0.3 })
    }

    fn feed(valley: &mut LossValley, losses: &[f64]) -> (Vec<&'static str>, Vec<AverageUpdate>) {
        let mut updates = Vec::new();
        let names = losses
            .iter()
            .enumerate()
            .map(|(i, &loss)| {
                let record = SegmentRecord { id: i as u64, start_step: i as u64, end_step: i as u64, end_loss: loss };
                valley.observe(record, &mut updates).name()
            })
            .collect();
        (names, updates)
    }

    #[test]
    fn a_falling_loss_never_converges_and_returns_the_last_segment() {
        let mut v = valley(3, 6);
        let (names, updates) = feed(&mut v, &[5.0, 4.0, 3.0, 2.0, 1.0]);
        assert!(names.iter().all(|n| *n == "wait"), "{names:?}");
        assert!(updates.is_empty());
        assert_eq!(v.finish(), Some(FinalChoice::LastSegment(4)));
    }

    #[test]
    fn a_rising_loss_after_the_minimum_ends_the_valley() {
        let mut v = valley(3, 6);
        let (names, _) = feed(&mut v, &[3.0, 2.0, 1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 3.0, 3.0, 3.0]);
        assert_eq!(names[..5], ["wait", "wait", "wait", "wait", "converge"]);
        assert_eq!(*names.last().unwrap_or(&""), "dead");
        assert!(v.is_dead());
    }

    #[test]
    fn numpy_sum_matches_pairwise_order() {
        let values: Vec<f64> = (0..300).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let sequential: f64 = values.iter().sum();
        assert!((numpy_sum(&values) - sequential).abs() < 1e-12);
        assert_eq!(numpy_sum(&[0.1, 0.2, 0.3]), 0.1 + 0.2 + 0.3);
    }
}
