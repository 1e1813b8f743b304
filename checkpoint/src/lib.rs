//! Collective, crash-safe checkpoints of a training job, and PyTorch weights in.
//!
//! A checkpoint is a directory `<root>/step<N>` holding the state after N completed steps:
//! - `part-<r>.safetensors`: rank r's contiguous range of every large flat tensor (parameters,
//!   optimizer moments, method statistics), so that W ranks write W disjoint parts in parallel;
//! - `replicated.safetensors`: small replicated tensors (BN buffers, scalars), written once by rank 0;
//! - `manifest.bin`: bincode with a versioned, checksummed header: metadata (step, world size,
//!   config fingerprint), every tensor's chunks (file, key, offset, length) and every file's size
//!   and CRC-32.
//!
//! Ranks write into `<root>/.tmp-step<N>`, fsync, and report their files' checksums to rank 0
//! through the rendezvous store; rank 0 then writes the manifest, renames the directory to
//! `step<N>` (the commit) and finally updates the `latest` pointer. Loading re-assembles full
//! tensors from the chunks, so a checkpoint written on W ranks loads on any number of ranks.

pub mod config_diff;
pub mod manifest;
pub mod pretrained;
pub mod read;
pub mod write;

pub use config_diff::{config_differences, fingerprint, flatten_config};
pub use manifest::{Chunk, FileRecord, Manifest, Meta, TensorRecord, FORMAT_VERSION};
pub use pretrained::{load_pretrained, PretrainedReport};
pub use read::{committed_steps, load, resolve_resume, LoadedCheckpoint, Resume, ResumeChoice};
pub use write::{clean_incomplete, CheckpointWriter, Snapshot, StateTensor, WriteReport};

/// Name of the directory of the checkpoint after `step` completed steps.
pub fn step_dir_name(step: u64) -> String {
    format!("step{step}")
}

/// The step of a committed checkpoint directory name (`step<N>`), if it is one.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step").and_then(|digits| digits.parse().ok())
}

/// The contiguous element range `[lo, hi)` of a tensor of `numel` elements that `rank` of
/// `world_size` writes.
pub fn shard_range(numel: u64, rank: usize, world_size: usize) -> (u64, u64) {
    let w = world_size.max(1) as u128;
    let lo = (numel as u128 * rank as u128 / w) as u64;
    let hi = (numel as u128 * (rank as u128 + 1) / w) as u64;
    (lo, hi)
}

pub const MANIFEST_FILE: &str = "manifest.bin";
pub const LATEST_FILE: &str = "latest";
pub const REPLICATED_FILE: &str = "replicated.safetensors";

pub fn part_file_name(rank: usize) -> String {
    format!("part-{rank}.safetensors")
}
