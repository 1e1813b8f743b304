//! One rank of a training job, as a recipe: configuration, communicator, data, model, method, then
//! the loop of updates and evaluations.

use crate::config::JobConfig;
use crate::eval::Evaluator;
use crate::preemption::{PreemptionSignal, WorkerOutcome};
use crate::progress::{fmt_duration, Progress};
use crate::records::{accuracy_table, peak_memory_gb, JsonlWriter, WindowMeans};
use crate::sharding;
use crate::WorkerArgs;
use anyhow::{bail, Context, Result};
use mgrun_collectives::store::StoreClient;
use mgrun_collectives::{scalars, Backend, Communicator, SingleRank};
use mgrun_collectives::{DeviceKind, RankEnv};
use mgrun_data::{Dataset, Loader};
use mgrun_methods::{Adam, AdamConfig, DomainShard, ExactMode, ShardingPlan, Topology, UpdateContext};
use mgrun_models::{Model, ModelSpec};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run_worker(args: &WorkerArgs) -> Result<WorkerOutcome> {
    // Before anything slow, so that an early SIGUSR1 is kept for the first step boundary.
    let preemption = PreemptionSignal::install()?;
    // --- Job configuration and this rank's identity.
    let env = RankEnv::from_env()?;
    let config = JobConfig::load(&args.config, &[])?;
    let device = env.device()?;
    configure_torch(&config, &env)?;
    let is_main = env.rank == 0;

    // --- Communicator over all ranks.
    let timeout = Duration::from_secs_f64(config.comm.timeout_s);
    let world = connect_world(&env, &config, device, timeout)?;

    // --- Data: the dataset tree (rank 0 makes the synthetic one if it is missing), this rank's
    // shard of every step, and the background loader.
    if is_main {
        std::fs::create_dir_all(&args.out_dir).with_context(|| format!("creating {}", args.out_dir.display()))?;
        prepare_synthetic_data(&config)?;
    }
    world.barrier().context("waiting for rank 0 to prepare the data")?;
    let dataset = Arc::new(Dataset::open(&config.data)?);
    let train_domains = dataset.train_domains().to_vec();
    let batch = config.data.batch_per_domain;
    let plan = sharding::job_plan(&config, env.world_size, train_domains.len())?;
    // --- Checkpoints: where they go, and the state to resume from (rank 0 picks it, every rank
    // loads it whole, so the number of ranks may differ from the run that wrote it).
    let checkpoint_root = config.checkpoint.dir.clone().unwrap_or_else(|| args.out_dir.join("checkpoints"));
    let config_keys = checkpoint_config_keys(&config)?;
    let resumed = resume_checkpoint(&config, &checkpoint_root, &config_keys, world.as_ref(), is_main)?;
    let start_step = resumed.as_ref().map_or(0, |c| c.meta.step);
    // On CUDA the loader pins each batch and starts its copy to the GPU ahead of the step.
    let shards = sharding::loader_shards(&plan, env.rank, &train_domains);
    let mut loader = Loader::new_on(dataset.clone(), shards, &config.data, config.train.seed, start_step, device)?;

    // --- Model (identical on every rank: built from the same seed, then rank 0's copy broadcast),
    // optimizer and method.
    let spec = ModelSpec {
        arch: config.model.arch.clone(),
        num_classes: dataset.classes().len(),
        freeze_bn: config.model.freeze_bn,
        dropout: config.model.dropout,
        width: config.model.width,
    };
    let execution = mgrun_models::Execution {
        precision: config.train.precision()?,
        channels_last: config.train.channels_last_on(device),
    };
    let mut model = mgrun_models::build_with(&spec, execution, device, config.train.seed as i64)?;
    if let Some(checkpoint) = &resumed {
        restore_model(model.as_ref(), checkpoint)?;
    } else if let Some(path) = &config.model.pretrained {
        let report = mgrun_checkpoint::load_pretrained(model.store_mut(), path)?;
        if is_main {
            println!("model.pretrained: loaded {} tensors from {}", report.loaded, path.display());
            if let Some(note) = &report.head_skipped {
                println!("model.pretrained: {note}");
            }
        }
    }
    broadcast_model(model.as_ref(), world.as_ref())?;
    let adam = AdamConfig { lr: config.train.lr, weight_decay: config.train.weight_decay, ..AdamConfig::default() };
    let mut optimizer = Adam::new(adam, model.store().numel(), device);
    let mut method = mgrun_methods::build(&config.method, model.as_ref(), train_domains.len())?;
    if let Some(checkpoint) = &resumed {
        let what = || format!("restoring the optimizer and method state from {}", checkpoint.dir.display());
        optimizer.load_state(&checkpoint.with_prefix(OPTIMIZER_PREFIX)).with_context(what)?;
        method.load_state(&checkpoint.with_prefix(METHOD_PREFIX)).with_context(what)?;
    }
    // The groups that sum the pieces of split domains, when the method needs each domain's
    // gradient on the fast path (deterministic mode gathers every micro-batch instead).
    let domain_groups = if method.needs_domain_gradients() && !config.train.deterministic {
        mgrun_methods::domain_groups(world.as_ref(), &plan)?
    } else {
        Vec::new()
    };
    let topo = Topology {
        world: world.as_ref(),
        plan: &plan,
        domain_groups: &domain_groups,
        bucket_bytes: (config.comm.bucket_mb * 1024.0 * 1024.0) as usize,
        exact: config.train.deterministic.then_some(ExactMode { seed: config.train.seed }),
    };

    // --- Outputs (rank 0).
    // On resume both files keep the records of the steps before the checkpoint and continue.
    let mut steps_out = None;
    let mut results_out = None;
    let mut window = WindowMeans::default();
    if is_main {
        let (writer, kept) = reopen_jsonl(&args.out_dir.join("steps.jsonl"), start_step)?;
        steps_out = Some(writer);
        // The running means since the last evaluation before the checkpoint continue too.
        let last_eval = (start_step > 0).then(|| (start_step - 1) / config.eval.every_steps * config.eval.every_steps);
        for record in kept.iter().filter(|r| last_eval.is_some_and(|e| r["step"].as_u64().is_some_and(|s| s > e))) {
            for (k, v) in record.as_object().into_iter().flatten().filter(|(k, _)| k.as_str() != "step") {
                window.add(k, v.as_f64().unwrap_or(0.0));
            }
            window.finish_step();
        }
        results_out = Some(reopen_jsonl(&args.out_dir.join("results.jsonl"), start_step)?.0);
    }
    if is_main {
        announce(&config, &env, &dataset, &plan, model.store().numel());
    }
    let evaluator = Evaluator { batch_size: config.eval.batch_size, image_size: config.data.image_size, device };
    let images_per_step = batch * train_domains.len();
    let mut progress = Progress::new(is_main, config.train.steps, images_per_step, config.train.progress_every_s);
    let steps_per_epoch = steps_per_epoch(&dataset, &train_domains, batch);
    let mut last_accuracy = Vec::new();
    // Always there: a preemption writes a checkpoint even when checkpoint.every_steps = 0.
    let checkpoint_store = if env.world_size > 1 {
        Some(
            StoreClient::connect_rank(&env, timeout)
                .context("connecting the checkpoint writer to the rendezvous store")?,
        )
    } else {
        None
    };
    let mut checkpoint_writer = mgrun_checkpoint::CheckpointWriter::new(
        &checkpoint_root,
        env.rank,
        env.world_size,
        config.checkpoint.keep_last,
        checkpoint_store,
    )?;

    // --- The training loop.
    for step in start_step..config.train.steps {
        let started = Instant::now();
        // Random state as a function of the step, so that a resumed run draws the same numbers.
        tch::manual_seed(step_seed(config.train.seed, step, env.rank));
        let data = loader.next().with_context(|| format!("loading the batch of step {step}"))?;
        let shards: Vec<DomainShard> = data
            .shards
            .into_iter()
            .zip(plan.pieces(env.rank))
            .map(|((domain, x, y), piece)| DomainShard {
                domain,
                offset: piece.lo,
                x: x.to_device(device),
                y: y.to_device(device),
            })
            .collect();
        let mut ctx = UpdateContext {
            model: model.as_mut(),
            optimizer: &mut optimizer,
            topology: &topo,
            step,
            total_steps: config.train.steps,
        };
        let stats = method.update(&mut ctx, &shards).with_context(|| format!("update at step {step}"))?;
        let step_time = started.elapsed().as_secs_f64();
        metrics::counter!("mgrun_steps_total").increment(1);
        metrics::histogram!("mgrun_step_seconds").record(step_time);

        window.add("loss", stats.loss);
        window.add("step_time", step_time);
        for (k, v) in &stats.extra {
            window.add(k, *v);
        }
        window.finish_step();
        if let Some(out) = steps_out.as_mut() {
            let mut record = json!({"step": step, "loss": stats.loss, "step_time": step_time});
            for (k, v) in &stats.extra {
                record[k] = json!(v);
            }
            out.write(&record)?;
        }
        progress.step(step, stats.loss);
        if !stats.loss.is_finite() {
            bail!("step {step}: the loss is {} (diverged); lower train.lr", stats.loss);
        }

        let last = step + 1 == config.train.steps;
        if step % config.eval.every_steps == 0 || last {
            let accuracy = evaluator.run(model.as_ref(), &dataset, world.as_ref()).context("evaluation")?;
            if let Some(out) = results_out.as_mut() {
                let mut record = serde_json::Map::new();
                record.insert("step".into(), json!(step));
                record.insert("epoch".into(), json!(step as f64 / steps_per_epoch));
                for (k, v) in window.take() {
                    record.insert(k, v);
                }
                record.insert("mem_gb".into(), json!(peak_memory_gb()));
                for a in &accuracy {
                    record.insert(format!("env{}_in_acc", a.domain), json!(a.in_acc));
                    record.insert(format!("env{}_out_acc", a.domain), json!(a.out_acc));
                }
                record.extend(method.summaries(model.as_ref()));
                if let Some(tensors) = method.evaluation_dump(model.as_ref())? {
                    let dir = args.out_dir.join("sensitivity");
                    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                    let path = dir.join(format!("step{step:06}.safetensors"));
                    let named: Vec<(String, tch::Tensor)> =
                        tensors.into_iter().map(|(n, t)| (n, t.to_device(tch::Device::Cpu))).collect();
                    tch::Tensor::write_safetensors(&named, &path)
                        .with_context(|| format!("writing {}", path.display()))?;
                    record.insert("sensitivity_dump".into(), json!(path));
                }
                record.insert("hparams".into(), run_hparams(&config)?);
                record.insert("args".into(), run_args(&config, &env, &dataset, &args.out_dir));
                out.write(&Value::Object(record))?;
            }
            last_accuracy = accuracy;
        }

        let periodic = config.checkpoint.every_steps > 0 && (step + 1) % config.checkpoint.every_steps == 0;
        // Preemption: every rank asks at every step boundary, so that all stop at the same step.
        let preempted = !last && preemption.requested_anywhere(world.as_ref())?;
        if periodic || preempted {
            let stall = Instant::now();
            let snapshot =
                snapshot_state(step + 1, &config_keys, &config, &env, model.as_ref(), &optimizer, method.as_ref())?;
            let copy_s = snapshot.copy_seconds;
            let previous = checkpoint_writer.save(snapshot)?;
            let stall_s = stall.elapsed().as_secs_f64();
            metrics::histogram!("mgrun_checkpoint_stall_seconds").record(stall_s);
            if is_main {
                println!(
                    "checkpoint step {}: training stalled {:.1} ms (copy {:.1} ms)",
                    step + 1,
                    stall_s * 1e3,
                    copy_s * 1e3
                );
                report_checkpoint(previous.as_ref());
            }
        }
        if preempted {
            let written = checkpoint_writer.wait().context("committing the preemption checkpoint")?;
            if is_main {
                report_checkpoint(written.as_ref());
                println!(
                    "preempted: stopped after step {} of {} with a checkpoint in {}; continue with --resume auto",
                    step + 1,
                    config.train.steps,
                    checkpoint_root.display()
                );
            }
            if preemption.terminated_after_notice() {
                eprintln!("rank {}: SIGTERM arrived after the preemption notice; held until the checkpoint", env.rank);
            }
            world.barrier().context("final barrier after the preemption checkpoint")?;
            return Ok(WorkerOutcome::Preempted { step: step + 1 });
        }
    }

    // --- Finish: the last checkpoint committed, the trained model and a summary table.
    let last = checkpoint_writer.wait()?;
    if is_main {
        report_checkpoint(last.as_ref());
    }
    if is_main {
        let path = args.out_dir.join("model.safetensors");
        mgrun_models::io::save_safetensors(model.store(), &path)?;
        println!(
            "done: {} steps in {} ({:.0} img/s); outputs in {}",
            config.train.steps,
            fmt_duration(progress.elapsed()),
            (config.train.steps as f64 * images_per_step as f64) / progress.elapsed().as_secs_f64().max(1e-9),
            args.out_dir.display()
        );
        print!("{}", accuracy_table(&last_accuracy));
    }
    world.barrier().context("final barrier")?;
    Ok(WorkerOutcome::Finished)
}

fn configure_torch(config: &JobConfig, env: &RankEnv) -> Result<()> {
    let threads = config.train.threads_per_rank(env.device_kind == DeviceKind::Cpu, env.local_world_size);
    tch::set_num_threads(threads.max(1) as i32);
    if config.train.deterministic {
        // cuBLAS reads this at its first handle creation (after this point): fixed workspaces
        // make its reductions reproducible. A user's own setting wins.
        if std::env::var_os("CUBLAS_WORKSPACE_CONFIG").is_none() {
            std::env::set_var("CUBLAS_WORKSPACE_CONFIG", ":4096:8");
        }
        mgrun_torch_shim::set_deterministic(true).context("train.deterministic")?;
    } else {
        // cuDNN autotuning: the input shapes of a training run are fixed.
        tch::Cuda::cudnn_set_benchmark(true);
    }
    Ok(())
}

fn connect_world(
    env: &RankEnv,
    config: &JobConfig,
    device: tch::Device,
    timeout: Duration,
) -> Result<Box<dyn Communicator>> {
    // Resolved even for one rank, so that a config asking for NCCL on the CPU fails the same way at any size.
    let backend = Backend::select(&config.comm.backend, device, env.ranks_per_gpu)
        .with_context(|| format!("rank {}", env.rank))?;
    if env.world_size == 1 {
        return Ok(Box::new(SingleRank::new(device)));
    }
    if backend == Backend::Nccl && env.rank == 0 {
        let version = mgrun_collectives::nccl::nccl_version().with_context(|| format!("rank {}", env.rank))?;
        println!("NCCL {version}");
    }
    let store = StoreClient::connect_rank(env, timeout).context("connecting to the rendezvous store")?;
    let comm = mgrun_collectives::connect(backend, &store, env.rank, env.world_size, device, timeout)
        .with_context(|| format!("rank {}: connecting the {} communicator", env.rank, backend.name()))?;
    Ok(comm)
}

/// `mgrun` makes the synthetic dataset on first use so that the quickstart needs no download.
fn prepare_synthetic_data(config: &JobConfig) -> Result<()> {
    if config.data.dataset != "synthetic" || config.data.root.exists() {
        return Ok(());
    }
    let opts = mgrun_data::synthetic::SyntheticOptions {
        out: config.data.root.clone(),
        ..mgrun_data::synthetic::SyntheticOptions::default()
    };
    println!("data.root {} is missing: generating the synthetic dataset there", config.data.root.display());
    let summary = mgrun_data::synthetic::generate(&opts)?;
    println!("{summary}");
    Ok(())
}

fn broadcast_model(model: &dyn Model, world: &dyn Communicator) -> Result<()> {
    if world.world_size() == 1 {
        return Ok(());
    }
    let _no_grad = tch::no_grad_guard();
    let mut flat = model.store().flat().shallow_clone();
    world.broadcast(&mut flat, 0).context("broadcasting the initial parameters from rank 0")?;
    for (name, buffer) in model.store().buffers() {
        let mut b = buffer.shallow_clone();
        world.broadcast(&mut b, 0).with_context(|| format!("broadcasting buffer {name}"))?;
    }
    Ok(())
}

/// DomainBed's epoch: steps per pass over the smallest training domain's in split.
fn steps_per_epoch(dataset: &Dataset, train_domains: &[usize], batch: usize) -> f64 {
    let smallest = train_domains.iter().map(|&d| dataset.domains()[d].in_split.len()).min().unwrap_or(0);
    (smallest as f64 / batch as f64).max(1e-9)
}

/// The run's identity with DomainBed's `args` field names, so that DomainBed's `collect_results`
/// (and `mgrun collect`) can read results.jsonl. Names follow `mgrun_sweep::registry`
/// (`domainbed_dataset_name` / `domainbed_algorithm_name`), which derives the run seeds from them.
fn run_args(config: &JobConfig, env: &RankEnv, dataset: &Dataset, out_dir: &std::path::Path) -> Value {
    // DomainBed's names, so that its collect_results (and `mgrun collect`) group runs as it does.
    let dataset_name = mgrun_sweep::registry::domainbed_dataset_name(&config.data.dataset);
    let algorithm = mgrun_sweep::registry::domainbed_algorithm_name(&config.method.name);
    json!({
        "dataset": dataset_name,
        "data_dir": config.data.root,
        "algorithm": algorithm,
        "test_envs": dataset.test_domains(),
        "domains": dataset.domains().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
        "holdout_fraction": config.data.holdout_fraction,
        "hparams_seed": config.train.hparams_seed,
        "trial_seed": config.data.split_seed,
        "seed": config.train.seed,
        "steps": config.train.steps,
        "checkpoint_freq": config.eval.every_steps,
        "output_dir": out_dir,
        "task": "domain_generalization",
        "world_size": env.world_size,
        "arch": config.model.arch,
    })
}

/// DomainBed's `hparams` names for the shared hyperparameters and the swept method ones (as
/// `mgrun sweep` names them), plus mgrun's full `[method]` table under `method`.
fn run_hparams(config: &JobConfig) -> Result<Value> {
    let method = serde_json::to_value(&config.method).context("serialising the method config")?;
    let mut hparams = json!({
        "lr": config.train.lr,
        "batch_size": config.data.batch_per_domain,
        "resnet_dropout": config.model.dropout,
        "weight_decay": config.train.weight_decay,
        "data_augmentation": config.data.augment,
        "class_balanced": false,
        "resnet18": config.model.arch == "resnet18",
        "freeze_bn": config.model.freeze_bn,
    });
    for (name, value) in config.method.searched_values()? {
        hparams[name] = value;
    }
    hparams["method"] = method;
    Ok(hparams)
}

fn announce(config: &JobConfig, env: &RankEnv, dataset: &Dataset, plan: &ShardingPlan, params: usize) {
    let names: Vec<String> = dataset
        .domains()
        .iter()
        .enumerate()
        .map(|(i, d)| if dataset.test_domains().contains(&i) { format!("{} (test)", d.name) } else { d.name.clone() })
        .collect();
    println!(
        "mgrun: {} on {} ranks ({}), method {}, {} {} params, {} classes, domains: {}",
        config.data.dataset,
        env.world_size,
        env.device_kind,
        config.method.name,
        config.model.arch,
        params,
        dataset.classes().len(),
        names.join(", ")
    );
    let train_names: Vec<String> = dataset.train_domains().iter().map(|&d| dataset.domains()[d].name.clone()).collect();
    // Built from this config already, so its section parses.
    let statistics = config.method.cross_rank_statistics().unwrap_or_default();
    print!("{}", sharding::describe(plan, &train_names, &statistics, config.train.deterministic, params));
    if config.train.deterministic && env.device_kind == DeviceKind::Cpu {
        println!(
            "deterministic mode: {} thread(s) per CPU rank (train.threads), the same at any world size",
            tch::get_num_threads()
        );
    }
}

/// Checkpoint names of the optimizer's and the method's state tensors.
const OPTIMIZER_PREFIX: &str = "optimizer.";
const METHOD_PREFIX: &str = "method.";
const FLAT_PARAMS: &str = "model.flat";
const BUFFER_PREFIX: &str = "model.buffer.";

/// Config keys that may change when a run is resumed (length, logging, evaluation, transport,
/// checkpointing itself, where the data lives); every other key must match the checkpoint's.
const RESUMABLE_KEYS: &[&str] = &[
    "checkpoint",
    "train.steps",
    "train.threads",
    "train.progress_every_s",
    "comm",
    "eval",
    "data.root",
    "data.num_workers",
    "data.prefetch",
    "data.cache_mb",
];

fn checkpoint_config_keys(config: &JobConfig) -> Result<std::collections::BTreeMap<String, String>> {
    let value = serde_json::to_value(config).context("serialising the config for its checkpoint fingerprint")?;
    Ok(mgrun_checkpoint::flatten_config(&value, RESUMABLE_KEYS))
}

/// The seed of torch's generator at `step` on `rank` (splitmix64 of the three).
fn step_seed(seed: u64, step: u64, rank: usize) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// Resolves `checkpoint.resume` on rank 0 (naming and skipping torn or corrupt checkpoints),
/// broadcasts the chosen step, and loads that checkpoint on every rank.
fn resume_checkpoint(
    config: &JobConfig,
    root: &std::path::Path,
    config_keys: &std::collections::BTreeMap<String, String>,
    world: &dyn Communicator,
    is_main: bool,
) -> Result<Option<mgrun_checkpoint::LoadedCheckpoint>> {
    let spec = config.checkpoint.resume.as_str();
    if spec == "none" {
        return Ok(None);
    }
    let mut chosen = None;
    let mut step = -1i64;
    if is_main {
        for removed in mgrun_checkpoint::clean_incomplete(root)? {
            println!("checkpoint: removed the incomplete {}", removed.display());
        }
        let choice = mgrun_checkpoint::resolve_resume(root, spec)?;
        for skipped in &choice.skipped {
            eprintln!("checkpoint: skipping invalid checkpoint {skipped}");
        }
        match choice.checkpoint {
            Some(checkpoint) => {
                step = checkpoint.meta.step as i64;
                chosen = Some(checkpoint);
            }
            None => println!("checkpoint.resume = {spec}: no checkpoint in {}, starting at step 0", root.display()),
        }
    }
    let step = scalars::broadcast_i64(world, &[step], 0).context("broadcasting the checkpoint step to resume from")?[0];
    if step < 0 {
        return Ok(None);
    }
    let checkpoint = match chosen {
        Some(checkpoint) => checkpoint,
        None => {
            let given = std::path::PathBuf::from(spec);
            let dir = if spec != "auto" && given.join(mgrun_checkpoint::MANIFEST_FILE).exists() {
                given
            } else {
                let base = if spec == "auto" { root.to_path_buf() } else { given };
                base.join(mgrun_checkpoint::step_dir_name(step as u64))
            };
            mgrun_checkpoint::load(&dir)?
        }
    };
    if checkpoint.meta.step != step as u64 {
        bail!("checkpoint {}: holds step {}, rank 0 chose step {step}", checkpoint.dir.display(), checkpoint.meta.step);
    }
    let differences = mgrun_checkpoint::config_differences(&checkpoint.meta.config, config_keys);
    if !differences.is_empty() {
        bail!(
            "checkpoint {} was written with another config (fingerprint {}); differing keys: {}. Resume with the same \
             settings, or start afresh with checkpoint.resume = \"none\"",
            checkpoint.dir.display(),
            checkpoint.meta.config_fingerprint,
            differences.join(", ")
        );
    }
    if is_main {
        println!(
            "resuming from {} (step {}, written on {} rank(s))",
            checkpoint.dir.display(),
            checkpoint.meta.step,
            checkpoint.meta.world_size
        );
    }
    Ok(Some(checkpoint))
}

fn restore_model(model: &dyn Model, checkpoint: &mgrun_checkpoint::LoadedCheckpoint) -> Result<()> {
    let store = model.store();
    let what = || format!("restoring the model from {}", checkpoint.dir.display());
    store.set_flat(&checkpoint.get(FLAT_PARAMS)?.to_device(store.device())).with_context(what)?;
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

/// Host copies of the part of the training state this rank writes, after `steps_done` steps.
fn snapshot_state(
    steps_done: u64,
    config_keys: &std::collections::BTreeMap<String, String>,
    config: &JobConfig,
    env: &RankEnv,
    model: &dyn Model,
    optimizer: &Adam,
    method: &dyn mgrun_methods::Method,
) -> Result<mgrun_checkpoint::Snapshot> {
    let numel = model.store().numel() as i64;
    // Per-parameter flat tensors are split over the ranks; everything else is written by rank 0.
    let entry = |name: String, tensor: tch::Tensor| {
        let sharded = tensor.dim() == 1 && tensor.size()[0] == numel;
        mgrun_checkpoint::StateTensor { name, tensor, sharded }
    };
    let mut tensors = vec![entry(FLAT_PARAMS.to_string(), model.store().flat().shallow_clone())];
    for (name, buffer) in model.store().buffers() {
        tensors.push(entry(format!("{BUFFER_PREFIX}{name}"), buffer.shallow_clone()));
    }
    tensors.extend(optimizer.state().into_iter().map(|(n, t)| entry(format!("{OPTIMIZER_PREFIX}{n}"), t)));
    tensors.extend(method.state().into_iter().map(|(n, t)| entry(format!("{METHOD_PREFIX}{n}"), t)));
    let meta = mgrun_checkpoint::Meta {
        step: steps_done,
        world_size: env.world_size,
        seed: config.train.seed,
        config_fingerprint: mgrun_checkpoint::fingerprint(config_keys),
        config: config_keys.clone(),
        created_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    mgrun_checkpoint::Snapshot::capture(meta, tensors, env.rank, env.world_size)
}

fn report_checkpoint(report: Option<&mgrun_checkpoint::WriteReport>) {
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

/// Opens a JSONL output for appending after a resume at `start_step`: the records of earlier
/// steps are kept (a record a killed run wrote past the checkpoint is dropped), via a temporary
/// file renamed over the old one so that a crash here loses nothing. Returns the kept records.
fn reopen_jsonl(path: &std::path::Path, start_step: u64) -> Result<(JsonlWriter, Vec<Value>)> {
    let kept: Vec<Value> = if start_step > 0 && path.exists() {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|r| r["step"].as_u64().is_some_and(|s| s < start_step))
            .collect()
    } else {
        Vec::new()
    };
    let tmp = path.with_extension("jsonl.tmp");
    let mut writer = JsonlWriter::create(&tmp)?;
    for record in &kept {
        writer.write(record)?;
    }
    // The open file follows the rename.
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok((writer, kept))
}
