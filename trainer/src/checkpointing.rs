//! Checkpointing, one component of the training loop: which checkpoint a run resumes from, restoring
//! the training state from it, and saving when due (every `checkpoint.every_steps` steps, and at once
//! when a preemption notice reached any rank), with the stall each save costs the training.

use crate::config::JobConfig;
use crate::preemption::{PreemptionSignal, WorkerOutcome};
use crate::swad::Swad;
use anyhow::{bail, Context, Result};
use mgrun_checkpoint::{CheckpointWriter, LoadedCheckpoint, Resume, Snapshot, StateTensor, WriteReport};
use mgrun_collectives::store::StoreClient;
use mgrun_collectives::RankEnv;
use mgrun_collectives::{scalars, Communicator};
use mgrun_methods::{Adam, Method};
use mgrun_models::Model;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Checkpoint names of the state tensors.
const OPTIMIZER_PREFIX: &str = "optimizer.";
const METHOD_PREFIX: &str = "method.";
const FLAT_PARAMS: &str = "model.flat";
const BUFFER_PREFIX: &str = "model.buffer.";
const SWAD_PREFIX: &str = "swad.";

/// Config keys that may change when a run is resumed (length, logging, evaluation, transport,
/// checkpointing itself, where the data lives); every other key must match the checkpoint's.
const RESUMABLE_KEYS: &[&str] = &[
    "checkpoint",
    "train.threads",
    "train.progress_every_s",
    "comm",
    "eval",
    "data.num_workers",
    "data.prefetch",
    "data.cache_mb",
    "metrics",
    "trace",
];

/// The one identity key that `--extend` lets change.
const STEPS_KEY: &str = "train.steps:";

/// What a checkpoint holds of a training run after some step.
pub struct TrainingState<'a> {
    pub model: &'a dyn Model,
    pub optimizer: &'a Adam,
    pub method: &'a dyn Method,
    /// SWAD's averages and valley, when `swad.enabled`.
    pub swad: Option<&'a Swad>,
}

pub struct Checkpointer {
    root: PathBuf,
    resume: Resume,
    /// `--extend`: a resumed run may have another `train.steps`.
    extend: bool,
    /// The config's fingerprinted keys, written into every checkpoint and compared on resume.
    config_keys: BTreeMap<String, String>,
    every_steps: u64,
    total_steps: u64,
    seed: u64,
    rank: usize,
    world_size: usize,
    writer: CheckpointWriter,
    /// The run's trained model is missing (its final write failed): a finished run may be resumed to
    /// write it again from its last checkpoint. Not with SWAD, whose final records would repeat.
    model_missing: bool,
    preemption: PreemptionSignal,
}

impl Checkpointer {
    /// Checkpoints of the run writing to `out_dir` (under `checkpoint.dir`, default `<out>/checkpoints`).
    /// Always built, since a preemption writes a checkpoint even when `checkpoint.every_steps` = 0.
    pub fn new(
        config: &JobConfig,
        env: &RankEnv,
        out_dir: &Path,
        timeout: Duration,
        preemption: PreemptionSignal,
    ) -> Result<Checkpointer> {
        let root = config.checkpoint.dir.clone().unwrap_or_else(|| out_dir.join("checkpoints"));
        let value = serde_json::to_value(config).context("serialising the config for its checkpoint fingerprint")?;
        let store = if env.world_size > 1 {
            Some(
                StoreClient::connect_rank(env, timeout)
                    .context("connecting the checkpoint writer to the rendezvous store")?,
            )
        } else {
            None
        };
        let writer = CheckpointWriter::new(&root, env.rank, env.world_size, config.checkpoint.keep_last, store)?;
        Ok(Checkpointer {
            root,
            resume: config.checkpoint.resume.clone(),
            extend: config.checkpoint.extend,
            config_keys: mgrun_checkpoint::flatten_config(&value, RESUMABLE_KEYS),
            every_steps: config.checkpoint.every_steps,
            total_steps: config.train.steps,
            seed: config.train.seed,
            rank: env.rank,
            world_size: env.world_size,
            writer,
            model_missing: !out_dir.join(crate::MODEL_FILE).exists() && !config.swad.enabled,
            preemption,
        })
    }

    fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// The checkpoint `checkpoint.resume` names, loaded whole on every rank (so the number of ranks may
    /// differ from the run that wrote it). Rank 0 resolves it, naming and skipping torn or corrupt
    /// checkpoints, and broadcasts its step.
    pub fn resume(&self, world: &dyn Communicator) -> Result<Option<LoadedCheckpoint>> {
        if self.resume == Resume::None {
            return Ok(None);
        }
        let mut chosen = None;
        let mut step = -1i64;
        if self.is_main() {
            for removed in mgrun_checkpoint::clean_incomplete(&self.root)? {
                println!("checkpoint: removed the incomplete {}", removed.display());
            }
            let choice = mgrun_checkpoint::resolve_resume(&self.root, &self.resume)?;
            for skipped in &choice.skipped {
                eprintln!("checkpoint: skipping invalid checkpoint {skipped}");
            }
            match choice.checkpoint {
                Some(checkpoint) => {
                    step = checkpoint.meta.step as i64;
                    chosen = Some(checkpoint);
                }
                None => println!(
                    "checkpoint.resume = {}: no checkpoint in {}, starting at step 0",
                    self.resume,
                    self.root.display()
                ),
            }
        }
        let step =
            scalars::broadcast_i64(world, &[step], 0).context("broadcasting the checkpoint step to resume from")?[0];
        if step < 0 {
            return Ok(None);
        }
        let checkpoint = match chosen {
            Some(checkpoint) => checkpoint,
            None => mgrun_checkpoint::load(&self.chosen_dir(step as u64))?,
        };
        if checkpoint.meta.step != step as u64 {
            bail!(
                "checkpoint {}: holds step {}, rank 0 chose step {step}",
                checkpoint.dir.display(),
                checkpoint.meta.step
            );
        }
        // The run's identity (dataset and its root, model, method, classes, domains, seeds, steps)
        // must match; train.steps may change only when asked for (--extend), since schedules depend
        // on it (DSP-Reg's warm-up and ramp, UDIM's warm-up, PS-KD's alpha).
        let mut differences = mgrun_checkpoint::config_differences(&checkpoint.meta.config, &self.config_keys);
        let steps_change = differences.iter().position(|d| d.starts_with(STEPS_KEY));
        if let (Some(index), true) = (steps_change, self.extend) {
            let change = differences.remove(index);
            if self.is_main() && differences.is_empty() {
                println!(
                    "--extend: {change}; schedules that depend on the total (DSP-Reg's warm-up and ramp, UDIM's \
                     warm-up, PS-KD's weight) follow the new value from step {}",
                    checkpoint.meta.step
                );
            }
        }
        if !differences.is_empty() {
            let hint = if steps_change.is_some() && !self.extend {
                " To train a run further with more steps, resume with --extend."
            } else {
                ""
            };
            bail!(
                "checkpoint {} belongs to another run (config fingerprint {}); differing keys: {}. Resume with the \
                 same settings, or start afresh in another --out.{hint}",
                checkpoint.dir.display(),
                checkpoint.meta.config_fingerprint,
                differences.join(", ")
            );
        }
        let finished_without_model = checkpoint.meta.step == self.total_steps && self.model_missing;
        if checkpoint.meta.step >= self.total_steps && !finished_without_model {
            bail!(
                "checkpoint {} is at step {}, and train.steps = {}: nothing left to train (the run is finished); to \
                 train it further, raise train.steps and resume with --extend",
                checkpoint.dir.display(),
                checkpoint.meta.step,
                self.total_steps
            );
        }
        if self.is_main() && finished_without_model {
            println!(
                "the run finished at step {} but its {} is missing: writing it from {}",
                checkpoint.meta.step,
                crate::MODEL_FILE,
                checkpoint.dir.display()
            );
        } else if self.is_main() {
            println!(
                "resuming from {} (step {}, written on {} rank(s))",
                checkpoint.dir.display(),
                checkpoint.meta.step,
                checkpoint.meta.world_size
            );
        }
        Ok(Some(checkpoint))
    }

    /// The directory of the checkpoint of `step` that rank 0 chose.
    fn chosen_dir(&self, step: u64) -> PathBuf {
        match &self.resume {
            Resume::Path(path) if path.join(mgrun_checkpoint::MANIFEST_FILE).exists() => path.clone(),
            Resume::Path(path) => path.join(mgrun_checkpoint::step_dir_name(step)),
            Resume::Auto | Resume::None => self.root.join(mgrun_checkpoint::step_dir_name(step)),
        }
    }

    /// After `step`: saves when due, and on a preemption notice saves, commits and says the rank must
    /// stop now (every rank asks at every step boundary, so that all stop at the same step).
    pub fn after_step(
        &mut self,
        step: u64,
        state: TrainingState<'_>,
        world: &dyn Communicator,
    ) -> Result<Option<WorkerOutcome>> {
        let steps_done = step + 1;
        let periodic = self.every_steps > 0 && steps_done.is_multiple_of(self.every_steps);
        let preempted = steps_done < self.total_steps && self.preemption.requested_anywhere(world)?;
        if periodic || preempted {
            self.save(steps_done, state)?;
        }
        if !preempted {
            return Ok(None);
        }
        let written = self.writer.wait().context("committing the preemption checkpoint")?;
        if self.is_main() {
            report(written.as_ref());
            println!(
                "preempted: stopped after step {steps_done} of {} with a checkpoint in {}; continue with --resume auto",
                self.total_steps,
                self.root.display()
            );
        }
        if self.preemption.terminated_after_notice() {
            eprintln!("rank {}: SIGTERM arrived after the preemption notice; held until the checkpoint", self.rank);
        }
        world.barrier().context("final barrier after the preemption checkpoint")?;
        Ok(Some(WorkerOutcome::Preempted { step: steps_done }))
    }

    /// Copies this rank's part of the state to the host and writes it in the background; training
    /// stalls only for the copy.
    fn save(&mut self, steps_done: u64, state: TrainingState<'_>) -> Result<()> {
        let stall = Instant::now();
        let snapshot = self.snapshot(steps_done, state)?;
        let copy_s = snapshot.copy_seconds;
        let previous = self.writer.save(snapshot)?;
        let stall_s = stall.elapsed().as_secs_f64();
        mgrun_telemetry::record_between_steps(mgrun_telemetry::Phase::Checkpoint, stall_s);
        if self.is_main() {
            println!(
                "checkpoint step {steps_done}: training stalled {:.1} ms (copy {:.1} ms)",
                stall_s * 1e3,
                copy_s * 1e3
            );
            report(previous.as_ref());
        }
        Ok(())
    }

    /// Waits for the last write to commit.
    pub fn finish(&mut self) -> Result<()> {
        let last = self.writer.wait()?;
        if self.is_main() {
            report(last.as_ref());
        }
        Ok(())
    }

    /// Host copies of the part of the training state this rank writes, after `steps_done` steps.
    fn snapshot(&self, steps_done: u64, state: TrainingState<'_>) -> Result<Snapshot> {
        let store = state.model.store();
        let numel = store.numel() as i64;
        // Per-parameter flat tensors are split over the ranks; everything else is written by rank 0.
        let entry = |name: String, tensor: tch::Tensor| {
            let sharded = tensor.dim() == 1 && tensor.size()[0] == numel;
            StateTensor { name, tensor, sharded }
        };
        let mut tensors = vec![entry(FLAT_PARAMS.to_string(), store.flat().shallow_clone())];
        for (name, buffer) in store.buffers() {
            tensors.push(entry(format!("{BUFFER_PREFIX}{name}"), buffer.shallow_clone()));
        }
        tensors.extend(state.optimizer.state().into_iter().map(|(n, t)| entry(format!("{OPTIMIZER_PREFIX}{n}"), t)));
        tensors.extend(state.method.state().into_iter().map(|(n, t)| entry(format!("{METHOD_PREFIX}{n}"), t)));
        if let Some(swad) = state.swad {
            tensors.extend(swad.state().into_iter().map(|(n, t)| entry(format!("{SWAD_PREFIX}{n}"), t)));
        }
        let meta = mgrun_checkpoint::Meta {
            step: steps_done,
            world_size: self.world_size,
            seed: self.seed,
            config_fingerprint: mgrun_checkpoint::fingerprint(&self.config_keys),
            config: self.config_keys.clone(),
            created_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        Snapshot::capture(meta, tensors, self.rank, self.world_size)
    }
}

/// Loads the model's parameters and buffers from `checkpoint`.
pub fn restore_model(model: &dyn Model, checkpoint: &LoadedCheckpoint) -> Result<()> {
    let store = model.store();
    let what = || format!("restoring the model from {}", checkpoint.dir.display());
    let saved = checkpoint.get(FLAT_PARAMS)?;
    if saved.numel() != store.numel() {
        // The config matched, so the model's shape came from the data: most often the class count.
        bail!(
            "{}: the checkpoint's model has {} parameters, this job's {} ({} classes in data.root now): the dataset's \
             classes changed since the checkpoint was written, so it cannot be resumed",
            what(),
            saved.numel(),
            store.numel(),
            model.spec().num_classes
        );
    }
    store.set_flat(&saved.to_device(store.device())).with_context(what)?;
    let _no_grad = tch::no_grad_guard();
    for (name, buffer) in store.buffers() {
        let saved = checkpoint.get(&format!("{BUFFER_PREFIX}{name}")).with_context(what)?;
        if saved.size() != buffer.size() {
            bail!("{}: buffer {name:?} has shape {:?}, the model's is {:?}", what(), saved.size(), buffer.size());
        }
        buffer.shallow_clone().copy_(saved);
    }
    Ok(())
}

/// Loads the optimizer's and the method's state from `checkpoint`.
pub fn restore_optimizer_and_method(
    checkpoint: &LoadedCheckpoint,
    optimizer: &mut Adam,
    method: &mut dyn Method,
) -> Result<()> {
    let what = || format!("restoring the optimizer and method state from {}", checkpoint.dir.display());
    optimizer.load_state(&checkpoint.with_prefix(OPTIMIZER_PREFIX)).with_context(what)?;
    method.load_state(&checkpoint.with_prefix(METHOD_PREFIX)).with_context(what)
}

/// Loads SWAD's state from `checkpoint` (the same config, so SWAD was on when it was written).
pub fn restore_swad(checkpoint: &LoadedCheckpoint, swad: &mut Swad) -> Result<()> {
    swad.load_state(&checkpoint.with_prefix(SWAD_PREFIX))
        .with_context(|| format!("restoring the SWAD state from {}", checkpoint.dir.display()))
}

fn report(report: Option<&WriteReport>) {
    let Some(report) = report else { return };
    let mb = report.bytes as f64 / 1e6;
    let dir = report.committed.as_ref().map(|d| d.display().to_string()).unwrap_or_default();
    println!(
        "checkpoint step {} committed to {dir}: rank 0 wrote {mb:.1} MB in {:.3} s ({:.0} MB/s){}",
        report.step,
        report.seconds,
        mb / report.seconds.max(1e-9),
        if report.pruned.is_empty() { String::new() } else { format!(", pruned {}", report.pruned.len()) }
    );
}
