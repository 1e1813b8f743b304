//! `model.pretrained`: a torchvision ResNet state dict (safetensors, exported from PyTorch) loaded
//! into a model. The featurizer must match exactly; the `fc.*` head is skipped (and keeps its
//! initialisation) when its class count differs. DomainBed's names (`featurizer.network.<name>`,
//! `classifier.weight|bias`) are accepted too.

use anyhow::{bail, Context, Result};
use mgrun_models::ParamStore;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use tch::{Kind, Tensor};

const HEAD_PREFIX: &str = "fc.";

#[derive(Debug, Clone, PartialEq)]
pub struct PretrainedReport {
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Why the head was not loaded, when it was not.
    pub head_skipped: Option<String>,
}

/// torchvision's name for a key that may be in DomainBed's naming.
fn torchvision_name(key: &str) -> String {
    if let Some(rest) = key.strip_prefix("featurizer.network.") {
        rest.to_string()
    } else if let Some(rest) = key.strip_prefix("classifier.") {
        format!("{HEAD_PREFIX}{rest}")
    } else {
        key.to_string()
    }
}

pub fn load_pretrained(store: &mut ParamStore, path: &Path) -> Result<PretrainedReport> {
    let file: BTreeMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("model.pretrained: reading {}", path.display()))?
        .into_iter()
        .map(|(k, t)| (torchvision_name(&k), t))
        .collect();
    let mut model: Vec<(String, Vec<i64>, Tensor)> = Vec::new();
    let flat = store.flat();
    for p in store.params() {
        // The logical NCHW view of the chunk (channels_last weights are stored NHWC in the flat buffer).
        let view = p.unflatten(flat);
        model.push((p.name.clone(), p.shape.clone(), view));
    }
    for (name, buffer) in store.buffers() {
        model.push((name.clone(), buffer.size(), buffer.shallow_clone()));
    }

    // The head is loaded only when every head tensor is there with the model's shape.
    let head_mismatch: Vec<String> = model
        .iter()
        .filter(|(name, _, _)| name.starts_with(HEAD_PREFIX))
        .filter_map(|(name, shape, _)| match file.get(name) {
            Some(t) if &t.size() == shape => None,
            Some(t) => Some(format!("{name} is {:?} in the file, {:?} in the model", t.size(), shape)),
            None => Some(format!("{name} is missing from the file")),
        })
        .collect();
    let load_head = head_mismatch.is_empty();

    let model_keys: BTreeSet<&str> = model.iter().map(|(n, _, _)| n.as_str()).collect();
    let unexpected: Vec<&String> =
        file.keys().filter(|k| !model_keys.contains(k.as_str()) && !k.starts_with(HEAD_PREFIX)).collect();
    let mut missing = Vec::new();
    let mut copies = Vec::new();
    for (name, shape, target) in &model {
        if name.starts_with(HEAD_PREFIX) && !load_head {
            continue;
        }
        let Some(source) = file.get(name) else {
            missing.push(name.clone());
            continue;
        };
        if &source.size() != shape {
            bail!(
                "model.pretrained {}: key {name:?} has shape {:?}, the model expects {shape:?} (wrong model.arch?)",
                path.display(),
                source.size()
            );
        }
        copies.push((target.shallow_clone(), source));
    }
    if !missing.is_empty() || !unexpected.is_empty() {
        bail!(
            "model.pretrained {}: the featurizer does not match model.arch: missing keys {missing:?}, unexpected keys {unexpected:?}",
            path.display()
        );
    }
    let _no_grad = tch::no_grad_guard();
    for (mut target, source) in copies.iter().map(|(t, s)| (t.shallow_clone(), *s)) {
        let kind = target.kind();
        target.copy_(&source.to_kind(if kind == Kind::Int64 { Kind::Int64 } else { kind }));
    }
    Ok(PretrainedReport {
        loaded: copies.len(),
        head_skipped: (!load_head).then(|| {
            format!("head fc.* not loaded ({}); it keeps its random initialisation", head_mismatch.join("; "))
        }),
    })
}
