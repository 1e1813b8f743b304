//! OCNN's kernel orthogonality (Wang, Chen, Chakraborty, Yu; CVPR 2020; samaonline/Orthogonal-
//! Convolutional-Neural-Networks) as ERM plus its regularizer: L = CE + λ sum_layers L_orth.
//! - A k x k conv kernel K (k > 1, `[Co, Ci, k, k]`): O = conv2d(K, K, stride S, padding P) with
//!   P = floor((k - 1)/S) S (the paper's padding; the published script passes padding 1, which is the
//!   same for the usual k = 3, S = 2 but not for S = 1), and L_orth = ||O - I_r0||_F, I_r0 zero but for
//!   eye(Co) at the centre. S is the layer's stride: 2 for the weights named in `strided`, else 1
//!   (a parameter does not know its layer's stride).
//! - A 1 x 1 conv and (with `linear`) a fully connected weight: W as `[Co, rest]`, L_orth =
//!   ||W'ᵀW' - I||_F on the smaller side (W' = W or Wᵀ), the published `orth_dist`.
//!
//! The norms are not squared, as in the published code (the paper writes them squared). The first
//! conv (the stem) is skipped with `skip_first_conv`, as the published ResNet script does.
//!
//! The penalty depends on the parameters only: every rank computes the same term from the same
//! weights, and its gradient is added to the batch gradient after the all-reduce, so the update is
//! exact (and bit for bit in deterministic mode) at any world size.

use crate::common::check_shards;
use crate::descriptor::{CrossRankStat, Hyperparameter, MessageSize, MethodDef};
use crate::gradients::{self, Pass};
use crate::{DomainShard, Method, StepStats, UpdateContext};
use anyhow::{bail, Context, Result};
use mgrun_models::{Model, ParamKind};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// OCNN hyperparameters (documented in [`Ocnn`]'s `HYPERPARAMETERS`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OcnnConfig {
    pub lambda: f64,
    pub skip_first_conv: bool,
    pub linear: bool,
    pub strided: Vec<String>,
}

impl Default for OcnnConfig {
    fn default() -> Self {
        Self { lambda: 0.01, skip_first_conv: true, linear: true, strided: Vec::new() }
    }
}

/// How one weight is penalised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Penalty {
    /// A k x k kernel (k > 1) at this stride.
    Kernel { stride: i64 },
    /// A 1 x 1 conv or a linear layer.
    Matrix,
}

pub struct Ocnn {
    lambda: f64,
    /// (index into the store's parameters, penalty).
    layers: Vec<(usize, Penalty)>,
}

impl MethodDef for Ocnn {
    type Config = OcnnConfig;
    const NAME: &'static str = "ocnn";
    const DOMAINBED_NAME: &'static str = "OCNN";
    const SUMMARY: &'static str = "ERM + lambda x the kernel orthogonality of the conv (and linear) weights.";
    const REFERENCE: &'static str = "Wang et al., CVPR 2020 (samaonline/Orthogonal-Convolutional-Neural-Networks)";
    const HYPERPARAMETERS: &'static [Hyperparameter] = &[
        Hyperparameter::fixed("lambda", "weight of the summed orthogonality distances (the script's --r), >= 0"),
        Hyperparameter::fixed("skip_first_conv", "leave the first conv kernel (the stem) unpenalised"),
        Hyperparameter::fixed(
            "linear",
            "also penalise 2-D (fully connected) weights, as ||WᵀW - I|| on the smaller side",
        ),
        Hyperparameter::fixed("strided", "names of the conv weights whose layer has stride 2 (others: stride 1)"),
    ];

    fn validate(cfg: &OcnnConfig) -> Result<()> {
        if !(cfg.lambda.is_finite() && cfg.lambda >= 0.0) {
            bail!("key `method.ocnn.lambda`: must be a finite number >= 0, got {}", cfg.lambda);
        }
        Ok(())
    }

    fn cross_rank_statistics(_cfg: &OcnnConfig) -> Vec<CrossRankStat> {
        vec![CrossRankStat::world_sum("gradient", MessageSize::PerParameter(1)), CrossRankStat::LOSS]
    }

    fn new(cfg: &OcnnConfig, model: &dyn Model, _num_domains: usize) -> Result<Self> {
        let params = model.store().params();
        for name in &cfg.strided {
            if !params.iter().any(|p| &p.name == name && p.shape.len() == 4) {
                bail!("key `method.ocnn.strided`: {name:?} is not a conv weight of this model");
            }
        }
        let mut layers = Vec::new();
        let mut first_conv = true;
        for (i, p) in params.iter().enumerate() {
            if p.kind != ParamKind::Weight {
                continue;
            }
            match p.shape.len() {
                4 => {
                    if std::mem::take(&mut first_conv) && cfg.skip_first_conv {
                        continue;
                    }
                    let penalty = if p.shape[2] == 1 && p.shape[3] == 1 {
                        Penalty::Matrix
                    } else {
                        Penalty::Kernel { stride: if cfg.strided.contains(&p.name) { 2 } else { 1 } }
                    };
                    layers.push((i, penalty));
                }
                2 if cfg.linear => layers.push((i, Penalty::Matrix)),
                _ => {}
            }
        }
        Ok(Self { lambda: cfg.lambda, layers })
    }
}

/// ||conv2d(K, K, S, P) - I_r0||_F.
fn kernel_distance(k: &Tensor, stride: i64) -> Result<Tensor> {
    let size = k.size();
    let (co, kh) = (size[0], size[2]);
    let padding = (kh - 1) / stride * stride;
    let out = k.f_conv2d::<Tensor>(k, None, [stride, stride], [padding, padding], [1, 1], 1)?;
    let (h, w) = (out.size()[2], out.size()[3]);
    let target = Tensor::zeros([co, co, h, w], (out.kind(), out.device()));
    target.select(3, w / 2).select(2, h / 2).f_copy_(&Tensor::eye(co, (out.kind(), out.device())))?;
    Ok((out - target).norm())
}

/// ||MᵀM - I||_F, M the weight as `[rows, cols]` with rows >= cols.
fn matrix_distance(w: &Tensor) -> Result<Tensor> {
    let mut m = w.reshape([w.size()[0], -1]);
    if m.size()[0] < m.size()[1] {
        m = m.tr();
    }
    let gram = m.tr().f_matmul(&m)?;
    let n = gram.size()[0];
    Ok((gram - Tensor::eye(n, (w.kind(), w.device()))).norm())
}

impl Method for Ocnn {
    fn update(&mut self, ctx: &mut UpdateContext<'_>, shards: &[DomainShard]) -> Result<StepStats> {
        check_shards("ocnn", ctx.topology, shards)?;
        let batch = gradients::batch_gradient(ctx.model, ctx.topology, shards, &Pass::plain(ctx.step, 0))?;
        let store = ctx.model.store();
        // The penalty's gradient by autograd into the parameters' views of a flat buffer, with
        // `run_backward` (no accumulation into the store's gradient, which `batch.grad` may alias).
        let mut distances = Vec::with_capacity(self.layers.len());
        let mut inputs = Vec::with_capacity(self.layers.len());
        for &(i, penalty) in &self.layers {
            let p = &store.params()[i];
            distances.push(match penalty {
                Penalty::Kernel { stride } => kernel_distance(&p.tensor, stride)?,
                Penalty::Matrix => matrix_distance(&p.tensor)?,
            });
            inputs.push(i);
        }
        let total = distances.into_iter().reduce(|a, b| a + b);
        let mut value = 0.0;
        let grad = match total {
            Some(total) => {
                value = total.f_double_value(&[]).context("reading the orthogonality penalty")?;
                let tensors: Vec<&Tensor> = inputs.iter().map(|&i| &store.params()[i].tensor).collect();
                let grads = Tensor::f_run_backward(&[&total], &tensors, false, false)
                    .context("gradient of the orthogonality penalty")?;
                let _guard = tch::no_grad_guard();
                let flat = Tensor::zeros_like(store.flat());
                for (&i, g) in inputs.iter().zip(&grads) {
                    store.params()[i].unflatten(&flat).f_copy_(g)?;
                }
                &batch.grad + flat * self.lambda
            }
            None => batch.grad.shallow_clone(),
        };
        ctx.optimizer.step(ctx.model.store().flat(), &grad)?;
        let extra = [("ocnn_penalty".to_string(), value)];
        Ok(StepStats { loss: batch.loss, extra: extra.into_iter().collect() })
    }
}
