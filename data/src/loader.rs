//! Turning sampled indices into tensors: the background training loader and evaluation batches.

use crate::config::DataConfig;
use crate::dataset::Dataset;
use crate::image_io::decode_rgb;
use crate::sampler::step_sample;
use crate::transforms::{normalize_into, train_transform, AugmentParams};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use tch::{Device, Kind, Tensor};

/// The part of one training domain's per-step batch that this rank loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// Index among the training domains, `0..K`.
    pub train_domain: usize,
    /// Index into [`Dataset::domains`].
    pub domain: usize,
    /// This rank's slice `[lo, hi)` of the domain's `batch_per_domain` images of each step.
    pub lo: usize,
    pub hi: usize,
}

/// Everything one rank needs for one step.
#[derive(Debug)]
pub struct StepBatch {
    pub step: u64,
    /// Per shard, in the order the shards were given.
    pub shards: Vec<ShardBatch>,
}

/// One shard's images of a step.
#[derive(Debug)]
pub struct ShardBatch {
    pub train_domain: usize,
    /// `[n, 3, S, S]` f32, normalised.
    pub x: Tensor,
    /// `[n]` i64 labels.
    pub y: Tensor,
    /// `[n]` i64 on the CPU: each image's index in its domain's file list, a stable identity for
    /// per-sample state (PS-KD's and ELR's tables).
    pub files: Tensor,
}

/// The settings of step loading, fixed for a loader's life.
#[derive(Debug)]
struct StepRecipe {
    dataset: Arc<Dataset>,
    shards: Vec<ShardSpec>,
    seed: u64,
    batch_per_domain: usize,
    image_size: u32,
    augment: bool,
    /// Decoded full-size source images for the random crops; `None` when `data.cache_mb` is 0.
    sources: Option<SourceCache>,
    /// Where the batches go: on CUDA the workers put them in pinned host memory for an asynchronous copy.
    device: Device,
}

/// Decoded source images (before any crop), filled on first use while their total stays within a byte budget:
/// the training transform crops the original image, so the evaluation cache of resized images cannot serve it.
#[derive(Debug)]
struct SourceCache {
    slots: Vec<Vec<OnceLock<Arc<RgbImage>>>>,
    budget_bytes: usize,
    used_bytes: AtomicUsize,
}

impl SourceCache {
    fn new(dataset: &Dataset, budget_mb: usize) -> Option<SourceCache> {
        if budget_mb == 0 {
            return None;
        }
        let slots = dataset.domains().iter().map(|d| (0..d.len()).map(|_| OnceLock::new()).collect()).collect();
        Some(SourceCache { slots, budget_bytes: budget_mb << 20, used_bytes: AtomicUsize::new(0) })
    }

    fn get_or_decode(&self, dataset: &Dataset, domain: usize, file: usize) -> Result<Arc<RgbImage>> {
        let slot = &self.slots[domain][file];
        if let Some(image) = slot.get() {
            return Ok(image.clone());
        }
        let image = Arc::new(decode_rgb(&dataset.domains()[domain].files[file])?);
        let bytes = image.as_raw().len();
        // Reserve before storing, so that concurrent workers never overshoot the budget.
        let reserved = self
            .used_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                (used + bytes <= self.budget_bytes).then_some(used + bytes)
            })
            .is_ok();
        if reserved && slot.set(image.clone()).is_err() {
            // Another worker stored the same image first.
            self.used_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(image)
    }
}

/// Prepares steps `start_step, start_step + 1, ...` on background threads. Worker `w` of `W` builds the steps
/// `start_step + w + k W` into its own bounded queue and [`Loader::next`] takes them round-robin, so steps come
/// out in order while up to `W` of them are decoded at once. At most about `prefetch` finished steps wait.
pub struct Loader {
    queues: Vec<Receiver<Result<StepBatch>>>,
    workers: Vec<JoinHandle<()>>,
    start_step: u64,
    next_step: u64,
    device: Device,
    /// Finished steps waiting in the queues (the workers add, `next` takes away).
    ready: Arc<AtomicUsize>,
}

impl Loader {
    /// Starts the workers, producing CPU tensors. `seed` is the run seed: it drives which images each step
    /// samples and their augmentation.
    pub fn new(
        dataset: Arc<Dataset>,
        shards: Vec<ShardSpec>,
        cfg: &DataConfig,
        seed: u64,
        start_step: u64,
    ) -> Result<Loader> {
        Loader::new_on(dataset, shards, cfg, seed, start_step, Device::Cpu)
    }

    /// [`Loader::new`] for batches on `device`. On CUDA the workers copy each batch into pinned (page-locked)
    /// host memory and [`Loader::next`] starts an asynchronous host-to-device copy on the current stream, so the
    /// copy overlaps with whatever the GPU is still doing.
    pub fn new_on(
        dataset: Arc<Dataset>,
        shards: Vec<ShardSpec>,
        cfg: &DataConfig,
        seed: u64,
        start_step: u64,
        device: Device,
    ) -> Result<Loader> {
        cfg.validate()?;
        for (i, spec) in shards.iter().enumerate() {
            let Some(domain) = dataset.domains().get(spec.domain) else {
                bail!("shard {i}: domain index {} out of range ({} domains)", spec.domain, dataset.domains().len());
            };
            if spec.lo > spec.hi || spec.hi > cfg.batch_per_domain {
                bail!(
                    "shard {i} (domain '{}'): slice [{}, {}) is not within the {} images of a step (data.batch_per_domain)",
                    domain.name,
                    spec.lo,
                    spec.hi,
                    cfg.batch_per_domain
                );
            }
            if domain.in_split.is_empty() && spec.lo < spec.hi {
                bail!("shard {i}: domain '{}' has no images in its training (in) split", domain.name);
            }
        }
        let sources = if cfg.augment { SourceCache::new(&dataset, cfg.cache_mb) } else { None };
        let recipe = Arc::new(StepRecipe {
            sources,
            device,
            dataset,
            shards,
            seed,
            batch_per_domain: cfg.batch_per_domain,
            image_size: u32::try_from(cfg.image_size).context("data.image_size")?,
            augment: cfg.augment,
        });
        let num_workers = cfg.num_workers.max(1);
        let per_worker_queue = cfg.prefetch.max(1).div_ceil(num_workers);
        let mut queues = Vec::with_capacity(num_workers);
        let mut workers = Vec::with_capacity(num_workers);
        let ready = Arc::new(AtomicUsize::new(0));
        for w in 0..num_workers {
            let (sender, receiver) = sync_channel(per_worker_queue);
            let recipe = recipe.clone();
            let first = start_step + w as u64;
            let ready = ready.clone();
            let handle = std::thread::Builder::new()
                .name(format!("mgrun-loader-{w}"))
                .spawn(move || produce_steps(&recipe, first, num_workers as u64, &sender, &ready))
                .with_context(|| format!("starting data loader thread {w}"))?;
            queues.push(receiver);
            workers.push(handle);
        }
        Ok(Loader { queues, workers, start_step, next_step: start_step, device, ready })
    }

    /// Finished steps waiting to be taken: 0 at every step means the loader is the bottleneck.
    pub fn queue_depth(&self) -> usize {
        self.ready.load(Ordering::Relaxed)
    }

    /// The next step's batch (steps count up from `start_step`). An unreadable image fails the step with an
    /// error naming the file.
    // Not an Iterator: the stream never ends and every item is fallible.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<StepBatch> {
        let step = self.next_step;
        let worker = ((step - self.start_step) % self.queues.len() as u64) as usize;
        let batch = match self.queues[worker].recv() {
            Ok(result) => {
                self.ready.fetch_sub(1, Ordering::Relaxed);
                result.with_context(|| format!("data loader, step {step}"))?
            }
            Err(_) => bail!("data loader thread {worker} stopped before step {step} (after an earlier error)"),
        };
        debug_assert_eq!(batch.step, step);
        self.next_step += 1;
        if !self.device.is_cuda() {
            return Ok(batch);
        }
        let mut shards = Vec::with_capacity(batch.shards.len());
        for shard in batch.shards {
            let to_device = |t: &Tensor, kind: Kind| {
                t.f_to_device_(self.device, kind, true, false)
                    .with_context(|| format!("copying step {step}'s batch to {:?}", self.device))
            };
            shards.push(ShardBatch {
                x: to_device(&shard.x, Kind::Float)?,
                y: to_device(&shard.y, Kind::Int64)?,
                ..shard
            });
        }
        Ok(StepBatch { step, shards })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the queues makes every worker's next send fail, which ends it.
        self.queues.clear();
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

fn produce_steps(
    recipe: &StepRecipe,
    first: u64,
    stride: u64,
    sender: &SyncSender<Result<StepBatch>>,
    ready: &AtomicUsize,
) {
    let mut step = first;
    loop {
        let result = build_step(recipe, step);
        let failed = result.is_err();
        // Counted before the send, which blocks while the queue is full: taking it away in `next`
        // can then never run before the count went up.
        ready.fetch_add(1, Ordering::Relaxed);
        if sender.send(result).is_err() || failed {
            return;
        }
        step += stride;
    }
}

fn build_step(recipe: &StepRecipe, step: u64) -> Result<StepBatch> {
    let mut shards = Vec::with_capacity(recipe.shards.len());
    for spec in &recipe.shards {
        let domain = &recipe.dataset.domains()[spec.domain];
        let picks = step_sample(recipe.seed, spec.domain, step, recipe.batch_per_domain, domain.in_split.len());
        let files: Vec<usize> = (spec.lo..spec.hi).map(|position| domain.in_split[picks[position]]).collect();
        let (x, y) = if recipe.augment {
            load_augmented(recipe, spec, step, &files)?
        } else {
            load_images(&recipe.dataset, spec.domain, &files, recipe.image_size, 1)?
        };
        let (x, y) = if recipe.device.is_cuda() { (pin(x, recipe.device)?, pin(y, recipe.device)?) } else { (x, y) };
        let files = Tensor::from_slice(&files.iter().map(|&f| f as i64).collect::<Vec<_>>());
        shards.push(ShardBatch { train_domain: spec.train_domain, x, y, files });
    }
    Ok(StepBatch { step, shards })
}

fn pin(t: Tensor, device: Device) -> Result<Tensor> {
    mgrun_torch_shim::pin_memory(&t).with_context(|| format!("pinning a batch in host memory for {device:?}"))
}

/// The training transform of `files` (positions `spec.lo..` of the domain's step batch).
fn load_augmented(recipe: &StepRecipe, spec: &ShardSpec, step: u64, files: &[usize]) -> Result<(Tensor, Tensor)> {
    let dataset = &recipe.dataset;
    let domain = &dataset.domains()[spec.domain];
    let size = recipe.image_size;
    let per_image = 3 * size as usize * size as usize;
    let mut pixels = vec![0f32; files.len() * per_image];
    for ((offset, &file), dst) in files.iter().enumerate().zip(pixels.chunks_exact_mut(per_image)) {
        let source = match &recipe.sources {
            Some(cache) => cache.get_or_decode(dataset, spec.domain, file)?,
            None => Arc::new(decode_rgb(&domain.files[file])?),
        };
        let params =
            AugmentParams::sample(recipe.seed, spec.domain, step, spec.lo + offset, source.width(), source.height());
        normalize_into(&train_transform(&source, &params, size), dst);
    }
    let s = i64::from(size);
    let x = Tensor::from_slice(&pixels).view([files.len() as i64, 3, s, s]);
    let labels: Vec<i64> = files.iter().map(|&f| domain.labels[f]).collect();
    Ok((x, Tensor::from_slice(&labels)))
}

/// Evaluation batch: files `indices` (indices into `domain.files`, e.g. values of `in_split`) of dataset domain
/// `domain`, resized to `image_size` and normalised, no augmentation. Decodes on a few threads.
pub fn load_eval_batch(
    dataset: &Dataset,
    domain: usize,
    indices: &[usize],
    image_size: i64,
) -> Result<(Tensor, Tensor)> {
    let size = u32::try_from(image_size).ok().filter(|&s| s > 0).with_context(|| format!("image size {image_size}"))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    load_images(dataset, domain, indices, size, threads)
}

/// The evaluation transform of files `items` of one domain into `x [n,3,S,S]`, `y [n]`, on up to `threads`
/// threads, through the dataset's cache of resized images.
fn load_images(
    dataset: &Dataset,
    domain: usize,
    items: &[usize],
    size: u32,
    threads: usize,
) -> Result<(Tensor, Tensor)> {
    let Some(dom) = dataset.domains().get(domain) else {
        bail!("domain index {domain} out of range ({} domains)", dataset.domains().len());
    };
    if let Some(&bad) = items.iter().find(|&&i| i >= dom.len()) {
        bail!("image index {bad} out of range for domain '{}' ({} images)", dom.name, dom.len());
    }
    let s = size as usize;
    let per_image = 3 * s * s;
    let mut pixels = vec![0f32; items.len() * per_image];
    // Small batches are not worth a thread each: at least 4 images per thread.
    let threads = threads.clamp(1, items.len().div_ceil(4).max(1));
    let fill = |chunk_items: &[usize], out: &mut [f32]| -> Result<()> {
        for (&file, dst) in chunk_items.iter().zip(out.chunks_exact_mut(per_image)) {
            let rgb = dataset.load_rgb(domain, file, size)?;
            normalize_into(&rgb, dst);
        }
        Ok(())
    };
    if threads == 1 {
        fill(items, &mut pixels)?;
    } else {
        let per_thread = items.len().div_ceil(threads);
        std::thread::scope(|scope| -> Result<()> {
            let handles: Vec<_> = items
                .chunks(per_thread)
                .zip(pixels.chunks_mut(per_thread * per_image))
                .map(|(chunk_items, out)| scope.spawn(move || fill(chunk_items, out)))
                .collect();
            for handle in handles {
                handle.join().map_err(|_| anyhow::anyhow!("image decoding thread panicked"))??;
            }
            Ok(())
        })?;
    }
    let n = items.len() as i64;
    let x = Tensor::from_slice(&pixels).view([n, 3, i64::from(size), i64::from(size)]);
    let labels: Vec<i64> = items.iter().map(|&file| dom.labels[file]).collect();
    Ok((x, Tensor::from_slice(&labels)))
}

/// What [`bench_loader`] measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderBench {
    pub workers: usize,
    pub images: usize,
    pub seconds: f64,
}

impl LoaderBench {
    pub fn images_per_second(&self) -> f64 {
        self.images as f64 / self.seconds
    }
    pub fn images_per_second_per_worker(&self) -> f64 {
        self.images_per_second() / self.workers as f64
    }
}

/// Throughput of the training loader on `cfg`'s dataset: every domain is a training domain contributing
/// `cfg.batch_per_domain` images a step, with `cfg.num_workers` threads, the image cache off (every image is
/// decoded each time it is drawn, as torchvision's `ImageFolder` does) and the training transform at
/// `cfg.image_size`. Times at least `images` images after one untimed warm-up step per worker.
pub fn bench_loader(cfg: &DataConfig, images: usize) -> Result<LoaderBench> {
    let cfg = DataConfig { test_domains: Vec::new(), cache_mb: 0, ..cfg.clone() };
    let dataset = Arc::new(Dataset::open(&cfg)?);
    let shards: Vec<ShardSpec> = (0..dataset.domains().len())
        .filter(|&d| !dataset.domains()[d].in_split.is_empty())
        .enumerate()
        .map(|(k, d)| ShardSpec { train_domain: k, domain: d, lo: 0, hi: cfg.batch_per_domain })
        .collect();
    if shards.is_empty() {
        bail!("dataset {} has no images to load", cfg.root.display());
    }
    let per_step = shards.len() * cfg.batch_per_domain;
    let workers = cfg.num_workers.max(1);
    let mut loader = Loader::new(dataset, shards, &cfg, 0, 0)?;
    for _ in 0..workers {
        loader.next()?;
    }
    let steps = images.div_ceil(per_step).max(1);
    let start = std::time::Instant::now();
    for _ in 0..steps {
        loader.next()?;
    }
    Ok(LoaderBench { workers, images: steps * per_step, seconds: start.elapsed().as_secs_f64() })
}
