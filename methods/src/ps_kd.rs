//! PS-KD, progressive self-knowledge distillation (Kim et al., ICCV 2021; lgcnsai/PS-KD-Pytorch), as
//! ERM plus its regularizer: the hard label is softened with the image's previous prediction,
//! ỹ = (1 - α_t) onehot(y) + α_t Π[id], and the loss is the soft cross-entropy -sum_c ỹ_c log softmax(z)_c;
//! after the step Π[id] <- softmax(z) (detached).
//!
//! Epochs become steps: mgrun draws batches with DomainBed's infinite with-replacement sampler, so
//! there is no epoch boundary. The published schedule α_t = α_T (t + 1)/T over epochs t of T becomes
//! α_t = α_T (step + 1)/total_steps, and "the prediction from the previous epoch" becomes the
//! prediction from the last step that drew the image (at the published one prediction per image per
//! epoch, the same thing). An image never drawn before has Π = onehot(y), as the published code's
//! epoch-0 initialisation gives.
//!
//! Π is a per-training-domain table keyed by [`DomainShard::ids`], kept identical on every rank by
//! all-gathering the step's predictions (see [`crate::elr`]'s [`SampleTables`]); each row holds the C
//! probabilities and a last column set to 1 once the image has a prediction.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::elr::{per_image_gradient, ImageTerms, SampleTables};
use crate::gradients::Pass;
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::Model;
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// PS-KD hyperparameters (documented in [`PsKd`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PsKdConfig {
    pub alpha_t: f64,
}

impl Default for PsKdConfig {
    /// The published α_T.
    fn default() -> Self {
        Self { alpha_t: 0.8 }
    }
}

pub struct PsKd {
    cfg: PsKdConfig,
    classes: usize,
    predictions: SampleTables,
}

impl MethodDef for PsKd {
    type Config = PsKdConfig;
    const NAME: &'static str = "ps_kd";
    const DOMAINBED_NAME: &'static str = "PSKD";
    const SUMMARY: &'static str =
        "ERM + progressive self-distillation: targets mix the label with the image's last prediction.";
    const REFERENCE: &'static str = "Kim et al., ICCV 2021 (lgcnsai/PS-KD-Pytorch); epochs as steps";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[Hyperparameter::fixed(
        "alpha_t",
        "α_T: weight of the last prediction in the target at the last step (α_t = α_T (step + 1)/total_steps)",
    )];

    fn validate(cfg: &PsKdConfig) -> Result<()> {
        if !(cfg.alpha_t.is_finite() && (0.0..=1.0).contains(&cfg.alpha_t)) {
            bail!("key `method.ps_kd.alpha_t`: must be in [0, 1], got {}", cfg.alpha_t);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &PsKdConfig) -> Vec<CrossRankStat> {
        vec![
            CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)),
            CrossRankStat::world_sum("loss and objective", MessageSize::Scalars(2)),
            // Its rows hold C + 1 values (the prediction and whether the image was seen).
            CrossRankStat { size: MessageSize::ImageRows(1), ..SampleTables::EXCHANGE },
        ]
    }

    fn new(cfg: &PsKdConfig, model: &dyn Model, num_domains: usize) -> Result<Self> {
        let classes = model.spec().num_classes;
        Ok(Self {
            cfg: cfg.clone(),
            classes,
            predictions: SampleTables::new("ps_kd", "prediction", num_domains, classes + 1),
        })
    }
}

impl Method for PsKd {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("ps_kd", ctx.topology, shards)?;
        let alpha = self.cfg.alpha_t * (ctx.step + 1) as f64 / ctx.total_steps.max(1) as f64;
        let alpha = alpha.min(self.cfg.alpha_t);
        let previous = self.predictions.lookup(shards)?;
        let classes = self.classes as i64;
        let pass = Pass::plain(ctx.step, 0);
        let result = per_image_gradient(ctx.model, ctx.topology, shards, &previous, &pass, |model, x, y, prev| {
            let logits = model.forward_t(x, true);
            let ce: Tensor = logits.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Sum, -100, 0.0)?;
            let onehot = y.f_one_hot(classes)?.to_kind(Kind::Float);
            // Images without a prediction yet: the label itself (the published epoch-0 table).
            let seen = prev.narrow(1, classes, 1);
            let pi: Tensor = prev.narrow(1, 0, classes) * &seen + &onehot * (1.0 - &seen);
            let target: Tensor = onehot * (1.0 - alpha) + pi * alpha;
            let log_p = logits.log_softmax(1, Kind::Float);
            let soft = -(target * &log_p).sum(Kind::Float);
            let p = log_p.detach().exp();
            let record = Tensor::f_cat(&[p, Tensor::ones([y.size()[0], 1], (Kind::Float, y.device()))], 1)?;
            let erm = ce.f_double_value(&[]).context("reading the cross-entropy")?;
            Ok(ImageTerms { objective: soft, erm, records: Some(record) })
        })?;
        self.predictions.exchange_and_write(ctx.topology, shards, &result.records)?;
        ctx.optimizer.step(ctx.model.store().flat(), &result.grad)?;
        let extra = [("ps_kd_alpha".to_string(), alpha), ("ps_kd_objective".to_string(), result.objective)];
        Ok(StepStats { loss: result.loss, extra: extra.into_iter().collect() })
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.predictions.state()
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        self.predictions.load_state(state)
    }
}
