//! DSP-Reg, Domain-Sensitive Parameter Regularization (arXiv 2601.19394), as specified in
//! methods.md section 1.3 (the paper's formulas are not public; every inferred choice is a knob).
//!
//! Per step: per-domain gradients g_e ([`gradients::domain_gradients`]: one backward per shard; a
//! domain split over ranks is summed within its domain group), the cross-domain moments
//! m = mean_e g_e and v = var_e g_e per scalar parameter ([`cross_domain_moments`]: one world
//! all-reduce of [sum g_e; sum g_e^2]), bias-corrected EMAs V and M, a sensitivity score s and a detached weight w.
//! The update gradient is the ERM gradient m plus an anchor/shrink penalty gradient
//! 2 lambda_t w (theta - theta0), or the gated (1 - gamma_t w) m. All statistics are fp32 tensors on
//! the model's device, computed on flat buffers.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::{self, Pass};
use crate::moments::{cross_domain_sums_into, moments_of_sums, CrossDomainMoments};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::{Model, ParamKind};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// How the weights w enter the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DspMode {
    /// Penalty lambda * sum_i w_i (theta_i - theta0_i)^2, theta0 = the weights at the first update.
    Anchor,
    /// Penalty lambda * sum_i w_i theta_i^2 (sensitivity-weighted L2).
    Shrink,
    /// No penalty: the update gradient is (1 - gamma * w) * m.
    Gate,
}

/// Sensitivity score s from the bias-corrected EMAs V (cross-domain variance) and M (squared mean).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DspScore {
    /// s = V / (V + M + epsilon), in [0, 1).
    Ratio,
    /// s = V / (mean of V over the parameter tensor + epsilon), unbounded.
    LayerNorm,
    /// The ratio score's rank within its parameter tensor, scaled to [0, 1]: (number of smaller
    /// values in the tensor) / (numel - 1); ties share the lowest rank.
    Rank,
}

/// Map from score s to weight w.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DspWeight {
    /// w = s.
    Linear,
    /// w = sigmoid((s - tau) / temperature).
    Sigmoid,
}

/// Denominator of the per-parameter cross-domain variance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarianceDenominator {
    /// Unbiased: divide by K - 1.
    #[serde(rename = "k_minus_1")]
    KMinus1,
    /// Divide by K.
    #[serde(rename = "k")]
    K,
}

/// DSP-Reg hyperparameters (methods.md section 1.3), documented in [`DspReg`]'s `HYPERPARAMETERS`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DspRegConfig {
    pub mode: DspMode,
    pub beta: f64,
    pub lambda: f64,
    pub gamma: f64,
    pub score: DspScore,
    pub weight: DspWeight,
    pub tau: f64,
    pub temperature: f64,
    pub epsilon: f64,
    pub variance_denominator: VarianceDenominator,
    pub warmup_frac: f64,
    pub ramp_frac: f64,
    pub exclude_norm: bool,
    pub exclude_bias: bool,
    pub exclude: Vec<String>,
    pub dump_sensitivity: bool,
}

impl Default for DspRegConfig {
    fn default() -> Self {
        Self {
            // Gate, not anchor: in the README's DSP-Reg comparison anchoring cost held-out accuracy from
            // scratch and from a pretrained start, and gate lost least.
            mode: DspMode::Gate,
            beta: 0.95,
            lambda: 0.1,
            gamma: 0.5,
            score: DspScore::Ratio,
            weight: DspWeight::Linear,
            tau: 0.5,
            temperature: 0.1,
            epsilon: 1e-20,
            variance_denominator: VarianceDenominator::KMinus1,
            warmup_frac: 0.1,
            ramp_frac: 0.1,
            exclude_norm: true,
            exclude_bias: true,
            exclude: Vec::new(),
            dump_sensitivity: false,
        }
    }
}

impl DspRegConfig {
    /// Steps of plain ERM, then of the linear ramp: `round(frac * total_steps)` each.
    pub fn schedule_steps(&self, total_steps: u64) -> (u64, u64) {
        let steps = |frac: f64| (frac * total_steps as f64).round() as u64;
        (steps(self.warmup_frac), steps(self.ramp_frac))
    }

    /// Fraction of lambda (or gamma) in force at 0-based `step`: 0 during warm-up, then
    /// `(step - warmup + 1) / ramp` capped at 1 (so the first step after warm-up is already active),
    /// 1 at once when the ramp is empty.
    pub fn penalty_fraction(&self, step: u64, total_steps: u64) -> f64 {
        let (warmup, ramp) = self.schedule_steps(total_steps);
        if step < warmup {
            0.0
        } else if ramp == 0 {
            1.0
        } else {
            ((step - warmup + 1) as f64 / ramp as f64).min(1.0)
        }
    }

    /// Full strength of the current mode: lambda for anchor/shrink, gamma for gate.
    pub fn strength(&self) -> f64 {
        match self.mode {
            DspMode::Anchor | DspMode::Shrink => self.lambda,
            DspMode::Gate => self.gamma,
        }
    }
}

/// Name and place of one parameter tensor in the flat buffer.
struct ParamSlot {
    name: String,
    offset: i64,
    numel: i64,
}

/// Per-element parameter-tensor index, for per-tensor reductions on flat buffers.
struct Segments {
    /// `[P]` int64: index of each element's parameter tensor.
    ids: Tensor,
    /// `[n]` f32: elements per tensor.
    counts: Tensor,
    /// `[n]` int64: first element of each tensor.
    starts: Tensor,
}

const STATE_VARIANCE: &str = "dsp_reg.ema_variance";
const STATE_MEAN_SQ: &str = "dsp_reg.ema_mean_sq";
const STATE_T: &str = "dsp_reg.t";
const STATE_THETA0: &str = "dsp_reg.theta0";

pub struct DspReg {
    cfg: DspRegConfig,
    num_domains: usize,
    slots: Vec<ParamSlot>,
    /// `[P]` f32, 1 where the weight applies and 0 for excluded parameters.
    mask: Tensor,
    included: f64,
    segments: Option<Segments>,
    /// EMAs of v and m^2 (not bias-corrected) and the number of updates they have seen.
    ema_variance: Tensor,
    ema_mean_sq: Tensor,
    t: u64,
    /// Anchor weights (mode `anchor`), captured at the first update unless restored.
    theta0: Option<Tensor>,
    /// The ratio score's statistics as one fused CPU pass where possible (see `fused_statistics`).
    fuse: bool,
    /// Per-step buffers kept across steps: [sum_e g_e; sum_e g_e^2] (2P) and the fused pass's update
    /// direction (P). Fresh buffers of this size would be mapped and page-faulted every step.
    sums: Tensor,
    update: Option<Tensor>,
}

impl MethodDef for DspReg {
    type Config = DspRegConfig;
    const NAME: &'static str = "dsp_reg";
    const DOMAINBED_NAME: &'static str = "DSPReg";
    const SUMMARY: &'static str = "Domain-Sensitive Parameter Regularization: per-parameter cross-domain gradient \
                                   variance (EMA) weights an anchor/shrink penalty or gates the update; one backward \
                                   per domain.";
    const REFERENCE: &'static str = "arXiv 2601.19394 (formulas inferred: methods.md section 1.3)";
    // Searched in the registry's style: log-uniform strength, a choice of decays (drawn in this order).
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::fixed("mode", "\"anchor\": + lambda*sum w(theta-theta0)^2; \"shrink\": theta0 = 0; \"gate\": update (1-gamma*w)*m"),
        Hyperparameter::searched("lambda", "penalty strength (anchor, shrink)", "dsp_lambda", Search::LogUniform { low: -3.0, high: 0.0 }),
        Hyperparameter::searched("beta", "EMA decay of the cross-domain gradient variance V and squared mean M", "dsp_beta", Search::Choice(&[0.9, 0.95, 0.99])),
        Hyperparameter::fixed("gamma", "gate strength in [0, 1] (gate)"),
        Hyperparameter::fixed("score", "\"ratio\": V/(V+M+epsilon); \"layer_norm\": V/mean_tensor(V); \"rank\": ratio ranked per tensor"),
        Hyperparameter::fixed("weight", "\"linear\": w = s; \"sigmoid\": w = sigmoid((s - tau)/temperature)"),
        Hyperparameter::fixed("tau", "threshold of the sigmoid weight"),
        Hyperparameter::fixed("temperature", "temperature of the sigmoid weight"),
        Hyperparameter::fixed("epsilon", "added to score denominators"),
        Hyperparameter::fixed("variance_denominator", "\"k_minus_1\" (unbiased) or \"k\" in the cross-domain variance"),
        Hyperparameter::fixed("warmup_frac", "fraction of steps with the plain ERM gradient while the EMAs fill"),
        Hyperparameter::fixed("ramp_frac", "fraction of steps over which lambda/gamma then ramps linearly from 0"),
        Hyperparameter::fixed("exclude_norm", "give normalisation affine parameters weight 0"),
        Hyperparameter::fixed("exclude_bias", "give conv/linear biases weight 0"),
        Hyperparameter::fixed("exclude", "parameter-name prefixes with weight 0, e.g. [\"fc.\"]"),
        Hyperparameter::fixed("dump_sensitivity", "write the per-parameter sensitivity s to a safetensors file at evaluations"),
    ];

    fn validate(cfg: &DspRegConfig) -> Result<()> {
        let check = |field: &str, value: f64, ok: bool, expected: &str| -> Result<()> {
            if !(value.is_finite() && ok) {
                bail!("key `method.dsp_reg.{field}`: must be {expected}, got {value}");
            }
            Ok(())
        };
        check("beta", cfg.beta, (0.0..1.0).contains(&cfg.beta), "in [0, 1)")?;
        check("lambda", cfg.lambda, cfg.lambda >= 0.0, ">= 0")?;
        check("gamma", cfg.gamma, (0.0..=1.0).contains(&cfg.gamma), "in [0, 1]")?;
        check("tau", cfg.tau, true, "finite")?;
        check("temperature", cfg.temperature, cfg.temperature > 0.0, "> 0")?;
        check("epsilon", cfg.epsilon, cfg.epsilon >= 0.0, ">= 0")?;
        check("warmup_frac", cfg.warmup_frac, (0.0..=1.0).contains(&cfg.warmup_frac), "in [0, 1]")?;
        check("ramp_frac", cfg.ramp_frac, (0.0..=1.0).contains(&cfg.ramp_frac), "in [0, 1]")?;
        if let Some(empty) = cfg.exclude.iter().position(|p| p.is_empty()) {
            bail!("key `method.dsp_reg.exclude`: entry {empty} is an empty prefix (it would exclude every parameter)");
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &DspRegConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::domain_group_sum("domain gradient (only when a domain is split over ranks)"),
            CrossRankStat::world_sum("gradient moments [sum_e g_e; sum_e g_e^2]", MessageSize::PerParameter(2)),
            CrossRankStat::LOSS,
        ]
    }

    /// Builds the state for `model`'s parameters; `num_domains` is the number of training domains K.
    fn new(cfg: &DspRegConfig, model: &dyn Model, num_domains: usize) -> Result<Self> {
        Self::validate(cfg)?;
        if num_domains < 2 {
            bail!(
                "method.dsp_reg needs at least 2 training domains to measure cross-domain gradient variance, got \
                 {num_domains} (leave more domains out of data.test_domains, or use another method)"
            );
        }
        let store = model.store();
        let device = store.device();
        let numel = store.numel() as i64;
        let slots: Vec<ParamSlot> = store
            .params()
            .iter()
            .map(|p| ParamSlot { name: p.name.clone(), offset: p.offset as i64, numel: p.numel as i64 })
            .collect();

        let mask = Tensor::ones([numel], (Kind::Float, Device::Cpu));
        let mut prefix_used = vec![false; cfg.exclude.len()];
        let mut included = 0i64;
        for p in store.params() {
            let by_kind = match p.kind {
                ParamKind::NormWeight | ParamKind::NormBias => cfg.exclude_norm,
                ParamKind::Bias => cfg.exclude_bias,
                ParamKind::Weight => false,
            };
            let mut by_name = false;
            for (used, prefix) in prefix_used.iter_mut().zip(&cfg.exclude) {
                if p.name.starts_with(prefix.as_str()) {
                    *used = true;
                    by_name = true;
                }
            }
            if by_kind || by_name {
                let _ = mask.narrow(0, p.offset as i64, p.numel as i64).fill_(0.0);
            } else {
                included += p.numel as i64;
            }
        }
        if let Some(unused) = prefix_used.iter().position(|used| !used) {
            bail!(
                "method.dsp_reg.exclude[{unused}]: prefix {:?} matches no parameter of the model",
                cfg.exclude[unused]
            );
        }

        let segments = match cfg.score {
            DspScore::Ratio => None,
            DspScore::LayerNorm | DspScore::Rank => Some(Self::segments(&slots, device)),
        };
        let zeros = || Tensor::zeros([numel], (Kind::Float, device));
        Ok(Self {
            cfg: cfg.clone(),
            num_domains,
            slots,
            mask: mask.to_device(device),
            included: included as f64,
            segments,
            ema_variance: zeros(),
            ema_mean_sq: zeros(),
            t: 0,
            theta0: None,
            fuse: true,
            sums: Tensor::empty([2 * numel], (Kind::Float, device)),
            update: None,
        })
    }

}

impl DspReg {
    fn segments(slots: &[ParamSlot], device: Device) -> Segments {
        let counts: Vec<i64> = slots.iter().map(|s| s.numel).collect();
        let starts: Vec<i64> = slots.iter().map(|s| s.offset).collect();
        let ids = Tensor::arange(slots.len() as i64, (Kind::Int64, Device::Cpu)).repeat_interleave_self_tensor(
            &Tensor::from_slice(&counts),
            0,
            None,
        );
        Segments {
            ids: ids.to_device(device),
            counts: Tensor::from_slice(&counts).to_kind(Kind::Float).to_device(device),
            starts: Tensor::from_slice(&starts).to_device(device),
        }
    }

    /// `[P]` f32: 1 where the weight applies, 0 for excluded parameters.
    pub fn weight_mask(&self) -> &Tensor {
        &self.mask
    }

    /// Sensitivity score s `[P]` from the current EMAs (zeros before the first update).
    pub fn sensitivity(&self) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        if self.t == 0 {
            return Ok(self.ema_variance.zeros_like());
        }
        let correction = 1.0 - self.cfg.beta.powf(self.t as f64);
        let variance = &self.ema_variance / correction;
        let mean_sq = &self.ema_mean_sq / correction;
        let eps = self.cfg.epsilon;
        let ratio = || &variance / (&variance + &mean_sq + eps);
        match (self.cfg.score, &self.segments) {
            (DspScore::Ratio, _) => Ok(ratio()),
            (DspScore::LayerNorm, Some(seg)) => {
                let sums = Tensor::zeros([self.slots.len() as i64], (Kind::Float, variance.device()))
                    .f_index_add(0, &seg.ids, &variance)
                    .context("DSP-Reg: per-tensor sums of V")?;
                let means = sums / &seg.counts;
                Ok(&variance / (means.index_select(0, &seg.ids) + eps))
            }
            (DspScore::Rank, Some(seg)) => {
                // Exact sort key: tensor index in the high 32 bits, the score's f32 bit pattern in
                // the low 32 (non-negative floats order like their bits; abs() turns -0 into +0).
                // A key's left insertion point among the sorted keys, minus its tensor's start, is
                // the number of smaller scores in its tensor; equal scores share that rank.
                let bits = ratio().abs().f_view_dtype(Kind::Int).context("DSP-Reg: score bits")?.to_kind(Kind::Int64);
                let key = seg.ids.f_mul_scalar(1i64 << 32)? + bits;
                let (sorted, _) = key.sort(0, false);
                let position = key
                    .f_searchsorted(&sorted, false, false, "left", None::<Tensor>)
                    .context("DSP-Reg: ranking scores")?;
                let rank = (position - seg.starts.index_select(0, &seg.ids)).to_kind(Kind::Float);
                let denominator = (seg.counts.index_select(0, &seg.ids) - 1.0).clamp_min(1.0);
                Ok(rank / denominator)
            }
            (_, None) => bail!("DSP-Reg: per-tensor segments missing for score {:?}", self.cfg.score),
        }
    }

    /// Weight w `[P]` (masked) from a score.
    fn weight_of(&self, score: &Tensor) -> Tensor {
        let w = match self.cfg.weight {
            DspWeight::Linear => score.shallow_clone(),
            DspWeight::Sigmoid => ((score - self.cfg.tau) / self.cfg.temperature).sigmoid(),
        };
        w * &self.mask
    }

    /// The sensitivity score of every parameter, shaped like the parameter, for a safetensors dump.
    pub fn sensitivity_tensors(&self, model: &dyn Model) -> Result<Vec<(String, Tensor)>> {
        let score = self.sensitivity()?;
        if model.store().numel() as i64 != score.numel() as i64 {
            bail!("DSP-Reg: model has {} parameters, statistics have {}", model.store().numel(), score.numel());
        }
        Ok(model.store().params().iter().map(|p| (p.name.clone(), p.unflatten(&score).contiguous())).collect())
    }

    /// One EMA update of V (with v) and M (with m^2).
    fn update_statistics(&mut self, moments: &CrossDomainMoments) -> Result<()> {
        let beta = self.cfg.beta;
        self.t += 1;
        let _ = self.ema_variance.f_mul_scalar_(beta)?.f_add_(&(&moments.variance * (1.0 - beta)))?;
        let _ = self.ema_mean_sq.f_mul_scalar_(beta)?.f_add_(&(&moments.mean * &moments.mean * (1.0 - beta)))?;
        Ok(())
    }

    /// The update direction: m plus the penalty gradient of the mode, or the gated m.
    fn regularized_gradient(&self, mean: Tensor, weight: &Tensor, theta: &Tensor, strength: f64) -> Result<Tensor> {
        if strength == 0.0 {
            return Ok(mean);
        }
        Ok(match self.cfg.mode {
            DspMode::Anchor => {
                let theta0 = self.theta0.as_ref().context("DSP-Reg: anchor weights missing")?;
                &mean + weight * (theta - theta0) * (2.0 * strength)
            }
            DspMode::Shrink => &mean + weight * theta * (2.0 * strength),
            DspMode::Gate => (1.0 - weight * strength) * &mean,
        })
    }

    /// The shards, the domain count and the parameter count match what the method was built for.
    fn check_layout(&self, ctx: &UpdateContext<'_>, shards: &[DomainShard]) -> Result<()> {
        check_shards("dsp_reg", ctx.topology, shards)?;
        if ctx.topology.num_domains() != self.num_domains {
            bail!(
                "method.dsp_reg was built for {} training domains but the topology has {}",
                self.num_domains,
                ctx.topology.num_domains()
            );
        }
        let numel = ctx.model.store().numel() as i64;
        if numel != self.mask.numel() as i64 {
            bail!("method.dsp_reg: model has {numel} parameters, the method was built for {}", self.mask.numel());
        }
        Ok(())
    }

    /// The ratio score on CPU ranks runs as one fused pass ([`DspReg::fused_statistics_step`]); the
    /// other scores, and CUDA ranks, take the tensor path (about 25 passes over P).
    fn fused_statistics(&self, theta: &Tensor) -> bool {
        self.fuse && self.cfg.score == DspScore::Ratio && theta.device() == Device::Cpu
    }

    /// `false`: the tensor path even where the fused pass applies, as CUDA ranks compute it (for
    /// tests and benchmarks that compare the two).
    pub fn set_fused_statistics(&mut self, on: bool) {
        self.fuse = on;
    }

    /// [`DspReg::update_statistics`], [`DspReg::sensitivity`], [`DspReg::weight_of`],
    /// [`DspReg::regularized_gradient`] and [`DspReg::mean_sensitivity`] of the ratio score in one
    /// pass over the parameters (the same arithmetic per element, in f32): the update direction and
    /// the mean sensitivity.
    fn fused_statistics_step(&mut self, sums: &Tensor, theta: &Tensor, strength: f64) -> Result<(Tensor, f64)> {
        self.t += 1;
        let theta0 = match (self.cfg.mode, strength != 0.0) {
            (DspMode::Anchor, true) => Some(self.theta0.as_ref().context("DSP-Reg: anchor weights missing")?),
            _ => None,
        };
        let update = self.update.get_or_insert_with(|| theta.empty_like()).shallow_clone();
        let buffers = mgrun_torch_shim::DspBuffers {
            sums,
            ema_variance: &self.ema_variance,
            ema_mean_sq: &self.ema_mean_sq,
            theta,
            theta0,
            mask: &self.mask,
            update: &update,
        };
        let coefficients = mgrun_torch_shim::DspCoefficients {
            k: self.num_domains as f64,
            denominator: self.variance_denominator(),
            beta: self.cfg.beta,
            correction: 1.0 - self.cfg.beta.powf(self.t as f64),
            epsilon: self.cfg.epsilon,
            tau: self.cfg.tau,
            temperature: self.cfg.temperature,
            strength,
            sigmoid_weight: i32::from(self.cfg.weight == DspWeight::Sigmoid),
            mode: match self.cfg.mode {
                DspMode::Anchor => 0,
                DspMode::Shrink => 1,
                DspMode::Gate => 2,
            },
        };
        let masked_score_sum = mgrun_torch_shim::dsp_ratio_step(&buffers, &coefficients)?;
        let mean_sensitivity = if self.included == 0.0 { 0.0 } else { masked_score_sum / self.included };
        Ok((update, mean_sensitivity))
    }

    fn variance_denominator(&self) -> f64 {
        let k = self.num_domains as f64;
        match self.cfg.variance_denominator {
            VarianceDenominator::KMinus1 => k - 1.0,
            VarianceDenominator::K => k,
        }
    }

    /// Mean score over the included parameters (0 when every parameter is excluded).
    fn mean_sensitivity(&self, score: &Tensor) -> Result<f64> {
        if self.included == 0.0 {
            return Ok(0.0);
        }
        Ok((score * &self.mask).sum(Kind::Double).f_double_value(&[])? / self.included)
    }

    fn check_state_tensor(name: &str, t: &Tensor, numel: i64) -> Result<()> {
        if t.size() != [numel] {
            bail!("DSP-Reg state: {name:?} has shape {:?}, expected [{numel}]", t.size());
        }
        Ok(())
    }
}

impl Method for DspReg {
    fn needs_domain_gradients(&self) -> bool {
        true
    }

    /// Three phases: per-domain gradients and their cross-domain moments; the statistics, score
    /// and weight; the regularised optimizer step.
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        self.check_layout(ctx, shards)?;
        if self.cfg.mode == DspMode::Anchor && self.theta0.is_none() {
            self.theta0 = Some(ctx.model.store().flat().detach().copy());
        }

        let grads = gradients::domain_gradients(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        let _guard = tch::no_grad_guard();
        let theta = ctx.model.store().flat();
        let mut sums = self.sums.shallow_clone();
        cross_domain_sums_into(&grads, ctx.topology, &mut sums)?;
        let strength = self.cfg.strength() * self.cfg.penalty_fraction(ctx.step, ctx.total_steps);
        let (update, mean_sensitivity) = if self.fused_statistics(theta) {
            self.fused_statistics_step(&sums, theta, strength)?
        } else {
            let moments = moments_of_sums(&sums, self.num_domains, self.variance_denominator())?;
            self.update_statistics(&moments)?;
            let score = self.sensitivity()?;
            let weight = self.weight_of(&score);
            (self.regularized_gradient(moments.mean, &weight, theta, strength)?, self.mean_sensitivity(&score)?)
        };
        ctx.optimizer.step(theta, &update)?;

        let mut extra = BTreeMap::new();
        extra.insert("dsp_lambda".to_string(), strength);
        extra.insert("dsp_mean_sensitivity".to_string(), mean_sensitivity);
        Ok(StepStats { loss: grads.loss, extra })
    }

    fn evaluation_dump(&self, model: &dyn Model) -> Result<Option<Vec<(String, Tensor)>>> {
        if self.cfg.dump_sensitivity {
            Ok(Some(self.sensitivity_tensors(model)?))
        } else {
            Ok(None)
        }
    }

    fn summaries(&self, _model: &dyn Model) -> Map<String, Value> {
        let mut out = Map::new();
        if self.t == 0 {
            return out;
        }
        let Ok(score) = self.sensitivity() else {
            return out;
        };
        let weight = self.weight_of(&score);
        let mut layers = Map::new();
        for slot in &self.slots {
            if slot.numel == 0 {
                continue;
            }
            let s = score.narrow(0, slot.offset, slot.numel);
            let w = weight.narrow(0, slot.offset, slot.numel);
            let value = |t: Tensor| t.f_double_value(&[]).unwrap_or(f64::NAN);
            layers.insert(
                slot.name.clone(),
                json!({
                    "mean": value(s.mean(Kind::Double)),
                    "max": value(s.max().to_kind(Kind::Double)),
                    "w_mean": value(w.mean(Kind::Double)),
                }),
            );
        }
        out.insert("dsp_sensitivity".to_string(), Value::Object(layers));
        out
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![
            (STATE_VARIANCE.to_string(), self.ema_variance.shallow_clone()),
            (STATE_MEAN_SQ.to_string(), self.ema_mean_sq.shallow_clone()),
            (STATE_T.to_string(), Tensor::from_slice(&[self.t as i64])),
        ];
        if let Some(theta0) = &self.theta0 {
            state.push((STATE_THETA0.to_string(), theta0.shallow_clone()));
        }
        state
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let find = |name: &str| state.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        let numel = self.mask.numel() as i64;
        let device = self.mask.device();
        let variance = find(STATE_VARIANCE).with_context(|| format!("DSP-Reg state: missing {STATE_VARIANCE:?}"))?;
        let mean_sq = find(STATE_MEAN_SQ).with_context(|| format!("DSP-Reg state: missing {STATE_MEAN_SQ:?}"))?;
        let t = find(STATE_T).with_context(|| format!("DSP-Reg state: missing {STATE_T:?}"))?;
        Self::check_state_tensor(STATE_VARIANCE, variance, numel)?;
        Self::check_state_tensor(STATE_MEAN_SQ, mean_sq, numel)?;
        if t.numel() != 1 {
            bail!("DSP-Reg state: {STATE_T:?} must hold one value, got shape {:?}", t.size());
        }
        let t = t.reshape([-1]).f_int64_value(&[0]).context("DSP-Reg state: dsp_reg.t")?;
        if t < 0 {
            bail!("DSP-Reg state: {STATE_T:?} is negative ({t})");
        }
        let theta0 = match find(STATE_THETA0) {
            Some(theta0) => {
                Self::check_state_tensor(STATE_THETA0, theta0, numel)?;
                Some(theta0.to_kind(Kind::Float).to_device(device).copy())
            }
            None if self.cfg.mode == DspMode::Anchor && t > 0 => {
                bail!("DSP-Reg state: mode anchor needs {STATE_THETA0:?} once statistics exist")
            }
            None => None,
        };
        self.ema_variance = variance.to_kind(Kind::Float).to_device(device).copy();
        self.ema_mean_sq = mean_sq.to_kind(Kind::Float).to_device(device).copy();
        self.t = t as u64;
        self.theta0 = theta0;
        Ok(())
    }
}
