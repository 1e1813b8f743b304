//! Turning sampled indices into tensors: the background training loader and evaluation batches.

use crate::config::DataConfig;
use crate::dataset::Dataset;
use crate::image_io::normalize_into;
use crate::sampler::{flip_decision, step_sample};
use anyhow::{bail, Context, Result};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::Tensor;

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
    /// Per shard, in the order the shards were given: `(train_domain, x [n,3,S,S] f32 normalised, y [n] i64)`.
    pub shards: Vec<(usize, Tensor, Tensor)>,
}

/// The settings of step loading, fixed for a loader's life.
#[derive(Debug, Clone)]
struct StepRecipe {
    dataset: Arc<Dataset>,
    shards: Vec<ShardSpec>,
    seed: u64,
    batch_per_domain: usize,
    image_size: u32,
    augment: bool,
}

/// Prepares steps `start_step, start_step + 1, ...` on background threads. Worker `w` of `W` builds the steps
/// `start_step + w + k W` into its own bounded queue and [`Loader::next`] takes them round-robin, so steps come
/// out in order while up to `W` of them are decoded at once. At most about `prefetch` finished steps wait.
pub struct Loader {
    queues: Vec<Receiver<Result<StepBatch>>>,
    workers: Vec<JoinHandle<()>>,
    start_step: u64,
    next_step: u64,
}

impl Loader {
    /// Starts the workers. `seed` is the run seed: it drives which images each step samples and their flips.
    pub fn new(
        dataset: Arc<Dataset>,
        shards: Vec<ShardSpec>,
        cfg: &DataConfig,
        seed: u64,
        start_step: u64,
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
        let recipe = Arc::new(StepRecipe {
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
        for w in 0..num_workers {
            let (sender, receiver) = sync_channel(per_worker_queue);
            let recipe = recipe.clone();
            let first = start_step + w as u64;
            let handle = std::thread::Builder::new()
                .name(format!("mgrun-loader-{w}"))
                .spawn(move || produce_steps(&recipe, first, num_workers as u64, &sender))
                .with_context(|| format!("starting data loader thread {w}"))?;
            queues.push(receiver);
            workers.push(handle);
        }
        Ok(Loader { queues, workers, start_step, next_step: start_step })
    }

    /// The next step's batch (steps count up from `start_step`). An unreadable image fails the step with an
    /// error naming the file.
    // Not an Iterator: the stream never ends and every item is fallible.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<StepBatch> {
        let step = self.next_step;
        let worker = ((step - self.start_step) % self.queues.len() as u64) as usize;
        let batch = match self.queues[worker].recv() {
            Ok(result) => result.with_context(|| format!("data loader, step {step}"))?,
            Err(_) => bail!("data loader thread {worker} stopped before step {step} (after an earlier error)"),
        };
        debug_assert_eq!(batch.step, step);
        self.next_step += 1;
        Ok(batch)
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

fn produce_steps(recipe: &StepRecipe, first: u64, stride: u64, sender: &SyncSender<Result<StepBatch>>) {
    let mut step = first;
    loop {
        let result = build_step(recipe, step);
        let failed = result.is_err();
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
        let items: Vec<(usize, bool)> = (spec.lo..spec.hi)
            .map(|position| {
                let file = domain.in_split[picks[position]];
                let flip = recipe.augment && flip_decision(recipe.seed, spec.domain, step, position);
                (file, flip)
            })
            .collect();
        let (x, y) = load_images(&recipe.dataset, spec.domain, &items, recipe.image_size, 1)?;
        shards.push((spec.train_domain, x, y));
    }
    Ok(StepBatch { step, shards })
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
    let items: Vec<(usize, bool)> = indices.iter().map(|&i| (i, false)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
    load_images(dataset, domain, &items, size, threads)
}

/// Decodes `(file index, flip)` items of one domain into `x [n,3,S,S]`, `y [n]`, on up to `threads` threads.
fn load_images(
    dataset: &Dataset,
    domain: usize,
    items: &[(usize, bool)],
    size: u32,
    threads: usize,
) -> Result<(Tensor, Tensor)> {
    let Some(dom) = dataset.domains().get(domain) else {
        bail!("domain index {domain} out of range ({} domains)", dataset.domains().len());
    };
    if let Some(&(bad, _)) = items.iter().find(|(i, _)| *i >= dom.len()) {
        bail!("image index {bad} out of range for domain '{}' ({} images)", dom.name, dom.len());
    }
    let s = size as usize;
    let per_image = 3 * s * s;
    let mut pixels = vec![0f32; items.len() * per_image];
    // Small batches are not worth a thread each: at least 4 images per thread.
    let threads = threads.clamp(1, items.len().div_ceil(4).max(1));
    let fill = |chunk_items: &[(usize, bool)], out: &mut [f32]| -> Result<()> {
        for (&(file, flip), dst) in chunk_items.iter().zip(out.chunks_exact_mut(per_image)) {
            let rgb = dataset.load_rgb(domain, file, size)?;
            normalize_into(&rgb, s, flip, dst);
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
    let labels: Vec<i64> = items.iter().map(|&(file, _)| dom.labels[file]).collect();
    Ok((x, Tensor::from_slice(&labels)))
}
