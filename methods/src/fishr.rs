//! Fishr (Rame, Dancette & Cord, ICML 2022), as DomainBed's `Fishr`: the mean cross-entropy plus
//! lambda_t times the mean over domains of mean((V_e - mean_e V_e)²), where V_e is an EMA of the
//! element-wise variance over domain e's images of the per-sample gradients of the linear head (weight
//! and bias), divided by (1 - ema) as DomainBed's `MovingAverage` returns it. lambda_t is 0 before
//! `penalty_anneal_iters` and `lambda` from then on; Adam restarts at the switch.
//!
//! The head's per-sample gradient of l_i is closed-form, g_i = (softmax(z_i) - onehot(y_i)) x [h_i, 1]
//! (what BackPACK computes), so the variance needs only the sums of g_i and of g_i² per domain: the
//! ranks sum those (2 C (D + 1) values per domain) through [`objective`](crate::objective), and every
//! rank updates the same EMAs (checkpointed).

use crate::common::{check_shards, penalty_switch};
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::Pass;
use crate::objective::{objective_gradient, DomainObjective, HeadOutput};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

const STATE_EMA: &str = "fishr.ema";

/// Fishr hyperparameters (documented in [`Fishr`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FishrConfig {
    pub lambda: f64,
    pub penalty_anneal_iters: u64,
    pub ema: f64,
}

impl Default for FishrConfig {
    fn default() -> Self {
        Self { lambda: 1000.0, penalty_anneal_iters: 1500, ema: 0.95 }
    }
}

pub struct Fishr {
    cfg: FishrConfig,
    /// C (D + 1), the head's parameter count.
    head_params: i64,
    /// `[K, C (D + 1)]` f64: each domain's EMA of its head-gradient variance (zeros before the first
    /// step, as DomainBed's first update starts from zeros).
    ema: Tensor,
    weight: f64,
    penalty: f64,
}

impl MethodDef for Fishr {
    type Config = FishrConfig;
    const NAME: &'static str = "fishr";
    const DOMAINBED_NAME: &'static str = "Fishr";
    const SUMMARY: &'static str =
        "Fishr: cross-entropy + lambda x the distance between domains' variances of per-sample head gradients.";
    const REFERENCE: &'static str = "Rame, Dancette & Cord, ICML 2022; DomainBed's Fishr";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::searched(
            "lambda",
            "weight of the gradient-variance matching (0 before penalty_anneal_iters)",
            "lambda",
            Search::LogUniform { low: 1.0, high: 4.0 },
        ),
        Hyperparameter::searched(
            "penalty_anneal_iters",
            "steps without the penalty; Adam restarts when it switches on",
            "penalty_anneal_iters",
            Search::IntUniform { low: 0.0, high: 5000.0 },
        ),
        Hyperparameter::searched(
            "ema",
            "decay of each domain's moving average of its gradient variance",
            "ema",
            Search::Uniform { low: 0.90, high: 0.99 },
        ),
    ];

    fn validate(cfg: &FishrConfig) -> Result<()> {
        if !(cfg.lambda.is_finite() && cfg.lambda >= 0.0) {
            bail!("key `method.fishr.lambda`: must be a finite number >= 0, got {}", cfg.lambda);
        }
        if !(0.0..1.0).contains(&cfg.ema) {
            bail!("key `method.fishr.ema`: must be in [0, 1), got {}", cfg.ema);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &FishrConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum(
                "per-domain loss sums and sums of per-sample head gradients and their squares",
                MessageSize::PerDomainHeadGradientMoments,
            ),
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
        ]
    }

    fn new(cfg: &FishrConfig, model: &dyn Model, num_domains: usize) -> Result<Self> {
        let head_params = (model.spec().num_classes * (model.feature_dim() + 1)) as i64;
        let ema = Tensor::zeros([num_domains as i64, head_params], (Kind::Double, model.store().device()));
        Ok(Self { cfg: cfg.clone(), head_params, ema, weight: 0.0, penalty: 0.0 })
    }
}

impl DomainObjective for Fishr {
    fn width(&self, _model: &dyn Model) -> usize {
        2 * self.head_params as usize
    }

    fn statistics(&self, out: &HeadOutput, y: &Tensor) -> Result<Tensor> {
        head_gradient_moments(out, y)
    }

    fn objective(&mut self, sums: &Tensor, batch: usize) -> Result<Tensor> {
        let (w, n) = (self.head_params, batch as f64);
        let mean = sums.narrow(1, 1, w) / n;
        let variance = sums.narrow(1, 1 + w, w) / n - mean.square();
        let ema = &self.ema * self.cfg.ema + variance * (1.0 - self.cfg.ema);
        self.ema = ema.detach().copy();
        let v = ema / (1.0 - self.cfg.ema);
        let penalty = (&v - v.mean_dim(0, true, Kind::Double)).square().mean(Kind::Double);
        self.penalty = penalty.f_double_value(&[]).context("Fishr penalty")?;
        let cross_entropy = sums.select(1, 0).sum(Kind::Double) / (sums.size()[0] as f64 * n);
        Ok(cross_entropy + penalty * self.weight)
    }
}

/// [sum_i g_i; sum_i g_i²] over the rows i of `out`, g_i the gradient of the linear head's weight and
/// bias for image i's cross-entropy: g_i = r_i x [h_i, 1] with r_i = softmax(z_i) - onehot(y_i)
/// (what BackPACK's BatchGrad computes), each `[C, D + 1]` row-major (column D: the bias).
pub(crate) fn head_gradient_moments(out: &HeadOutput, y: &Tensor) -> Result<Tensor> {
    let classes = out.logits.size()[1];
    let residual = out.logits.softmax(1, Kind::Float) - y.one_hot(classes).to_kind(Kind::Float);
    let h = &out.head_input;
    let ones = Tensor::ones([h.size()[0], 1], (Kind::Float, h.device()));
    let h1 = Tensor::f_cat(&[h, &ones], 1).context("[h, 1]")?;
    let sum = residual.tr().matmul(&h1).reshape([-1]);
    let sum_sq = residual.square().tr().matmul(&h1.square()).reshape([-1]);
    Tensor::f_cat(&[sum, sum_sq], 0).context("per-sample head gradient moments")
}

impl Method for Fishr {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("fishr", ctx.topology, shards)?;
        self.weight = penalty_switch(ctx, self.cfg.penalty_anneal_iters, 0.0, self.cfg.lambda)?;
        let result = objective_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0), self)?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        let extra = [("fishr_penalty".to_string(), self.penalty), ("fishr_weight".to_string(), self.weight)];
        Ok(StepStats { loss: result.loss, extra: extra.into_iter().collect() })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        vec![(STATE_EMA.to_string(), self.ema.shallow_clone())]
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let (_, ema) = state.iter().find(|(n, _)| n == STATE_EMA).context("method state: missing Fishr's EMA")?;
        if ema.size() != self.ema.size() {
            bail!("method state: Fishr's EMA has shape {:?}, this job needs {:?}", ema.size(), self.ema.size());
        }
        self.ema = ema.to_kind(Kind::Double).to_device(self.ema.device()).copy();
        Ok(())
    }
}
