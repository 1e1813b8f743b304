//! DomainBed's MNIST_CNN shape for tiny RGB images: four 3x3 convolutions with ReLU and GroupNorm,
//! global average pooling, dropout and a linear head. GroupNorm normalises each sample on its own,
//! so the model's output does not depend on how a batch is split across ranks.

use crate::classifier::{Classifier, Featurizer};
use crate::params::Init;
use crate::{Execution, ModelSpec, ParamBuilder, ParamId, ParamKind};
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
    blocks: Vec<ConvBlock>,
    classifier: Classifier,
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
        let classifier = Classifier::build(spec, execution, b, 2 * w, device, seed)?;
        Ok(Self { blocks, classifier })
    }
}

impl Featurizer for SmallCnn {
    fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    fn classifier_mut(&mut self) -> &mut Classifier {
        &mut self.classifier
    }

    fn featurize(&self, xs: &Tensor, _train: bool) -> Tensor {
        let p = self.classifier.store();
        let mut h = xs.shallow_clone();
        for blk in &self.blocks {
            h = h
                .conv2d(p.get(blk.weight), Some(p.get(blk.bias)), [blk.stride, blk.stride], [1, 1], [1, 1], 1)
                .relu()
                .group_norm(GROUPS, Some(p.get(blk.norm_weight)), Some(p.get(blk.norm_bias)), 1e-5, false);
        }
        h.mean_dim(&[2i64, 3][..], false, None)
    }
}
