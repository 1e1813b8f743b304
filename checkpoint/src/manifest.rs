//! The manifest of a checkpoint: metadata, where every tensor's chunks are, and every file's
//! checksum. Stored as bincode behind a header: magic, format version, payload length, payload CRC-32.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Bumped whenever the manifest's layout changes; older readers refuse newer manifests by name.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"MGRUNCKP";
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// What the training loop needs besides tensors to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Steps completed: the resumed run starts at this step index. The sampler is a pure function
    /// of (seed, domain, step) and the torch generator is re-seeded from (seed, step, rank) at
    /// every step, so the step is the whole sampler and RNG state of every domain.
    pub step: u64,
    /// Ranks that wrote the checkpoint (loading works on any number).
    pub world_size: usize,
    /// `train.seed`.
    pub seed: u64,
    /// Fingerprint of the config keys that must not change on resume, and those keys' values.
    pub config_fingerprint: String,
    pub config: BTreeMap<String, String>,
    /// Seconds since the Unix epoch when the snapshot was taken.
    pub created_unix_s: u64,
}

/// One contiguous piece of a tensor (flattened, in elements) stored under `key` in `file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub file: String,
    pub key: String,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorRecord {
    pub name: String,
    /// safetensors dtype name (`F32`, `I64`, ...).
    pub dtype: String,
    pub shape: Vec<i64>,
    /// True when the tensor is split into one range per rank.
    pub sharded: bool,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    pub crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub meta: Meta,
    pub tensors: Vec<TensorRecord>,
    pub files: Vec<FileRecord>,
}

impl Manifest {
    pub fn encode(&self) -> Result<Vec<u8>> {
        let payload =
            bincode::serde::encode_to_vec(self, bincode::config::standard()).context("encoding the manifest")?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        Ok(out)
    }

    /// Decodes and checks the header (`origin` names the file in errors).
    pub fn decode(bytes: &[u8], origin: &Path) -> Result<Manifest> {
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            bail!("{}: not an mgrun checkpoint manifest (bad magic or truncated header)", origin.display());
        }
        let word = |range: std::ops::Range<usize>| -> [u8; 4] {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[range]);
            w
        };
        let version = u32::from_le_bytes(word(8..12));
        if version != FORMAT_VERSION {
            bail!("{}: manifest format version {version}, this mgrun reads version {FORMAT_VERSION}", origin.display());
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&bytes[12..20]);
        let len = u64::from_le_bytes(len_bytes) as usize;
        let expected_crc = u32::from_le_bytes(word(20..24));
        let payload = &bytes[HEADER_LEN..];
        if payload.len() != len {
            bail!("{}: manifest payload has {} bytes, header says {len} (torn write)", origin.display(), payload.len());
        }
        let crc = crc32fast::hash(payload);
        if crc != expected_crc {
            bail!("{}: manifest checksum mismatch (crc32 {crc:08x}, expected {expected_crc:08x})", origin.display());
        }
        let (manifest, _) = bincode::serde::decode_from_slice(payload, bincode::config::standard())
            .with_context(|| format!("{}: decoding the manifest", origin.display()))?;
        Ok(manifest)
    }
}
