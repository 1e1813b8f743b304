//! SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021) around Adam.
//!
//! First pass: g = grad of the ERM objective; eps = rho * T^2 g / (||T g||_2 + 1e-12) over all
//! parameters jointly (T = 1 for SAM, T = |theta| + eta for ASAM). Second pass at theta + eps on the
//! same batch; theta is restored exactly (copied back) and Adam steps with the second-pass gradient.
//! `global` perturbs with the world's gradient (first-pass all-reduce); `local` perturbs with each
//! rank's own gradient (m-sharpness, no first-pass communication).

use crate::common::{all_reduce_grad, all_reduce_scalars, check_shards, concatenated_loss_and_grad};
use crate::{CrossRankStat, DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which gradient defines the perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamPerturb {
    /// The all-reduced gradient of the whole job's batch: every rank applies the same eps.
    Global,
    /// Each rank's own (un-reduced) gradient: per-rank sharpness (m = the rank's batch).
    Local,
}

/// SAM / ASAM hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamConfig {
    /// Radius of the perturbation (DomainBed default 0.05; ASAM typically uses ~10x more).
    pub rho: f64,
    /// `global` (all-reduced first-pass gradient) or `local` (per-rank gradient, m-sharpness).
    pub perturb: SamPerturb,
    /// ASAM: scale the perturbation element-wise by T = |theta| + eta.
    pub adaptive: bool,
    /// ASAM's offset in T = |theta| + eta.
    pub eta: f64,
}

impl Default for SamConfig {
    fn default() -> Self {
        Self { rho: 0.05, perturb: SamPerturb::Global, adaptive: false, eta: 0.01 }
    }
}

impl SamConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.rho.is_finite() && self.rho >= 0.0) {
            bail!("method.sam.rho must be a finite number >= 0, got {}", self.rho);
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            bail!("method.sam.eta must be a finite number >= 0, got {}", self.eta);
        }
        Ok(())
    }

    pub(crate) const FIELD_DOCS: &'static [(&'static str, &'static str)] = &[
        ("rho", "perturbation radius"),
        ("perturb", "\"global\": eps from the all-reduced gradient; \"local\": per-rank gradient (m-sharpness)"),
        ("adaptive", "ASAM: scale eps element-wise by T = |theta| + eta"),
        ("eta", "ASAM offset in T = |theta| + eta"),
    ];
}

pub struct Sam {
    cfg: SamConfig,
}

impl Sam {
    pub fn new(cfg: &SamConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg: cfg.clone() })
    }
}

impl Method for Sam {
    fn name(&self) -> &'static str {
        "sam"
    }

    fn cross_rank_statistics(&self) -> Vec<CrossRankStat> {
        let mut stats = Vec::new();
        if self.cfg.perturb == SamPerturb::Global {
            stats.push(CrossRankStat {
                name: "first-pass gradient",
                collective: "all_reduce_sum",
                size: "P",
                group: "world",
            });
        }
        stats.push(CrossRankStat {
            name: "perturbed gradient",
            collective: "all_reduce_sum",
            size: "P",
            group: "world",
        });
        stats.push(match self.cfg.perturb {
            SamPerturb::Global => {
                CrossRankStat { name: "loss", collective: "all_reduce_sum", size: "1", group: "world" }
            }
            SamPerturb::Local => {
                CrossRankStat { name: "loss, gradient norm", collective: "all_reduce_sum", size: "2", group: "world" }
            }
        });
        stats
    }

    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        let topology = ctx.topology;
        check_shards("sam", topology, shards)?;
        let world = topology.world;
        let (local_loss, mut grad) = concatenated_loss_and_grad(ctx.model, topology, shards)?;
        if self.cfg.perturb == SamPerturb::Global {
            all_reduce_grad(world, &mut grad, topology.bucket_bytes, "the SAM first-pass gradient")?;
        }

        let theta = ctx.model.store().flat().shallow_clone();
        let saved_theta = theta.copy();
        let grad_norm;
        {
            let _guard = tch::no_grad_guard();
            let scale = if self.cfg.adaptive { Some(theta.abs() + self.cfg.eta) } else { None };
            let scaled_grad = match &scale {
                Some(t) => t * &grad,
                None => grad.shallow_clone(),
            };
            grad_norm = scaled_grad.norm().f_double_value(&[]).context("SAM gradient norm")?;
            let factor = self.cfg.rho / (grad_norm + 1e-12);
            // eps = rho * T^2 g / (||T g|| + 1e-12) = T * (T g) * factor.
            let eps = match &scale {
                Some(t) => t * &scaled_grad * factor,
                None => &grad * factor,
            };
            let _ = theta.shallow_clone().f_add_(&eps).context("SAM: theta += eps")?;
        }

        // Second pass on the same batch at theta + eps; its loss is not reported.
        let (_, mut perturbed_grad) = concatenated_loss_and_grad(ctx.model, topology, shards)?;
        ctx.model.store().set_flat(&saved_theta).context("SAM: restoring theta")?;
        all_reduce_grad(world, &mut perturbed_grad, topology.bucket_bytes, "the SAM perturbed gradient")?;

        let device = ctx.model.store().device();
        let (loss, reported_norm) = match self.cfg.perturb {
            SamPerturb::Global => (all_reduce_scalars(world, &[local_loss], device)?[0], grad_norm),
            SamPerturb::Local => {
                // Per-rank norms differ: report their mean so that every rank logs the same value.
                let sums = all_reduce_scalars(world, &[local_loss, grad_norm], device)?;
                (sums[0], sums[1] / world.world_size() as f64)
            }
        };
        ctx.optimizer.step(ctx.model.store().flat(), &perturbed_grad)?;
        let mut extra = BTreeMap::new();
        extra.insert("sam_grad_norm".to_string(), reported_norm);
        Ok(StepStats { loss, extra })
    }
}
