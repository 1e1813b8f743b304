//! Weight Compander (Cakaj, Mehnert, Yang 2023, arXiv 2306.16993) as an explicit, named variant:
//! every conv and linear weight (`ParamKind::Weight`; not biases, not norm parameters) is
//! reparameterized w = f(v) through a fixed odd compander, and training is ERM on the latent v.
//!
//! **The compander is our inference, not the paper's equation** (only the abstract was found: a fixed
//! nonlinear odd function that limits large magnitudes and pushes small weights away from zero). The one
//! variant, `variant = "mu_law"`, is the mu-law compander
//!
//! f(v) = a sign(v) ln(1 + mu |v|) / ln(1 + mu),   f'(v) = a mu / (ln(1 + mu) (1 + mu |v|)),
//!
//! and f⁻¹(w) = sign(w) (exp(|w| ln(1 + mu) / a) - 1) / mu.
//!
//! Mechanics: the model's parameter buffer holds the effective weights w (evaluation, export, SWAD and
//! everything else see the real network); the method keeps the latent v as its state (the whole flat
//! buffer: f⁻¹(w) for the reparameterized weights, w itself for the rest), set at the first update to
//! v0 = f⁻¹(w0) so that training starts from the usual (or pretrained) network. A step: the ERM batch
//! gradient g_w ([`gradients::batch_gradient`], all-reduced; the exact path in deterministic mode), the
//! chain rule g_v = g_w f'(v), the Adam step on v (weight decay, when set, acts on v), then w = f(v) is
//! written back into the model. Only the all-reduced gradient is transformed, identically on every rank,
//! so the update is exact under any sharding (bit for bit on the exact path).
//!
//! Why the defaults (a = 0.25, mu = 25): with Adam the step in v hardly depends on the gradient's
//! scale, so a weight moves about f'(v) times as far as under plain ERM. As a function of the weight,
//! that gain is f'(v) = G0 exp(-|w| / s) with s = a / ln(1 + mu) ≈ 0.077 and G0 = mu s ≈ 1.92: weights
//! near zero learn about twice as fast (they are "reactivated"), the gain is 1 at |w| = s ln G0 ≈ 0.05
//! (the scale of a ResNet-50's initial conv and head weights, std ≈ 0.02-0.03), 0.5 at |w| ≈ 0.1 and 0.14 at
//! |w| ≈ 0.2: large magnitudes are compressed. Learning a and mu (which the paper allows) is left out.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::gradients::{self, Pass};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::{Model, ParamKind};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// The compander f (only one: the mu-law form, our inference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompanderVariant {
    /// f(v) = a sign(v) ln(1 + mu |v|) / ln(1 + mu).
    MuLaw,
}

/// Weight Compander hyperparameters (documented in [`WeightCompander`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WeightCompanderConfig {
    pub variant: CompanderVariant,
    pub a: f64,
    pub mu: f64,
}

impl Default for WeightCompanderConfig {
    fn default() -> Self {
        Self { variant: CompanderVariant::MuLaw, a: 0.25, mu: 25.0 }
    }
}

const STATE_LATENT: &str = "weight_compander.latent";

pub struct WeightCompander {
    a: f64,
    mu: f64,
    /// `[P]` bool on the parameters' device: true where the flat buffer holds a reparameterized weight.
    mask: Tensor,
    /// The latent v over the whole flat buffer (identity outside `mask`); `None` until the first update
    /// (or a restored checkpoint) sets it from the model's weights.
    latent: Option<Tensor>,
}

impl MethodDef for WeightCompander {
    type Config = WeightCompanderConfig;
    const NAME: &'static str = "weight_compander";
    const DOMAINBED_NAME: &'static str = "WeightCompander";
    const SUMMARY: &'static str =
        "ERM on latent weights v with w = f(v), f a fixed odd mu-law compander (our inference \
         of the paper's f) on conv/linear weights.";
    const REFERENCE: &'static str =
        "Cakaj, Mehnert, Yang 2023, arXiv 2306.16993 (abstract only; the mu-law f is our inference)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::fixed(
            "variant",
            "the compander: \"mu_law\", f(v) = a sign(v) ln(1 + mu|v|)/ln(1 + mu) (our inference, not the paper's f)",
        ),
        Hyperparameter::fixed("a", "output scale of f (f(1) = a), > 0"),
        Hyperparameter::fixed("mu", "compression of f (gain a mu/ln(1 + mu) at 0, decaying with |w|), > 0"),
    ];

    fn validate(cfg: &WeightCompanderConfig) -> Result<()> {
        for (field, value) in [("a", cfg.a), ("mu", cfg.mu)] {
            if !(value.is_finite() && value > 0.0) {
                bail!("key `method.weight_compander.{field}`: must be a finite number > 0, got {value}");
            }
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &WeightCompanderConfig) -> Vec<CrossRankStat> {
        vec![CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)), CrossRankStat::LOSS]
    }

    fn new(cfg: &WeightCompanderConfig, model: &dyn Model, _num_domains: usize) -> Result<Self> {
        let store = model.store();
        let mask = Tensor::zeros([store.numel() as i64], (Kind::Bool, store.device()));
        for p in store.params().iter().filter(|p| p.kind == ParamKind::Weight) {
            let _ = mask.narrow(0, p.offset as i64, p.numel as i64).f_fill_(1)?;
        }
        let CompanderVariant::MuLaw = cfg.variant;
        Ok(Self { a: cfg.a, mu: cfg.mu, mask, latent: None })
    }
}

impl WeightCompander {
    /// f(v) on the reparameterized entries, v elsewhere.
    fn compand(&self, v: &Tensor) -> Tensor {
        let f = (v.abs() * self.mu).log1p() * v.sign() * (self.a / self.mu.ln_1p());
        f.where_self(&self.mask, v)
    }

    /// g f'(v) on the reparameterized entries, g elsewhere.
    fn chain(&self, v: &Tensor, g: &Tensor) -> Tensor {
        let slope = (v.abs() * self.mu + 1.0).reciprocal() * (self.a * self.mu / self.mu.ln_1p());
        (g * slope).where_self(&self.mask, g)
    }

    /// f⁻¹(w) on the reparameterized entries (computed in f64), w elsewhere.
    fn expand(&self, w: &Tensor) -> Result<Tensor> {
        let w64 = w.to_kind(Kind::Double);
        let v = (w64.abs() * (self.mu.ln_1p() / self.a)).expm1() * w64.sign() * (1.0 / self.mu);
        let v = v.to_kind(Kind::Float).where_self(&self.mask, w);
        let finite = v.isfinite().all().f_int64_value(&[]).context("checking the latent weights")? != 0;
        if !finite {
            bail!(
                "method.weight_compander: a weight too large for f⁻¹ (exp(|w| ln(1 + mu)/a) overflows f32); raise \
                 `method.weight_compander.a` or lower `mu`"
            );
        }
        Ok(v)
    }
}

impl Method for WeightCompander {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("weight_compander", ctx.topology, shards)?;
        if self.latent.is_none() {
            let _guard = tch::no_grad_guard();
            self.latent = Some(self.expand(&ctx.model.store().flat().detach())?);
        }
        let batch = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        let _guard = tch::no_grad_guard();
        let v = self.latent.as_ref().context("weight_compander: latent weights")?;
        let grad = self.chain(v, &batch.grad);
        ctx.optimizer.step(v, &grad)?;
        ctx.model.store().set_flat(&self.compand(v))?;
        Ok(StepStats { loss: batch.loss, extra: Default::default() })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.latent.iter().map(|v| (STATE_LATENT.to_string(), v.shallow_clone())).collect()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        // A checkpoint taken before the first update holds no latent: it is then set from the
        // restored weights at the next update, as in a fresh run.
        self.latent = match state.iter().find(|(n, _)| n == STATE_LATENT) {
            None => None,
            Some((_, t)) => {
                let numel = self.mask.numel() as i64;
                if t.size() != [numel] {
                    bail!("method state: {STATE_LATENT:?} has shape {:?}, expected [{numel}]", t.size());
                }
                Some(t.to_kind(Kind::Float).to_device(self.mask.device()).copy())
            }
        };
        Ok(())
    }
}
