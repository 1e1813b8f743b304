//! `mgrun bench step`: the time of one training step of the real model, method and optimizer on
//! random inputs, for each (method, precision), with the device synchronized around the timed
//! loop; plus a phase breakdown of the ERM step (forward, backward, optimizer) and of evaluation's
//! forward pass. With `ranks` > 1 it times rank 0's share of a larger job (one domain per rank when
//! ranks = domains), its collectives replaced by no-ops.

use anyhow::{bail, Context, Result};
use mgrun_collectives::SingleRank;
use mgrun_methods::{Adam, AdamConfig, DomainShard, ExactMode, MethodConfig, ShardingPlan, Topology, UpdateContext};
pub use mgrun_models::Precision;
use mgrun_models::{Execution, ModelSpec};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

/// What to measure.
#[derive(Debug, Clone)]
pub struct StepBenchConfig {
    pub device: Device,
    pub arch: String,
    pub image_size: i64,
    pub batch_per_domain: usize,
    pub domains: usize,
    pub classes: usize,
    /// `small_cnn` width (ignored by the ResNets).
    pub width: i64,
    pub methods: Vec<String>,
    pub precisions: Vec<Precision>,
    /// Unset: channels-last on CUDA, not on CPU.
    pub channels_last: Option<bool>,
    pub steps: usize,
    pub warmup: usize,
    /// Also time the phases of the ERM step.
    pub phases: bool,
    /// Deterministic mode with micro-batches of this many images (its cost on one rank).
    pub micro_batch: Option<usize>,
    /// Time rank 0 of a job of this many ranks (1: the whole batch in this process).
    pub ranks: usize,
}

/// One measured (method, precision).
#[derive(Debug, Clone, Serialize)]
pub struct StepBenchRow {
    pub method: String,
    pub precision: String,
    pub channels_last: bool,
    pub ms_per_step: f64,
    pub images_per_s: f64,
    /// Peak bytes held by the CUDA caching allocator during the timed steps (CUDA only).
    pub peak_gpu_mem_gb: Option<f64>,
    /// Milliseconds per phase of the ERM step, when measured.
    pub phases_ms: Vec<(String, f64)>,
}

/// Parses `fp32,bf16`.
pub fn parse_precisions(list: &str) -> Result<Vec<Precision>> {
    list.split(',').map(|p| p.trim().parse::<Precision>().context("--precision")).collect()
}

fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// Checks on `device` that bf16 autocast is active under the shim's guard: a matmul in it
/// returns bf16. Returns a one-line report.
pub fn check_bf16_autocast(device: Device) -> Result<String> {
    let a = Tensor::ones([8, 8], (Kind::Float, device));
    let inside = {
        let _autocast = mgrun_torch_shim::autocast_bf16(device)?;
        a.matmul(&a).kind()
    };
    let outside = a.matmul(&a).kind();
    if inside != Kind::BFloat16 || outside != Kind::Float {
        bail!("bf16 autocast on {device:?} is not active: matmul gave {inside:?} inside, {outside:?} outside");
    }
    Ok(format!("bf16 autocast active on {device:?}: matmul gives {inside:?} inside the region, {outside:?} after"))
}

/// Runs every (method, precision) of `cfg`.
pub fn run_step_bench(cfg: &StepBenchConfig) -> Result<Vec<StepBenchRow>> {
    if cfg.steps == 0 || cfg.domains == 0 || cfg.batch_per_domain == 0 || cfg.classes == 0 || cfg.ranks == 0 {
        bail!("bench step: --steps, --domains, --batch-per-domain, --classes and --ranks must be at least 1");
    }
    if cfg.device.is_cuda() {
        // Fixed shapes: let cuDNN pick its fastest kernels, as a training run does.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    let mut rows = Vec::new();
    for &precision in &cfg.precisions {
        for method in &cfg.methods {
            rows.push(
                bench_one(cfg, method, precision)
                    .with_context(|| format!("bench step: method {method}, precision {precision}"))?,
            );
        }
    }
    Ok(rows)
}

fn bench_one(cfg: &StepBenchConfig, method_name: &str, precision: Precision) -> Result<StepBenchRow> {
    let device = cfg.device;
    let channels_last = cfg.channels_last.unwrap_or(device.is_cuda());
    // BN in training mode, as a torchvision model in .train() (the PyTorch reference script).
    let spec = ModelSpec {
        arch: cfg.arch.clone(),
        num_classes: cfg.classes,
        freeze_bn: false,
        dropout: 0.0,
        width: cfg.width,
        pretrained: None,
    };
    let mut model = mgrun_models::build_with(&spec, Execution { precision, channels_last }, device, 0)?;
    let mut optimizer = Adam::new(AdamConfig::default(), model.store().numel(), device);
    let method_cfg = MethodConfig::named(method_name);
    let mut method = mgrun_methods::build(&method_cfg, model.as_ref(), cfg.domains)?;
    // Rank 0 of `cfg.ranks`: SingleRank's collectives return their input, so the step computes rank
    // 0's images and statistics without communication.
    let world = SingleRank::new(device);
    let plan = ShardingPlan::balanced(cfg.ranks, cfg.domains, cfg.batch_per_domain, cfg.micro_batch.unwrap_or(1))?;
    let topology = Topology {
        world: &world,
        plan: &plan,
        domain_groups: &[],
        bucket_bytes: 25 << 20,
        exact: cfg.micro_batch.map(|_| ExactMode { seed: 0 }),
        overlap: None,
    };
    tch::manual_seed(1);
    let shards: Vec<DomainShard> = plan
        .pieces(0)
        .iter()
        .map(|piece| DomainShard {
            domain: piece.domain,
            offset: piece.lo,
            x: Tensor::randn([piece.len() as i64, 3, cfg.image_size, cfg.image_size], (Kind::Float, device)),
            y: Tensor::randint(cfg.classes as i64, [piece.len() as i64], (Kind::Int64, device)),
            ids: Some(Tensor::arange_start(piece.lo as i64, piece.hi as i64, (Kind::Int64, device))),
        })
        .collect();
    let images: usize = plan.pieces(0).iter().map(|piece| piece.len()).sum();
    let total_steps = (cfg.warmup + cfg.steps) as u64;
    let mut run_steps = |first: usize, count: usize| -> Result<()> {
        for step in first..first + count {
            let mut ctx = UpdateContext {
                model: model.as_mut(),
                optimizer: &mut optimizer,
                topology: &topology,
                step: step as u64,
                total_steps,
                seed: 0,
            };
            method.update(&mut ctx, &shards).with_context(|| format!("step {step}"))?;
        }
        Ok(())
    };
    run_steps(0, cfg.warmup)?;
    synchronize(device);
    let device_index = match device {
        Device::Cuda(index) => Some(index),
        _ => None,
    };
    if let Some(index) = device_index {
        mgrun_torch_shim::reset_cuda_peak_memory(index)?;
    }
    let started = Instant::now();
    run_steps(cfg.warmup, cfg.steps)?;
    synchronize(device);
    let seconds = started.elapsed().as_secs_f64() / cfg.steps as f64;
    let peak_gpu_mem_gb = match device_index {
        Some(index) => Some(mgrun_torch_shim::cuda_memory_stats(index)?.peak_allocated as f64 / (1u64 << 30) as f64),
        None => None,
    };
    let phases_ms = if cfg.phases && method_name == "erm" {
        erm_phases(model.as_mut(), &mut optimizer, &shards, cfg.steps.clamp(1, 10))?
    } else {
        Vec::new()
    };
    Ok(StepBenchRow {
        method: method_name.to_string(),
        precision: precision.to_string(),
        channels_last,
        ms_per_step: seconds * 1e3,
        images_per_s: images as f64 / seconds,
        peak_gpu_mem_gb,
        phases_ms,
    })
}

/// The ERM step cut into phases with a device synchronization after each (so the sum exceeds an
/// unsynchronized step a little), and evaluation's forward pass (eval mode, no gradient, argmax) of
/// the same images: mean milliseconds per phase over `steps` steps.
fn erm_phases(
    model: &mut dyn mgrun_models::Model,
    optimizer: &mut Adam,
    shards: &[DomainShard],
    steps: usize,
) -> Result<Vec<(String, f64)>> {
    let device = model.store().device();
    let xs: Vec<&Tensor> = shards.iter().map(|s| &s.x).collect();
    let ys: Vec<&Tensor> = shards.iter().map(|s| &s.y).collect();
    let (x, y) = (Tensor::cat(&xs, 0), Tensor::cat(&ys, 0));
    let names = ["forward+loss", "backward", "optimizer", "eval forward"];
    let mut totals = [0.0f64; 4];
    for _ in 0..steps {
        let mut marks = Vec::with_capacity(5);
        synchronize(device);
        marks.push(Instant::now());
        let loss = model.forward_t(&x, true).f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Mean, -100, 0.0)?;
        synchronize(device);
        marks.push(Instant::now());
        model.store_mut().zero_grad();
        loss.f_backward().context("backward")?;
        synchronize(device);
        marks.push(Instant::now());
        optimizer.step(model.store().flat(), &model.store().flat_grad_alias())?;
        synchronize(device);
        marks.push(Instant::now());
        {
            let _no_grad = tch::no_grad_guard();
            let _ = model.forward_t(&x, false).f_argmax(-1, false)?;
        }
        synchronize(device);
        marks.push(Instant::now());
        for (i, total) in totals.iter_mut().enumerate() {
            *total += (marks[i + 1] - marks[i]).as_secs_f64();
        }
    }
    Ok(names.iter().zip(totals).map(|(n, t)| (n.to_string(), t * 1e3 / steps as f64)).collect())
}

/// The rows as a markdown table, with SAM and DSP-Reg step times relative to ERM's at the same
/// precision.
pub fn markdown_table(rows: &[StepBenchRow]) -> String {
    let mut out = String::from(
        "| method | precision | channels_last | ms/step | img/s | peak GPU mem (GiB) | step time / ERM |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let erm = rows.iter().find(|r| r.method == "erm" && r.precision == row.precision);
        let ratio = erm.map_or("-".to_string(), |e| format!("{:.2}x", row.ms_per_step / e.ms_per_step));
        let mem = row.peak_gpu_mem_gb.map_or("-".to_string(), |g| format!("{g:.2}"));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.0} | {} | {} |",
            row.method, row.precision, row.channels_last, row.ms_per_step, row.images_per_s, mem, ratio
        );
    }
    for row in rows.iter().filter(|r| !r.phases_ms.is_empty()) {
        let phases: Vec<String> = row.phases_ms.iter().map(|(n, ms)| format!("{n} {ms:.1} ms")).collect();
        let _ = writeln!(out, "\nERM {} phases (synchronized): {}", row.precision, phases.join(", "));
    }
    out
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Per phase name, the median over rounds of its milliseconds (phases in the first round's order).
fn median_phases(rounds: &[&[(String, f64)]]) -> Vec<(String, f64)> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .map(|(name, _)| {
            let values = rounds.iter().filter_map(|r| r.iter().find(|(n, _)| n == name).map(|(_, ms)| *ms)).collect();
            (name.clone(), median(values))
        })
        .collect()
}

/// Rounds of the same rows (same order) merged into one: the median step time and phase times.
pub fn median_rows(rounds: &[Vec<StepBenchRow>]) -> Vec<StepBenchRow> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let ms_per_step = median(rounds.iter().map(|r| r[i].ms_per_step).collect());
            let phases: Vec<&[(String, f64)]> = rounds.iter().map(|r| r[i].phases_ms.as_slice()).collect();
            StepBenchRow {
                ms_per_step,
                images_per_s: row.images_per_s * row.ms_per_step / ms_per_step,
                peak_gpu_mem_gb: rounds.iter().filter_map(|r| r[i].peak_gpu_mem_gb).reduce(f64::max),
                phases_ms: median_phases(&phases),
                ..row.clone()
            }
        })
        .collect()
}

/// A row of `bench/pytorch_step.py --json`: the same step in PyTorch eager with one optimizer.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PytorchStepRow {
    pub method: String,
    pub precision: String,
    pub channels_last: bool,
    /// `foreach` or `fused` Adam.
    pub optimizer: String,
    pub ms_per_step: f64,
    #[serde(default)]
    pub phases_ms: Vec<(String, f64)>,
}

/// mgrun's rounds against PyTorch's (foreach and fused Adam, the same rounds) as markdown: per
/// (method, precision) the step, and per phase of ERM. Times are medians over the rounds; speed =
/// PyTorch time / mgrun time is the median of the rounds' ratios (above 1: mgrun is faster), with their
/// range, so that a machine whose speed drifts between rounds shows as a wide range.
pub fn pytorch_comparison(rounds: &[Vec<StepBenchRow>], torch_rounds: &[Vec<PytorchStepRow>]) -> String {
    // A row's time: the whole step (`phase` None) or one phase.
    fn time(ms_per_step: f64, phases: &[(String, f64)], phase: Option<&str>) -> Option<f64> {
        match phase {
            None => Some(ms_per_step),
            Some(phase) => phases.iter().find(|(n, _)| n == phase).map(|(_, ms)| *ms),
        }
    }
    // "median PyTorch ms | speed [min, max]" of row `i` against `optimizer`, over the rounds.
    let compare = |i: usize, phase: Option<&str>, optimizer: &str| {
        let pairs: Vec<(f64, f64)> = rounds
            .iter()
            .zip(torch_rounds)
            .filter_map(|(ours, theirs)| {
                let row = &ours[i];
                let t = theirs.iter().find(|t| {
                    t.method == row.method
                        && t.precision == row.precision
                        && t.channels_last == row.channels_last
                        && t.optimizer == optimizer
                })?;
                Some((time(row.ms_per_step, &row.phases_ms, phase)?, time(t.ms_per_step, &t.phases_ms, phase)?))
            })
            .collect();
        if pairs.is_empty() {
            return ("-".to_string(), "-".to_string());
        }
        let theirs = median(pairs.iter().map(|(_, t)| *t).collect());
        let ratios: Vec<f64> = pairs.iter().map(|(ours, t)| t / ours).collect();
        let (low, high) = ratios.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), r| (l.min(*r), h.max(*r)));
        (format!("{theirs:.1}"), format!("{:.2}x [{low:.2}, {high:.2}]", median(ratios)))
    };
    let cells = |i: usize, phase: Option<&str>| {
        let (foreach_ms, vs_foreach) = compare(i, phase, "foreach");
        let (fused_ms, vs_fused) = compare(i, phase, "fused");
        format!("{foreach_ms} | {fused_ms} | {vs_foreach} | {vs_fused}")
    };
    let mut out = String::from(
        "| method | precision | mgrun ms/step | PyTorch foreach ms | PyTorch fused ms | speed vs foreach | speed vs fused |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let medians = median_rows(rounds);
    for (i, row) in medians.iter().enumerate() {
        let _ = writeln!(out, "| {} | {} | {:.1} | {} |", row.method, row.precision, row.ms_per_step, cells(i, None));
    }
    for (i, row) in medians.iter().enumerate().filter(|(_, r)| !r.phases_ms.is_empty()) {
        let _ = write!(
            out,
            "\nERM {} phases (synchronized)\n\n| phase | mgrun ms | PyTorch foreach ms | PyTorch fused ms | speed vs \
             foreach | speed vs fused |\n|---|---|---|---|---|---|\n",
            row.precision
        );
        for (phase, ms) in &row.phases_ms {
            let _ = writeln!(out, "| {phase} | {ms:.1} | {} |", cells(i, Some(phase)));
        }
    }
    out
}
