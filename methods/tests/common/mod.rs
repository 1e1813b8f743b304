//! The harness that tests/reference.rs, tests/regularizers.rs and tests/sharding.rs share: their
//! setting (SmallCnn width 8, 3 domains x 4 images of 8x8, 3 steps), the PyTorch reference runner and
//! its safetensors files, each rank's shards of the balanced plan, method steps on a plan, and ranks as
//! threads joined by TCP communicators through an in-process rendezvous store. A module of each of
//! those test crates (not a test target of its own); each uses only part of it.
#![allow(dead_code)]

use mgrun_collectives::store::{StoreClient, StoreServer};
use mgrun_collectives::tcp::TcpCommunicator;
use mgrun_collectives::Communicator;
use mgrun_methods::{Adam, DomainShard, ExactMode, Method, ShardingPlan, Topology, UpdateContext};
use mgrun_models::{Model, ModelSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

pub const WIDTH: i64 = 8;
pub const NUM_CLASSES: usize = 5;
pub const NUM_DOMAINS: usize = 3;
pub const BATCH: i64 = 4;
pub const STEPS: u64 = 3;

pub fn spec() -> ModelSpec {
    ModelSpec {
        arch: "small_cnn".into(),
        num_classes: NUM_CLASSES,
        freeze_bn: false,
        dropout: 0.0,
        width: WIDTH,
        pretrained: None,
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

pub fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

/// The reference's input (initial weights and batches) and output files.
pub struct Fixture {
    pub input: PathBuf,
    pub output: PathBuf,
}

/// A fresh directory for this process's fixture files, `name_<pid>` under the target's tmp dir.
pub fn fixture_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `tensors` and `config` into `dir` and runs the Python reference `script` (a path under the
/// workspace root) on them once: the input and output files.
pub fn run_reference(dir: &Path, script: &str, tensors: &[(String, Tensor)], config: &serde_json::Value) -> Fixture {
    let input = dir.join("input.safetensors");
    Tensor::write_safetensors(tensors, &input).unwrap();
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    let output = dir.join("reference.safetensors");
    let script = workspace_root().join(script);
    let result = Command::new(python()).arg(&script).arg(&input).arg(&config_path).arg(&output).output().unwrap();
    assert!(
        result.status.success(),
        "reference failed: {}\n{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    Fixture { input, output }
}

pub fn load(path: &PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

/// The fixture's initial weights (state-dict names) as the model's flat buffer.
pub fn fixture_weights(inputs: &HashMap<String, Tensor>) -> Tensor {
    let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    let flat: Vec<Tensor> = model.store().params().iter().map(|p| inputs[&p.name].reshape([-1])).collect();
    Tensor::cat(&flat, 0)
}

pub fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).to_kind(Kind::Double).norm().double_value(&[]);
    diff / b.to_kind(Kind::Double).norm().double_value(&[]).max(1e-30)
}

/// `[step][domain]` batches of BATCH images as plain vectors (tch tensors are not `Sync`).
pub type Batches = Vec<Vec<(Vec<f32>, Vec<i64>)>>;

/// This rank's shards of `step`, with the images' ids if `ids` (one per image of a domain's batch)
/// is given.
pub fn shards_of(data: &Batches, plan: &ShardingPlan, rank: usize, step: u64, ids: Option<&[i64]>) -> Vec<DomainShard> {
    plan.pieces(rank)
        .iter()
        .map(|piece| {
            let (x, y) = &data[step as usize][piece.domain];
            let x = Tensor::from_slice(x).view([BATCH, 3, 8, 8]);
            let y = Tensor::from_slice(y);
            let (lo, len) = (piece.lo as i64, piece.len() as i64);
            DomainShard {
                domain: piece.domain,
                offset: piece.lo,
                x: x.narrow(0, lo, len),
                y: y.narrow(0, lo, len),
                ids: ids.map(|ids| Tensor::from_slice(ids).narrow(0, lo, len)),
            }
        })
        .collect()
}

/// Steps `steps` of a run of STEPS on `world`'s share of the plan (run seed 3; the exact path's seed 3
/// if `exact`), the shards of each step from `shards`; the losses.
#[allow(clippy::too_many_arguments)]
pub fn steps(
    model: &mut dyn Model,
    method: &mut dyn Method,
    adam: &mut Adam,
    plan: &ShardingPlan,
    world: &dyn Communicator,
    exact: bool,
    steps: std::ops::Range<u64>,
    shards: impl Fn(u64) -> Vec<DomainShard>,
) -> Vec<f64> {
    let exact = exact.then_some(ExactMode { seed: 3 });
    let topology = Topology { world, plan, domain_groups: &[], bucket_bytes: 4096, exact, overlap: None };
    steps
        .map(|step| {
            let shards = shards(step);
            let mut ctx =
                UpdateContext { model, optimizer: adam, topology: &topology, step, total_steps: STEPS, seed: 3 };
            method.update(&mut ctx, &shards).unwrap().loss
        })
        .collect()
}

/// Every rank's result of `body` on `world` threads joined by TCP communicators (rendezvous `token`),
/// with the balanced plan of `unit`-image units.
pub fn on_threads<T: Send>(
    token: &str,
    world: usize,
    unit: usize,
    body: impl Fn(&ShardingPlan, &dyn Communicator) -> T + Sync,
) -> Vec<T> {
    let plan = ShardingPlan::balanced(world, NUM_DOMAINS, BATCH as usize, unit).unwrap();
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), token.into()).unwrap();
    let addr = server.addr().to_string();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (addr, plan, body) = (addr.clone(), &plan, &body);
                s.spawn(move || {
                    let store = StoreClient::connect(&addr, token, Duration::from_secs(30)).unwrap();
                    let comm =
                        TcpCommunicator::connect(&store, rank, world, Device::Cpu, Duration::from_secs(60)).unwrap();
                    body(plan, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
