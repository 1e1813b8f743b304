//! SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021) around Adam.
//!
//! First pass: g = grad of the ERM objective; eps = rho * T^2 g / (||T g||_2 + 1e-12) over all
//! parameters jointly (T = 1 for SAM, T = |theta| + eta for ASAM). Second pass at theta + eps on the
//! same batch; theta is restored exactly (copied back) and Adam steps with the second-pass gradient.
//! `global` perturbs with the gradient of the whole batch (a first-pass all-reduce); `local` perturbs
//! each domain's images with that domain's own gradient (domain-wise sharpness: m-sharpness with one
//! domain per perturbation), which does not depend on how domains are laid out over ranks. With one
//! domain per rank, `local` is the original multi-accelerator recipe and needs no first-pass
//! communication; a domain split over ranks sums its pieces within its domain group first.

use crate::common::check_shards;
use crate::gradients::{self, Pass};
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_collectives::{scalars, ReduceOp};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::Tensor;

/// Which gradient defines the perturbation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SamPerturb {
    /// The all-reduced gradient of the whole job's batch: every rank applies the same eps.
    Global,
    /// Each domain's own gradient, for that domain's images: domain-wise sharpness (m-sharpness with
    /// m = the domain's B images), the same on any number of ranks.
    Local,
}

/// SAM / ASAM hyperparameters (documented in [`Sam`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamConfig {
    pub rho: f64,
    pub perturb: SamPerturb,
    pub adaptive: bool,
    pub eta: f64,
}

impl Default for SamConfig {
    fn default() -> Self {
        Self { rho: 0.05, perturb: SamPerturb::Global, adaptive: false, eta: 0.01 }
    }
}

pub struct Sam {
    cfg: SamConfig,
    /// theta during the perturbed pass, kept across steps (a fresh P-sized buffer would be mapped
    /// and page-faulted every step).
    saved_theta: Option<Tensor>,
}

impl MethodDef for Sam {
    type Config = SamConfig;
    const NAME: &'static str = "sam";
    const DOMAINBED_NAME: &'static str = "SAM";
    const SUMMARY: &'static str = "Sharpness-aware minimisation (SAM/ASAM): gradient at theta + rho*g/||g||, two passes per \
                                   step; perturbation from the global or per-domain gradient.";
    const REFERENCE: &'static str = "Foret et al., ICLR 2021 (SAM); Kwon et al., ICML 2021 (ASAM)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        // DomainBed has no SAM entry; a log-uniform radius in the registry's style.
        Hyperparameter::searched("rho", "perturbation radius", "sam_rho", Search::LogUniform { low: -2.0, high: -0.5 }),
        Hyperparameter::fixed(
            "perturb",
            "\"global\": eps from the whole batch's gradient; \"local\": each domain's eps from its own gradient",
        ),
        Hyperparameter::fixed("adaptive", "ASAM: scale eps element-wise by T = |theta| + eta"),
        Hyperparameter::fixed("eta", "ASAM offset in T = |theta| + eta"),
    ];

    fn validate(cfg: &SamConfig) -> Result<()> {
        if !(cfg.rho.is_finite() && cfg.rho >= 0.0) {
            bail!("key `method.sam.rho`: must be a finite number >= 0, got {}", cfg.rho);
        }
        if !(cfg.eta.is_finite() && cfg.eta >= 0.0) {
            bail!("key `method.sam.eta`: must be a finite number >= 0, got {}", cfg.eta);
        }
        Ok(())
    }

    fn cross_rank_statistics(cfg: &SamConfig) -> Vec<CrossRankStat> {
        let perturbed = CrossRankStat::world_sum("perturbed gradient", MessageSize::PerParameter(1));
        match cfg.perturb {
            SamPerturb::Global => vec![
                CrossRankStat::world_sum("first-pass gradient", MessageSize::PerParameter(1)),
                perturbed,
                CrossRankStat::LOSS,
            ],
            SamPerturb::Local => vec![
                CrossRankStat::domain_group_sum("first-pass domain gradient (only for a domain split over ranks)"),
                perturbed,
                CrossRankStat::LOSS,
                CrossRankStat::world_sum("sum of the domains' gradient norms", MessageSize::Scalars(1)),
            ],
        }
    }

    fn new(cfg: &SamConfig, _model: &dyn Model, _num_domains: usize) -> Result<Self> {
        Ok(Self { cfg: cfg.clone(), saved_theta: None })
    }
}

/// eps = factor * direction: direction = g (SAM) or T^2 g (ASAM), factor = rho / (||T g|| + 1e-12).
struct Perturbation {
    direction: Tensor,
    factor: f64,
    /// ||T g||.
    norm: f64,
}

impl Perturbation {
    /// eps as a tensor of its own.
    fn offset(&self) -> Tensor {
        &self.direction * self.factor
    }

    /// theta += eps in one pass, without materialising eps (addcmul with the factor as a 0-dim
    /// tensor computes (direction * factor) + theta, the same rounding as adding `offset()`).
    fn add_to(&self, theta: &Tensor) -> Result<()> {
        let factor = Tensor::from(self.factor as f32);
        let _ = theta.shallow_clone().f_addcmul_(&self.direction, &factor).context("SAM: theta += eps")?;
        Ok(())
    }
}

/// The perturbation at parameters `theta` for gradient `grad`: one pass over P for SAM's norm, four
/// more for ASAM's T.
fn perturbation(cfg: &SamConfig, theta: &Tensor, grad: &Tensor) -> Result<Perturbation> {
    let _guard = tch::no_grad_guard();
    let (direction, norm) = if cfg.adaptive {
        let mut scale = theta.abs();
        let _ = scale.f_add_scalar_(cfg.eta)?;
        let scaled_grad = &scale * grad;
        let norm = scaled_grad.norm().f_double_value(&[]).context("SAM gradient norm")?;
        let _ = scale.f_mul_(&scaled_grad)?;
        (scale, norm)
    } else {
        (grad.shallow_clone(), grad.norm().f_double_value(&[]).context("SAM gradient norm")?)
    };
    Ok(Perturbation { direction, factor: cfg.rho / (norm + 1e-12), norm })
}

/// The second pass of a global SAM step: the batch gradient at theta + eps, eps from the first pass's
/// `ascent` gradient (the same on every rank), with theta restored bit for bit afterwards. Returns
/// ||T g|| and the gradient. `saved_theta` is kept across steps by the caller.
pub(crate) fn perturbed_batch_gradient(
    cfg: &SamConfig,
    saved_theta: &mut Option<Tensor>,
    ctx: &mut UpdateContext<'_>,
    shards: &[DomainShard],
    ascent: &Tensor,
) -> Result<(f64, Tensor)> {
    let theta = ctx.model.store().flat().shallow_clone();
    let perturbation = perturbation(cfg, &theta, ascent)?;
    let saved_theta = saved_theta.get_or_insert_with(|| theta.empty_like()).shallow_clone();
    tch::no_grad(|| saved_theta.shallow_clone().f_copy_(&theta)).context("SAM: saving theta")?;
    tch::no_grad(|| perturbation.add_to(&theta))?;
    // Second pass on the same batch at theta + eps; its loss is not reported.
    let second = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 1));
    ctx.model.store().set_flat(&saved_theta).context("SAM: restoring theta")?;
    Ok((perturbation.norm, second?.grad))
}

impl Method for Sam {
    fn needs_domain_gradients(&self) -> bool {
        self.cfg.perturb == SamPerturb::Local
    }

    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        let topology = ctx.topology;
        check_shards("sam", topology, shards)?;
        let theta = ctx.model.store().flat().shallow_clone();
        let (loss, reported_norm, perturbed) = match self.cfg.perturb {
            SamPerturb::Global => {
                let first = gradients::batch_gradient(ctx.model, topology, shards, &Pass::plain(ctx.step, 0))?;
                let (norm, grad) = perturbed_batch_gradient(&self.cfg, &mut self.saved_theta, ctx, shards, &first.grad)?;
                (first.loss, norm, grad)
            }
            SamPerturb::Local => {
                let first = gradients::domain_gradients(ctx.model, topology, shards, &Pass::plain(ctx.step, 0))?;
                let mut offsets: Vec<Option<Tensor>> = (0..topology.num_domains()).map(|_| None).collect();
                let mut norms = 0.0;
                for domain in &first.domains {
                    let perturbation = perturbation(&self.cfg, &theta, &domain.grad)?;
                    offsets[domain.domain] = Some(tch::no_grad(|| perturbation.offset()));
                    if domain.leader {
                        norms += perturbation.norm;
                    }
                }
                if !first.replicated {
                    norms = scalars::all_reduce_f64(topology.world, &[norms], ReduceOp::Sum)
                        .context("all-reduce of the SAM gradient norms")?[0];
                }
                let pass = Pass { step: ctx.step, index: 1, offsets: Some(&offsets) };
                let second = gradients::batch_gradient(ctx.model, topology, shards, &pass)?;
                // The mean over domains, so that every rank logs the same value.
                (first.loss, norms / topology.num_domains() as f64, second.grad)
            }
        };
        ctx.optimizer.step(ctx.model.store().flat(), &perturbed)?;
        let mut extra = BTreeMap::new();
        extra.insert("sam_grad_norm".to_string(), reported_norm);
        Ok(StepStats { loss, extra })
    }
}
