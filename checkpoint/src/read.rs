//! Finding, verifying and loading checkpoints; tensors are re-assembled whole, whatever the number
//! of ranks that wrote them.

use crate::manifest::{Manifest, Meta};
use crate::{parse_step_dir, step_dir_name, LATEST_FILE, MANIFEST_FILE};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A verified checkpoint, every tensor whole and on the CPU.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub meta: Meta,
    pub tensors: Vec<(String, Tensor)>,
}

impl LoadedCheckpoint {
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| anyhow!("checkpoint {}: no tensor {name:?}", self.dir.display()))
    }

    /// The tensors whose names start with `prefix`, with the prefix removed.
    pub fn with_prefix(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .filter_map(|(n, t)| n.strip_prefix(prefix).map(|rest| (rest.to_string(), t.shallow_clone())))
            .collect()
    }
}

/// Committed checkpoints (`step<N>` directories) under `root`, newest first.
pub fn committed_steps(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing checkpoints in {}", root.display())),
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| parse_step_dir(&e.file_name().to_string_lossy()).map(|s| (s, e.path())))
        .collect();
    steps.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(steps)
}

/// Reads the manifest of `dir`, verifies every file's size and CRC-32, and re-assembles every
/// tensor from its chunks.
pub fn load(dir: &Path) -> Result<LoadedCheckpoint> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let bytes = std::fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = Manifest::decode(&bytes, &manifest_path)?;

    let mut contents: HashMap<String, Vec<u8>> = HashMap::new();
    for record in &manifest.files {
        let path = dir.join(&record.name);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if data.len() as u64 != record.size {
            bail!("{}: {} bytes, the manifest says {} (torn or truncated)", path.display(), data.len(), record.size);
        }
        let crc = crc32fast::hash(&data);
        if crc != record.crc32 {
            bail!("{}: checksum mismatch (crc32 {crc:08x}, manifest {:08x}): corrupt", path.display(), record.crc32);
        }
        contents.insert(record.name.clone(), data);
    }
    let mut parsed: HashMap<&str, SafeTensors> = HashMap::new();
    for (name, data) in &contents {
        let st = SafeTensors::deserialize(data).map_err(|e| anyhow!("{}: {e:?}", dir.join(name).display()))?;
        parsed.insert(name.as_str(), st);
    }

    let mut tensors = Vec::with_capacity(manifest.tensors.len());
    for record in &manifest.tensors {
        let what = || format!("checkpoint {}: tensor {:?}", dir.display(), record.name);
        let kind = kind_of(&record.dtype).with_context(what)?;
        let elt = kind.elt_size_in_bytes();
        let numel: u64 = record.shape.iter().map(|&d| d.max(0) as u64).product();
        let mut data = vec![0u8; numel as usize * elt];
        let mut chunks = record.chunks.clone();
        chunks.sort_by_key(|c| c.offset);
        let mut covered = 0u64;
        for chunk in &chunks {
            if chunk.offset != covered || chunk.offset + chunk.len > numel {
                bail!("{}: chunks do not tile the tensor (gap or overlap at element {covered})", what());
            }
            let file =
                parsed.get(chunk.file.as_str()).ok_or_else(|| anyhow!("{}: no file {:?}", what(), chunk.file))?;
            let view = file.tensor(&chunk.key).map_err(|e| anyhow!("{}: {}: {e:?}", what(), chunk.file))?;
            let bytes = view.data();
            if bytes.len() as u64 != chunk.len * elt as u64 {
                bail!(
                    "{}: chunk in {} has {} bytes, expected {}",
                    what(),
                    chunk.file,
                    bytes.len(),
                    chunk.len * elt as u64
                );
            }
            let start = (chunk.offset as usize) * elt;
            data[start..start + bytes.len()].copy_from_slice(bytes);
            covered += chunk.len;
        }
        if covered != numel {
            bail!("{}: chunks cover {covered} of {numel} elements", what());
        }
        tensors.push((record.name.clone(), Tensor::from_data_size(&data, &record.shape, kind)));
    }
    Ok(LoadedCheckpoint { dir: dir.to_path_buf(), meta: manifest.meta, tensors })
}

fn kind_of(dtype: &str) -> Result<Kind> {
    Ok(match dtype {
        "F32" => Kind::Float,
        "F64" => Kind::Double,
        "F16" => Kind::Half,
        "BF16" => Kind::BFloat16,
        "I64" => Kind::Int64,
        "I32" => Kind::Int,
        "I16" => Kind::Int16,
        "I8" => Kind::Int8,
        "U8" => Kind::Uint8,
        "BOOL" => Kind::Bool,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// What `checkpoint.resume` resolved to.
pub struct ResumeChoice {
    pub checkpoint: Option<LoadedCheckpoint>,
    /// Checkpoints that were newer but failed verification: `path: reason`.
    pub skipped: Vec<String>,
}

/// Where a run continues from (`checkpoint.resume`, `--resume`): written `"none"`, `"auto"` or a path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Resume {
    /// Start at step 0.
    #[default]
    None,
    /// The newest checkpoint under the run's checkpoint root that verifies, skipping and naming torn
    /// or corrupt ones; none at all starts from scratch.
    Auto,
    /// One checkpoint directory, or a checkpoint root (then its newest valid one, which must exist).
    Path(PathBuf),
}

impl Resume {
    fn parse(text: &str) -> Resume {
        match text {
            "none" | "" => Resume::None,
            "auto" => Resume::Auto,
            path => Resume::Path(PathBuf::from(path)),
        }
    }
}

impl std::fmt::Display for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resume::None => f.write_str("none"),
            Resume::Auto => f.write_str("auto"),
            Resume::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Resume, Self::Err> {
        Ok(Resume::parse(text))
    }
}

impl serde::Serialize for Resume {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Resume {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Resume, D::Error> {
        Ok(Resume::parse(&String::deserialize(deserializer)?))
    }
}

/// Resolves `resume` against the checkpoint root `root` (see [`Resume`]).
pub fn resolve_resume(root: &Path, resume: &Resume) -> Result<ResumeChoice> {
    match resume {
        Resume::None => Ok(ResumeChoice { checkpoint: None, skipped: Vec::new() }),
        Resume::Auto => newest_valid(root),
        Resume::Path(path) => {
            if path.join(MANIFEST_FILE).exists() {
                let checkpoint = load(path).with_context(|| format!("checkpoint.resume = {}", path.display()))?;
                return Ok(ResumeChoice { checkpoint: Some(checkpoint), skipped: Vec::new() });
            }
            if !path.is_dir() {
                bail!(
                    "checkpoint.resume = {}: no such checkpoint (expected a step<N> directory or a checkpoint root)",
                    path.display()
                );
            }
            let choice = newest_valid(path)?;
            if choice.checkpoint.is_none() {
                bail!(
                    "checkpoint.resume = {}: no valid checkpoint there{}",
                    path.display(),
                    if choice.skipped.is_empty() { String::new() } else { format!(" ({})", choice.skipped.join("; ")) }
                );
            }
            Ok(choice)
        }
    }
}

/// The checkpoint that `latest` names (the run's last commit pointer), or the newest valid one at or
/// before it when it is damaged. A valid checkpoint past `latest` is used only when its config
/// fingerprint is `latest`'s (the same run, stopped between committing the directory and moving the
/// pointer); another run's, left in the same root, is never chosen. Without a `latest`, the newest
/// valid checkpoint. Every passed-over checkpoint is named in `skipped`.
fn newest_valid(root: &Path) -> Result<ResumeChoice> {
    let mut skipped = Vec::new();
    let pointer = root.join(LATEST_FILE);
    let latest_step = match std::fs::read_to_string(&pointer) {
        Ok(text) => match parse_step_dir(text.trim()) {
            Some(step) => Some(step),
            None => {
                skipped.push(format!("{}: names no step<N> directory ({:?})", pointer.display(), text.trim()));
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("reading {}", pointer.display())),
    };
    let committed = committed_steps(root)?;
    if let Some(latest) = latest_step.filter(|latest| !committed.iter().any(|(step, _)| step == latest)) {
        skipped.push(format!(
            "{}: names {}, which is not a committed checkpoint there",
            pointer.display(),
            step_dir_name(latest)
        ));
    }
    // The fingerprint of the run that `latest` belongs to.
    let run_fingerprint = latest_step.and_then(|latest| {
        let dir = committed.iter().find(|(step, _)| *step == latest).map(|(_, dir)| dir)?;
        load(dir).ok().map(|c| c.meta.config_fingerprint)
    });
    for (step, dir) in committed {
        let past_latest = latest_step.is_some_and(|latest| step > latest);
        match load(&dir) {
            Ok(checkpoint) if past_latest && run_fingerprint.as_ref() != Some(&checkpoint.meta.config_fingerprint) => {
                skipped.push(format!(
                    "{}: newer than {LATEST_FILE} (step {}) and written with another config (fingerprint {}): \
                     not this run's",
                    dir.display(),
                    latest_step.unwrap_or(0),
                    checkpoint.meta.config_fingerprint
                ));
            }
            Ok(checkpoint) => return Ok(ResumeChoice { checkpoint: Some(checkpoint), skipped }),
            Err(e) => skipped.push(format!("{}: {e:#}", dir.display())),
        }
    }
    Ok(ResumeChoice { checkpoint: None, skipped })
}
