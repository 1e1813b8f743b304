//! Training methods. Each method is one small type with one [`Method::update`] per step (DomainBed's
//! `update(minibatches)` contract) that also declares the statistics it exchanges across ranks.
//!
//! Domains are sharded across ranks by the trainer ([`sharding`]): a rank receives [`DomainShard`]s,
//! each a slice of one training domain's per-step minibatch. A method must produce the same update
//! whatever the sharding: it asks [`gradients`] for the gradients it needs, which assembles them
//! exactly from the shards through the [`Topology`]'s communicators (and, in deterministic mode,
//! bit for bit the same on any number of ranks).

pub mod adam;
mod common;
pub mod descriptor;
pub mod gradients;
pub mod moments;
pub mod objective;
pub mod overlap;
pub mod registry;
pub mod sharding;

/// Declares each method's module and lists its descriptor in [`METHODS`]: adding a method is a new
/// file `src/<module>.rs` with a type implementing [`MethodDef`], plus one line here.
macro_rules! methods {
    ($($module:ident :: $method:ident),* $(,)?) => {
        $(pub mod $module;)*
        /// Every method, in the order `mgrun methods` lists them.
        pub const METHODS: &[MethodDescriptor] = &[$(MethodDescriptor::of::<$module::$method>()),*];
    };
}

methods! {
    erm::Erm,
    sam::Sam,
    dsp_reg::DspReg,
    vrex::Vrex,
    group_dro::GroupDro,
    coral::Coral,
    fishr::Fishr,
    disam::Disam,
    tram::Tram,
    udim::Udim,
    ocnn::Ocnn,
    elr::Elr,
    ps_kd::PsKd,
    advstyle::AdvStyle,
    mixup::Mixup,
    weight_compander::WeightCompander,
}

pub use adam::{Adam, AdamConfig};
pub use advstyle::{AdvStyle, AdvStyleConfig};
pub use coral::{Coral, CoralConfig};
pub use descriptor::{CrossRankStat, Hyperparameter, MethodDef, MethodDescriptor, Search};
pub use disam::{Disam, DisamConfig};
pub use dsp_reg::{DspReg, DspRegConfig};
pub use elr::{Elr, ElrConfig};
pub use erm::{Erm, ErmConfig};
pub use fishr::{Fishr, FishrConfig};
pub use group_dro::{GroupDro, GroupDroConfig};
pub use mixup::{Mixup, MixupConfig, MixupTransport};
pub use ocnn::{Ocnn, OcnnConfig};
pub use ps_kd::{PsKd, PsKdConfig};
pub use registry::{available, build, descriptor, MethodConfig};
pub use sam::{Sam, SamConfig, SamPerturb};
pub use sharding::{domain_groups, DomainGroup, Piece, ShardingPlan};
pub use tram::{Tram, TramConfig, TramTarget};
pub use udim::{Udim, UdimConfig};
pub use vrex::{Vrex, VrexConfig};
pub use weight_compander::{CompanderVariant, WeightCompander, WeightCompanderConfig};

use anyhow::Result;
use mgrun_collectives::Communicator;
use mgrun_models::Model;
use std::collections::BTreeMap;
use tch::Tensor;

/// This rank's part of one training domain's minibatch for the current step: one [`Piece`] of the
/// sharding plan with its images.
pub struct DomainShard {
    /// Index of the domain among the *training* domains, `0..num_domains`.
    pub domain: usize,
    /// Position of the first image in the domain's per-step batch (the piece's `lo`).
    pub offset: usize,
    /// Images `[n, 3, H, W]` and labels `[n]` (int64), on the training device.
    pub x: Tensor,
    pub y: Tensor,
    /// `[n]` int64 on the training device: each image's index in its domain's file list, the key
    /// of per-sample state (PS-KD, ELR); `None` where images do not come from a dataset.
    pub ids: Option<Tensor>,
}

/// Deterministic mode (`train.deterministic`): the plan's units are fixed micro-batches, each with
/// its own backward pass and random stream, and their gradients are summed in one fixed order
/// whatever rank computed them, so a run gives the same bits on any number of ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExactMode {
    /// The run seed; a micro-batch's random stream (dropout) is a function of it, the step, the
    /// pass and the micro-batch.
    pub seed: u64,
}

/// How domains are laid out over the ranks of the job.
pub struct Topology<'a> {
    /// All ranks of the job.
    pub world: &'a dyn Communicator,
    /// Which images every rank computes.
    pub plan: &'a ShardingPlan,
    /// The groups of the split domains this rank holds a piece of, in domain order (built with
    /// [`domain_groups`] when the method asks for per-domain gradients on the fast path).
    pub domain_groups: &'a [DomainGroup],
    /// Largest gradient bucket for one collective, bytes (`comm.bucket_mb`).
    pub bucket_bytes: usize,
    /// `Some` in deterministic mode (the plan's unit is then the micro-batch).
    pub exact: Option<ExactMode>,
    /// `comm.overlap`: the batch gradient's buckets are reduced during backward (see [`overlap`]).
    pub overlap: Option<&'a overlap::GradientOverlap>,
}

impl Topology<'_> {
    /// Number of training domains K.
    pub fn num_domains(&self) -> usize {
        self.plan.num_domains()
    }

    /// Images per domain per step over the whole job, B (each shard holds part of them).
    pub fn batch_per_domain(&self) -> usize {
        self.plan.batch_per_domain()
    }

    /// The group of split domain `domain`, if this rank holds a piece of it.
    pub fn domain_group(&self, domain: usize) -> Option<&dyn Communicator> {
        self.domain_groups.iter().find(|g| g.domain == domain).map(|g| g.comm.as_ref())
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
    /// The run's seed (`train.seed`): random draws that every rank must share (Mixup's pairs and
    /// mixing weights) are a function of it and the step.
    pub seed: u64,
}

/// What one update reports; identical on every rank.
#[derive(Debug, Clone, Default)]
pub struct StepStats {
    /// Mean cross-entropy over all domains' minibatches (the objective ERM minimises).
    pub loss: f64,
    /// Method-specific scalars (e.g. `dsp_lambda`, `sam_grad_norm`).
    pub extra: BTreeMap<String, f64>,
}

/// A method's step and state; its names, hyperparameters and what crosses ranks are declared by
/// [`MethodDef`] on the same type.
pub trait Method: Send {
    /// True when the method needs each domain's exact gradient (so the trainer builds the groups
    /// of split domains); ERM and global SAM need only the sum over the batch.
    fn needs_domain_gradients(&self) -> bool {
        false
    }
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
