//! AdvStyle, adversarial style augmentation (Zhong, Zhao, Lee, Sebe; NeurIPS 2022;
//! YBZh/AdvStyle), as ERM plus its augmentation: per image and channel of the (normalised) input,
//! μ = mean_HW x, σ = sqrt(var_HW x + 1e-5) (`var` unbiased, torch's default as in the published
//! code), x_n = (x - μ)/σ; one gradient-ascent step of size `lr` on the cross-entropy with respect to
//! (μ, σ) of x_n σ + μ gives (μ', σ'), and the step trains on [x; x_n σ' + μ'] with labels [y; y]:
//! L = (1/2KB) sum_i (CE(x_i) + CE(x_adv_i)).
//!
//! The ascent's loss is the mean cross-entropy over the job's batch (the published code uses its
//! per-GPU batch, which would make the step depend on the world size): since μ and σ are per image,
//! each image's statistics move by lr/(KB) times its own loss's gradient. The ascent is a forward and
//! backward over this rank's images (per unit in deterministic mode, so the same bits at any world
//! size) with respect to the statistics only; the parameters' gradient is then that of the training
//! loss. The step reports the clean images' cross-entropy as `loss`.

use crate::common::{check_shards, shard_len};
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::elr::{per_image_gradient, ImageTerms};
use crate::gradients::{for_each_unit, Pass};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// AdvStyle hyperparameters (documented in [`AdvStyle`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdvStyleConfig {
    pub lr: f64,
}

impl Default for AdvStyleConfig {
    /// The classification port's default (the paper's value was not found).
    fn default() -> Self {
        Self { lr: 1.0 }
    }
}

pub struct AdvStyle {
    cfg: AdvStyleConfig,
}

/// Added to the variance, as in the published code.
const EPS: f64 = 1e-5;

impl MethodDef for AdvStyle {
    type Config = AdvStyleConfig;
    const NAME: &'static str = "advstyle";
    const DOMAINBED_NAME: &'static str = "AdvStyle";
    const SUMMARY: &'static str =
        "ERM on each image and a copy whose channel mean/std took one adversarial ascent step.";
    const REFERENCE: &'static str = "Zhong et al., NeurIPS 2022 (YBZh/AdvStyle), one ascent step";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[Hyperparameter::fixed(
        "lr",
        "step size of the ascent on the images' channel mean and std (on the batch's mean cross-entropy), >= 0",
    )];

    fn validate(cfg: &AdvStyleConfig) -> Result<()> {
        if !(cfg.lr.is_finite() && cfg.lr >= 0.0) {
            bail!("key `method.advstyle.lr`: must be a finite number >= 0, got {}", cfg.lr);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &AdvStyleConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum("loss and objective", MessageSize::Scalars(2)),
        ]
    }

    fn new(cfg: &AdvStyleConfig, _model: &dyn Model, _num_domains: usize) -> Result<Self> {
        Ok(Self { cfg: cfg.clone() })
    }
}

/// The restyled images of `x` after one ascent step of `lr` on `scale` x their summed cross-entropy.
fn restyle(model: &dyn Model, x: &Tensor, y: &Tensor, lr: f64, scale: f64) -> Result<Tensor> {
    let (mu, sigma, normed) = {
        let _guard = tch::no_grad_guard();
        let mu = x.mean_dim(&[2i64, 3][..], true, Kind::Float);
        let var = x.var_dim(&[2i64, 3][..], true, true);
        let sigma = (var + EPS).sqrt();
        let normed = (x - &mu) / &sigma;
        (mu, sigma, normed)
    };
    let mu = mu.detach().set_requires_grad(true);
    let sigma = sigma.detach().set_requires_grad(true);
    let styled = &normed * &sigma + &mu;
    let loss =
        model.forward_t(&styled, true).f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)? * scale;
    let grads = Tensor::f_run_backward(&[&loss], &[&mu, &sigma], false, false)
        .context("gradient of the cross-entropy with respect to the images' style")?;
    let _guard = tch::no_grad_guard();
    let mu = mu.detach() + &grads[0] * lr;
    let sigma = sigma.detach() + &grads[1] * lr;
    Ok(normed * sigma + mu)
}

impl Method for AdvStyle {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("advstyle", ctx.topology, shards)?;
        let topology = ctx.topology;
        let scale = 1.0 / (topology.num_domains() * topology.batch_per_domain()) as f64;
        let lr = self.cfg.lr;
        // Pass 0: the ascent, per unit (exact path) or over this rank's images.
        let mut adversarial: Vec<Tensor> = shards.iter().map(|s| s.x.zeros_like()).collect();
        let ascent = Pass::plain(ctx.step, 0);
        if topology.exact.is_some() {
            for_each_unit(ctx.model, topology, shards, &ascent, |model, unit| {
                let styled = restyle(&*model, &unit.x, &unit.y, lr, scale)?;
                let n = unit.x.size()[0];
                adversarial[unit.shard].narrow(0, unit.start, n).f_copy_(&styled)?;
                Ok(())
            })?;
        } else {
            let nonempty: Vec<usize> = (0..shards.len()).filter(|&i| shard_len(&shards[i]) > 0).collect();
            if !nonempty.is_empty() {
                let xs: Vec<&Tensor> = nonempty.iter().map(|&i| &shards[i].x).collect();
                let ys: Vec<&Tensor> = nonempty.iter().map(|&i| &shards[i].y).collect();
                let x = Tensor::f_cat(&xs, 0).context("concatenating the shards' images")?;
                let y = Tensor::f_cat(&ys, 0).context("concatenating the shards' labels")?;
                let styled = restyle(&*ctx.model, &x, &y, lr, scale)?;
                let mut start = 0;
                for &i in &nonempty {
                    let n = shard_len(&shards[i]);
                    adversarial[i] = styled.narrow(0, start, n).copy();
                    start += n;
                }
            }
        }
        // Pass 1: the training loss on [x; x_adv], halved per image so that it is the mean over 2KB.
        let train = Pass::plain(ctx.step, 1);
        let result = per_image_gradient(ctx.model, topology, shards, &adversarial, &train, |model, x, y, x_adv| {
            let n = x.size()[0];
            let logits = model.forward_t(&Tensor::f_cat(&[x, x_adv], 0)?, true);
            let ce = |part: Tensor| part.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0);
            let clean = ce(logits.narrow(0, 0, n))?;
            let styled = ce(logits.narrow(0, n, n))?;
            let erm = clean.f_double_value(&[]).context("reading the cross-entropy")?;
            Ok(ImageTerms { objective: (clean + styled) * 0.5, erm, records: None })
        })?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        let extra = [("advstyle_objective".to_string(), result.objective)];
        Ok(StepStats { loss: result.loss, extra: extra.into_iter().collect() })
    }
}
