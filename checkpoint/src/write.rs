//! Writing a checkpoint collectively, in the background, and committing it atomically.

use crate::manifest::{Chunk, FileRecord, Manifest, Meta, TensorRecord};
use crate::{part_file_name, shard_range, step_dir_name, LATEST_FILE, MANIFEST_FILE, REPLICATED_FILE};
use anyhow::{anyhow, bail, Context, Result};
use mgrun_collectives::store::StoreClient;
use safetensors::tensor::{Dtype, TensorView};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One tensor of the training state. `sharded` tensors must be 1-D; each rank writes its range.
pub struct StateTensor {
    pub name: String,
    pub tensor: Tensor,
    pub sharded: bool,
}

/// What one rank writes of one state tensor, copied to host memory.
struct HostPart {
    name: String,
    sharded: bool,
    /// Shape and dtype of the whole tensor (for the manifest).
    shape: Vec<i64>,
    kind: Kind,
    /// This rank's range of a sharded tensor, or the whole of a replicated one (rank 0 only).
    data: Option<Tensor>,
}

/// Host copies of the part of the state this rank writes, at a step boundary, ready for the writer
/// thread: its range of every sharded tensor, and (rank 0) the replicated tensors.
pub struct Snapshot {
    pub meta: Meta,
    rank: usize,
    world_size: usize,
    parts: Vec<HostPart>,
    /// Seconds the copy took (the training loop's stall, without waiting for an earlier write).
    pub copy_seconds: f64,
}

impl Snapshot {
    /// Copies what rank `rank` of `world_size` writes of `tensors` to private, contiguous host memory
    /// (the only part that stalls training: the device-to-host copy, or a memcpy on the CPU since
    /// training mutates the originals). Nothing else is copied, so the stall shrinks with the ranks.
    pub fn capture(meta: Meta, tensors: Vec<StateTensor>, rank: usize, world_size: usize) -> Result<Snapshot> {
        let started = Instant::now();
        if rank >= world_size {
            bail!("checkpoint snapshot: rank {rank} is not below the world size {world_size}");
        }
        let _no_grad = tch::no_grad_guard();
        let mut parts = Vec::with_capacity(tensors.len());
        for t in tensors {
            if t.sharded && t.tensor.dim() != 1 {
                bail!("checkpoint tensor {:?}: a sharded tensor must be 1-D, got shape {:?}", t.name, t.tensor.size());
            }
            let source = if t.sharded {
                let (lo, hi) = shard_range(t.tensor.numel() as u64, rank, world_size);
                Some(t.tensor.narrow(0, lo as i64, (hi - lo) as i64))
            } else if rank == 0 {
                Some(t.tensor.shallow_clone())
            } else {
                None
            };
            let data = source.map(|source| {
                if source.device() == Device::Cpu {
                    source.detach().contiguous().copy()
                } else {
                    source.detach().to_device(Device::Cpu).contiguous()
                }
            });
            parts.push(HostPart {
                name: t.name,
                sharded: t.sharded,
                shape: t.tensor.size(),
                kind: t.tensor.kind(),
                data,
            });
        }
        Ok(Snapshot { meta, rank, world_size, parts, copy_seconds: started.elapsed().as_secs_f64() })
    }

    /// Bytes copied to host memory.
    pub fn nbytes(&self) -> u64 {
        self.parts
            .iter()
            .filter_map(|p| p.data.as_ref())
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum()
    }
}

/// What one finished checkpoint write did on this rank.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub step: u64,
    /// Bytes this rank wrote (its part, plus the replicated file and manifest on rank 0).
    pub bytes: u64,
    /// Seconds from the start of the write to the end of the commit (rank 0) or the report.
    pub seconds: f64,
    pub copy_seconds: f64,
    /// The committed directory (rank 0 only).
    pub committed: Option<PathBuf>,
    /// Older checkpoints removed by `keep_last` (rank 0 only).
    pub pruned: Vec<PathBuf>,
}

/// This rank's checkpoint writer: one background write at a time.
pub struct CheckpointWriter {
    root: PathBuf,
    rank: usize,
    world_size: usize,
    keep_last: usize,
    /// Carries the file checksums of ranks > 0 to rank 0 (None on a single rank).
    store: Option<std::sync::Arc<StoreClient>>,
    pending: Option<JoinHandle<Result<WriteReport>>>,
}

impl CheckpointWriter {
    /// `keep_last` = 0 keeps every checkpoint. `store` is required when `world_size > 1`.
    pub fn new(
        root: &Path,
        rank: usize,
        world_size: usize,
        keep_last: usize,
        store: Option<StoreClient>,
    ) -> Result<Self> {
        if world_size > 1 && store.is_none() {
            bail!("checkpoint writer on {world_size} ranks needs the rendezvous store");
        }
        Ok(Self {
            root: root.to_path_buf(),
            rank,
            world_size,
            keep_last,
            store: store.map(std::sync::Arc::new),
            pending: None,
        })
    }

    /// Starts writing `snapshot` in the background after the previous write finished; returns
    /// the previous write's report.
    pub fn save(&mut self, snapshot: Snapshot) -> Result<Option<WriteReport>> {
        let previous = self.wait()?;
        let job = self.job();
        let handle = std::thread::Builder::new()
            .name(format!("ckpt-writer-{}", self.rank))
            .spawn(move || job.run(snapshot))
            .context("starting the checkpoint writer thread")?;
        self.pending = Some(handle);
        Ok(previous)
    }

    /// One write of this rank's part of a checkpoint.
    fn job(&self) -> WriteJob {
        WriteJob {
            root: self.root.clone(),
            rank: self.rank,
            world_size: self.world_size,
            keep_last: self.keep_last,
            store: self.store.clone(),
        }
    }

    /// Waits for the write in progress, if any.
    pub fn wait(&mut self) -> Result<Option<WriteReport>> {
        match self.pending.take() {
            None => Ok(None),
            Some(handle) => match handle.join() {
                Ok(result) => result.map(Some),
                Err(_) => Err(anyhow!("rank {}: the checkpoint writer thread panicked", self.rank)),
            },
        }
    }

    /// Writes `snapshot` in the calling thread (tests, benchmarks).
    pub fn save_blocking(&mut self, snapshot: Snapshot) -> Result<WriteReport> {
        self.wait()?;
        let job = self.job();
        job.run(snapshot)
    }
}

/// Removes what a crash can leave behind in `root`: uncommitted `.tmp-step*` and half-pruned
/// `.trash-*` directories. Only rank 0 calls it, before any rank can start writing.
pub fn clean_incomplete(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(removed) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".tmp-") || name.starts_with(".trash-") {
            let path = entry.path();
            std::fs::remove_dir_all(&path)
                .or_else(|_| std::fs::remove_file(&path))
                .with_context(|| format!("removing the incomplete checkpoint {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

struct WriteJob {
    root: PathBuf,
    rank: usize,
    world_size: usize,
    keep_last: usize,
    store: Option<std::sync::Arc<StoreClient>>,
}

fn store_key(step: u64, rank: usize) -> String {
    format!("mgrun/checkpoint/step{step}/rank{rank}")
}

impl WriteJob {
    fn run(self, snapshot: Snapshot) -> Result<WriteReport> {
        let started = Instant::now();
        let step = snapshot.meta.step;
        if (snapshot.rank, snapshot.world_size) != (self.rank, self.world_size) {
            bail!(
                "checkpoint step {step}: a snapshot of rank {} of {} given to the writer of rank {} of {}",
                snapshot.rank,
                snapshot.world_size,
                self.rank,
                self.world_size
            );
        }
        let tmp = self.root.join(format!(".tmp-{}", step_dir_name(step)));
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let context = || format!("rank {}: writing checkpoint step {step} in {}", self.rank, tmp.display());

        // This rank's range of every sharded tensor.
        let part: Vec<(String, Tensor)> = snapshot
            .parts
            .iter()
            .filter(|p| p.sharded)
            .filter_map(|p| p.data.as_ref().filter(|d| d.numel() > 0).map(|d| (p.name.clone(), d.shallow_clone())))
            .collect();
        let mut files =
            vec![write_safetensors_file(&tmp.join(part_file_name(self.rank)), &part).with_context(context)?];
        if self.rank == 0 {
            let replicated: Vec<(String, Tensor)> = snapshot
                .parts
                .iter()
                .filter(|p| !p.sharded)
                .filter_map(|p| p.data.as_ref().map(|d| (p.name.clone(), d.shallow_clone())))
                .collect();
            files.push(write_safetensors_file(&tmp.join(REPLICATED_FILE), &replicated).with_context(context)?);
        }
        let mut bytes: u64 = files.iter().map(|f| f.size).sum();

        if self.rank != 0 {
            // Report to rank 0; this rank is done with the checkpoint.
            if let Some(store) = &self.store {
                let payload = bincode::serde::encode_to_vec(&files, bincode::config::standard())?;
                store.set(&store_key(step, self.rank), &payload).with_context(context)?;
            }
            return Ok(WriteReport {
                step,
                bytes,
                seconds: started.elapsed().as_secs_f64(),
                copy_seconds: snapshot.copy_seconds,
                committed: None,
                pruned: Vec::new(),
            });
        }

        // Rank 0: gather every part's checksum, write the manifest, commit.
        for r in 1..self.world_size {
            let store = self.store.as_ref().ok_or_else(|| anyhow!("no store to gather checkpoint parts"))?;
            let payload = store
                .get(&store_key(step, r))
                .with_context(|| format!("checkpoint step {step}: waiting for rank {r}'s part"))?;
            let (records, _): (Vec<FileRecord>, usize) =
                bincode::serde::decode_from_slice(&payload, bincode::config::standard())
                    .with_context(|| format!("checkpoint step {step}: decoding rank {r}'s file records"))?;
            files.extend(records);
        }
        let manifest = build_manifest(&snapshot, self.world_size, files);
        let encoded = manifest.encode()?;
        write_synced(&tmp.join(MANIFEST_FILE), &encoded).with_context(context)?;
        bytes += encoded.len() as u64;
        sync_dir(&tmp)?;

        let final_dir = self.root.join(step_dir_name(step));
        if final_dir.exists() {
            // Left by an earlier attempt that got past this step; replaced by the new one.
            let trash = self.root.join(format!(".trash-{}-{}", step_dir_name(step), std::process::id()));
            std::fs::rename(&final_dir, &trash)
                .with_context(|| format!("moving the old {} aside", final_dir.display()))?;
            std::fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))?;
        }
        std::fs::rename(&tmp, &final_dir)
            .with_context(|| format!("committing {} -> {}", tmp.display(), final_dir.display()))?;
        sync_dir(&self.root)?;
        let latest_tmp = self.root.join(format!(".tmp-{LATEST_FILE}"));
        write_synced(&latest_tmp, format!("{}\n", step_dir_name(step)).as_bytes())?;
        std::fs::rename(&latest_tmp, self.root.join(LATEST_FILE))
            .with_context(|| format!("updating {}", self.root.join(LATEST_FILE).display()))?;
        sync_dir(&self.root)?;
        let pruned = prune(&self.root, step, self.keep_last)?;
        Ok(WriteReport {
            step,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
            copy_seconds: snapshot.copy_seconds,
            committed: Some(final_dir),
            pruned,
        })
    }
}

fn build_manifest(snapshot: &Snapshot, world_size: usize, files: Vec<FileRecord>) -> Manifest {
    let tensors = snapshot
        .parts
        .iter()
        .map(|t| {
            let numel = t.shape.iter().product::<i64>() as u64;
            let chunks = if t.sharded {
                (0..world_size)
                    .filter_map(|r| {
                        let (lo, hi) = shard_range(numel, r, world_size);
                        (hi > lo).then(|| Chunk {
                            file: part_file_name(r),
                            key: t.name.clone(),
                            offset: lo,
                            len: hi - lo,
                        })
                    })
                    .collect()
            } else {
                vec![Chunk { file: REPLICATED_FILE.to_string(), key: t.name.clone(), offset: 0, len: numel }]
            };
            TensorRecord {
                name: t.name.clone(),
                dtype: dtype_of(t.kind).map(|d| format!("{d:?}")).unwrap_or_default(),
                shape: t.shape.clone(),
                sharded: t.sharded,
                chunks,
            }
        })
        .collect();
    Manifest { meta: snapshot.meta.clone(), tensors, files }
}

/// Removes committed checkpoints older than the newest `keep_last` (never `current`).
fn prune(root: &Path, current: u64, keep_last: usize) -> Result<Vec<PathBuf>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let steps = crate::read::committed_steps(root)?;
    let mut removed = Vec::new();
    for (step, path) in steps.into_iter().skip(keep_last) {
        if step == current {
            continue;
        }
        // Renamed first so that a crash mid-removal leaves no half checkpoint under a step name.
        let trash = root.join(format!(".trash-{}-{}", step_dir_name(step), std::process::id()));
        std::fs::rename(&path, &trash).with_context(|| format!("pruning {}", path.display()))?;
        std::fs::remove_dir_all(&trash).with_context(|| format!("removing {}", trash.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

pub(crate) fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("tensor kind {other:?} cannot be checkpointed"),
    })
}

/// Serialises `tensors` as safetensors, writes and fsyncs the file, and returns its record.
fn write_safetensors_file(path: &Path, tensors: &[(String, Tensor)]) -> Result<FileRecord> {
    let mut buffers = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous();
        let nbytes = t.numel() * t.kind().elt_size_in_bytes();
        let mut data = vec![0u8; nbytes];
        t.f_copy_data_u8(&mut data, t.numel()).with_context(|| format!("reading tensor {name:?}"))?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype_of(t.kind()).with_context(|| format!("tensor {name:?}"))?, shape, data));
    }
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(name, dtype, shape, data)| {
            TensorView::new(*dtype, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| anyhow!("tensor {name:?}: {e:?}"))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &None).map_err(|e| anyhow!("serialising {}: {e:?}", path.display()))?;
    write_synced(path, &bytes)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(FileRecord { name, size: bytes.len() as u64, crc32: crc32fast::hash(&bytes) })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("fsync {}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync directory {}", dir.display()))
}
