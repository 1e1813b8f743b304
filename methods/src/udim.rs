//! UDIM, unknown-domain inconsistency minimisation (Shin, Bae, Na, Kim & Moon, ICLR 2024): after a
//! plain-SAM warm-up, each step
//! 1. perturbs every training image towards an "unknown domain":
//!    x~ = x + syn_lr * grad_x L_syn / ||grad_x L_syn|| with L_syn = CE + rho_syn ||grad_theta CE||
//!    (a double backward through the network);
//! 2. takes SAM's gradient on the source images at theta + rho g/||g||;
//! 3. adds `weight` x the gradient of the inconsistency I between the source and perturbed images'
//!    per-sample gradients of the linear head (variances centred on the source mean, as the code
//!    does): I = 1/2 sum_G mean((v_G - (v_src + v_syn)/2)²) + sum_params mean_n ||g_n^syn||² / dim(param),
//!    per training domain and summed (`domain_wise = true`) or over the whole batch.
//!
//! Departures from the published code (`iada_final.py`), each the paper's rule: SAM's eps comes from the
//! whole batch's gradient (the code's DDP path overwrites the synchronised gradient, so its eps and
//! update are per rank); the input gradient is normalised per image (the code normalises over the
//! batch axis, `F.normalize(dim=0)`); the warm-up is this run's first `warmup_frac` of the steps
//! (the code trains SAM in a separate run and restarts from its best checkpoint).
//!
//! Sharded: ||grad_theta CE|| of the whole batch needs the all-reduced gradient g, after which each
//! image's x~ is local (the derivative of rho_syn ||g|| for image i is rho_syn <g/||g||, d g_i/d x_i>);
//! the inconsistency goes through [`objective`](crate::objective) with each image paired with its x~
//! (the ranks sum 4 C (D + 1) head-gradient moments per domain).

use crate::common::{check_shards, shard_len};
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::fishr::head_gradient_moments;
use crate::gradients::{self, for_each_unit, Pass};
use crate::objective::{paired_objective_gradient, DomainObjective, HeadOutput};
use crate::sam::{perturbed_batch_gradient, SamConfig, SamPerturb};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// UDIM hyperparameters (documented in [`Udim`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UdimConfig {
    pub rho: f64,
    pub rho_syn: f64,
    pub syn_lr: f64,
    pub weight: f64,
    pub warmup_frac: f64,
    pub domain_wise: bool,
}

impl Default for UdimConfig {
    /// The published PACS scripts: rho = rho_syn = 0.05, syn_lr 10, worst_weight 1, warm-up ratio 5.
    fn default() -> Self {
        Self { rho: 0.05, rho_syn: 0.05, syn_lr: 10.0, weight: 1.0, warmup_frac: 0.2, domain_wise: true }
    }
}

pub struct Udim {
    cfg: UdimConfig,
    /// C (D + 1), the head's parameter count, and C.
    head_params: i64,
    classes: i64,
    inconsistency: f64,
    saved_theta: Option<Tensor>,
}

impl MethodDef for Udim {
    type Config = UdimConfig;
    const NAME: &'static str = "udim";
    const DOMAINBED_NAME: &'static str = "UDIM";
    const SUMMARY: &'static str = "Unknown-domain inconsistency minimisation: SAM plus the mismatch of head-gradient \
                                   statistics between images and their loss-ascent perturbations (after a SAM warm-up).";
    const REFERENCE: &'static str = "Shin, Bae, Na, Kim & Moon, ICLR 2024 (aailabkaist/UDIM)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::fixed("rho", "SAM radius on the source images (and during the warm-up)"),
        Hyperparameter::fixed("rho_syn", "weight of ||grad_theta CE|| in the loss the images ascend"),
        Hyperparameter::fixed("syn_lr", "length of the (per-image normalised) input perturbation step"),
        Hyperparameter::fixed("weight", "weight of the inconsistency gradient (the code's worst_weight)"),
        Hyperparameter::fixed("warmup_frac", "fraction of the steps trained with plain SAM first"),
        Hyperparameter::fixed("domain_wise", "inconsistency per training domain, summed (else over the batch)"),
    ];

    fn validate(cfg: &UdimConfig) -> Result<()> {
        for (field, value) in
            [("rho", cfg.rho), ("rho_syn", cfg.rho_syn), ("syn_lr", cfg.syn_lr), ("weight", cfg.weight)]
        {
            if !(value.is_finite() && value >= 0.0) {
                bail!("key `method.udim.{field}`: must be a finite number >= 0, got {value}");
            }
        }
        if !(0.0..=1.0).contains(&cfg.warmup_frac) {
            bail!("key `method.udim.warmup_frac`: must be in [0, 1], got {}", cfg.warmup_frac);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &UdimConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("first-pass gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum(
                "per-domain head-gradient moments of the images and of their perturbations",
                MessageSize::PerDomainHeadGradientMoments,
            ),
            CrossRankStat::world_sum("inconsistency gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum("perturbed gradient", MessageSize::PerParameter(1)),
            CrossRankStat::LOSS,
        ]
    }

    fn new(cfg: &UdimConfig, model: &dyn Model, _num_domains: usize) -> Result<Self> {
        let classes = model.spec().num_classes as i64;
        let head_params = classes * (model.feature_dim() as i64 + 1);
        Ok(Self { cfg: cfg.clone(), head_params, classes, inconsistency: 0.0, saved_theta: None })
    }
}

impl DomainObjective for Udim {
    fn width(&self, _model: &dyn Model) -> usize {
        4 * self.head_params as usize
    }

    /// [moments of the images' head gradients; moments of their perturbations'] (rows: n images, then
    /// their n perturbations).
    fn statistics(&self, out: &HeadOutput, y: &Tensor) -> Result<Tensor> {
        let n = y.size()[0] / 2;
        let half = |start: i64| -> Result<Tensor> {
            let rows = HeadOutput {
                head_input: out.head_input.narrow(0, start, n),
                logits: out.logits.narrow(0, start, n),
            };
            head_gradient_moments(&rows, &y.narrow(0, start, n))
        };
        Tensor::f_cat(&[half(0)?, half(n)?], 0).context("UDIM statistics")
    }

    fn objective(&mut self, sums: &Tensor, batch: usize) -> Result<Tensor> {
        let (sums, n) = if self.cfg.domain_wise {
            (sums.shallow_clone(), batch as f64)
        } else {
            (sums.sum_dim_intlist(0, true, Kind::Double), (batch * sums.size()[0] as usize) as f64)
        };
        let w = self.head_params;
        let part = |i: i64| sums.narrow(1, 1 + i * w, w) / n;
        let (mean_src, sq_src, mean_syn, sq_syn) = (part(0), part(1), part(2), part(3));
        let var_src = &sq_src - mean_src.square();
        // The perturbed images' variance is centred on the source mean, as in the published code.
        let var_syn = &sq_syn - &mean_syn * &mean_src * 2.0 + mean_src.square();
        let middle = (&var_src + &var_syn) * 0.5;
        let spread = ((&var_src - &middle).square().mean_dim(1, false, Kind::Double)
            + (&var_syn - &middle).square().mean_dim(1, false, Kind::Double))
            * 0.5;
        // sum_params mean_n ||g_n^syn||² / dim: the weight's C D elements and the bias's C (column D).
        let per_class = sq_syn.view([sq_syn.size()[0], self.classes, -1]);
        let features = per_class.size()[2] - 1;
        let weight_norm = per_class.narrow(2, 0, features).sum_dim_intlist([1, 2].as_slice(), false, Kind::Double)
            / (self.classes * features) as f64;
        let bias_norm =
            per_class.narrow(2, features, 1).sum_dim_intlist([1, 2].as_slice(), false, Kind::Double) / self.classes as f64;
        let inconsistency = (spread + weight_norm + bias_norm).sum(Kind::Double);
        self.inconsistency = inconsistency.f_double_value(&[]).context("UDIM inconsistency")?;
        Ok(inconsistency * self.cfg.weight)
    }
}

impl Udim {
    /// x~ for every image of every shard (see the module docs); `direction` = g/||g|| of the whole batch.
    fn perturbed_inputs(
        &self,
        ctx: &mut UpdateContext<'_>,
        shards: &[DomainShard],
        direction: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let topology = ctx.topology;
        let scale = 1.0 / (topology.num_domains() * topology.batch_per_domain()) as f64;
        let out: Vec<Tensor> = shards.iter().map(|s| s.x.zeros_like()).collect();
        let pass = Pass::plain(ctx.step, 2);
        if topology.exact.is_some() {
            for_each_unit(ctx.model, topology, shards, &pass, |model, unit| {
                let perturbed = self.perturb(model, &unit.x, &unit.y, direction, scale)?;
                out[unit.shard].narrow(0, unit.start, unit.x.size()[0]).f_copy_(&perturbed)?;
                Ok(())
            })?;
        } else {
            for (shard, target) in shards.iter().zip(&out) {
                if shard_len(shard) > 0 {
                    target.shallow_clone().f_copy_(&self.perturb(ctx.model, &shard.x, &shard.y, direction, scale)?)?;
                }
            }
        }
        Ok(out)
    }

    /// x + syn_lr * v / ||v|| per image, v = grad_x [scale * CE_sum + rho_syn <direction, grad_theta(scale * CE_sum)>].
    fn perturb(&self, model: &mut dyn Model, x: &Tensor, y: &Tensor, direction: &Tensor, scale: f64) -> Result<Tensor> {
        let input = x.detach().set_requires_grad(true);
        let loss = model
            .forward_t(&input, true)
            .f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)
            .context("UDIM: cross-entropy of the images to perturb")?
            * scale;
        let store = model.store();
        let params: Vec<Tensor> = store.params().iter().map(|p| p.tensor.shallow_clone()).collect();
        let grads = Tensor::f_run_backward(&[&loss], &params, true, true).context("UDIM: grad_theta with its graph")?;
        // <direction, grad_theta>, which has the gradient of ||grad_theta|| at direction = g/||g||.
        let projections: Vec<Tensor> =
            store.params().iter().zip(&grads).map(|(param, grad)| (param.unflatten(direction) * grad).sum(Kind::Float)).collect();
        let projection = Tensor::f_stack(&projections, 0).context("UDIM: <direction, grad_theta>")?.sum(Kind::Float);
        let ascent = loss + projection * self.cfg.rho_syn;
        let input_grad = Tensor::f_run_backward(&[&ascent], &[&input], false, false)
            .context("UDIM: gradient of the ascent loss with respect to the images")?
            .remove(0);
        let norms = input_grad.flatten(1, -1).norm_scalaropt_dim(2, [1].as_slice(), false).clamp_min(1e-12);
        let shape: Vec<i64> = std::iter::once(-1).chain(std::iter::repeat_n(1, x.dim() - 1)).collect();
        Ok(x.detach() + input_grad / norms.view(shape.as_slice()) * self.cfg.syn_lr)
    }
}

impl Method for Udim {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("udim", ctx.topology, shards)?;
        let sam = SamConfig { rho: self.cfg.rho, perturb: SamPerturb::Global, ..SamConfig::default() };
        let warmup = (self.cfg.warmup_frac * ctx.total_steps as f64).round() as u64;
        let first = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        let mut extra = std::collections::BTreeMap::new();
        let grad = if ctx.step < warmup {
            let (norm, grad) = perturbed_batch_gradient(&sam, &mut self.saved_theta, ctx, shards, &first.grad)?;
            extra.insert("sam_grad_norm".to_string(), norm);
            extra.insert("udim_inconsistency".to_string(), 0.0);
            grad
        } else {
            // The first-pass gradient aliases the gradient buffer, which the passes below overwrite.
            let batch_grad = first.grad.copy();
            let norm = batch_grad.norm().f_double_value(&[]).context("UDIM: gradient norm")?;
            let direction = &batch_grad / (norm + 1e-12);
            let perturbed = self.perturbed_inputs(ctx, shards, &direction)?;
            let pass = Pass::plain(ctx.step, 3);
            let inconsistency = paired_objective_gradient(ctx.model, ctx.topology, shards, Some(&perturbed), &pass, self)?;
            let inconsistency_grad = inconsistency.grad.copy();
            let (norm, grad) = perturbed_batch_gradient(&sam, &mut self.saved_theta, ctx, shards, &batch_grad)?;
            extra.insert("sam_grad_norm".to_string(), norm);
            extra.insert("udim_inconsistency".to_string(), self.inconsistency);
            grad + inconsistency_grad
        };
        ctx.optimizer.step(ctx.model.store().flat(), &grad)?;
        Ok(StepStats { loss: first.loss, extra })
    }
}
