//! ELR, early-learning regularization (Liu et al., NeurIPS 2020; shengliu66/ELR's `elr_loss`) as ERM
//! plus its regularizer: per training image a target t, an EMA of the model's (clamped, renormalised)
//! predictions, and the loss CE(z, y) + λ log(1 - <t, p>), p = clamp(softmax(z), 1e-4, 1 - 1e-4).
//! As in the published loss, t is updated with this step's prediction first and the penalty uses the
//! updated t: t <- β t + (1 - β) p̂, p̂ = p.detach() / sum_c p.detach(), t starting at zeros.
//!
//! Per-sample state: one table per training domain, keyed by [`DomainShard::ids`] (the image's index
//! in its domain's file list), grown to the largest id seen (rows never seen are zeros, the
//! published initial value, so growing is the same as sizing from the file count). The same image
//! can land on different ranks at different steps, so every rank keeps every domain's whole table:
//! after the step the ranks all-gather (domain, position in the batch, id, new target) of the step's
//! images and every rank writes them in batch order (domain, then position); an image drawn twice in
//! one step (the sampler draws with replacement) keeps its last copy's target, as PyTorch's
//! `target[index] = ...` does. Shards without ids are an error.
//!
//! This file also holds what the per-sample methods (ELR, PS-KD, AdvStyle) share:
//! [`per_image_gradient`] and [`SampleTables`].

use crate::common::{all_reduce_grad, backward_flat, check_shards, shard_len, zero_gradient};
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::gradients::{for_each_unit, gather_domain_sums, gather_unit_sum, Pass};
use crate::{DomainShard, Method, StepStats, Topology, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_collectives::{scalars, ReduceOp};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tch::{Kind, Reduction, Tensor};

/// ELR hyperparameters (documented in [`Elr`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ElrConfig {
    pub beta: f64,
    pub lambda: f64,
}

impl Default for ElrConfig {
    /// The published CIFAR-10 settings.
    fn default() -> Self {
        Self { beta: 0.7, lambda: 3.0 }
    }
}

pub struct Elr {
    cfg: ElrConfig,
    targets: SampleTables,
}

/// Clamp of ELR's predictions (keeps log(1 - <t, p>) finite).
const CLAMP: f64 = 1e-4;

impl MethodDef for Elr {
    type Config = ElrConfig;
    const NAME: &'static str = "elr";
    const DOMAINBED_NAME: &'static str = "ELR";
    const SUMMARY: &'static str =
        "ERM + early-learning regularization: lambda x log(1 - <t, p>), t a per-image EMA of the predictions.";
    const REFERENCE: &'static str = "Liu et al., NeurIPS 2020 (shengliu66/ELR, elr_loss without ELR+)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::fixed("beta", "EMA factor of the per-image targets, in [0, 1)"),
        Hyperparameter::fixed("lambda", "weight of the log(1 - <t, p>) penalty, >= 0"),
    ];

    fn validate(cfg: &ElrConfig) -> Result<()> {
        if !(cfg.beta.is_finite() && (0.0..1.0).contains(&cfg.beta)) {
            bail!("key `method.elr.beta`: must be in [0, 1), got {}", cfg.beta);
        }
        if !(cfg.lambda.is_finite() && cfg.lambda >= 0.0) {
            bail!("key `method.elr.lambda`: must be a finite number >= 0, got {}", cfg.lambda);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &ElrConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum("loss and objective", MessageSize::Scalars(2)),
            SampleTables::EXCHANGE,
        ]
    }

    fn new(cfg: &ElrConfig, model: &dyn Model, num_domains: usize) -> Result<Self> {
        let classes = model.spec().num_classes;
        Ok(Self { cfg: cfg.clone(), targets: SampleTables::new("elr", "target", num_domains, classes) })
    }
}

impl Method for Elr {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("elr", ctx.topology, shards)?;
        let old = self.targets.lookup(shards)?;
        let (beta, lambda) = (self.cfg.beta, self.cfg.lambda);
        let pass = Pass::plain(ctx.step, 0);
        let result = per_image_gradient(ctx.model, ctx.topology, shards, &old, &pass, |model, x, y, t_old| {
            let logits = model.forward_t(x, true);
            let ce: Tensor = logits.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)?;
            let p: Tensor = logits.softmax(1, Kind::Float).clamp(CLAMP, 1.0 - CLAMP);
            let p_hat = {
                let d = p.detach();
                &d / d.sum_dim_intlist(1, true, Kind::Float)
            };
            let t: Tensor = t_old * beta + p_hat * (1.0 - beta);
            let agreement: Tensor = (&t * &p).sum_dim_intlist(1, false, Kind::Float);
            let penalty = agreement.neg().f_add_scalar(1.0)?.log().sum(Kind::Float);
            let erm = ce.f_double_value(&[]).context("reading the cross-entropy")?;
            Ok(ImageTerms { objective: ce + penalty * lambda, erm, records: Some(t) })
        })?;
        self.targets.exchange_and_write(ctx.topology, shards, &result.records)?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        let extra = [("elr_objective".to_string(), result.objective)];
        Ok(StepStats { loss: result.loss, extra: extra.into_iter().collect() })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.targets.state()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.targets.load_state(state)
    }
}

/// What a per-image objective returns for some images (see [`per_image_gradient`]).
pub(crate) struct ImageTerms {
    /// The objective's terms summed over the images: a differentiable scalar.
    pub objective: Tensor,
    /// The plain cross-entropy summed over the images (the ERM loss the step reports).
    pub erm: f64,
    /// Per-image values to hand back, `[n, w]` (PS-KD's predictions, ELR's targets).
    pub records: Option<Tensor>,
}

/// What [`per_image_gradient`] returns: all but `records` the same on every rank.
pub(crate) struct PerImageGradient {
    /// The ERM loss (1/(KB)) sum_i CE_i.
    pub loss: f64,
    /// The objective (1/(KB)) sum_i o_i.
    pub objective: f64,
    /// Its gradient (flat; on the fast path an alias of the model's gradient buffer).
    pub grad: Tensor,
    /// Per shard, this rank's records of its images in shard order (`None` when there are none).
    pub records: Vec<Option<Tensor>>,
}

/// The gradient of (1/(KB)) sum_i o_i over the job's images, where o_i may depend on per-image side
/// inputs: `aux[s]`'s rows align with `shards[s].x`'s. `f(model, x, y, aux)` returns the terms summed
/// over the images it is given. Fast path: one forward over this rank's images concatenated and a
/// SUM all-reduce; exact path: a forward and backward per unit with the unit's random stream, the
/// units' gradients summed in unit order (the same bits at every world size), as
/// [`crate::gradients::batch_gradient`] does for the plain cross-entropy.
pub(crate) fn per_image_gradient(
    model: &mut dyn Model,
    topology: &Topology<'_>,
    shards: &[DomainShard],
    aux: &[Tensor],
    pass: &Pass<'_>,
    mut f: impl FnMut(&dyn Model, &Tensor, &Tensor, &Tensor) -> Result<ImageTerms>,
) -> Result<PerImageGradient> {
    if aux.len() != shards.len() || aux.iter().zip(shards).any(|(a, s)| a.size().first() != s.x.size().first()) {
        bail!("each shard needs one row of side inputs per image");
    }
    let scale = 1.0 / (topology.num_domains() * topology.batch_per_domain()) as f64;
    let mut records: Vec<Option<Tensor>> = shards.iter().map(|_| None).collect();
    if topology.exact.is_some() {
        let slots = topology.plan.max_units_per_rank().max(1);
        let (numel, device) = (model.store().numel() as i64, model.store().device());
        let local = Tensor::zeros([slots as i64, numel], (Kind::Float, device));
        let (mut erm, mut objective) = (vec![0.0f64; slots], vec![0.0f64; slots]);
        for_each_unit(model, topology, shards, pass, |model, unit| {
            let n = unit.x.size()[0];
            let side = aux[unit.shard].narrow(0, unit.start, n).copy();
            let out = f(&*model, &unit.x, &unit.y, &side)?;
            erm[unit.slot] = out.erm;
            objective[unit.slot] = out.objective.f_double_value(&[]).context("reading a micro-batch's objective")?;
            let grad = backward_flat(model.store_mut(), &out.objective)
                .with_context(|| format!("backward of a micro-batch of domain {}", unit.domain))?;
            let _guard = tch::no_grad_guard();
            local.get(unit.slot as i64).f_copy_(&grad)?;
            if let Some(rec) = out.records {
                let shard_n = shard_len(&shards[unit.shard]);
                let all = records[unit.shard]
                    .get_or_insert_with(|| Tensor::zeros([shard_n, rec.size()[1]], (Kind::Float, rec.device())));
                all.narrow(0, unit.start, n).f_copy_(&rec.detach())?;
            }
            Ok(())
        })?;
        let sums = gather_domain_sums(topology, &local)?;
        let _guard = tch::no_grad_guard();
        let mut total = sums[0].copy();
        for grad in &sums[1..] {
            total += grad;
        }
        return Ok(PerImageGradient {
            loss: gather_unit_sum(topology, &erm)? * scale,
            objective: gather_unit_sum(topology, &objective)? * scale,
            grad: total * scale,
            records,
        });
    }
    let nonempty: Vec<usize> = (0..shards.len()).filter(|&i| shard_len(&shards[i]) > 0).collect();
    let (mut erm, mut objective) = (0.0, 0.0);
    let mut grad = if nonempty.is_empty() {
        zero_gradient(model.store())
    } else {
        let cat = |parts: Vec<&Tensor>, what: &str| {
            Tensor::f_cat(&parts, 0).with_context(|| format!("concatenating the shards' {what}"))
        };
        let x = cat(nonempty.iter().map(|&i| &shards[i].x).collect(), "images")?;
        let y = cat(nonempty.iter().map(|&i| &shards[i].y).collect(), "labels")?;
        let side = cat(nonempty.iter().map(|&i| &aux[i]).collect(), "side inputs")?;
        let out = f(&*model, &x, &y, &side)?;
        erm = out.erm * scale;
        let scaled = out.objective * scale;
        objective = scaled.f_double_value(&[]).context("reading the local objective")?;
        if let Some(rec) = out.records {
            let mut start = 0;
            for &i in &nonempty {
                let n = shard_len(&shards[i]);
                records[i] = Some(rec.narrow(0, start, n).detach().to_kind(Kind::Float));
                start += n;
            }
        }
        backward_flat(model.store_mut(), &scaled)?
    };
    all_reduce_grad(topology.world, &mut grad, topology.bucket_bytes, "a per-image objective's gradient")?;
    let sums = scalars::all_reduce_f64(topology.world, &[erm, objective], ReduceOp::Sum)
        .context("all-reduce of the loss and objective")?;
    Ok(PerImageGradient { loss: sums[0], objective: sums[1], grad, records })
}

/// Per training domain, a table of `width` values per image keyed by the image's id, identical on
/// every rank (see the module docs): rows are zeros until first written; a table grows to the
/// largest id written.
pub(crate) struct SampleTables {
    method: &'static str,
    what: &'static str,
    width: usize,
    /// `[rows, width]` f32 per training domain (on the CPU: only the step's rows travel to the device).
    tables: Vec<Tensor>,
}

impl SampleTables {
    /// The step's (domain, position, id, values) rows, all-gathered over the world.
    pub const EXCHANGE: CrossRankStat = CrossRankStat {
        name: "the step's per-image table rows (domain, position, id, C values), padded to the largest rank's images",
        collective: crate::descriptor::Collective::AllGather,
        size: MessageSize::ImageRows(0),
        group: crate::descriptor::Group::World,
    };

    pub fn new(method: &'static str, what: &'static str, num_domains: usize, width: usize) -> Self {
        let tables =
            (0..num_domains).map(|_| Tensor::zeros([0, width as i64], (Kind::Float, tch::Device::Cpu))).collect();
        Self { method, what, width, tables }
    }

    /// The ids of a shard's images, checked.
    fn ids(&self, shard: &DomainShard) -> Result<Vec<i64>> {
        let ids = shard.ids.as_ref().with_context(|| {
            format!(
                "method.{}: the images of domain {} carry no sample ids (DomainShard.ids); the method keeps a {} per \
                 image and needs them",
                self.method, shard.domain, self.what
            )
        })?;
        let ids = Vec::<i64>::try_from(&ids.to_device(tch::Device::Cpu).to_kind(Kind::Int64))
            .with_context(|| format!("method.{}: reading the sample ids", self.method))?;
        if ids.len() as i64 != shard_len(shard) || ids.iter().any(|&i| i < 0) {
            bail!("method.{}: domain {} has {} images but ids {:?}", self.method, shard.domain, shard_len(shard), ids);
        }
        if shard.domain >= self.tables.len() {
            bail!("method.{}: domain {} of {} training domains", self.method, shard.domain, self.tables.len());
        }
        Ok(ids)
    }

    /// Each shard's rows, `[n, width]` on the shard's device (zeros for ids never written).
    pub fn lookup(&self, shards: &[DomainShard]) -> Result<Vec<Tensor>> {
        shards
            .iter()
            .map(|shard| {
                let ids = self.ids(shard)?;
                let table = &self.tables[shard.domain];
                let rows = table.size()[0];
                let out = Tensor::zeros([ids.len() as i64, self.width as i64], (Kind::Float, tch::Device::Cpu));
                let known: Vec<i64> = (0..ids.len() as i64).filter(|&i| ids[i as usize] < rows).collect();
                if !known.is_empty() {
                    let which = Tensor::from_slice(&known);
                    let at: Vec<i64> = known.iter().map(|&i| ids[i as usize]).collect();
                    let values = table.index_select(0, &Tensor::from_slice(&at));
                    let mut out = out.shallow_clone();
                    let _ = out.f_index_copy_(0, &which, &values)?;
                }
                Ok(out.to_device(shard.x.device()))
            })
            .collect()
    }

    /// All-gathers every rank's `records` (rows of its shards' images) and writes them on every rank
    /// in batch order (domain, then position in the domain's batch), the last copy of an id winning.
    pub fn exchange_and_write(
        &mut self,
        topology: &Topology<'_>,
        shards: &[DomainShard],
        records: &[Option<Tensor>],
    ) -> Result<()> {
        let row_len = 3 + self.width;
        let world = topology.world;
        let max_images = (0..world.world_size()).map(|r| topology.plan.images(r)).max().unwrap_or(0).max(1);
        // One f64 row per image (f32 values and ids below 2^53 are exact), padded with domain -1.
        let mut local = vec![-1.0f64; max_images * row_len];
        let mut at = 0;
        for (shard, record) in shards.iter().zip(records) {
            let n = shard_len(shard) as usize;
            if n == 0 {
                continue;
            }
            let record =
                record.as_ref().with_context(|| format!("method.{}: no {}s for a shard", self.method, self.what))?;
            let values = Vec::<f32>::try_from(&record.to_device(tch::Device::Cpu).to_kind(Kind::Float).reshape([-1]))
                .with_context(|| format!("method.{}: reading the step's {}s", self.method, self.what))?;
            if values.len() != n * self.width || at + n > max_images {
                bail!("method.{}: {} values for {n} images of width {}", self.method, values.len(), self.width);
            }
            for (i, id) in self.ids(shard)?.into_iter().enumerate() {
                let row = &mut local[at * row_len..(at + 1) * row_len];
                row[0] = shard.domain as f64;
                row[1] = (shard.offset + i) as f64;
                row[2] = id as f64;
                for (dst, src) in row[3..].iter_mut().zip(&values[i * self.width..(i + 1) * self.width]) {
                    *dst = f64::from(*src);
                }
                at += 1;
            }
        }
        let gathered = scalars::all_gather_f64(world, &local)
            .with_context(|| format!("method.{}: all-gather of the step's {}s", self.method, self.what))?;
        // (domain, position) -> row, then per domain id -> values: the last position wins.
        let mut ordered: BTreeMap<(usize, usize), &[f64]> = BTreeMap::new();
        for rank_rows in &gathered {
            for row in rank_rows.chunks(row_len).filter(|r| r[0] >= 0.0) {
                ordered.insert((row[0] as usize, row[1] as usize), row);
            }
        }
        let mut per_domain: Vec<BTreeMap<i64, &[f64]>> = vec![BTreeMap::new(); self.tables.len()];
        for ((domain, _), row) in ordered {
            let table = per_domain.get_mut(domain).context("a table row of an unknown domain")?;
            table.insert(row[2] as i64, &row[3..]);
        }
        for (table, updates) in self.tables.iter_mut().zip(per_domain) {
            let Some((&largest, _)) = updates.last_key_value() else { continue };
            let rows = table.size()[0];
            if largest >= rows {
                let grow = Tensor::zeros([largest + 1 - rows, self.width as i64], (Kind::Float, tch::Device::Cpu));
                *table = Tensor::f_cat(&[&*table, &grow], 0)?;
            }
            let ids: Vec<i64> = updates.keys().copied().collect();
            let values: Vec<f32> = updates.values().flat_map(|v| v.iter().map(|&x| x as f32)).collect();
            let values = Tensor::from_slice(&values).view([ids.len() as i64, self.width as i64]);
            let _ = table.f_index_copy_(0, &Tensor::from_slice(&ids), &values)?;
        }
        Ok(())
    }

    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.tables.iter().enumerate().map(|(e, t)| (format!("{}.{}.{e}", self.method, self.what), t.copy())).collect()
    }

    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        for (e, table) in self.tables.iter_mut().enumerate() {
            let name = format!("{}.{}.{e}", self.method, self.what);
            let (_, saved) =
                state.iter().find(|(n, _)| *n == name).with_context(|| format!("method state: missing {name}"))?;
            if saved.dim() != 2 || saved.size()[1] != self.width as i64 {
                bail!("method state: {name} has shape {:?}, expected [rows, {}]", saved.size(), self.width);
            }
            *table = saved.to_kind(Kind::Float).to_device(tch::Device::Cpu).copy();
        }
        Ok(())
    }
}
