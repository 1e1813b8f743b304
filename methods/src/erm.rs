//! ERM: minimise the mean cross-entropy over all training domains, L = (1/K) sum_e L_e. The batch
//! gradient of [`gradients::batch_gradient`]: on the fast path one forward on all of this rank's
//! images concatenated (as DomainBed's ERM does), one backward and a world SUM all-reduce, whatever
//! domains the images come from; then one Adam step.

use crate::common::check_shards;
use crate::gradients::{self, Pass};
use crate::descriptor::{CrossRankStat, MessageSize, MethodDef};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::Result;
use mgrun_models::Model;
use serde::{Deserialize, Serialize};

/// ERM has no hyperparameters of its own (the learning rate and weight decay are `train.*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErmConfig {}

#[derive(Debug, Default)]
pub struct Erm;

impl MethodDef for Erm {
    type Config = ErmConfig;
    const NAME: &'static str = "erm";
    const DOMAINBED_NAME: &'static str = "ERM";
    const SUMMARY: &'static str =
        "Empirical risk minimisation: mean cross-entropy over all training domains, one backward per step.";
    const REFERENCE: &'static str = "Vapnik 1998; DomainBed's ERM (Gulrajani & Lopez-Paz, ICLR 2021)";
    const HYPERPARAMETERS: &'static [crate::Hyperparameter] = &[];

    fn cross_rank_statistics(_config: &ErmConfig) -> Vec<CrossRankStat> {
        vec![CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)), CrossRankStat::LOSS]
    }

    fn new(_config: &ErmConfig, _model: &dyn Model, _num_domains: usize) -> Result<Self> {
        Ok(Self)
    }
}

impl Method for Erm {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("erm", ctx.topology, shards)?;
        let batch = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        ctx.optimizer.step(ctx.model.store().flat(), &batch.grad)?;
        Ok(StepStats { loss: batch.loss, extra: Default::default() })
    }
}
