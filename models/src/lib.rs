//! Models for mgrun: torchvision-structured ResNets and a small CNN for tiny images.
//!
//! All trainable parameters of a model live in **one flat f32 buffer** ([`ParamStore`]); each
//! parameter is a view into it. Optimizers, gradient buckets and per-parameter statistics
//! (DSP-Reg's moments) therefore work on single flat tensors, and a checkpoint is a few large
//! tensors with a table of names and offsets.

pub mod io;
pub mod params;
pub mod resnet;
pub mod small_cnn;

pub use io::{load_safetensors, save_safetensors};
pub use params::{Param, ParamBuilder, ParamId, ParamKind, ParamStore};
pub use resnet::ResNet;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// Architecture and head of a classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `resnet18`, `resnet50` or `small_cnn`.
    pub arch: String,
    pub num_classes: usize,
    /// BatchNorm layers always use their running statistics (DomainBed's `freeze_bn`).
    pub freeze_bn: bool,
    /// Dropout probability on the features, before the linear head (DomainBed's `resnet_dropout`).
    pub dropout: f64,
    /// Channel width of `small_cnn` (ignored by the ResNets).
    pub width: i64,
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
    fn classify(&self, features: &Tensor, train: bool) -> Tensor;
    fn store(&self) -> &ParamStore;
    fn store_mut(&mut self) -> &mut ParamStore;
    fn spec(&self) -> &ModelSpec;
}

/// Builds `spec` on `device`, initialised deterministically from `seed`.
pub fn build(spec: &ModelSpec, device: Device, seed: i64) -> Result<Box<dyn Model>> {
    match spec.arch.as_str() {
        "resnet18" | "resnet50" => Ok(Box::new(resnet::ResNet::new(spec, device, seed)?)),
        "small_cnn" => Ok(Box::new(small_cnn::SmallCnn::new(spec, device, seed)?)),
        other => bail!("model.arch: unknown architecture {other:?} (expected resnet18, resnet50 or small_cnn)"),
    }
}
