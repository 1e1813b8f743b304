//! Pieces shared by the methods: shard checks, summed cross-entropy, backward into a flat gradient,
//! and the small per-step all-reduce of scalars.

use crate::{DomainShard, Topology};
use anyhow::{bail, Context, Result};
use mgrun_collectives::{all_reduce_flat, Communicator, ReduceOp};
use mgrun_models::{Model, ParamStore};
use tch::{Device, Kind, Reduction, Tensor};

/// Checks the topology and the shards a rank received against it.
pub(crate) fn check_shards(method: &str, topology: &Topology<'_>, shards: &[DomainShard]) -> Result<()> {
    if topology.num_domains == 0 || topology.batch_per_domain == 0 {
        bail!(
            "method.{method}: topology needs at least one domain and one image per domain (got {} domains, batch {})",
            topology.num_domains,
            topology.batch_per_domain
        );
    }
    if topology.domain_group.is_some() && shards.len() != 1 {
        bail!(
            "method.{method}: a rank that shares its domain with other ranks must hold exactly one shard, got {}",
            shards.len()
        );
    }
    for shard in shards {
        if shard.domain >= topology.num_domains {
            bail!(
                "method.{method}: shard of domain {} but only {} training domains",
                shard.domain,
                topology.num_domains
            );
        }
        let n = shard.x.size().first().copied().unwrap_or(0);
        if shard.y.size() != [n] {
            bail!(
                "method.{method}: domain {} shard has {n} images but labels of shape {:?}",
                shard.domain,
                shard.y.size()
            );
        }
        if n as usize > topology.batch_per_domain {
            bail!(
                "method.{method}: domain {} shard has {n} images, more than the batch per domain {}",
                shard.domain,
                topology.batch_per_domain
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

/// Gradient of `loss` with respect to every parameter, as a fresh flat tensor.
pub(crate) fn backward_flat(store: &mut ParamStore, loss: &Tensor) -> Result<Tensor> {
    store.zero_grad();
    loss.f_backward().context("backward pass")?;
    Ok(store.flat_grad())
}

/// Local loss `sum_i l_i / (K*B)` of one forward over all shards concatenated, and its flat gradient
/// (zeros when the rank holds no images).
pub(crate) fn concatenated_loss_and_grad(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
) -> Result<(f64, Tensor)> {
    let nonempty: Vec<&DomainShard> = shards.iter().filter(|s| shard_len(s) > 0).collect();
    let store = model.store();
    if nonempty.is_empty() {
        return Ok((0.0, Tensor::zeros([store.numel() as i64], (Kind::Float, store.device()))));
    }
    let xs: Vec<&Tensor> = nonempty.iter().map(|s| &s.x).collect();
    let ys: Vec<&Tensor> = nonempty.iter().map(|s| &s.y).collect();
    let x = Tensor::f_cat(&xs, 0).context("concatenating the shards' images")?;
    let y = Tensor::f_cat(&ys, 0).context("concatenating the shards' labels")?;
    let scale = 1.0 / (topology.num_domains * topology.batch_per_domain) as f64;
    let loss = cross_entropy_sum(&*model, &x, &y)? * scale;
    let value = loss.f_double_value(&[]).context("reading the local loss")?;
    let grad = backward_flat(model.store_mut(), &loss)?;
    Ok((value, grad))
}

/// World SUM all-reduce of a flat gradient, in buckets.
pub(crate) fn all_reduce_grad(
    comm: &dyn Communicator,
    grad: &mut Tensor,
    bucket_bytes: usize,
    what: &str,
) -> Result<()> {
    all_reduce_flat(comm, grad, ReduceOp::Sum, bucket_bytes)
        .with_context(|| format!("all-reduce of {what} (rank {} of {})", comm.rank(), comm.world_size()))
}

/// SUM all-reduce of a few f64 scalars in one collective.
pub(crate) fn all_reduce_scalars(comm: &dyn Communicator, values: &[f64], device: Device) -> Result<Vec<f64>> {
    if comm.world_size() == 1 {
        return Ok(values.to_vec());
    }
    let mut t = Tensor::from_slice(values).to_device(device);
    comm.all_reduce(&mut t, ReduceOp::Sum)
        .with_context(|| format!("all-reduce of the step's scalars (rank {} of {})", comm.rank(), comm.world_size()))?;
    Vec::<f64>::try_from(t.to_device(Device::Cpu)).context("reading the all-reduced scalars")
}
