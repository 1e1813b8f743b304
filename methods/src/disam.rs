//! DISAM (domain-inspired SAM; Zhang et al., ICLR 2024), as its published `DISAM_Trainer`: SAM whose
//! ascent direction comes from the gradient of L_CE - lambda x Var_e(L_e) (the population variance of
//! the domains' mean losses), so that the perturbation favours the domains that are already
//! converged less; the descent is the plain cross-entropy gradient at theta + eps.
//!
//! Sharded: the first pass is the cross-domain objective of [`objective`](crate::objective) (the
//! ranks sum the K domains' loss sums), eps is global (the same on every rank), and the second pass is
//! SAM's.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::Pass;
use crate::objective::objective_gradient;
use crate::sam::{perturbed_batch_gradient, SamConfig, SamPerturb};
use crate::vrex::LossVariance;
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// DISAM hyperparameters (documented in [`Disam`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DisamConfig {
    pub rho: f64,
    pub lambda: f64,
}

impl Default for DisamConfig {
    /// The published README's example (lambda 0.1, rho 0.05).
    fn default() -> Self {
        Self { rho: 0.05, lambda: 0.1 }
    }
}

pub struct Disam {
    sam: SamConfig,
    ascent: LossVariance,
    saved_theta: Option<Tensor>,
}

impl MethodDef for Disam {
    type Config = DisamConfig;
    const NAME: &'static str = "disam";
    const DOMAINBED_NAME: &'static str = "DISAM";
    const SUMMARY: &'static str = "Domain-inspired SAM: SAM with eps from the gradient of CE - lambda x the variance of \
                                   the domains' losses; two passes per step.";
    const REFERENCE: &'static str = "Zhang et al., ICLR 2024 (MediaBrain-SJTU/DISAM, algorithms/DISAM.py)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        // Neither is in DomainBed's registry: SAM's radius range, and lambda around the published 0.1.
        Hyperparameter::searched("rho", "perturbation radius", "sam_rho", Search::LogUniform { low: -2.0, high: -0.5 }),
        Hyperparameter::searched(
            "lambda",
            "weight of the domain-loss variance subtracted in the ascent objective",
            "disam_lambda",
            Search::LogUniform { low: -2.0, high: 0.0 },
        ),
    ];

    fn validate(cfg: &DisamConfig) -> Result<()> {
        if !(cfg.rho.is_finite() && cfg.rho >= 0.0) {
            bail!("key `method.disam.rho`: must be a finite number >= 0, got {}", cfg.rho);
        }
        if !(cfg.lambda.is_finite() && cfg.lambda >= 0.0) {
            bail!("key `method.disam.lambda`: must be a finite number >= 0, got {}", cfg.lambda);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &DisamConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("per-domain loss sums", MessageSize::PerDomain(1)),
            CrossRankStat::world_sum("ascent gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum("perturbed gradient", MessageSize::PerParameter(1)),
        ]
    }

    fn new(cfg: &DisamConfig, _model: &dyn Model, _num_domains: usize) -> Result<Self> {
        let sam = SamConfig { rho: cfg.rho, perturb: SamPerturb::Global, ..SamConfig::default() };
        Ok(Self { sam, ascent: LossVariance { weight: -cfg.lambda, variance: 0.0 }, saved_theta: None })
    }
}

impl Method for Disam {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("disam", ctx.topology, shards)?;
        let first = objective_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0), &mut self.ascent)?;
        let (norm, grad) = perturbed_batch_gradient(&self.sam, &mut self.saved_theta, ctx, shards, &first.grad)?;
        ctx.optimizer.step(ctx.model.store().flat(), &grad)?;
        let extra = [("sam_grad_norm".to_string(), norm), ("disam_loss_variance".to_string(), self.ascent.variance)];
        Ok(StepStats { loss: first.loss, extra: extra.into_iter().collect() })
    }
}
