//! Cross-domain objectives J(S) of per-domain statistics that are sums over images (methods.md §0):
//! VREx's and GroupDRO's per-domain losses, CORAL's feature moments, Fishr's head-gradient moments.
//!
//! Every rank computes the statistics of its own images, the ranks sum them per domain into S (the
//! same on every rank), every rank differentiates J at S (G = dJ/dS, the same everywhere), and each
//! backpropagates the surrogate sum over its pieces of <G_e, s_piece> through its own images. Since S
//! is a sum over pieces, the world sum of those gradients is exactly dJ/dθ (the chain rule), whatever
//! J is: no rank needs another rank's images, only the small S. On the exact path (deterministic mode)
//! the units' statistics and gradients are all-gathered and summed in unit order, so S, J and the
//! gradient are the same bits at every world size.

use crate::common::{all_reduce_grad, backward_flat, shard_len, zero_gradient};
use crate::gradients::{for_each_unit, gather_domain_sums, Pass};
use crate::{DomainShard, Topology};
use anyhow::{bail, Context, Result};
use mgrun_collectives::{all_reduce_flat, ReduceOp};
use mgrun_models::Model;
use tch::{Kind, Reduction, Tensor};

/// The training forward of a batch, split where the head begins.
pub struct HeadOutput {
    /// Features after the head's dropout, `[n, D]` (DomainBed's featurizer output).
    pub head_input: Tensor,
    /// `[n, C]`.
    pub logits: Tensor,
}

/// A method's objective over the K training domains' statistics.
pub trait DomainObjective {
    /// Number of statistics per domain besides the loss sum (column 0 of S, always there).
    fn width(&self, model: &dyn Model) -> usize;

    /// The extra statistics of some images of one domain, summed over them: `[width]`,
    /// differentiable. Only called when `width > 0`.
    fn statistics(&self, _out: &HeadOutput, _y: &Tensor) -> Result<Tensor> {
        bail!("this objective has no statistics besides the losses")
    }

    /// J(S) as a differentiable f64 scalar. `sums` is S, `[K, 1 + width]` f64, row e holding training
    /// domain e's statistics summed over its `batch` images (column 0: the sum of its cross-entropies).
    /// Called once per step, on every rank with the same S, so state updated here (EMAs, GroupDRO's
    /// weights) stays identical on all ranks.
    fn objective(&mut self, sums: &Tensor, batch: usize) -> Result<Tensor>;
}

/// What [`objective_gradient`] returns, the same on every rank.
pub struct ObjectiveGradient {
    /// The ERM objective (1/(KB)) sum_i l_i, for the step's report.
    pub loss: f64,
    /// J at this step's S.
    pub objective: f64,
    /// dJ/dθ (flat; on the fast path an alias of the model's gradient buffer, valid until the next
    /// backward).
    pub grad: Tensor,
}

/// J and dJ/dθ over the job's batch (see the module docs).
pub fn objective_gradient(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    pass: &Pass<'_>,
    objective: &mut dyn DomainObjective,
) -> Result<ObjectiveGradient> {
    paired_objective_gradient(model, topology, shards, None, pass, objective)
}

/// [`objective_gradient`] where every image comes with a companion (`companions[i]` has the shape of
/// `shards[i].x`, e.g. UDIM's perturbed copies): a piece's statistics then see the outputs of its
/// images followed by those of their companions (2n rows), with the labels repeated.
pub fn paired_objective_gradient(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    companions: Option<&[Tensor]>,
    pass: &Pass<'_>,
    objective: &mut dyn DomainObjective,
) -> Result<ObjectiveGradient> {
    if pass.offsets.is_some() {
        bail!("cross-domain objectives at offset parameters are not supported");
    }
    if let Some(companions) = companions {
        if companions.len() != shards.len() || companions.iter().zip(shards).any(|(c, s)| c.size() != s.x.size()) {
            bail!("each shard needs one companion image per image");
        }
    }
    let width = 1 + objective.width(&*model);
    if topology.exact.is_some() {
        return exact_objective_gradient(model, topology, shards, companions, pass, objective, width);
    }

    // This rank's images in one forward; each piece's statistics from its rows.
    let (k, device) = (topology.num_domains() as i64, model.store().device());
    let local = Tensor::zeros([k, width as i64], (Kind::Float, device));
    let nonempty: Vec<(usize, &DomainShard)> = shards.iter().enumerate().filter(|(_, s)| shard_len(s) > 0).collect();
    let mut pieces: Vec<(usize, Tensor)> = Vec::with_capacity(nonempty.len());
    if !nonempty.is_empty() {
        // Images (then their companions) of every piece in one forward; a piece's rows are its
        // images' and its companions'.
        let mut xs: Vec<&Tensor> = nonempty.iter().map(|(_, s)| &s.x).collect();
        let mut ys: Vec<&Tensor> = nonempty.iter().map(|(_, s)| &s.y).collect();
        if let Some(companions) = companions {
            xs.extend(nonempty.iter().map(|(i, _)| &companions[*i]));
            ys.extend(nonempty.iter().map(|(_, s)| &s.y));
        }
        let x = Tensor::f_cat(&xs, 0).context("concatenating the shards' images")?;
        let y = Tensor::f_cat(&ys, 0).context("concatenating the shards' labels")?;
        let out = forward(&*model, &x);
        let total: i64 = nonempty.iter().map(|(_, s)| shard_len(s)).sum();
        let mut start = 0;
        for (_, shard) in &nonempty {
            let n = shard_len(shard);
            let mut rows = vec![start];
            if companions.is_some() {
                rows.push(total + start);
            }
            let pick = |t: &Tensor| -> Result<Tensor> {
                let parts: Vec<Tensor> = rows.iter().map(|&r| t.narrow(0, r, n)).collect();
                Tensor::f_cat(&parts, 0).context("a piece's rows")
            };
            let piece = HeadOutput { head_input: pick(&out.head_input)?, logits: pick(&out.logits)? };
            let s = piece_statistics(&*objective, width, &piece, &pick(&y)?)?;
            let _guard = tch::no_grad_guard();
            let mut row = local.get(shard.domain as i64);
            row += s.detach();
            pieces.push((shard.domain, s));
            start += n;
        }
    }
    let mut flat = local.view([-1]);
    all_reduce_flat(topology.world, &mut flat, ReduceOp::Sum, topology.bucket_bytes)
        .context("all-reduce of the per-domain statistics")?;
    let (value, sums_grad) = differentiate(objective, &local, topology.batch_per_domain())?;

    let mut grad = match surrogate(&pieces, &sums_grad) {
        Some(surrogate) => backward_flat(model.store_mut(), &surrogate)?,
        None => zero_gradient(model.store()),
    };
    all_reduce_grad(topology.world, &mut grad, topology.bucket_bytes, "the objective's gradient")?;
    Ok(ObjectiveGradient { loss: erm_loss(&local, topology)?, objective: value, grad })
}

/// The exact path: a forward per unit, the units' statistics summed in unit order into S, then a
/// backward per unit of its surrogate, the units' gradients summed in unit order.
fn exact_objective_gradient(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    companions: Option<&[Tensor]>,
    pass: &Pass<'_>,
    objective: &mut dyn DomainObjective,
    width: usize,
) -> Result<ObjectiveGradient> {
    let slots = topology.plan.max_units_per_rank().max(1);
    let device = model.store().device();
    let local = Tensor::zeros([slots as i64, width as i64], (Kind::Float, device));
    // Each unit's graph stays alive until its surrogate's backward below.
    let mut units: Vec<(usize, usize, Tensor)> = Vec::new();
    {
        let statistics = &*objective;
        for_each_unit(model, topology, shards, pass, |model, unit| {
            let (x, y) = match companions {
                None => (unit.x.shallow_clone(), unit.y.shallow_clone()),
                Some(companions) => {
                    let paired = companions[unit.shard].narrow(0, unit.start, unit.x.size()[0]).copy();
                    (Tensor::f_cat(&[&unit.x, &paired], 0)?, Tensor::f_cat(&[&unit.y, &unit.y], 0)?)
                }
            };
            let s = piece_statistics(statistics, width, &forward(&*model, &x), &y)?;
            let _guard = tch::no_grad_guard();
            local.get(unit.slot as i64).f_copy_(&s.detach())?;
            units.push((unit.slot, unit.domain, s));
            Ok(())
        })?;
    }
    let sums =
        Tensor::f_stack(&gather_domain_sums(topology, &local)?, 0).context("stacking the domains' statistics")?;
    let (value, sums_grad) = differentiate(objective, &sums, topology.batch_per_domain())?;

    let numel = model.store().numel() as i64;
    let grads = Tensor::zeros([slots as i64, numel], (Kind::Float, device));
    for (slot, domain, s) in units {
        let surrogate = (sums_grad.get(domain as i64) * s).sum(Kind::Float);
        let grad = backward_flat(model.store_mut(), &surrogate)
            .with_context(|| format!("backward of a unit of domain {domain}"))?;
        let _guard = tch::no_grad_guard();
        grads.get(slot as i64).f_copy_(&grad)?;
    }
    let per_domain = gather_domain_sums(topology, &grads)?;
    let _guard = tch::no_grad_guard();
    let mut grad = per_domain[0].shallow_clone();
    for domain_grad in &per_domain[1..] {
        grad += domain_grad;
    }
    Ok(ObjectiveGradient { loss: erm_loss(&sums, topology)?, objective: value, grad })
}

/// The training forward, split at the head.
fn forward(model: &dyn Model, x: &Tensor) -> HeadOutput {
    let features = model.features(x, true);
    let head_input = model.head_input(&features, true);
    let logits = model.linear_head(&head_input);
    HeadOutput { head_input, logits }
}

/// `[1 + width]`: the piece's cross-entropy sum, then the objective's statistics.
fn piece_statistics(objective: &dyn DomainObjective, width: usize, out: &HeadOutput, y: &Tensor) -> Result<Tensor> {
    let loss_sum = out
        .logits
        .f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)
        .context("cross-entropy of the model's logits against the shard labels")?
        .reshape([1]);
    if width == 1 {
        return Ok(loss_sum);
    }
    let extra = objective.statistics(out, y)?;
    if extra.size() != [width as i64 - 1] {
        bail!("an objective's statistics have shape {:?}, expected [{}]", extra.size(), width - 1);
    }
    Tensor::f_cat(&[loss_sum, extra.to_kind(Kind::Float)], 0).context("joining a piece's statistics")
}

/// J at S and dJ/dS (f32, the statistics' kind).
fn differentiate(objective: &mut dyn DomainObjective, sums: &Tensor, batch: usize) -> Result<(f64, Tensor)> {
    let sums = sums.detach().to_kind(Kind::Double).set_requires_grad(true);
    let value = objective.objective(&sums, batch)?;
    if value.numel() != 1 {
        bail!("an objective must be a scalar, got shape {:?}", value.size());
    }
    let scalar = value.f_double_value(&[]).context("reading the objective")?;
    let grads = Tensor::f_run_backward(&[&value], &[&sums], false, false).context("differentiating the objective")?;
    let grad = grads.into_iter().next().context("the objective's gradient")?;
    Ok((scalar, grad.to_kind(Kind::Float)))
}

/// Sum over pieces of <dJ/dS_e, s_piece>: its gradient is this rank's share of dJ/dθ.
fn surrogate(pieces: &[(usize, Tensor)], sums_grad: &Tensor) -> Option<Tensor> {
    pieces.iter().map(|(domain, s)| (sums_grad.get(*domain as i64) * s).sum(Kind::Float)).reduce(|a, b| a + b)
}

/// (1/(KB)) times the sum of S's loss column.
fn erm_loss(sums: &Tensor, topology: &Topology<'_>) -> Result<f64> {
    let total = sums.select(1, 0).to_kind(Kind::Double).sum(Kind::Double);
    let total = total.f_double_value(&[]).context("reading the loss sums")?;
    Ok(total / (topology.num_domains() * topology.batch_per_domain()) as f64)
}
