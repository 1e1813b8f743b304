//! Pieces shared by the methods: shard checks, summed cross-entropy, backward into a flat gradient,
//! and the bucketed all-reduce of a flat gradient.

use crate::{DomainShard, Topology, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_collectives::{all_reduce_flat, Communicator, ReduceOp};
use mgrun_models::{Model, ParamStore};
use tch::{Reduction, Tensor};

/// Checks the shards a rank received against its pieces of the sharding plan.
pub(crate) fn check_shards(method: &str, topology: &Topology<'_>, shards: &[DomainShard]) -> Result<()> {
    let rank = topology.world.rank();
    let pieces = topology.plan.pieces(rank);
    if shards.len() != pieces.len() {
        bail!(
            "method.{method}: rank {rank} holds {} pieces in the sharding plan but got {} shards",
            pieces.len(),
            shards.len()
        );
    }
    for (shard, piece) in shards.iter().zip(pieces) {
        let n = shard_len(shard);
        if (shard.domain, shard.offset, n as usize) != (piece.domain, piece.lo, piece.len()) {
            bail!(
                "method.{method}: rank {rank} got images [{}, {}) of domain {}, but its piece of the plan is [{}, {}) of \
                 domain {}",
                shard.offset,
                shard.offset + n as usize,
                shard.domain,
                piece.lo,
                piece.hi,
                piece.domain
            );
        }
        if shard.y.size() != [n] {
            bail!(
                "method.{method}: domain {} shard has {n} images but labels of shape {:?}",
                shard.domain,
                shard.y.size()
            );
        }
    }
    Ok(())
}

/// Number of images in a shard.
pub(crate) fn shard_len(shard: &DomainShard) -> i64 {
    shard.x.size().first().copied().unwrap_or(0)
}

/// Sum of per-sample cross-entropies of `x` (training-mode forward).
pub(crate) fn cross_entropy_sum(model: &dyn Model, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let logits = model.forward_t(x, true);
    logits
        .f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)
        .context("cross-entropy of the model's logits against the shard labels")
}

/// Gradient of `loss` with respect to every parameter, as a flat tensor that aliases the store's
/// gradient buffer (no copy): the next backward overwrites it.
pub(crate) fn backward_flat(store: &mut ParamStore, loss: &Tensor) -> Result<Tensor> {
    store.zero_grad();
    loss.f_backward().context("backward pass")?;
    Ok(store.flat_grad_alias())
}

/// The flat gradient of a rank that holds no images this step: zeros, so that it still takes part
/// in the all-reduce.
pub(crate) fn zero_gradient(store: &ParamStore) -> Tensor {
    Tensor::zeros([store.numel() as i64], (tch::Kind::Float, store.device()))
}

/// SUM all-reduce of a flat gradient, in buckets.
pub(crate) fn all_reduce_grad(
    comm: &dyn Communicator,
    grad: &mut Tensor,
    bucket_bytes: usize,
    what: &str,
) -> Result<()> {
    all_reduce_flat(comm, grad, ReduceOp::Sum, bucket_bytes)
        .with_context(|| format!("all-reduce of {what} (rank {} of {})", comm.rank(), comm.world_size()))
}

/// DomainBed's penalty annealing (IRM, VREx, Fishr): the penalty weight is `before` until step
/// `anneal_iters` and `after` from it on; Adam restarts at the switch, since the gradient's scale
/// jumps there (DomainBed re-creates the optimizer).
pub(crate) fn penalty_switch(ctx: &mut UpdateContext<'_>, anneal_iters: u64, before: f64, after: f64) -> Result<f64> {
    if ctx.step == anneal_iters && anneal_iters != 0 {
        ctx.optimizer.reset()?;
    }
    Ok(if ctx.step >= anneal_iters { after } else { before })
}
