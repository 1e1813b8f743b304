//! Training methods. Each method is one small type with one [`Method::update`] per step (DomainBed's
//! `update(minibatches)` contract) that also declares the statistics it exchanges across ranks.
//!
//! Domains are sharded across ranks by the trainer: a rank receives [`DomainShard`]s, each a slice
//! of one training domain's per-step minibatch. A method must produce the same update whatever the
//! sharding: per-domain quantities are assembled exactly from the shards through the
//! [`Topology`]'s communicators.

pub mod adam;
mod common;
pub mod dsp_reg;
pub mod erm;
pub mod registry;
pub mod sam;

pub use adam::{Adam, AdamConfig};
pub use dsp_reg::{DspReg, DspRegConfig};
pub use erm::{Erm, ErmConfig};
pub use registry::{available, build, describe, MethodConfig, MethodInfo};
pub use sam::{Sam, SamConfig, SamPerturb};

use anyhow::Result;
use mgrun_collectives::Communicator;
use mgrun_models::Model;
use std::collections::BTreeMap;
use tch::Tensor;

/// This rank's part of one training domain's minibatch for the current step.
pub struct DomainShard {
    /// Index of the domain among the *training* domains, `0..num_domains`.
    pub domain: usize,
    /// Images `[n, 3, H, W]` and labels `[n]` (int64), on the training device.
    pub x: Tensor,
    pub y: Tensor,
}

/// How domains are laid out over the ranks of the job.
pub struct Topology<'a> {
    /// All ranks of the job.
    pub world: &'a dyn Communicator,
    /// When one domain is split over several ranks (world size >= number of domains): the ranks
    /// holding the same domain as this rank. `None` when this rank holds whole domains.
    pub domain_group: Option<&'a dyn Communicator>,
    /// Number of training domains K.
    pub num_domains: usize,
    /// Images per domain per step over the whole job, B (each shard holds part of them).
    pub batch_per_domain: usize,
    /// Largest gradient bucket for one collective, bytes (`comm.bucket_mb`).
    pub bucket_bytes: usize,
    /// Reproducible mode (`train.deterministic`): cross-domain statistics are summed in f64, where
    /// the sum of a few f32 values is exact, so they do not depend on how domains are laid out
    /// over ranks (the order of the reduction).
    pub deterministic: bool,
}

impl Topology<'_> {
    /// True when this rank contributes its domain's statistics to world-level sums: always for
    /// whole domains, and for the lowest rank of a domain group.
    pub fn is_domain_leader(&self) -> bool {
        self.domain_group.is_none_or(|g| g.rank() == 0)
    }
}

/// Everything an update may touch.
pub struct UpdateContext<'a> {
    pub model: &'a mut dyn Model,
    pub optimizer: &'a mut Adam,
    pub topology: &'a Topology<'a>,
    /// 0-based index of this step and the run's total number of steps (for warm-up schedules).
    pub step: u64,
    pub total_steps: u64,
}

/// What one update reports; identical on every rank.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Mean cross-entropy over all domains' minibatches (the objective ERM minimises).
    pub loss: f64,
    /// Method-specific scalars (e.g. `dsp_lambda`, `sam_grad_norm`).
    pub extra: BTreeMap<String, f64>,
}

/// A statistic that a method reduces across ranks, for documentation, logs and benchmarks.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossRankStat {
    pub name: &'static str,
    /// "all_reduce_sum", "all_reduce_avg", ...
    pub collective: &'static str,
    /// Size of the message: "P" (one value per parameter), "2P", "1" ...
    pub size: &'static str,
    /// The communicator it runs on: "world" or "domain_group".
    pub group: &'static str,
}

pub trait Method: Send {
    fn name(&self) -> &'static str;
    /// Statistics exchanged across ranks at every step.
    fn cross_rank_statistics(&self) -> Vec<CrossRankStat>;
    /// One optimisation step from this rank's shards (zero_grad, backward(s), collectives,
    /// optimizer step). Every rank calls it at every step.
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats>;
    /// Extra fields for the evaluation records in results.jsonl (e.g. DSP-Reg's per-layer
    /// sensitivity summaries). Empty by default.
    fn summaries(&self, _model: &dyn Model) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }
    /// Optional per-parameter tensors to save at each evaluation (e.g. DSP-Reg's sensitivity with
    /// `dump_sensitivity`), with the parameters' names and shapes.
    fn evaluation_dump(&self, _model: &dyn Model) -> Result<Option<Vec<(String, Tensor)>>> {
        Ok(None)
    }
    /// Method state to checkpoint (moving averages, anchors), as named tensors.
    fn state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Restores what [`Method::state`] returned.
    fn load_state(&mut self, _state: &[(String, Tensor)]) -> Result<()> {
        Ok(())
    }
}
