//! One rank of a training job, as a recipe: configuration, communicator, data, model, method, then
//! the loop: batch, update, records, SWAD's averages, evaluation when due, checkpoint when due.

use crate::checkpointing::{restore_model, restore_optimizer_and_method, restore_swad, Checkpointer, TrainingState};
use crate::config::JobConfig;
use crate::eval::Evaluator;
use crate::preemption::{PreemptionSignal, WorkerOutcome};
use crate::progress::{fmt_duration, Progress};
use crate::records::{accuracy_table, RunRecords, SKIPPED_LISTED};
use crate::sharding;
use crate::swad::{Swad, ValleyDecision};
use crate::{WorkerArgs, TRACE_DIR};
use anyhow::{bail, Context, Result};
use mgrun_checkpoint::LoadedCheckpoint;
use mgrun_collectives::store::StoreClient;
use mgrun_collectives::{Backend, Communicator, DeviceKind, RankEnv, SingleRank};
use mgrun_data::{Dataset, Loader};
use mgrun_methods::descriptor::MessageDims;
use mgrun_methods::overlap::GradientOverlap;
use mgrun_methods::{Adam, DomainShard, ExactMode, ShardingPlan, Topology, UpdateContext};
use mgrun_models::{Model, ModelSpec};
use mgrun_telemetry::{self as telemetry, Phase, StepReport};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run_worker(args: &WorkerArgs) -> Result<WorkerOutcome> {
    // Before anything slow, so that an early SIGUSR1 is kept for the first step boundary.
    let preemption = PreemptionSignal::install()?;
    // --- Job configuration, this rank's identity and the communicator over all ranks.
    let env = RankEnv::from_env()?;
    let config = JobConfig::load(&args.config, &[])?;
    config.check_world_size(env.world_size).with_context(|| format!("config {}", args.config.display()))?;
    config.check_pretrained().with_context(|| format!("config {}", args.config.display()))?;
    let device = env.device()?;
    configure_torch(&config, &env)?;
    let is_main = env.rank == 0;
    let timeout = Duration::from_secs_f64(config.comm.timeout_s);
    let world = connect_world(&env, &config, device, timeout)?;
    start_telemetry(&config, &env, &args.out_dir)?;

    // --- Data, checkpoints, model, optimizer and method. The model is identical on every rank: built
    // from the same seed or checkpoint, then rank 0's copy broadcast.
    let dataset = open_dataset(&config, &args.out_dir, world.as_ref(), is_main)?;
    let num_domains = dataset.train_domains().len();
    let plan = sharding::job_plan(&config, env.world_size, num_domains)?;
    let mut checkpointer = Checkpointer::new(&config, &env, &args.out_dir, timeout, preemption)?;
    let resumed = checkpointer.resume(world.as_ref())?;
    let start_step = resumed.as_ref().map_or(0, |c| c.meta.step);
    // On CUDA the loader pins each batch and starts its copy to the GPU ahead of the step.
    let shards = sharding::loader_shards(&plan, env.rank, dataset.train_domains());
    let mut loader = Loader::new_on(dataset.clone(), shards, &config.data, config.train.seed, start_step, device)?;
    let mut model = build_model(&config, &dataset, device, resumed.as_ref(), world.as_ref())?;
    let mut optimizer = Adam::new(config.train.adam(), model.store().numel(), device);
    let mut method = mgrun_methods::build(&config.method, model.as_ref(), num_domains)?;
    if let Some(checkpoint) = &resumed {
        restore_optimizer_and_method(checkpoint, &mut optimizer, method.as_mut())?;
    }
    let mut swad = config.swad.enabled.then(|| Swad::new(&config.swad, device));
    if let (Some(checkpoint), Some(swad)) = (&resumed, swad.as_mut()) {
        restore_swad(checkpoint, swad)?;
    }
    // The groups that sum the pieces of split domains, when the method needs each domain's
    // gradient on the fast path (deterministic mode gathers every micro-batch instead).
    let domain_groups = if method.needs_domain_gradients() && !config.train.deterministic {
        mgrun_methods::domain_groups(world.as_ref(), &plan)?
    } else {
        Vec::new()
    };
    let overlap =
        start_overlap(&config, &env, device, method.needs_domain_gradients(), model.as_ref(), world.as_ref())?;
    let topo = Topology {
        world: world.as_ref(),
        plan: &plan,
        domain_groups: &domain_groups,
        bucket_bytes: bucket_bytes(&config),
        exact: config.train.deterministic.then_some(ExactMode { seed: config.train.seed }),
        overlap: overlap.as_ref(),
    };

    // --- Records, evaluation and progress.
    let mut records = RunRecords::open(&config, &env, &dataset, &args.out_dir, start_step)?;
    if is_main {
        announce(&config, &env, &dataset, &plan, &*model);
    }
    let evaluator = Evaluator::new(&config, device);
    let images_per_step = config.data.batch_per_domain * num_domains;
    let mut progress = Progress::new(env.rank, config.train.steps, images_per_step, config.train.progress_every_s);
    let images_on_this_rank: usize = plan.pieces(env.rank).iter().map(|p| p.len()).sum();
    let mut last_accuracy = Vec::new();
    // Steps trained in all, fewer than train.steps when SWAD's valley ends early.
    let mut steps_done = start_step;

    // --- The training loop.
    for step in start_step..config.train.steps {
        if swad.as_ref().is_some_and(|s| s.valley().is_dead()) {
            break;
        }
        let started = Instant::now();
        telemetry::step_begin(step);
        // Random state as a function of the step, so that a resumed run draws the same numbers.
        tch::manual_seed(step_seed(config.train.seed, step, env.rank));
        let shards = {
            let _waiting = telemetry::phase(Phase::DataWait);
            next_shards(&mut loader, &plan, env.rank, device)
                .with_context(|| format!("loading the batch of step {step}"))?
        };
        let update_started = Instant::now();
        let mut ctx = UpdateContext {
            model: model.as_mut(),
            optimizer: &mut optimizer,
            topology: &topo,
            step,
            total_steps: config.train.steps,
            seed: config.train.seed,
        };
        let stats = method.update(&mut ctx, &shards).with_context(|| format!("update at step {step}"))?;
        let times = telemetry::step_end(&StepReport {
            update_s: update_started.elapsed().as_secs_f64(),
            images: images_on_this_rank,
            loss: stats.loss,
            grad_norm: optimizer.take_grad_norm(),
            method_stats: stats.extra.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            loader_queue_depth: Some(loader.queue_depth()),
        });
        records.step(step, &stats, started.elapsed().as_secs_f64())?;
        progress.step(step, stats.loss, &times);
        if !stats.loss.is_finite() {
            bail!("step {step}: the loss is {} (diverged); lower train.lr", stats.loss);
        }
        steps_done = step + 1;
        if let Some(swad) = swad.as_mut() {
            swad.after_step(step, model.store().flat());
        }
        if evaluator.due(step) {
            let evaluation_started = Instant::now();
            let evaluation = evaluator.run(model.as_ref(), &dataset, world.as_ref()).context("evaluation")?;
            telemetry::record_between_steps(Phase::Evaluation, evaluation_started.elapsed().as_secs_f64());
            record_metrics(step, &mut records, world.as_ref(), device)?;
            let train_out_loss = evaluation.train_out_loss(dataset.train_domains());
            records.evaluation(step, &evaluation.accuracy, train_out_loss, method.as_ref(), model.as_ref())?;
            last_accuracy = evaluation.accuracy;
            if let Some(swad) = swad.as_mut() {
                let loss = rank0_value(world.as_ref(), train_out_loss).context("SWAD's validation loss")?;
                let decision = swad.after_evaluation(step, loss)?;
                if is_main {
                    announce_valley(step, loss, &decision);
                }
                if decision == ValleyDecision::Dead {
                    // swad.py stops here, before anything else of the step (every rank decides alike).
                    break;
                }
            }
        }
        let state = TrainingState {
            model: model.as_ref(),
            optimizer: &optimizer,
            method: method.as_ref(),
            swad: swad.as_ref(),
        };
        if let Some(preempted) = checkpointer.after_step(step, state, world.as_ref())? {
            return Ok(preempted);
        }
    }

    // --- Finish: the last checkpoint committed, the trained model and a summary table.
    telemetry::flush();
    checkpointer.finish()?;
    if is_main {
        let path = args.out_dir.join(crate::MODEL_FILE);
        mgrun_models::io::save_safetensors(model.store(), &path).with_context(|| {
            format!(
                "saving the trained model after step {steps_done} (the records and committed checkpoints are kept: \
                 make {} writable and run again with --resume auto)",
                args.out_dir.display()
            )
        })?;
        if steps_done == start_step {
            println!("done: the model of step {steps_done} is written; outputs in {}", args.out_dir.display());
        } else {
            println!(
                "done: {steps_done} steps in {} ({:.0} img/s); outputs in {}",
                fmt_duration(progress.elapsed()),
                ((steps_done - start_step) as f64 * images_per_step as f64)
                    / progress.elapsed().as_secs_f64().max(1e-9),
                args.out_dir.display()
            );
        }
        print!("{}", accuracy_table(&last_accuracy));
    }
    if let Some(swad) = swad.as_mut() {
        let last_step = steps_done.saturating_sub(1);
        finish_swad(swad, last_step, model.as_ref(), &evaluator, &dataset, world.as_ref(), &mut records, args)?;
    }
    world.barrier().context("final barrier")?;
    Ok(WorkerOutcome::Finished)
}

/// `comm.overlap`: the batch gradient's buckets reduced during backward, when this job can (the
/// launch says which, and why not).
fn start_overlap(
    config: &JobConfig,
    env: &RankEnv,
    device: tch::Device,
    per_domain_gradients: bool,
    model: &dyn Model,
    world: &dyn Communicator,
) -> Result<Option<GradientOverlap>> {
    let is_main = env.rank == 0;
    if let Some(why) = overlap_unavailable(config, env.world_size, device, per_domain_gradients) {
        if is_main && config.comm.overlap && env.world_size > 1 {
            println!("comm.overlap: off: {why}");
        }
        return Ok(None);
    }
    let overlap = GradientOverlap::new(world, model.store(), bucket_bytes(config))?;
    if is_main {
        println!(
            "comm.overlap: on: the batch gradient's {} bucket(s) of up to {} MB are reduced during backward",
            overlap.buckets(),
            config.comm.bucket_mb
        );
    }
    Ok(Some(overlap))
}

fn bucket_bytes(config: &JobConfig) -> usize {
    (config.comm.bucket_mb * 1024.0 * 1024.0) as usize
}

/// Why the batch gradient's communication cannot overlap backward in this job, if it cannot.
fn overlap_unavailable(
    config: &JobConfig,
    world_size: usize,
    device: tch::Device,
    per_domain_gradients: bool,
) -> Option<&'static str> {
    if !config.comm.overlap {
        Some("comm.overlap = false")
    } else if world_size == 1 {
        Some("one rank")
    } else if config.train.deterministic {
        Some("deterministic mode gathers every micro-batch's gradient after its backward")
    } else if device.is_cuda() {
        Some("not implemented for CUDA ranks yet")
    } else if per_domain_gradients {
        Some("the method needs each domain's whole gradient (a backward per domain, each reduced after it)")
    } else {
        None
    }
}

/// Monitoring for this rank: the recorder (and its Chrome trace, `[trace]`), and the Prometheus
/// endpoint when `[metrics] prometheus` is set.
fn start_telemetry(config: &JobConfig, env: &RankEnv, out_dir: &Path) -> Result<()> {
    telemetry::init(&telemetry::Options {
        rank: env.rank,
        trace_file: config.trace.enabled.then(|| out_dir.join(TRACE_DIR).join(format!("rank{}.json", env.rank))),
        trace_steps: config.trace.steps,
    })?;
    if let Some(base) = &config.metrics.prometheus {
        let address = telemetry::prometheus::rank_address(base, env.local_rank)?;
        telemetry::prometheus::serve(address, env.rank, env.group_rank)?;
        if env.local_rank == 0 {
            println!(
                "metrics: rank {} serves Prometheus metrics on http://{address}/metrics (the node's other ranks on the \
                 next ports)",
                env.rank
            );
        }
    }
    Ok(())
}

/// The step-time breakdown of every rank since the last evaluation, gathered to rank 0's
/// `metrics.jsonl` (one collective of a few numbers per evaluation).
fn record_metrics(step: u64, records: &mut RunRecords, world: &dyn Communicator, device: tch::Device) -> Result<()> {
    let summary = telemetry::take_window();
    let gpu_mem_gb = match device {
        tch::Device::Cuda(index) => {
            mgrun_torch_shim::cuda_memory_stats(index).map(|m| m.peak_allocated as f64 / 1e9).unwrap_or(f64::NAN)
        }
        _ => f64::NAN,
    };
    if gpu_mem_gb.is_finite() {
        metrics::gauge!("mgrun_gpu_memory_bytes").set(gpu_mem_gb * 1e9);
    }
    let mut values = summary.to_values().to_vec();
    values.push(gpu_mem_gb);
    let gathered = mgrun_collectives::scalars::all_gather_f64(world, &values).context("gathering metrics summaries")?;
    let ranks: Vec<(telemetry::WindowSummary, Option<f64>)> = gathered
        .iter()
        .map(|v| {
            let gpu = v.get(telemetry::SUMMARY_VALUES).copied().filter(|g| g.is_finite());
            (telemetry::WindowSummary::from_values(v), gpu)
        })
        .collect();
    records.metrics(step, &ranks)
}

/// `value` as rank 0 has it, on every rank: an all-reduced sum may differ in its last bits between
/// ranks (ring reductions add in rank order), and SWAD's decisions must be the same everywhere.
fn rank0_value(world: &dyn Communicator, value: f64) -> Result<f64> {
    let bits = mgrun_collectives::scalars::broadcast_i64(world, &[value.to_bits() as i64], 0)?;
    Ok(f64::from_bits(bits[0] as u64))
}

fn announce_valley(step: u64, loss: f64, decision: &ValleyDecision) {
    match decision {
        ValleyDecision::Converged { converge_step, threshold } => println!(
            "swad: step {step}: tr_outloss {loss:.6}: converged at step {converge_step}, threshold {threshold:.6}"
        ),
        ValleyDecision::Dead => println!("swad: step {step}: tr_outloss {loss:.6}: the loss valley ended: early stop"),
        _ => {}
    }
}

/// SWAD's model at the end of the run: evaluated (accuracy table, a results record marked swad) and
/// written to `<out>/model_swad.safetensors`. The model's parameters are replaced by the average
/// (buffers stay the final iterate's: swad.py averages parameters only), after `model.safetensors`
/// was written.
#[allow(clippy::too_many_arguments)]
fn finish_swad(
    swad: &mut Swad,
    last_step: u64,
    model: &dyn Model,
    evaluator: &Evaluator,
    dataset: &Dataset,
    world: &dyn Communicator,
    records: &mut RunRecords,
    args: &WorkerArgs,
) -> Result<()> {
    let (params, summary) = swad.finish()?;
    model.store().set_flat(&params).context("loading the SWAD average into the model")?;
    let evaluation = evaluator.run(model, dataset, world).context("evaluating the SWAD model")?;
    let train_out_loss = evaluation.train_out_loss(dataset.train_domains());
    records.swad(last_step, &evaluation.accuracy, train_out_loss, &summary)?;
    if world.rank() == 0 {
        let path = args.out_dir.join("model_swad.safetensors");
        mgrun_models::io::save_safetensors(model.store(), &path).context("saving the SWAD model")?;
        let first = summary.segments.iter().map(|s| s.start_step).min().unwrap_or(0);
        let last = summary.segments.iter().map(|s| s.end_step).max().unwrap_or(0);
        let how = if summary.last_segment_only {
            "never converged: the last segment's average".to_string()
        } else {
            format!("{} segment averages", summary.n_averaged)
        };
        println!(
            "swad: steps {first}-{last}, {how}{}; written to {}",
            if summary.early_stopped { ", stopped early" } else { "" },
            path.display()
        );
        print!("{}", accuracy_table(&evaluation.accuracy));
    }
    Ok(())
}

/// The dataset tree, once rank 0 has created the output directory and, for the synthetic dataset, made
/// the data if it is missing (so that the quickstart needs no download).
fn open_dataset(config: &JobConfig, out_dir: &Path, world: &dyn Communicator, is_main: bool) -> Result<Arc<Dataset>> {
    if is_main {
        std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        prepare_synthetic_data(config)?;
    }
    world.barrier().context("waiting for rank 0 to prepare the data")?;
    let dataset = Dataset::open(&config.data)?;
    if is_main && !dataset.skipped().is_empty() {
        report_skipped(dataset.skipped(), out_dir)?;
    }
    Ok(Arc::new(dataset))
}

/// `data.on_corrupt = "skip"` left images out: say how many and which (the first on the console, all
/// of them in `<out>/skipped.txt`), so that nothing is dropped without a trace.
fn report_skipped(skipped: &[std::path::PathBuf], out_dir: &Path) -> Result<()> {
    let path = out_dir.join("skipped.txt");
    let list: String = skipped.iter().map(|p| format!("{}\n", p.display())).collect();
    std::fs::write(&path, list).with_context(|| format!("writing {}", path.display()))?;
    let first: Vec<String> = skipped.iter().take(SKIPPED_LISTED).map(|p| p.display().to_string()).collect();
    let more = skipped.len().saturating_sub(SKIPPED_LISTED);
    println!(
        "data.on_corrupt = \"skip\": left out {} unreadable image(s): {}{}; the full list is in {}",
        skipped.len(),
        first.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() },
        path.display()
    );
    Ok(())
}

/// The model on every rank: restored from `resumed`, or from `model.pretrained`, or fresh from the
/// seed; then rank 0's copy broadcast.
fn build_model(
    config: &JobConfig,
    dataset: &Dataset,
    device: tch::Device,
    resumed: Option<&LoadedCheckpoint>,
    world: &dyn Communicator,
) -> Result<Box<dyn Model>> {
    let spec = ModelSpec { num_classes: dataset.classes().len(), ..config.model.clone() };
    let execution = mgrun_models::Execution {
        precision: config.train.precision,
        channels_last: config.train.channels_last_on(device),
    };
    let mut model = mgrun_models::build_with(&spec, execution, device, config.train.seed as i64)?;
    if let Some(checkpoint) = resumed {
        restore_model(model.as_ref(), checkpoint)?;
    } else if let Some(path) = config.pretrained_weights() {
        let report = mgrun_checkpoint::load_pretrained(model.store_mut(), path).with_context(|| {
            format!("model.pretrained = {} (torchvision's ImageNet ResNet-50: `make weights`)", path.display())
        })?;
        if world.rank() == 0 {
            println!("model.pretrained: loaded {} tensors from {}", report.loaded, path.display());
            if let Some(note) = &report.head_skipped {
                println!("model.pretrained: {note}");
            }
        }
    }
    broadcast_model(model.as_ref(), world)?;
    Ok(model)
}

/// This rank's pieces of the next step's batch, on `device`.
fn next_shards(loader: &mut Loader, plan: &ShardingPlan, rank: usize, device: tch::Device) -> Result<Vec<DomainShard>> {
    let data = loader.next()?;
    Ok(data
        .shards
        .into_iter()
        .zip(plan.pieces(rank))
        .map(|(shard, piece)| DomainShard {
            domain: shard.train_domain,
            offset: piece.lo,
            x: shard.x.to_device(device),
            y: shard.y.to_device(device),
            ids: Some(shard.files.to_device(device)),
        })
        .collect())
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
    let backend = Backend::select(config.comm.backend, device, env.ranks_per_gpu)
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
    Ok(mgrun_telemetry::comm::InstrumentedCommunicator::wrap(comm))
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

fn announce(config: &JobConfig, env: &RankEnv, dataset: &Dataset, plan: &ShardingPlan, model: &dyn Model) {
    let params = model.store().numel();
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
    let dims = MessageDims {
        params,
        features: model.feature_dim(),
        classes: dataset.classes().len(),
        domains: train_names.len(),
        batch_images: train_names.len() * config.data.batch_per_domain,
        batch_pixels: train_names.len() * config.data.batch_per_domain * 3 * (config.data.image_size as usize).pow(2),
    };
    print!("{}", sharding::describe(plan, &train_names, &statistics, config.train.deterministic, dims));
    if config.train.deterministic && env.device_kind == DeviceKind::Cpu {
        println!(
            "deterministic mode: {} thread(s) per CPU rank (train.threads), the same at any world size",
            tch::get_num_threads()
        );
    }
}

/// The seed of torch's generator at `step` on `rank` (splitmix64 of the three).
fn step_seed(seed: u64, step: u64, rank: usize) -> i64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (rank as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}
