//! ResNet-18 and ResNet-50 with torchvision's exact structure, initialisation and state-dict
//! names (`conv1.weight`, `layer1.0.bn1.running_mean`, `layer2.0.downsample.0.weight`, ...), so
//! that torchvision checkpoints load unchanged. The Bottleneck block strides on its 3x3 conv
//! (torchvision's "ResNet v1.5").

use crate::classifier::{Classifier, Featurizer};
use crate::params::Init;
use crate::{Execution, ModelSpec, ParamBuilder, ParamId, ParamKind, ParamStore};
use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

/// torchvision's BatchNorm2d defaults.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

/// Which residual block a ResNet is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34), expansion 1.
    Basic,
    /// 1x1 -> 3x3 -> 1x1 convs (ResNet-50/101/152), expansion 4.
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> i64 {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// Block type and blocks per stage of a named architecture.
pub fn arch_layout(arch: &str) -> Option<(BlockKind, [usize; 4])> {
    match arch {
        "resnet18" => Some((BlockKind::Basic, [2, 2, 2, 2])),
        "resnet50" => Some((BlockKind::Bottleneck, [3, 4, 6, 3])),
        _ => None,
    }
}

/// A bias-free convolution (every conv of a torchvision ResNet).
struct Conv {
    weight: ParamId,
    stride: i64,
    padding: i64,
}

impl Conv {
    fn declare(b: &mut ParamBuilder, name: &str, cin: i64, cout: i64, kernel: i64, stride: i64) -> Self {
        let weight = b.param(
            &format!("{name}.weight"),
            &[cout, cin, kernel, kernel],
            ParamKind::Weight,
            Init::KaimingNormalFanOut,
        );
        Conv { weight, stride, padding: kernel / 2 }
    }

    fn forward(&self, store: &ParamStore, xs: &Tensor) -> Tensor {
        xs.conv2d(
            store.get(self.weight),
            None::<&Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// BatchNorm2d: affine params in the flat buffer, running statistics as store buffers.
struct BatchNorm {
    weight: ParamId,
    bias: ParamId,
    running_mean: usize,
    running_var: usize,
    num_batches_tracked: usize,
}

impl BatchNorm {
    fn declare(b: &mut ParamBuilder, name: &str, channels: i64) -> Self {
        let weight = b.param(&format!("{name}.weight"), &[channels], ParamKind::NormWeight, Init::Const(1.0));
        let bias = b.param(&format!("{name}.bias"), &[channels], ParamKind::NormBias, Init::Const(0.0));
        let running_mean =
            b.buffer(&format!("{name}.running_mean"), Tensor::zeros([channels], (Kind::Float, Device::Cpu)));
        let running_var =
            b.buffer(&format!("{name}.running_var"), Tensor::ones([channels], (Kind::Float, Device::Cpu)));
        // A 0-dim int64 tensor, as in torchvision's state dict.
        let num_batches_tracked =
            b.buffer(&format!("{name}.num_batches_tracked"), Tensor::zeros([0i64; 0], (Kind::Int64, Device::Cpu)));
        BatchNorm { weight, bias, running_mean, running_var, num_batches_tracked }
    }

    /// `use_batch_stats`: normalise with the batch's statistics and update the running ones in
    /// place (training without frozen BN); otherwise normalise with the running statistics.
    fn forward(&self, store: &ParamStore, xs: &Tensor, use_batch_stats: bool) -> Tensor {
        let out = xs.batch_norm(
            Some(store.get(self.weight)),
            Some(store.get(self.bias)),
            Some(store.buffer(self.running_mean)),
            Some(store.buffer(self.running_var)),
            use_batch_stats,
            BN_MOMENTUM,
            BN_EPS,
            true,
        );
        if use_batch_stats {
            let _guard = tch::no_grad_guard();
            // Shares storage with the store's buffer, so the increment is visible there.
            let _ = store.buffer(self.num_batches_tracked).shallow_clone().g_add_scalar_(1);
        }
        out
    }
}

struct Downsample {
    conv: Conv,
    bn: BatchNorm,
}

/// One residual block; `conv3`/`bn3` exist only in Bottleneck blocks.
struct Block {
    conv1: Conv,
    bn1: BatchNorm,
    conv2: Conv,
    bn2: BatchNorm,
    conv3: Option<(Conv, BatchNorm)>,
    downsample: Option<Downsample>,
}

impl Block {
    fn declare(b: &mut ParamBuilder, name: &str, kind: BlockKind, inplanes: i64, planes: i64, stride: i64) -> Self {
        let out_channels = planes * kind.expansion();
        let (conv1, bn1, conv2, bn2, conv3) = match kind {
            BlockKind::Basic => {
                let conv1 = Conv::declare(b, &format!("{name}.conv1"), inplanes, planes, 3, stride);
                let bn1 = BatchNorm::declare(b, &format!("{name}.bn1"), planes);
                let conv2 = Conv::declare(b, &format!("{name}.conv2"), planes, planes, 3, 1);
                let bn2 = BatchNorm::declare(b, &format!("{name}.bn2"), planes);
                (conv1, bn1, conv2, bn2, None)
            }
            BlockKind::Bottleneck => {
                // groups = 1 and base_width = 64, so the inner width equals `planes`.
                let conv1 = Conv::declare(b, &format!("{name}.conv1"), inplanes, planes, 1, 1);
                let bn1 = BatchNorm::declare(b, &format!("{name}.bn1"), planes);
                let conv2 = Conv::declare(b, &format!("{name}.conv2"), planes, planes, 3, stride);
                let bn2 = BatchNorm::declare(b, &format!("{name}.bn2"), planes);
                let conv3 = Conv::declare(b, &format!("{name}.conv3"), planes, out_channels, 1, 1);
                let bn3 = BatchNorm::declare(b, &format!("{name}.bn3"), out_channels);
                (conv1, bn1, conv2, bn2, Some((conv3, bn3)))
            }
        };
        let downsample = (stride != 1 || inplanes != out_channels).then(|| Downsample {
            conv: Conv::declare(b, &format!("{name}.downsample.0"), inplanes, out_channels, 1, stride),
            bn: BatchNorm::declare(b, &format!("{name}.downsample.1"), out_channels),
        });
        Block { conv1, bn1, conv2, bn2, conv3, downsample }
    }

    /// In place where torchvision is (ReLU after BN, the residual sum): BN's backward keeps its input,
    /// not its output, so the output can be overwritten; the values are those of the out-of-place ops,
    /// without a fresh activation-sized buffer per ReLU.
    fn forward(&self, store: &ParamStore, xs: &Tensor, batch_stats: bool) -> Tensor {
        let mut h = self.bn1.forward(store, &self.conv1.forward(store, xs), batch_stats);
        let _ = h.relu_();
        h = self.bn2.forward(store, &self.conv2.forward(store, &h), batch_stats);
        if let Some((conv3, bn3)) = &self.conv3 {
            let _ = h.relu_();
            h = bn3.forward(store, &conv3.forward(store, &h), batch_stats);
        }
        match &self.downsample {
            Some(ds) => h += ds.bn.forward(store, &ds.conv.forward(store, xs), batch_stats),
            None => h += xs,
        }
        let _ = h.relu_();
        h
    }
}

/// A torchvision ResNet classifier whose parameters live in one flat buffer.
pub struct ResNet {
    conv1: Conv,
    bn1: BatchNorm,
    blocks: Vec<Block>,
    feature_dim: i64,
    classifier: Classifier,
}

impl ResNet {
    /// Builds `spec.arch` (`resnet18` or `resnet50`), initialised as torchvision does, from `seed`.
    pub fn new(spec: &ModelSpec, device: Device, seed: i64) -> Result<Self> {
        Self::new_with(spec, Execution::default(), device, seed)
    }

    /// As [`ResNet::new`], to run with `execution` (same initial parameters).
    pub fn new_with(spec: &ModelSpec, execution: Execution, device: Device, seed: i64) -> Result<Self> {
        let Some((kind, layers)) = arch_layout(&spec.arch) else {
            bail!("model.arch: {:?} is not a ResNet (expected resnet18 or resnet50)", spec.arch);
        };
        if spec.num_classes == 0 {
            bail!("model.num_classes: must be at least 1 for {}", spec.arch);
        }
        if !(0.0..=1.0).contains(&spec.dropout) {
            bail!("model.dropout: must be in [0, 1], got {}", spec.dropout);
        }
        let mut b = ParamBuilder::new();
        let conv1 = Conv::declare(&mut b, "conv1", 3, 64, 7, 2);
        let bn1 = BatchNorm::declare(&mut b, "bn1", 64);
        let mut blocks = Vec::new();
        let mut inplanes = 64;
        for (stage, &count) in layers.iter().enumerate() {
            let planes = 64i64 << stage;
            let first_stride = if stage == 0 { 1 } else { 2 };
            for index in 0..count {
                let name = format!("layer{}.{index}", stage + 1);
                let stride = if index == 0 { first_stride } else { 1 };
                blocks.push(Block::declare(&mut b, &name, kind, inplanes, planes, stride));
                inplanes = planes * kind.expansion();
            }
        }
        let feature_dim = inplanes;
        let classifier = Classifier::build(spec, execution, b, feature_dim, device, seed)?;
        Ok(Self { conv1, bn1, blocks, feature_dim, classifier })
    }

    /// Width of [`Model::features`]: 512 for ResNet-18, 2048 for ResNet-50.
    pub fn feature_dim(&self) -> i64 {
        self.feature_dim
    }
}

impl Featurizer for ResNet {
    fn classifier(&self) -> &Classifier {
        &self.classifier
    }

    fn classifier_mut(&mut self) -> &mut Classifier {
        &mut self.classifier
    }

    fn featurize(&self, xs: &Tensor, train: bool) -> Tensor {
        let store = self.classifier.store();
        // Frozen BN (DomainBed's protocol) always normalises with the running statistics.
        let batch_stats = train && !self.classifier.spec().freeze_bn;
        let mut stem = self.bn1.forward(store, &self.conv1.forward(store, xs), batch_stats);
        let _ = stem.relu_();
        let mut h = stem.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for block in &self.blocks {
            h = block.forward(store, &h, batch_stats);
        }
        // Global average pooling as a mean: the same values as adaptive_avg_pool2d(1), and its
        // CUDA backward is deterministic (adaptive_avg_pool2d_backward_cuda is not).
        h.mean_dim(&[2i64, 3][..], false, None)
    }
}
