//! The gradients a method asks for, over the job's whole batch and identical on every rank.
//!
//! Two ways to compute them, chosen by [`Topology::exact`]:
//! - **Fast path**: a rank computes the gradient of its own images (one backward over all its pieces
//!   when only the batch gradient is needed, one per piece when each domain's is) and the ranks sum
//!   them with all-reduces: over the world for the batch gradient, within a domain group for the
//!   pieces of a split domain. The float sums then depend on how the images fall on the ranks, so
//!   results agree across world sizes up to rounding.
//! - **Exact path** (deterministic mode): every unit of the plan (a fixed micro-batch) gets its own
//!   forward and backward with its own random stream; the units' gradients are all-gathered (a bucket
//!   of parameters at a time) and every rank sums them in one fixed order, unit after unit within a
//!   domain, then domain after domain. No sum depends on which rank computed which unit, so 1, 2, 3 ...
//!   ranks give the same bits. The price: a backward per micro-batch, and every rank receives every
//!   unit's gradient (N x P values per pass, against about 2P for a ring all-reduce).

use crate::common::{all_reduce_grad, backward_flat, cross_entropy_sum, shard_len, zero_gradient};
use crate::overlap::GradientOverlap;
use crate::{DomainShard, Topology};
use anyhow::{bail, Context, Result};
use mgrun_collectives::{scalars, ReduceOp};
use mgrun_models::{Model, ParamStore};
use tch::{Kind, Tensor};

/// One gradient pass of a method's step.
pub struct Pass<'p> {
    /// The step and the pass within it (0, 1, ...): together they name the exact path's random
    /// streams, so that every pass draws its own dropout masks.
    pub step: u64,
    pub index: u64,
    /// Added to the parameters while the images of training domain e are computed (per-domain SAM's
    /// perturbation); indexed by training domain, `None` for no offset.
    pub offsets: Option<&'p [Option<Tensor>]>,
}

impl Pass<'_> {
    pub fn plain(step: u64, index: u64) -> Pass<'static> {
        Pass { step, index, offsets: None }
    }
}

/// The ERM objective over the job's batch, L = (1/(KB)) sum_i l_i, and its gradient (on the fast
/// path an alias of the model's gradient buffer, valid until the next backward).
pub struct BatchGradient {
    pub loss: f64,
    pub grad: Tensor,
}

/// One training domain's gradient g_e = grad L_e, L_e the mean loss over its B images. On the fast
/// path the last domain's may alias the model's gradient buffer, valid until the next backward.
pub struct DomainGradient {
    pub domain: usize,
    pub grad: Tensor,
    /// True on the one rank that counts this domain in world-level sums (the lowest holder).
    pub leader: bool,
}

/// Every domain's gradient this rank holds.
pub struct DomainGradients {
    /// The ERM objective (1/K) sum_e L_e, the same on every rank.
    pub loss: f64,
    /// In domain order: the domains of this rank's pieces (fast path) or every domain (exact path).
    pub domains: Vec<DomainGradient>,
    /// Every rank holds every domain (exact path): world-level sums need no collective.
    pub replicated: bool,
}

/// A per-image loss other than the cross-entropy of the images as given (Mixup's loss on mixed
/// images, say), summed over some consecutive images of one domain.
pub trait ImageLoss {
    /// The sum of the losses of `x`/`y`: images `first..first + n` of training domain `domain`'s
    /// per-step batch; a differentiable scalar.
    fn loss_sum(&self, model: &dyn Model, domain: usize, first: usize, x: &Tensor, y: &Tensor) -> Result<Tensor>;
}

/// The batch gradient, the same on every rank (see the module docs).
pub fn batch_gradient(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
) -> Result<BatchGradient> {
    batch_gradient_with(model, topology, shards, pass, None)
}

/// [`batch_gradient`] of (1/(KB)) times the sum of `loss` over the job's images (the cross-entropy
/// when `None`).
pub fn batch_gradient_with(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
    loss: Option<&dyn ImageLoss>,
) -> Result<BatchGradient> {
    let scale = 1.0 / (topology.num_domains() * topology.batch_per_domain()) as f64;
    if topology.exact.is_some() {
        let sums = exact_domain_sums(model, topology, shards, pass, loss)?;
        let _guard = tch::no_grad_guard();
        let mut total = sums.grads[0].copy();
        for grad in &sums.grads[1..] {
            total += grad;
        }
        return Ok(BatchGradient { loss: sums.loss_sum * scale, grad: total * scale });
    }
    let world = topology.world;
    // With comm.overlap the plain batch gradient comes back already summed over the ranks.
    let mut reduced = false;
    let (local_loss, mut grad) = match (pass.offsets, loss) {
        (None, None) => {
            let (local_loss, grad, summed) = concatenated_gradient(model, shards, scale, topology.overlap)?;
            reduced = summed;
            (local_loss, grad)
        }
        (Some(_), Some(_)) => bail!("a custom image loss at offset parameters is not supported"),
        (None, Some(loss)) => {
            // A loss term per piece (each draws on its own domain's data), one backward.
            let terms = shards
                .iter()
                .filter(|s| shard_len(s) > 0)
                .map(|s| loss.loss_sum(&*model, s.domain, s.offset, &s.x, &s.y))
                .collect::<Result<Vec<Tensor>>>()?;
            match terms.into_iter().reduce(|a, b| a + b) {
                Some(total) => {
                    let total = total * scale;
                    let value = total.f_double_value(&[]).context("reading the local loss")?;
                    (value, backward_flat(model.store_mut(), &total)?)
                }
                None => (0.0, zero_gradient(model.store())),
            }
        }
        (Some(offsets), None) => {
            // A backward per piece at that domain's offset parameters, accumulated in the flat gradient.
            model.store_mut().zero_grad();
            let mut local_loss = 0.0;
            let saved = OffsetParameters::save(model.store());
            for shard in shards.iter().filter(|s| shard_len(s) > 0) {
                saved.apply(model.store(), offsets.get(shard.domain).and_then(Option::as_ref))?;
                let loss_sum = cross_entropy_sum(&*model, &shard.x, &shard.y)?;
                local_loss += loss_sum.f_double_value(&[]).context("reading a shard's loss")? * scale;
                (loss_sum * scale).f_backward().context("backward pass")?;
            }
            saved.restore(model.store())?;
            (local_loss, model.store().flat_grad_alias())
        }
    };
    if !reduced {
        all_reduce_grad(world, &mut grad, topology.bucket_bytes, "the batch gradient")?;
    }
    let loss = scalars::all_reduce_f64(world, &[local_loss], ReduceOp::Sum).context("all-reduce of the loss")?[0];
    Ok(BatchGradient { loss, grad })
}

/// Every domain's gradient g_e, assembled exactly from its pieces (see the module docs).
pub fn domain_gradients(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
) -> Result<DomainGradients> {
    let (k, b) = (topology.num_domains() as f64, topology.batch_per_domain() as f64);
    if topology.exact.is_some() {
        let sums = exact_domain_sums(model, topology, shards, pass, None)?;
        let domains = sums
            .grads
            .into_iter()
            .enumerate()
            .map(|(domain, sum)| DomainGradient { domain, grad: sum * (1.0 / b), leader: true })
            .collect();
        return Ok(DomainGradients { loss: sums.loss_sum / (k * b), domains, replicated: true });
    }
    if pass.offsets.is_some() {
        bail!("per-domain gradients at offset parameters are not supported");
    }
    let mut local_loss = 0.0;
    let nonempty: Vec<&DomainShard> = shards.iter().filter(|s| shard_len(s) > 0).collect();
    let mut domains = Vec::with_capacity(nonempty.len());
    for (i, shard) in nonempty.iter().enumerate() {
        let loss_sum = cross_entropy_sum(&*model, &shard.x, &shard.y)?;
        local_loss += loss_sum.f_double_value(&[]).context("reading a shard's loss")? / (k * b);
        let grad = backward_flat(model.store_mut(), &(loss_sum / b))
            .with_context(|| format!("backward of domain {}", shard.domain))?;
        // The next shard's backward reuses the gradient buffer: all but the last keep a copy.
        let grad = if i + 1 < nonempty.len() { grad.copy() } else { grad };
        domains.push(DomainGradient { domain: shard.domain, grad, leader: true });
    }
    // Pieces of a split domain are summed before anything non-linear. Every rank walks its groups in
    // domain order, so the collectives of overlapping groups cannot wait on each other in a cycle.
    for entry in &mut domains {
        if let Some(group) = topology.domain_group(entry.domain) {
            all_reduce_grad(group, &mut entry.grad, topology.bucket_bytes, "a domain's gradient within its group")?;
            entry.leader = group.rank() == 0;
        }
    }
    let loss =
        scalars::all_reduce_f64(topology.world, &[local_loss], ReduceOp::Sum).context("all-reduce of the loss")?[0];
    Ok(DomainGradients { loss, domains, replicated: false })
}

/// The sum over the job's batch of a per-image quantity that `sum_of` returns summed over the images
/// it is given (no gradient), the same on every rank: on the fast path over this rank's images
/// concatenated and all-reduced; on the exact path per unit (with the unit's random stream, so noise
/// drawn inside follows the unit), all-gathered and added in unit order.
pub fn image_sum(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
    mut sum_of: impl FnMut(&mut dyn Model, &Tensor, &Tensor) -> Result<f64>,
) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    if topology.exact.is_some() {
        let mut sums = vec![0.0f64; topology.plan.max_units_per_rank().max(1)];
        for_each_unit(model, topology, shards, pass, |model, unit| {
            sums[unit.slot] = sum_of(model, &unit.x, &unit.y)?;
            Ok(())
        })?;
        return gather_unit_sum(topology, &sums);
    }
    let nonempty: Vec<&DomainShard> = shards.iter().filter(|s| shard_len(s) > 0).collect();
    let mut local = 0.0;
    if !nonempty.is_empty() {
        let xs: Vec<&Tensor> = nonempty.iter().map(|s| &s.x).collect();
        let ys: Vec<&Tensor> = nonempty.iter().map(|s| &s.y).collect();
        let x = Tensor::f_cat(&xs, 0).context("concatenating the shards' images")?;
        let y = Tensor::f_cat(&ys, 0).context("concatenating the shards' labels")?;
        local = sum_of(model, &x, &y)?;
    }
    Ok(scalars::all_reduce_f64(topology.world, &[local], ReduceOp::Sum).context("all-reduce of a per-image sum")?[0])
}

/// One forward and backward over all of this rank's images concatenated, the loss scaled by `scale`
/// (zeros when the rank holds no images): the local loss and flat gradient.
/// This rank's loss and gradient of its images in one backward; with `overlap`, the gradient is
/// summed over the ranks during the backward (the flag says so).
fn concatenated_gradient(
    model: &mut dyn Model,
    shards: &[DomainShard],
    scale: f64,
    overlap: Option<&GradientOverlap>,
) -> Result<(f64, Tensor, bool)> {
    let nonempty: Vec<&DomainShard> = shards.iter().filter(|s| shard_len(s) > 0).collect();
    if nonempty.is_empty() {
        return Ok((0.0, zero_gradient(model.store()), false));
    }
    let (x, y) = if nonempty.len() == 1 {
        (nonempty[0].x.shallow_clone(), nonempty[0].y.shallow_clone())
    } else {
        let xs: Vec<&Tensor> = nonempty.iter().map(|s| &s.x).collect();
        let ys: Vec<&Tensor> = nonempty.iter().map(|s| &s.y).collect();
        (
            Tensor::f_cat(&xs, 0).context("concatenating the shards' images")?,
            Tensor::f_cat(&ys, 0).context("concatenating the shards' labels")?,
        )
    };
    let loss = cross_entropy_sum(&*model, &x, &y)? * scale;
    let value = loss.f_double_value(&[]).context("reading the local loss")?;
    match overlap {
        Some(overlap) => Ok((value, overlap.backward(model.store_mut(), &loss)?, true)),
        None => Ok((value, backward_flat(model.store_mut(), &loss)?, false)),
    }
}

/// The exact path's result: per training domain, the sum of its units' gradients of sum_i l_i and
/// of their loss sums, each summed in unit order.
struct DomainSums {
    grads: Vec<Tensor>,
    loss_sum: f64,
}

/// Computes this rank's units, all-gathers every unit's gradient and loss, and sums them per domain
/// in the fixed order (see the module docs).
fn exact_domain_sums(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
    loss: Option<&dyn ImageLoss>,
) -> Result<DomainSums> {
    let slots = topology.plan.max_units_per_rank().max(1);
    let (numel, device) = (model.store().numel() as i64, model.store().device());
    // This rank's units, one forward and backward each, into rows of `local` (padded to `slots`).
    let local = Tensor::zeros([slots as i64, numel], (Kind::Float, device));
    let mut losses = vec![0.0f64; slots];
    for_each_unit(model, topology, shards, pass, |model, unit| {
        let store = model.store_mut();
        store.zero_grad();
        let loss_sum = match loss {
            None => cross_entropy_sum(&*model, &unit.x, &unit.y)?,
            Some(loss) => {
                let first = shards[unit.shard].offset + unit.start as usize;
                loss.loss_sum(&*model, unit.domain, first, &unit.x, &unit.y)?
            }
        };
        losses[unit.slot] = loss_sum.f_double_value(&[]).context("reading a micro-batch's loss")?;
        loss_sum.f_backward().with_context(|| format!("backward of a micro-batch of domain {}", unit.domain))?;
        copy_flat_grad(model.store(), &local.get(unit.slot as i64))
    })?;
    let grads = gather_domain_sums(topology, &local)?;
    Ok(DomainSums { grads, loss_sum: gather_unit_sum(topology, &losses)? })
}

/// One of this rank's units on the exact path: a micro-batch of one domain, in its own copies.
pub(crate) struct Unit {
    /// Row of this unit in the rank's `[slots, n]` buffers.
    pub slot: usize,
    pub domain: usize,
    /// The shard it comes from (an index into the shards given) and its first image there.
    pub shard: usize,
    pub start: i64,
    pub x: Tensor,
    pub y: Tensor,
}

/// Calls `visit` on each of this rank's units in plan order, with the unit's random stream seeded
/// and the pass's offset for its domain applied to the parameters (restored afterwards).
pub(crate) fn for_each_unit(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
    mut visit: impl FnMut(&mut dyn Model, Unit) -> Result<()>,
) -> Result<()> {
    let plan = topology.plan;
    let seed = topology.exact.map_or(0, |e| e.seed);
    let rank = topology.world.rank();
    let mine = plan.units_of(rank);
    let slots = plan.max_units_per_rank().max(1);
    let units_per_domain = plan.units_per_domain();
    let saved = pass.offsets.map(|_| OffsetParameters::save(model.store()));
    for (shard_index, shard) in shards.iter().enumerate() {
        let n = shard_len(shard) as usize;
        let first = shard.offset / plan.unit();
        let last = (shard.offset + n).div_ceil(plan.unit());
        for j in first..last {
            let (lo, hi) = plan.unit_images(j);
            let unit = shard.domain * units_per_domain + j;
            let slot = unit.checked_sub(mine.start).filter(|s| mine.contains(&unit) && *s < slots);
            let slot = slot.with_context(|| format!("unit {unit} of domain {} is not rank {rank}'s", shard.domain))?;
            if lo < shard.offset || hi > shard.offset + n {
                bail!(
                    "domain {} shard [{}, {}) cuts unit {j} [{lo}, {hi})",
                    shard.domain,
                    shard.offset,
                    shard.offset + n
                );
            }
            // Fresh copies: a unit's inputs must not depend on where it sat in the rank's piece.
            let start = (lo - shard.offset) as i64;
            let x = shard.x.narrow(0, start, (hi - lo) as i64).copy();
            let y = shard.y.narrow(0, start, (hi - lo) as i64).copy();
            tch::manual_seed(unit_seed(seed, pass.step, pass.index, unit));
            if let (Some(saved), Some(offsets)) = (&saved, pass.offsets) {
                saved.apply(model.store(), offsets.get(shard.domain).and_then(Option::as_ref))?;
            }
            visit(&mut *model, Unit { slot, domain: shard.domain, shard: shard_index, start, x, y })?;
        }
    }
    if let Some(saved) = &saved {
        saved.restore(model.store())?;
    }
    Ok(())
}

/// Copies the model's flat gradient into `row`.
fn copy_flat_grad(store: &ParamStore, row: &Tensor) -> Result<()> {
    let _guard = tch::no_grad_guard();
    let mut row = row.shallow_clone();
    match store.flat_grad_view() {
        Some(grad) => row.f_copy_(grad)?,
        None => row.f_copy_(&store.flat_grad())?,
    };
    Ok(())
}

/// Every rank's unit rows of `local` (`[slots, n]`, a row per unit of this rank) on every rank, a
/// bucket of columns at a time, summed per training domain in unit order: K tensors `[n]`, the same
/// bits on every rank and at every world size.
pub(crate) fn gather_domain_sums(topology: &Topology<'_>, local: &Tensor) -> Result<Vec<Tensor>> {
    let _guard = tch::no_grad_guard();
    let (plan, world) = (topology.plan, topology.world);
    let (slots, numel) = (local.size()[0], local.size()[1]);
    let units_per_domain = plan.units_per_domain();
    let sums: Vec<Tensor> =
        (0..plan.num_domains()).map(|_| Tensor::zeros([numel], (local.kind(), local.device()))).collect();
    let chunk = (topology.bucket_bytes / (4 * slots as usize)).max(1) as i64;
    let mut start = 0i64;
    while start < numel {
        let len = chunk.min(numel - start);
        let part = local.narrow(1, start, len).contiguous();
        let gathered = world.all_gather(&part).with_context(|| {
            format!("all-gather of micro-batch rows (rank {} of {})", world.rank(), world.world_size())
        })?;
        for (domain, sum) in sums.iter().enumerate() {
            let mut acc: Option<Tensor> = None;
            for j in 0..units_per_domain {
                let (owner, slot) = plan.unit_location(domain * units_per_domain + j);
                let row = gathered.get(owner as i64).get(slot as i64);
                acc = Some(match acc {
                    None => row.copy(),
                    Some(mut acc) => {
                        acc += &row;
                        acc
                    }
                });
            }
            if let Some(acc) = acc {
                sum.narrow(0, start, len).f_copy_(&acc)?;
            }
        }
        start += len;
    }
    Ok(sums)
}

/// The sum of every unit's value (`values` holds this rank's, by slot; losses, or any per-unit
/// sum), added in unit order.
pub(crate) fn gather_unit_sum(topology: &Topology<'_>, values: &[f64]) -> Result<f64> {
    let plan = topology.plan;
    let gathered = scalars::all_gather_f64(topology.world, values).context("all-gather of micro-batch losses")?;
    let mut loss_sum = 0.0;
    for unit in 0..plan.total_units() {
        let (owner, slot) = plan.unit_location(unit);
        loss_sum += gathered[owner][slot];
    }
    Ok(loss_sum)
}

/// The random stream of micro-batch `unit` in pass `pass` of `step` (splitmix64 of the four).
fn unit_seed(seed: u64, step: u64, pass: u64, unit: usize) -> i64 {
    let mut z = seed;
    for part in [step, pass, unit as u64] {
        z = (z ^ part).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 1) as i64
}

/// The parameters before a pass at offsets, restored bit for bit afterwards (θ + ε - ε is not θ in
/// floating point).
struct OffsetParameters {
    theta: Tensor,
}

impl OffsetParameters {
    fn save(store: &ParamStore) -> Self {
        Self { theta: store.flat().detach().copy() }
    }

    /// Sets the parameters to θ + offset (θ when there is none).
    fn apply(&self, store: &ParamStore, offset: Option<&Tensor>) -> Result<()> {
        match offset {
            Some(offset) => store.set_flat(&(&self.theta + offset)),
            None => store.set_flat(&self.theta),
        }
    }

    fn restore(&self, store: &ParamStore) -> Result<()> {
        store.set_flat(&self.theta)
    }
}
