//! GroupDRO (Sagawa et al., ICLR 2020), as DomainBed's `GroupDRO`: weights q over the domains,
//! q_e <- q_e exp(eta L_e) then normalised, every step; the loss is sum_e q_e L_e with the updated
//! q (held constant in the gradient).
//!
//! Sharded through [`objective`](crate::objective): the ranks sum their domains' loss sums (K
//! scalars), so every rank applies the same update to its copy of q (checkpointed).

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::Pass;
use crate::objective::{objective_gradient, DomainObjective};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

const STATE_Q: &str = "group_dro.q";

/// GroupDRO hyperparameters (documented in [`GroupDro`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupDroConfig {
    pub eta: f64,
}

impl Default for GroupDroConfig {
    fn default() -> Self {
        Self { eta: 0.01 }
    }
}

pub struct GroupDro {
    cfg: GroupDroConfig,
    /// The domains' weights, ones at the start as in DomainBed (normalised after the first update).
    q: Vec<f64>,
}

impl MethodDef for GroupDro {
    type Config = GroupDroConfig;
    const NAME: &'static str = "group_dro";
    const DOMAINBED_NAME: &'static str = "GroupDRO";
    const SUMMARY: &'static str =
        "Group distributionally robust optimisation: domain losses weighted by q, which grows with exp(eta x loss).";
    const REFERENCE: &'static str = "Sagawa et al., ICLR 2020; DomainBed's GroupDRO";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[Hyperparameter::searched(
        "eta",
        "step size of the exponentiated-gradient update of the domain weights q",
        "groupdro_eta",
        Search::LogUniform { low: -3.0, high: -1.0 },
    )];

    fn validate(cfg: &GroupDroConfig) -> Result<()> {
        if !(cfg.eta.is_finite() && cfg.eta >= 0.0) {
            bail!("key `method.group_dro.eta`: must be a finite number >= 0, got {}", cfg.eta);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &GroupDroConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("per-domain loss sums", MessageSize::PerDomain(1)),
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
        ]
    }

    fn new(cfg: &GroupDroConfig, _model: &dyn Model, num_domains: usize) -> Result<Self> {
        Ok(Self { cfg: cfg.clone(), q: vec![1.0; num_domains] })
    }
}

impl DomainObjective for GroupDro {
    fn width(&self, _model: &dyn Model) -> usize {
        0
    }

    fn objective(&mut self, sums: &Tensor, batch: usize) -> Result<Tensor> {
        let losses = sums.select(1, 0) / batch as f64;
        let values = Vec::<f64>::try_from(&losses.detach()).context("GroupDRO: reading the domains' losses")?;
        if values.len() != self.q.len() {
            bail!("GroupDRO: {} domain losses for {} weights", values.len(), self.q.len());
        }
        for (q, loss) in self.q.iter_mut().zip(&values) {
            *q *= (self.cfg.eta * loss).exp();
        }
        let total: f64 = self.q.iter().sum();
        for q in &mut self.q {
            *q /= total;
        }
        let q = Tensor::from_slice(&self.q).to_device(losses.device());
        Ok((losses * q).sum(Kind::Double))
    }
}

impl Method for GroupDro {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("group_dro", ctx.topology, shards)?;
        let result = objective_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0), self)?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        let q_max = self.q.iter().copied().fold(0.0, f64::max);
        let extra = [("group_dro_q_max".to_string(), q_max), ("group_dro_loss".to_string(), result.objective)];
        Ok(StepStats { loss: result.loss, extra: extra.into_iter().collect() })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        vec![(STATE_Q.to_string(), Tensor::from_slice(&self.q))]
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let (_, q) = state.iter().find(|(n, _)| n == STATE_Q).context("method state: missing GroupDRO's q")?;
        let q = Vec::<f64>::try_from(&q.to_kind(Kind::Double).reshape([-1])).context("method state: GroupDRO's q")?;
        if q.len() != self.q.len() {
            bail!("method state: GroupDRO's q has {} weights, the job has {} training domains", q.len(), self.q.len());
        }
        self.q = q;
        Ok(())
    }
}
