//! TRAM, trust-region aware minimisation (Sherborne, Saphra, Dasigi & Peng, ICLR 2024): ASAM whose
//! radius is a trust-region distance in function space instead of a fixed rho,
//! eps = d T² g / ||T g|| (T = |theta| + eta; T = 1 with `adaptive = false`), with d the batch-mean KL
//! divergence KL(p_target || p_current) of the softmax outputs:
//! - `target = "previous"` (TRAM-theta_{t-1}): the model before the previous update;
//! - `target = "initial"` (TRAM-theta_0): the model at the start of training (the pretrained weights);
//! - `target = "noise"` (TRAM-x): the current model on inputs plus N(0, sigma²) noise.
//!
//! The published `first_step` builds eps from `ones_like(grad) * scale` without the gradient (a bug,
//! see methods-notes.md c.2); this follows the paper, eps proportional to g. Its KL is divided by the
//! batch size twice (`kl_div(..., "mean") / B`); here d is the plain batch mean, times `logit_scale`.
//! The distance uses eval-mode forwards without gradient (no dropout in either model).
//!
//! Sharded: every rank sums the KL over its images and the ranks all-reduce that sum (one scalar),
//! so all use the same d; eps then follows global SAM (the first-pass gradient all-reduced). The
//! target copy is taken right before each (synchronised) update, so it is the same on every rank.
//! Cost: SAM's two passes plus two gradient-free forwards, and one copy of the parameters.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::gradients::{self, Pass};
use crate::sam::{perturbed_batch_gradient, SamConfig, SamPerturb};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

const STATE_TARGET: &str = "tram.target";

/// What the current model's outputs are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TramTarget {
    Previous,
    Initial,
    Noise,
}

/// TRAM hyperparameters (documented in [`Tram`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TramConfig {
    pub target: TramTarget,
    pub adaptive: bool,
    pub eta: f64,
    pub sigma: f64,
    pub logit_scale: f64,
}

impl Default for TramConfig {
    /// The paper builds TRAM on ASAM; sigma as R3F's baseline in the paper (0.1).
    fn default() -> Self {
        Self { target: TramTarget::Previous, adaptive: true, eta: 0.01, sigma: 0.1, logit_scale: 1.0 }
    }
}

pub struct Tram {
    cfg: TramConfig,
    /// The target parameters (`previous`, `initial`); `None` for `noise`.
    target: Option<Tensor>,
    saved_theta: Option<Tensor>,
}

impl MethodDef for Tram {
    type Config = TramConfig;
    const NAME: &'static str = "tram";
    const DOMAINBED_NAME: &'static str = "TRAM";
    const SUMMARY: &'static str = "Trust-region aware minimisation: ASAM with its radius set each step by a KL \
                                   distance to the previous/initial model or to noised inputs.";
    const REFERENCE: &'static str = "Sherborne, Saphra, Dasigi & Peng, ICLR 2024 (tomsherborne/tram_optimizer)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::fixed(
            "target",
            "\"previous\": KL to the model before the last update; \"initial\": to the starting (pretrained) model; \
             \"noise\": to the current model on noised inputs",
        ),
        Hyperparameter::fixed("adaptive", "ASAM's element-wise scale T = |theta| + eta (the paper's choice)"),
        Hyperparameter::fixed("eta", "ASAM offset in T = |theta| + eta"),
        Hyperparameter::fixed("sigma", "standard deviation of the input noise of target = \"noise\""),
        Hyperparameter::fixed("logit_scale", "factor on the KL distance"),
    ];

    fn validate(cfg: &TramConfig) -> Result<()> {
        for (field, value) in [("eta", cfg.eta), ("sigma", cfg.sigma), ("logit_scale", cfg.logit_scale)] {
            if !(value.is_finite() && value >= 0.0) {
                bail!("key `method.tram.{field}`: must be a finite number >= 0, got {value}");
            }
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &TramConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("sum of the KL distances", MessageSize::Scalars(1)),
            CrossRankStat::world_sum("first-pass gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum("perturbed gradient", MessageSize::PerParameter(1)),
            CrossRankStat::LOSS,
        ]
    }

    fn new(cfg: &TramConfig, model: &dyn Model, _num_domains: usize) -> Result<Self> {
        let target = match cfg.target {
            TramTarget::Previous | TramTarget::Initial => Some(model.store().flat().detach().copy()),
            TramTarget::Noise => None,
        };
        Ok(Self { cfg: cfg.clone(), target, saved_theta: None })
    }
}

/// sum_i KL(p_i || q_i) for target logits p and current logits q, rows i; in f64, since the two
/// distributions are close and f32 log-differences would lose most of their digits.
fn kl_sum(target_logits: &Tensor, current_logits: &Tensor) -> Result<f64> {
    let log_p = target_logits.log_softmax(1, Kind::Double);
    let log_q = current_logits.log_softmax(1, Kind::Double);
    let kl = (log_p.exp() * (&log_p - log_q)).sum(Kind::Double);
    kl.f_double_value(&[]).context("TRAM: reading the KL distance")
}

impl Tram {
    /// d = logit_scale x the batch-mean KL to the target.
    fn distance(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<f64> {
        let (sigma, images) = (self.cfg.sigma, (ctx.topology.num_domains() * ctx.topology.batch_per_domain()) as f64);
        let pass = Pass::plain(ctx.step, 2);
        let sum = match &self.target {
            None => gradients::image_sum(ctx.model, ctx.topology, shards, &pass, |model, x, _| {
                let noised = x + x.randn_like() * sigma;
                kl_sum(&model.forward_t(&noised, false), &model.forward_t(x, false))
            })?,
            Some(target) => {
                let theta = ctx.model.store().flat().shallow_clone();
                let saved = self.saved_theta.get_or_insert_with(|| theta.empty_like()).shallow_clone();
                tch::no_grad(|| saved.shallow_clone().f_copy_(&theta)).context("TRAM: saving theta")?;
                gradients::image_sum(ctx.model, ctx.topology, shards, &pass, |model, x, _| {
                    let current = model.forward_t(x, false);
                    model.store().set_flat(target)?;
                    let target_logits = model.forward_t(x, false);
                    model.store().set_flat(&saved)?;
                    kl_sum(&target_logits, &current)
                })?
            }
        };
        Ok(self.cfg.logit_scale * sum / images)
    }
}

impl Method for Tram {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("tram", ctx.topology, shards)?;
        let distance = self.distance(ctx, shards)?;
        let sam = SamConfig { rho: distance, perturb: SamPerturb::Global, adaptive: self.cfg.adaptive, eta: self.cfg.eta };
        let first = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        let (norm, grad) = perturbed_batch_gradient(&sam, &mut self.saved_theta, ctx, shards, &first.grad)?;
        if let (TramTarget::Previous, Some(target)) = (self.cfg.target, &self.target) {
            // Next step's target: the parameters before this (synchronised) update.
            tch::no_grad(|| target.shallow_clone().f_copy_(ctx.model.store().flat())).context("TRAM: target copy")?;
        }
        ctx.optimizer.step(ctx.model.store().flat(), &grad)?;
        let extra = [("tram_distance".to_string(), distance), ("sam_grad_norm".to_string(), norm)];
        Ok(StepStats { loss: first.loss, extra: extra.into_iter().collect() })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.target.iter().map(|t| (STATE_TARGET.to_string(), t.shallow_clone())).collect()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let Some(target) = &mut self.target else { return Ok(()) };
        let (_, saved) = state.iter().find(|(n, _)| n == STATE_TARGET).context("method state: missing TRAM's target")?;
        if saved.size() != target.size() {
            bail!("method state: TRAM's target has shape {:?}, the model {:?}", saved.size(), target.size());
        }
        *target = saved.to_kind(Kind::Float).to_device(target.device()).copy();
        Ok(())
    }
}
