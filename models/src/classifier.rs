//! What every architecture here shares: its spec, execution, parameter store and linear head. An
//! architecture supplies only its featurizer ([`Featurizer`]) and gets [`Model`] from it.

use crate::params::Init;
use crate::{Execution, Model, ModelSpec, ParamBuilder, ParamId, ParamKind, ParamStore};
use anyhow::Result;
use tch::{Device, Tensor};

/// A featurizer's surroundings: the spec, the execution, every parameter (the featurizer's and the
/// head's) and the head `fc`, as torchvision names and initialises it.
pub struct Classifier {
    spec: ModelSpec,
    execution: Execution,
    store: ParamStore,
    fc_weight: ParamId,
    fc_bias: ParamId,
}

impl Classifier {
    /// Declares the head after the featurizer's parameters in `b` (so the initial values follow
    /// torchvision's order) and builds the store.
    pub(crate) fn build(
        spec: &ModelSpec,
        execution: Execution,
        mut b: ParamBuilder,
        feature_dim: i64,
        device: Device,
        seed: i64,
    ) -> Result<Self> {
        let classes = spec.num_classes as i64;
        let init = Init::UniformFanIn(feature_dim);
        let fc_weight = b.param("fc.weight", &[classes, feature_dim], ParamKind::Weight, init);
        let fc_bias = b.param("fc.bias", &[classes], ParamKind::Bias, init);
        let store = b.build_with_layout(device, seed, execution.channels_last)?;
        Ok(Self { spec: spec.clone(), execution, store, fc_weight, fc_bias })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    /// Dropout (when training) and the linear head.
    fn head(&self, features: &Tensor, train: bool) -> Tensor {
        self.linear(&self.dropout(features, train))
    }

    fn dropout(&self, features: &Tensor, train: bool) -> Tensor {
        features.dropout(self.spec.dropout, train)
    }

    fn linear(&self, head_input: &Tensor) -> Tensor {
        head_input.linear(self.store.get(self.fc_weight), Some(self.store.get(self.fc_bias)))
    }
}

/// An architecture's featurizer over its [`Classifier`].
pub trait Featurizer: Send {
    fn classifier(&self) -> &Classifier;
    fn classifier_mut(&mut self) -> &mut Classifier;
    /// Pooled features `[N, feature_dim]`, computed inside the model's autocast region.
    fn featurize(&self, xs: &Tensor, train: bool) -> Tensor;
}

impl<F: Featurizer> Model for F {
    /// One autocast region for the whole forward pass.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let c = self.classifier();
        c.execution.run(xs, |xs| c.head(&self.featurize(xs, train), train))
    }

    fn features(&self, xs: &Tensor, train: bool) -> Tensor {
        self.classifier().execution.run(xs, |xs| self.featurize(xs, train))
    }

    fn classify(&self, features: &Tensor, train: bool) -> Tensor {
        let c = self.classifier();
        c.execution.run(features, |f| c.head(f, train))
    }

    fn head_input(&self, features: &Tensor, train: bool) -> Tensor {
        self.classifier().dropout(features, train)
    }

    fn linear_head(&self, head_input: &Tensor) -> Tensor {
        let c = self.classifier();
        c.execution.run(head_input, |h| c.linear(h))
    }

    fn feature_dim(&self) -> usize {
        let c = self.classifier();
        c.store.get(c.fc_weight).size().get(1).map_or(0, |&d| d as usize)
    }

    fn store(&self) -> &ParamStore {
        &self.classifier().store
    }

    fn store_mut(&mut self) -> &mut ParamStore {
        &mut self.classifier_mut().store
    }

    fn spec(&self) -> &ModelSpec {
        &self.classifier().spec
    }

    fn execution(&self) -> Execution {
        self.classifier().execution
    }
}
