//! VREx (Krueger et al., ICML 2021), as DomainBed's `VREx`: the mean of the per-domain losses plus
//! λ_t times their population variance, L = mean_e L_e + λ_t mean_e (L_e - mean L)², with λ_t = 1
//! before `penalty_anneal_iters` and `lambda` from then on; Adam restarts at the switch.
//!
//! Sharded through [`objective`](crate::objective): the ranks sum their domains' loss sums (K
//! scalars), every rank takes dL/dL_e from them and backpropagates its own pieces.

use crate::common::{check_shards, penalty_switch};
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::Pass;
use crate::objective::{objective_gradient, DomainObjective};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// VREx hyperparameters (documented in [`Vrex`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VrexConfig {
    pub lambda: f64,
    pub penalty_anneal_iters: u64,
}

impl Default for VrexConfig {
    fn default() -> Self {
        Self { lambda: 10.0, penalty_anneal_iters: 500 }
    }
}

pub struct Vrex {
    cfg: VrexConfig,
    objective: LossVariance,
}

/// mean_e L_e + weight x the population variance of the L_e, over the sums of the domains' losses
/// (VREx; DISAM's ascent objective with a negative weight).
pub(crate) struct LossVariance {
    pub weight: f64,
    /// The variance at the last evaluation, for the step's report.
    pub variance: f64,
}

impl MethodDef for Vrex {
    type Config = VrexConfig;
    const NAME: &'static str = "vrex";
    const DOMAINBED_NAME: &'static str = "VREx";
    const SUMMARY: &'static str =
        "Variance risk extrapolation: mean domain loss + lambda x the variance of the domains' losses.";
    const REFERENCE: &'static str = "Krueger et al., ICML 2021; DomainBed's VREx";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::searched(
            "lambda",
            "weight of the variance of the domains' losses (1 before penalty_anneal_iters)",
            "vrex_lambda",
            Search::LogUniform { low: -1.0, high: 5.0 },
        ),
        Hyperparameter::searched(
            "penalty_anneal_iters",
            "steps with weight 1 before lambda applies; Adam restarts at the switch",
            "vrex_penalty_anneal_iters",
            Search::IntLogUniform { low: 0.0, high: 4.0 },
        ),
    ];

    fn validate(cfg: &VrexConfig) -> Result<()> {
        if !(cfg.lambda.is_finite() && cfg.lambda >= 0.0) {
            bail!("key `method.vrex.lambda`: must be a finite number >= 0, got {}", cfg.lambda);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &VrexConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("per-domain loss sums", MessageSize::PerDomain(1)),
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
        ]
    }

    fn new(cfg: &VrexConfig, _model: &dyn Model, _num_domains: usize) -> Result<Self> {
        Ok(Self { cfg: cfg.clone(), objective: LossVariance { weight: 1.0, variance: 0.0 } })
    }
}

impl DomainObjective for LossVariance {
    fn width(&self, _model: &dyn Model) -> usize {
        0
    }

    fn objective(&mut self, sums: &Tensor, batch: usize) -> Result<Tensor> {
        let losses = sums.select(1, 0) / batch as f64;
        let mean = losses.mean(Kind::Double);
        let variance = (&losses - &mean).square().mean(Kind::Double);
        self.variance = variance.f_double_value(&[]).context("the variance of the domains' losses")?;
        Ok(mean + variance * self.weight)
    }
}

impl Method for Vrex {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("vrex", ctx.topology, shards)?;
        let objective = &mut self.objective;
        objective.weight = penalty_switch(ctx, self.cfg.penalty_anneal_iters, 1.0, self.cfg.lambda)?;
        let result = objective_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0), objective)?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        let extra = [("vrex_penalty".to_string(), objective.variance), ("vrex_weight".to_string(), objective.weight)];
        Ok(StepStats { loss: result.loss, extra: extra.into_iter().collect() })
    }
}
