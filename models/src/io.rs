//! State-dict I/O in the safetensors format, with torchvision's key names, so that checkpoints
//! move between mgrun and PyTorch (`safetensors.torch.load_file` + `load_state_dict`).

use crate::ParamStore;
use anyhow::{bail, Context, Result};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Writes every parameter (f32) and buffer (as stored: f32 running statistics, int64
/// `num_batches_tracked`) of `store` to `path`, under their state-dict names. The file is written under
/// a temporary name and renamed over `path`, so that a failed write never leaves half a file there.
pub fn save_safetensors(store: &ParamStore, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> =
        store.named_tensors().into_iter().map(|(name, t)| (name, t.to_device(Device::Cpu).contiguous())).collect();
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = std::path::PathBuf::from(temporary);
    // Created here first so that an unwritable directory is reported as the operating system says it
    // (tch's error would print the raw error structure).
    std::fs::File::create(&temporary).with_context(|| format!("creating {}", temporary.display()))?;
    let written = Tensor::write_safetensors(&tensors, &temporary)
        .with_context(|| format!("writing state dict ({} tensors) to {}", tensors.len(), temporary.display()))
        .and_then(|()| {
            std::fs::rename(&temporary, path)
                .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

fn is_float(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16)
}

/// Copies the tensors of the safetensors file `path` into `store`'s parameters and buffers,
/// matching by name. Shapes must always agree; with `strict`, every key of the model must be in
/// the file and the file must have no other keys (PyTorch's `load_state_dict(strict=True)`).
/// Everything is checked before anything is copied, so a failed load leaves `store` unchanged.
pub fn load_safetensors(store: &mut ParamStore, path: &Path, strict: bool) -> Result<()> {
    let file_tensors: HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .with_context(|| format!("reading state dict {}", path.display()))?
        .into_iter()
        .collect();

    let mut missing = Vec::new();
    let mut copies: Vec<(Tensor, &Tensor)> = Vec::new();
    let mut model_keys = BTreeSet::new();
    let flat = store.flat();
    for param in store.params() {
        model_keys.insert(param.name.as_str());
        let Some(source) = file_tensors.get(&param.name) else {
            missing.push(param.name.clone());
            continue;
        };
        if source.size() != param.shape {
            bail!(
                "{}: key {:?} has shape {:?}, the model expects {:?}",
                path.display(),
                param.name,
                source.size(),
                param.shape
            );
        }
        if !is_float(source.kind()) {
            bail!(
                "{}: key {:?} is {:?}, a parameter needs a floating-point tensor",
                path.display(),
                param.name,
                source.kind()
            );
        }
        // Write through the flat buffer (which does not require grad) rather than the leaf view;
        // `unflatten` presents a channels-last chunk with its logical NCHW shape.
        let target = param.unflatten(flat);
        copies.push((target, source));
    }
    for (name, buffer) in store.buffers() {
        model_keys.insert(name.as_str());
        let Some(source) = file_tensors.get(name) else {
            missing.push(name.clone());
            continue;
        };
        if source.size() != buffer.size() {
            bail!(
                "{}: key {:?} has shape {:?}, the model expects {:?}",
                path.display(),
                name,
                source.size(),
                buffer.size()
            );
        }
        copies.push((buffer.shallow_clone(), source));
    }

    if strict {
        let mut unexpected: Vec<&str> =
            file_tensors.keys().map(String::as_str).filter(|k| !model_keys.contains(k)).collect();
        unexpected.sort_unstable();
        if !missing.is_empty() || !unexpected.is_empty() {
            bail!(
                "{}: state dict does not match the model (strict): missing keys {:?}, unexpected keys {:?}",
                path.display(),
                missing,
                unexpected
            );
        }
    }

    let _guard = tch::no_grad_guard();
    for (mut target, source) in copies {
        target.copy_(source);
    }
    Ok(())
}
