//! Models for mgrun: torchvision-structured ResNets and a small CNN for tiny images.
//!
//! All trainable parameters of a model live in **one flat f32 buffer** ([`ParamStore`]); each
//! parameter is a view into it. Optimizers, gradient buckets and per-parameter statistics
//! (DSP-Reg's moments) therefore work on single flat tensors, and a checkpoint is a few large
//! tensors with a table of names and offsets.

pub mod classifier;
pub mod io;
pub mod params;
pub mod resnet;
pub mod small_cnn;

pub use io::{load_safetensors, save_safetensors};
pub use params::{Param, ParamBuilder, ParamId, ParamKind, ParamStore};
pub use resnet::ResNet;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Architecture and head of a classifier: the `[model]` section of a job config, whose class count
/// comes from the dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// `resnet18`, `resnet50` or `small_cnn`.
    pub arch: String,
    /// Set from the dataset, never from a config.
    #[serde(skip)]
    pub num_classes: usize,
    /// BatchNorm layers always use their running statistics (DomainBed's `freeze_bn`).
    pub freeze_bn: bool,
    /// Dropout probability on the features, before the linear head (DomainBed's `resnet_dropout`).
    pub dropout: f64,
    /// Channel width of `small_cnn` (ignored by the ResNets).
    pub width: i64,
    /// A torchvision ResNet state dict (safetensors) to start from, as torchvision's `weights=`; the
    /// `fc.*` head is skipped when its class count differs. [`build`] starts from random weights:
    /// training loads these with `mgrun_checkpoint::load_pretrained`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pretrained: Option<std::path::PathBuf>,
}

impl Default for ModelSpec {
    /// The configuration defaults: DomainBed's ResNet-50 with frozen BatchNorm.
    fn default() -> Self {
        Self { arch: "resnet50".into(), num_classes: 0, freeze_bn: true, dropout: 0.0, width: 64, pretrained: None }
    }
}

/// Arithmetic of the forward pass. Parameters, gradients, losses and optimizer state are always
/// f32; `Bf16` runs the forward under bf16 autocast (convolutions and matmuls in bf16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    /// `fp32` or `bf16`; `fp16` is refused, saying why.
    fn from_str(name: &str) -> Result<Precision> {
        match name {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "fp16" => bail!(
                "\"fp16\" needs dynamic loss scaling, which mgrun does not implement; use \"bf16\" (same tensor-core \
                 speed, no loss scaling) or \"fp32\""
            ),
            other => bail!("expected \"fp32\" or \"bf16\", got {other:?}"),
        }
    }
}

/// How a model executes, beside what it is ([`ModelSpec`]): these choices change speed, not the
/// function the model computes (up to bf16 rounding).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Execution {
    pub precision: Precision,
    /// Store 4-D conv weights channels-last and convert inputs to channels-last, so that cuDNN
    /// runs NHWC kernels (faster on tensor cores).
    pub channels_last: bool,
}

impl Execution {
    /// The autocast region of one forward pass on `device` (`None` in fp32).
    fn autocast(&self, device: Device) -> Option<mgrun_torch_shim::AutocastGuard> {
        if self.precision != Precision::Bf16 {
            return None;
        }
        match mgrun_torch_shim::autocast_bf16(device) {
            Ok(guard) => Some(guard),
            Err(error) => {
                // Checked when the model is built (`check`), so this is not expected to happen.
                eprintln!("mgrun: warning: running the forward pass in fp32: {error:#}");
                None
            }
        }
    }

    /// `xs` in the memory format this execution uses.
    fn input(&self, xs: &Tensor) -> Tensor {
        if self.channels_last && xs.dim() == 4 {
            xs.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
        } else {
            xs.shallow_clone()
        }
    }

    /// Fails early when the device cannot run this execution.
    fn check(&self, device: Device) -> Result<()> {
        if self.precision == Precision::Bf16 {
            drop(mgrun_torch_shim::autocast_bf16(device)?);
        }
        Ok(())
    }

    /// Runs one forward pass (`forward` gets the input in this execution's memory format) under
    /// this execution's autocast; the result is f32 so that losses stay in f32.
    pub(crate) fn run(&self, xs: &Tensor, forward: impl FnOnce(&Tensor) -> Tensor) -> Tensor {
        let _autocast = self.autocast(xs.device());
        let out = forward(&self.input(xs));
        if out.kind() == Kind::Float {
            out
        } else {
            out.to_kind(Kind::Float)
        }
    }
}

/// A classifier: a featurizer followed by dropout and a linear head.
pub trait Model: Send {
    /// Logits for a batch of NCHW images. `train` enables dropout and BN batch statistics
    /// (unless BN is frozen).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let f = self.features(xs, train);
        self.classify(&f, train)
    }
    /// Pooled features, `[N, feature_dim]`.
    fn features(&self, xs: &Tensor, train: bool) -> Tensor;
    /// Dropout (when training) and the linear head on features.
    fn classify(&self, features: &Tensor, train: bool) -> Tensor {
        self.linear_head(&self.head_input(features, train))
    }
    /// The head's input: features after its dropout (DomainBed's featurizer output, on which
    /// CORAL aligns moments and Fishr takes per-sample head gradients).
    fn head_input(&self, features: &Tensor, train: bool) -> Tensor;
    /// The linear head alone, logits = W h + b.
    fn linear_head(&self, head_input: &Tensor) -> Tensor;
    /// D, the length of a feature vector (the head's input).
    fn feature_dim(&self) -> usize;
    fn store(&self) -> &ParamStore;
    fn store_mut(&mut self) -> &mut ParamStore;
    fn spec(&self) -> &ModelSpec;
    /// Precision and memory format of the forward pass.
    fn execution(&self) -> Execution {
        Execution::default()
    }
}

/// Every `model.arch` this crate builds.
pub const ARCHITECTURES: &[&str] = &["resnet18", "resnet50", "small_cnn"];

/// True for the architectures with BatchNorm layers (whose training-mode statistics depend on which
/// images a forward pass sees, unless `freeze_bn`).
pub fn has_batch_norm(arch: &str) -> bool {
    arch.starts_with("resnet")
}

/// Builds `spec` on `device`, initialised deterministically from `seed` (fp32, NCHW).
pub fn build(spec: &ModelSpec, device: Device, seed: i64) -> Result<Box<dyn Model>> {
    build_with(spec, Execution::default(), device, seed)
}

/// Builds `spec` on `device` to run with `execution`; the initial parameters are the same as
/// [`build`]'s for the same `seed`.
pub fn build_with(spec: &ModelSpec, execution: Execution, device: Device, seed: i64) -> Result<Box<dyn Model>> {
    execution.check(device).context("model execution")?;
    match spec.arch.as_str() {
        "resnet18" | "resnet50" => Ok(Box::new(resnet::ResNet::new_with(spec, execution, device, seed)?)),
        "small_cnn" => Ok(Box::new(small_cnn::SmallCnn::new_with(spec, execution, device, seed)?)),
        other => bail!("model.arch: unknown architecture {other:?} (expected one of {})", ARCHITECTURES.join(", ")),
    }
}
