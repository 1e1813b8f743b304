//! DomainBed's MNIST_CNN shape for tiny RGB images: four 3x3 convolutions with ReLU and GroupNorm,
//! global average pooling, dropout and a linear head. GroupNorm normalises each sample on its own,
//! so the model's output does not depend on how a batch is split across ranks.

use crate::params::Init;
use crate::{Execution, Model, ModelSpec, ParamBuilder, ParamId, ParamKind, ParamStore};
use anyhow::{bail, Result};
use tch::{Device, Tensor};

const GROUPS: i64 = 8;

struct ConvBlock {
    weight: ParamId,
    bias: ParamId,
    norm_weight: ParamId,
    norm_bias: ParamId,
    stride: i64,
}

pub struct SmallCnn {
    spec: ModelSpec,
    execution: Execution,
    blocks: Vec<ConvBlock>,
    fc_weight: ParamId,
    fc_bias: ParamId,
    store: ParamStore,
}

impl SmallCnn {
    pub fn new(spec: &ModelSpec, device: Device, seed: i64) -> Result<Self> {
        Self::new_with(spec, Execution::default(), device, seed)
    }

    pub fn new_with(spec: &ModelSpec, execution: Execution, device: Device, seed: i64) -> Result<Self> {
        let w = spec.width;
        if w < GROUPS || w % GROUPS != 0 {
            bail!("model.width: small_cnn needs a multiple of {GROUPS}, got {w}");
        }
        let mut b = ParamBuilder::new();
        let channels = [(3, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 2 * w, 1)];
        let mut blocks = Vec::new();
        for (i, &(cin, cout, stride)) in channels.iter().enumerate() {
            let n = i + 1;
            let fan_in = cin * 9;
            blocks.push(ConvBlock {
                weight: b.param(
                    &format!("conv{n}.weight"),
                    &[cout, cin, 3, 3],
                    ParamKind::Weight,
                    Init::UniformFanIn(fan_in),
                ),
                bias: b.param(&format!("conv{n}.bias"), &[cout], ParamKind::Bias, Init::UniformFanIn(fan_in)),
                norm_weight: b.param(&format!("gn{n}.weight"), &[cout], ParamKind::NormWeight, Init::Const(1.0)),
                norm_bias: b.param(&format!("gn{n}.bias"), &[cout], ParamKind::NormBias, Init::Const(0.0)),
                stride,
            });
        }
        let feat = 2 * w;
        let classes = spec.num_classes as i64;
        let fc_weight = b.param("fc.weight", &[classes, feat], ParamKind::Weight, Init::UniformFanIn(feat));
        let fc_bias = b.param("fc.bias", &[classes], ParamKind::Bias, Init::UniformFanIn(feat));
        let store = b.build_with_layout(device, seed, execution.channels_last)?;
        Ok(Self { spec: spec.clone(), execution, blocks, fc_weight, fc_bias, store })
    }
}

impl SmallCnn {
    fn features_here(&self, xs: &Tensor) -> Tensor {
        let p = &self.store;
        let mut h = xs.shallow_clone();
        for blk in &self.blocks {
            h = h
                .conv2d(p.get(blk.weight), Some(p.get(blk.bias)), [blk.stride, blk.stride], [1, 1], [1, 1], 1)
                .relu()
                .group_norm(GROUPS, Some(p.get(blk.norm_weight)), Some(p.get(blk.norm_bias)), 1e-5, false);
        }
        h.mean_dim(&[2i64, 3][..], false, None)
    }

    fn classify_here(&self, features: &Tensor, train: bool) -> Tensor {
        let p = &self.store;
        features.dropout(self.spec.dropout, train).linear(p.get(self.fc_weight), Some(p.get(self.fc_bias)))
    }
}

impl Model for SmallCnn {
    /// One autocast region for the whole forward pass.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.execution.run(xs, |xs| self.classify_here(&self.features_here(xs), train))
    }

    fn features(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.execution.run(xs, |xs| self.features_here(xs))
    }

    fn classify(&self, features: &Tensor, train: bool) -> Tensor {
        self.execution.run(features, |f| self.classify_here(f, train))
    }

    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.store
    }
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }
    fn execution(&self) -> Execution {
        self.execution
    }
}
