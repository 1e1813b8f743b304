//! One rank of a training job, as a recipe: configuration, communicator, data, model, method, then
//! the loop of updates and evaluations.

use crate::config::JobConfig;
use crate::env::RankEnv;
use crate::eval::Evaluator;
use crate::progress::{fmt_duration, Progress};
use crate::records::{accuracy_table, peak_memory_gb, JsonlWriter, WindowMeans};
use crate::topology;
use crate::WorkerArgs;
use anyhow::{bail, Context, Result};
use mgrun_collectives::store::StoreClient;
use mgrun_collectives::tcp::TcpCommunicator;
use mgrun_collectives::{Communicator, SingleRank};
use mgrun_data::{Dataset, Loader};
use mgrun_methods::{Adam, AdamConfig, DomainShard, Topology, UpdateContext};
use mgrun_models::{Model, ModelSpec};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn run_worker(args: &WorkerArgs) -> Result<()> {
    // --- Job configuration and this rank's identity.
    let env = RankEnv::from_env()?;
    let mut config = JobConfig::load(&args.config, &args.overrides)?;
    config.resolve_paths(&std::env::current_dir().context("reading the current directory")?);
    let device = env.device()?;
    configure_torch(&config, &env);
    let is_main = env.rank == 0;

    // --- Communicator over all ranks.
    let timeout = Duration::from_secs_f64(config.comm.timeout_s);
    let world = connect_world(&env, &config, timeout)?;

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
    let plan = topology::plan(env.rank, env.world_size, &train_domains, batch)?;
    let domain_group: Option<Box<dyn Communicator>> = match plan.domain_color {
        Some(color) => Some(world.split(color).context("creating the domain group communicator")?),
        None => None,
    }
    .filter(|g| g.world_size() > 1);
    let mut loader = Loader::new(dataset.clone(), plan.shards.clone(), &config.data, config.train.seed, 0)?;

    // --- Model (identical on every rank: built from the same seed, then rank 0's copy broadcast),
    // optimizer and method.
    let spec = ModelSpec {
        arch: config.model.arch.clone(),
        num_classes: dataset.classes().len(),
        freeze_bn: config.model.freeze_bn,
        dropout: config.model.dropout,
        width: config.model.width,
    };
    let mut model = mgrun_models::build(&spec, device, config.train.seed as i64)?;
    broadcast_model(model.as_ref(), world.as_ref())?;
    let adam = AdamConfig { lr: config.train.lr, weight_decay: config.train.weight_decay, ..AdamConfig::default() };
    let mut optimizer = Adam::new(adam, model.store().numel(), device);
    let mut method = mgrun_methods::build(&config.method, model.as_ref(), train_domains.len())?;
    let topo = Topology {
        world: world.as_ref(),
        domain_group: domain_group.as_deref(),
        num_domains: train_domains.len(),
        batch_per_domain: batch,
        bucket_bytes: (config.comm.bucket_mb * 1024.0 * 1024.0) as usize,
    };

    // --- Outputs (rank 0).
    let mut steps_out = if is_main { Some(JsonlWriter::create(&args.out_dir.join("steps.jsonl"))?) } else { None };
    let mut results_out = if is_main { Some(JsonlWriter::create(&args.out_dir.join("results.jsonl"))?) } else { None };
    if is_main {
        let resolved = toml::to_string_pretty(&config).context("serialising the resolved config")?;
        std::fs::write(args.out_dir.join("config.resolved.toml"), resolved)
            .with_context(|| format!("writing {}", args.out_dir.join("config.resolved.toml").display()))?;
        announce(&config, &env, &dataset, &plan, method.as_ref(), model.store().numel());
    }
    let evaluator = Evaluator { batch_size: config.eval.batch_size, image_size: config.data.image_size, device };
    let images_per_step = batch * train_domains.len();
    let mut progress = Progress::new(is_main, config.train.steps, images_per_step, config.train.progress_every_s);
    let steps_per_epoch = steps_per_epoch(&dataset, &train_domains, batch);
    let mut window = WindowMeans::default();
    let mut last_accuracy = Vec::new();

    // --- The training loop.
    for step in 0..config.train.steps {
        let started = Instant::now();
        let data = loader.next().with_context(|| format!("loading the batch of step {step}"))?;
        let shards: Vec<DomainShard> = data
            .shards
            .into_iter()
            .map(|(domain, x, y)| DomainShard { domain, x: x.to_device(device), y: y.to_device(device) })
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
                record.insert("hparams".into(), serde_json::to_value(&config.method)?);
                record.insert("args".into(), run_args(&config, &env, &dataset));
                out.write(&Value::Object(record))?;
            }
            last_accuracy = accuracy;
        }
    }

    // --- Finish: the trained model and a summary table.
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
    Ok(())
}

fn configure_torch(config: &JobConfig, env: &RankEnv) {
    let threads = if config.train.threads > 0 {
        config.train.threads
    } else if let Some(n) = std::env::var("OMP_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()) {
        n
    } else {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        (cores / env.local_world_size.max(1)).max(1)
    };
    tch::set_num_threads(threads.max(1) as i32);
    if config.train.deterministic {
        tch::Cuda::cudnn_set_benchmark(false);
    }
}

fn connect_world(env: &RankEnv, config: &JobConfig, timeout: Duration) -> Result<Box<dyn Communicator>> {
    if env.world_size == 1 {
        return Ok(Box::new(SingleRank));
    }
    if config.comm.backend == "nccl" {
        bail!("comm.backend = \"nccl\" is not available in this build; use \"auto\" or \"tcp\"");
    }
    let store = StoreClient::from_env(timeout).context("connecting to the rendezvous store")?;
    let comm = TcpCommunicator::connect(&store, env.rank, env.world_size, timeout)
        .with_context(|| format!("rank {}: connecting the TCP communicator", env.rank))?;
    Ok(Box::new(comm))
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

fn run_args(config: &JobConfig, env: &RankEnv, dataset: &Dataset) -> Value {
    json!({
        "dataset": config.data.dataset,
        "data_dir": config.data.root,
        "algorithm": config.method.name,
        "test_envs": dataset.test_domains(),
        "trial_seed": config.data.split_seed,
        "seed": config.train.seed,
        "steps": config.train.steps,
        "checkpoint_freq": config.eval.every_steps,
        "world_size": env.world_size,
        "arch": config.model.arch,
    })
}

fn announce(
    config: &JobConfig,
    env: &RankEnv,
    dataset: &Dataset,
    plan: &topology::RankPlan,
    method: &dyn mgrun_methods::Method,
    params: usize,
) {
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
        method.name(),
        config.model.arch,
        params,
        dataset.classes().len(),
        names.join(", ")
    );
    println!(
        "sharding: {} training domains x {} images per step; rank 0 holds {:?} ({} rank(s) per domain)",
        dataset.train_domains().len(),
        config.data.batch_per_domain,
        plan.shards.iter().map(|s| (s.train_domain, s.lo, s.hi)).collect::<Vec<_>>(),
        plan.ranks_per_domain
    );
    for stat in method.cross_rank_statistics() {
        println!("cross-rank statistic: {} ({} of {} on {})", stat.name, stat.collective, stat.size, stat.group);
    }
}
