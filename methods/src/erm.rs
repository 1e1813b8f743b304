//! ERM: minimise the mean cross-entropy over all training domains, L = (1/K) sum_e L_e. One forward
//! on all of this rank's shards concatenated (as DomainBed's ERM does), one backward, a world SUM
//! all-reduce of the flat gradient (each rank's loss is already scaled by 1/(K*B)), one Adam step.

use crate::common::{all_reduce_grad, all_reduce_scalars, check_shards, concatenated_loss_and_grad};
use crate::{CrossRankStat, DomainShard, Method, StepStats, UpdateContext};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// ERM has no hyperparameters of its own (the optimizer's are under `optimizer`).
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
        let topology = ctx.topology;
        check_shards("erm", topology, shards)?;
        let (local_loss, mut grad) = concatenated_loss_and_grad(ctx.model, topology, shards)?;
        all_reduce_grad(topology.world, &mut grad, topology.bucket_bytes, "the ERM gradient")?;
        let device = ctx.model.store().device();
        let loss = all_reduce_scalars(topology.world, &[local_loss], device)?[0];
        ctx.optimizer.step(ctx.model.store().flat(), &grad)?;
        Ok(StepStats { loss, extra: Default::default() })
    }
}
