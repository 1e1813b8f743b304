//! Deep CORAL (Sun & Saenko, ECCV-W 2016), as DomainBed's `CORAL`: the mean cross-entropy plus
//! gamma times the mean over domain pairs of mean((mu_i - mu_j)²) + mean((C_i - C_j)²), with mu_e and
//! C_e the mean and the (n - 1)-normalised covariance of domain e's features (the head's input).
//!
//! Sharded through [`objective`](crate::objective): the ranks sum each domain's feature sums and
//! second moments (D + D² values per domain), from which every rank forms the same means and
//! covariances; the pair terms' gradients flow back through each rank's own images.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::Pass;
use crate::objective::{objective_gradient, DomainObjective, HeadOutput};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// CORAL hyperparameters (documented in [`Coral`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoralConfig {
    pub gamma: f64,
}

impl Default for CoralConfig {
    fn default() -> Self {
        Self { gamma: 1.0 }
    }
}

pub struct Coral {
    cfg: CoralConfig,
    /// D, the feature length.
    features: i64,
    penalty: f64,
}

impl MethodDef for Coral {
    type Config = CoralConfig;
    const NAME: &'static str = "coral";
    const DOMAINBED_NAME: &'static str = "CORAL";
    const SUMMARY: &'static str =
        "Deep CORAL: cross-entropy + gamma x the distance between domains' feature means and covariances.";
    const REFERENCE: &'static str = "Sun & Saenko, ECCV 2016 workshops; DomainBed's CORAL";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[Hyperparameter::searched(
        "gamma",
        "weight of the feature mean and covariance alignment between domain pairs",
        "mmd_gamma",
        Search::LogUniform { low: -1.0, high: 1.0 },
    )];

    fn validate(cfg: &CoralConfig) -> Result<()> {
        if !(cfg.gamma.is_finite() && cfg.gamma >= 0.0) {
            bail!("key `method.coral.gamma`: must be a finite number >= 0, got {}", cfg.gamma);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &CoralConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum(
                "per-domain loss sums, feature sums and second moments",
                MessageSize::PerDomainFeatureMoments,
            ),
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
        ]
    }

    fn new(cfg: &CoralConfig, model: &dyn Model, _num_domains: usize) -> Result<Self> {
        Ok(Self { cfg: cfg.clone(), features: model.feature_dim() as i64, penalty: 0.0 })
    }
}

impl DomainObjective for Coral {
    fn width(&self, _model: &dyn Model) -> usize {
        (self.features + self.features * self.features) as usize
    }

    /// [sum_i h_i; sum_i h_i h_i^T (row-major)].
    fn statistics(&self, out: &HeadOutput, _y: &Tensor) -> Result<Tensor> {
        let h = &out.head_input;
        let second = h.tr().matmul(h).reshape([-1]);
        Tensor::f_cat(&[h.sum_dim_intlist(0, false, Kind::Float), second], 0).context("CORAL statistics")
    }

    fn objective(&mut self, sums: &Tensor, batch: usize) -> Result<Tensor> {
        if batch < 2 {
            bail!("method coral: a covariance needs at least 2 images per domain, data.batch_per_domain is {batch}");
        }
        let (k, d, n) = (sums.size()[0], self.features, batch as f64);
        let mut moments = Vec::with_capacity(k as usize);
        for e in 0..k {
            let row = sums.get(e);
            let mean = row.narrow(0, 1, d) / n;
            let outer = mean.outer(&mean) * n;
            let covariance = (row.narrow(0, 1 + d, d * d).view([d, d]) - outer) / (n - 1.0);
            moments.push((mean, covariance));
        }
        let mut penalty = Tensor::zeros([], (Kind::Double, sums.device()));
        for i in 0..moments.len() {
            for j in i + 1..moments.len() {
                let (mi, ci) = &moments[i];
                let (mj, cj) = &moments[j];
                penalty = penalty + (mi - mj).square().mean(Kind::Double) + (ci - cj).square().mean(Kind::Double);
            }
        }
        if k > 1 {
            penalty /= (k * (k - 1) / 2) as f64;
        }
        self.penalty = penalty.f_double_value(&[]).context("CORAL penalty")?;
        let cross_entropy = sums.select(1, 0).sum(Kind::Double) / (k as f64 * n);
        Ok(cross_entropy + penalty * self.cfg.gamma)
    }
}

impl Method for Coral {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("coral", ctx.topology, shards)?;
        let result = objective_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0), self)?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        Ok(StepStats { loss: result.loss, extra: [("coral_penalty".to_string(), self.penalty)].into_iter().collect() })
    }
}
