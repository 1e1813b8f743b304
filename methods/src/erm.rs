//! ERM: minimise the mean cross-entropy over all training domains, L = (1/K) sum_e L_e. The batch
//! gradient of [`gradients::batch_gradient`]: on the fast path one forward on all of this rank's
//! images concatenated (as DomainBed's ERM does), one backward and a world SUM all-reduce, whatever
//! domains the images come from; then one Adam step.

use crate::common::check_shards;
use crate::gradients::{self, Pass};
use crate::{CrossRankStat, DomainShard, Method, StepStats, UpdateContext};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// ERM has no hyperparameters of its own (the learning rate and weight decay are `train.*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ErmConfig {}

#[derive(Debug, Default)]
pub struct Erm;

impl Erm {
    pub fn new(_cfg: &ErmConfig) -> Self {
        Self
    }
}

impl Method for Erm {
    fn name(&self) -> &'static str {
        "erm"
    }

    fn cross_rank_statistics(&self) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat { name: "gradient", collective: "all_reduce_sum", size: "P", group: "world" },
            CrossRankStat { name: "loss", collective: "all_reduce_sum", size: "1", group: "world" },
        ]
    }

    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("erm", ctx.topology, shards)?;
        let batch = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        ctx.optimizer.step(ctx.model.store().flat(), &batch.grad)?;
        Ok(StepStats { loss: batch.loss, extra: Default::default() })
    }
}
