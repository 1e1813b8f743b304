//! Inter-domain Mixup, as DomainBed's `Mixup` (Yan et al. 2020; Wang et al. 2020): the training
//! domains are put in a random cycle (perm, pairs (perm[i], perm[i+1 mod K])); each pair draws
//! lambda ~ Beta(alpha, alpha) and trains on x = lambda x_a + (1 - lambda) x_b with the loss
//! lambda CE(f(x), y_a) + (1 - lambda) CE(f(x), y_b), averaged over the pairs.
//!
//! Sharded: a rank holding images lo..hi of domain a needs images lo..hi of its partner b, which
//! other ranks may hold. Every rank sends its images to all (one all-gather) as the 8-bit pixels they
//! were normalised from (`transport = "uint8"`, a quarter of f32's bytes; the receiver re-normalises
//! them bit for bit as the loader did, and the sender checks that round trip), or as f32. The pairs
//! and lambdas come from the run seed and the step (ChaCha8), so every rank draws the same ones at any
//! world size; DomainBed draws them from torch's and numpy's global generators.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef, Search};
use crate::gradients::{self, ImageLoss, Pass};
use crate::{DomainShard, Method, StepStats, Topology, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// The loader's normalisation, `(p / 255 - mean) / std` per channel (ImageNet statistics); it must
/// equal `mgrun_data::transforms`' (a test checks it, and the uint8 round trip, bit for bit).
pub const NORMALIZATION_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const NORMALIZATION_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How partner images cross ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixupTransport {
    /// The 8-bit pixels the loader normalised (exact for the loader's images).
    Uint8,
    /// The normalised f32 values (any images).
    Float32,
}

/// Mixup hyperparameters (documented in [`Mixup`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MixupConfig {
    pub alpha: f64,
    pub transport: MixupTransport,
}

impl Default for MixupConfig {
    fn default() -> Self {
        Self { alpha: 0.2, transport: MixupTransport::Uint8 }
    }
}

pub struct Mixup {
    cfg: MixupConfig,
}

impl MethodDef for Mixup {
    type Config = MixupConfig;
    const NAME: &'static str = "mixup";
    const DOMAINBED_NAME: &'static str = "Mixup";
    const SUMMARY: &'static str = "Inter-domain Mixup: images of paired domains mixed with lambda ~ Beta(alpha, alpha), \
                                   their labels' losses weighted alike.";
    const REFERENCE: &'static str = "Yan et al. 2020; Wang et al. 2020; DomainBed's Mixup";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::searched(
            "alpha",
            "Beta(alpha, alpha) distribution of the mixing weight",
            "mixup_alpha",
            Search::LogUniform { low: -1.0, high: 1.0 },
        ),
        Hyperparameter::fixed(
            "transport",
            "how partner images cross ranks: \"uint8\" (the loader's 8-bit pixels, exact) or \"float32\"",
        ),
    ];

    fn validate(cfg: &MixupConfig) -> Result<()> {
        if !(cfg.alpha.is_finite() && cfg.alpha > 0.0) {
            bail!("key `method.mixup.alpha`: must be a finite number > 0, got {}", cfg.alpha);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &MixupConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat {
                name: "every rank's images and labels (for the partner domains)",
                collective: crate::descriptor::Collective::AllGather,
                size: MessageSize::BatchImages,
                group: crate::descriptor::Group::World,
            },
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
            CrossRankStat::LOSS,
        ]
    }

    fn new(cfg: &MixupConfig, _model: &dyn Model, _num_domains: usize) -> Result<Self> {
        Ok(Self { cfg: cfg.clone() })
    }
}

/// The step's pairing: domain a is mixed with `partner[a]` using weight `lambda[a]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PairDraws {
    pub perm: Vec<usize>,
    pub partner: Vec<usize>,
    pub lambda: Vec<f64>,
}

/// The pairs and weights of `step` of a run with `seed`: a random permutation of the K domains, then
/// one Beta(alpha, alpha) draw per pair (perm[i], perm[i+1 mod K]) in pair order.
pub fn pair_draws(seed: u64, step: u64, domains: usize, alpha: f64) -> Result<PairDraws> {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x4D49_5855_5000_0000; // "MIXUP"
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(z ^ (z >> 31));
    let beta = Beta::new(alpha, alpha).with_context(|| format!("method.mixup.alpha = {alpha}"))?;
    let mut perm: Vec<usize> = (0..domains).collect();
    perm.shuffle(&mut rng);
    let (mut partner, mut lambda) = (vec![0; domains], vec![0.0; domains]);
    for i in 0..domains {
        let (a, b) = (perm[i], perm[(i + 1) % domains]);
        partner[a] = b;
        lambda[a] = beta.sample(&mut rng);
    }
    Ok(PairDraws { perm, partner, lambda })
}

/// `[n, 3, H, W]` normalised images back to the 8-bit pixels they came from.
pub fn to_pixels(x: &Tensor) -> Result<Tensor> {
    let (mean, std) = channel_constants(x)?;
    Ok(((x * std + mean) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8))
}

/// 8-bit pixels normalised as the loader does, `(p / 255 - mean) / std` in f32, the same bits.
pub fn from_pixels(pixels: &Tensor) -> Result<Tensor> {
    let (mean, std) = channel_constants(pixels)?;
    Ok((pixels.to_kind(Kind::Float) / 255.0 - mean) / std)
}

fn channel_constants(like: &Tensor) -> Result<(Tensor, Tensor)> {
    if like.dim() != 4 || like.size()[1] != 3 {
        bail!("method.mixup: expected images [n, 3, H, W], got shape {:?}", like.size());
    }
    let constant = |values: &[f32; 3]| Tensor::from_slice(values).view([1, 3, 1, 1]).to_device(like.device());
    Ok((constant(&NORMALIZATION_MEAN), constant(&NORMALIZATION_STD)))
}

/// Every training domain's whole per-step batch `(x [B, 3, H, W], y [B])`, gathered from all ranks.
fn whole_batches(topology: &Topology<'_>, shards: &[DomainShard], transport: MixupTransport) -> Result<Vec<(Tensor, Tensor)>> {
    let plan = topology.plan;
    let world = topology.world;
    let image = shards.first().map(|s| s.x.size()).context("method.mixup: this rank has no shards")?;
    let device = shards[0].x.device();
    let per_rank = (0..world.world_size())
        .map(|r| plan.pieces(r).iter().map(|p| p.len()).sum::<usize>())
        .max()
        .unwrap_or(0)
        .max(1) as i64;
    let (channels, height, width) = (image[1], image[2], image[3]);
    let kind = match transport {
        MixupTransport::Uint8 => Kind::Uint8,
        MixupTransport::Float32 => Kind::Float,
    };
    // This rank's images (padded to the largest rank's count), in piece order.
    let images = Tensor::zeros([per_rank, channels, height, width], (kind, device));
    let labels = Tensor::zeros([per_rank], (Kind::Int64, device));
    let mut row = 0;
    for shard in shards {
        let n = shard.x.size()[0];
        if n == 0 {
            continue;
        }
        let sent = match transport {
            MixupTransport::Float32 => shard.x.shallow_clone(),
            MixupTransport::Uint8 => {
                let pixels = to_pixels(&shard.x)?;
                if !from_pixels(&pixels)?.equal(&shard.x) {
                    bail!(
                        "method.mixup: domain {}'s images are not the loader's normalised 8-bit pixels, so \
                         transport = \"uint8\" would change them; set method.mixup.transport = \"float32\"",
                        shard.domain
                    );
                }
                pixels
            }
        };
        images.narrow(0, row, n).f_copy_(&sent)?;
        labels.narrow(0, row, n).f_copy_(&shard.y)?;
        row += n;
    }
    let images = world.all_gather(&images).context("method.mixup: all-gather of the ranks' images")?;
    let labels = world.all_gather(&labels).context("method.mixup: all-gather of the ranks' labels")?;
    let batch = plan.batch_per_domain() as i64;
    let mut out: Vec<(Tensor, Tensor)> = (0..plan.num_domains())
        .map(|_| {
            (Tensor::zeros([batch, channels, height, width], (kind, device)), Tensor::zeros([batch], (Kind::Int64, device)))
        })
        .collect();
    for rank in 0..world.world_size() {
        let mut row = 0;
        for piece in plan.pieces(rank) {
            let n = piece.len() as i64;
            let (x, y) = &mut out[piece.domain];
            x.narrow(0, piece.lo as i64, n).f_copy_(&images.get(rank as i64).narrow(0, row, n))?;
            y.narrow(0, piece.lo as i64, n).f_copy_(&labels.get(rank as i64).narrow(0, row, n))?;
            row += n;
        }
    }
    out.into_iter()
        .map(|(x, y)| Ok((if kind == Kind::Uint8 { from_pixels(&x)? } else { x }, y)))
        .collect()
}

/// The loss of images mixed with their partner domain's images at the same positions.
struct MixedLoss {
    draws: PairDraws,
    batches: Vec<(Tensor, Tensor)>,
}

impl ImageLoss for MixedLoss {
    fn loss_sum(&self, model: &dyn Model, domain: usize, first: usize, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let lambda = self.draws.lambda[domain];
        let (partner_x, partner_y) = &self.batches[self.draws.partner[domain]];
        let n = x.size()[0];
        let (partner_x, partner_y) = (partner_x.narrow(0, first as i64, n), partner_y.narrow(0, first as i64, n));
        let logits = model.forward_t(&(x * lambda + partner_x * (1.0 - lambda)), true);
        let cross_entropy = |labels: &Tensor| {
            logits
                .f_cross_entropy_loss::<Tensor>(labels, None, Reduction::Sum, -100, 0.0)
                .context("method.mixup: cross-entropy of the mixed images")
        };
        Ok(cross_entropy(y)? * lambda + cross_entropy(&partner_y)? * (1.0 - lambda))
    }
}

impl Method for Mixup {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("mixup", ctx.topology, shards)?;
        let draws = pair_draws(ctx.seed, ctx.step, ctx.topology.num_domains(), self.cfg.alpha)?;
        let batches = whole_batches(ctx.topology, shards, self.cfg.transport)?;
        let loss = MixedLoss { draws, batches };
        let pass = Pass::plain(ctx.step, 0);
        let batch = gradients::batch_gradient_with(ctx.model, ctx.topology, shards, &pass, Some(&loss))?;
        ctx.optimizer.step(ctx.model.store().flat(), &batch.grad)?;
        Ok(StepStats { loss: batch.loss, extra: Default::default() })
    }
}
