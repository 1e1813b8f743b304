//! `weight_compander` (our mu-law variant of Weight Compander: w = f(v) on conv/linear weights, Adam on
//! the latent v) against an independent PyTorch reference (tests/reference/weight_compander_ref.py:
//! autograd through f with v as the leaf, torch.optim.Adam on v), in the setting of
//! tests/regularizers.rs: SmallCnn width 8, 3 domains x 4 images of 8x8, 3 steps, on the fast path and
//! on the exact path with micro-batches of 3; its invariance to sharding on 1..5 ranks (threads joined by
//! TCP communicators), bit for bit on the exact path; and the checkpoint round trip of its latent weights.

use mgrun_collectives::store::{StoreClient, StoreServer};
use mgrun_collectives::tcp::TcpCommunicator;
use mgrun_collectives::{Communicator, SingleRank};
use mgrun_methods::{
    build, Adam, AdamConfig, DomainShard, ExactMode, Method, MethodConfig, ShardingPlan, Topology, UpdateContext,
    WeightCompander, WeightCompanderConfig,
};
use mgrun_models::{Model, ModelSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const WIDTH: i64 = 8;
const NUM_CLASSES: usize = 5;
const NUM_DOMAINS: usize = 3;
const BATCH: i64 = 4;
const STEPS: u64 = 3;
const TOLERANCE: f64 = 1e-5;
const MICRO_BATCH: usize = 3;

fn spec() -> ModelSpec {
    ModelSpec {
        arch: "small_cnn".into(),
        num_classes: NUM_CLASSES,
        freeze_bn: false,
        dropout: 0.0,
        width: WIDTH,
        pretrained: None,
    }
}

fn adam_config() -> AdamConfig {
    AdamConfig { lr: 1e-2, ..AdamConfig::default() }
}

/// ERM and weight_compander with its defaults.
fn cases() -> Vec<(&'static str, MethodConfig)> {
    vec![
        ("erm", MethodConfig::named("erm")),
        ("weight_compander", MethodConfig::of::<WeightCompander>(&WeightCompanderConfig::default()).unwrap()),
    ]
}

fn compander() -> MethodConfig {
    cases().remove(1).1
}

fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn python() -> PathBuf {
    std::env::var_os("MGRUN_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

struct Fixture {
    input: PathBuf,
    output: PathBuf,
}

/// Writes the initial weights and batches once and runs the Python reference once.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("weight_compander_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = mgrun_models::build(&spec(), Device::Cpu, 7).unwrap();
        let mut tensors: Vec<(String, Tensor)> = model.store().named_tensors();
        for (step, domains) in batches().iter().enumerate() {
            for (e, (x, y)) in domains.iter().enumerate() {
                tensors.push((format!("x.{step}.{e}"), Tensor::from_slice(x).view([BATCH, 3, 8, 8])));
                tensors.push((format!("y.{step}.{e}"), Tensor::from_slice(y)));
            }
        }
        let input = dir.join("input.safetensors");
        Tensor::write_safetensors(&tensors, &input).unwrap();
        let case_json: Vec<serde_json::Value> = cases()
            .iter()
            .map(|(name, m)| {
                serde_json::json!({
                    "name": name, "method": m.name, "adam": adam_config(), "section": m.section(&m.name).unwrap(),
                })
            })
            .collect();
        let config = serde_json::json!({
            "width": WIDTH, "num_classes": NUM_CLASSES, "steps": STEPS, "num_domains": NUM_DOMAINS,
            "cases": case_json,
        });
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let output = dir.join("reference.safetensors");
        let script = workspace_root().join("tests/reference/weight_compander_ref.py");
        let result = Command::new(python()).arg(&script).arg(&input).arg(&config_path).arg(&output).output().unwrap();
        assert!(
            result.status.success(),
            "reference failed: {}\n{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
        Fixture { input, output }
    })
}

fn load(path: &PathBuf) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).to_kind(Kind::Double).norm().double_value(&[]);
    diff / b.to_kind(Kind::Double).norm().double_value(&[]).max(1e-30)
}

/// `[step][domain]` batches of BATCH images as plain vectors (tch tensors are not `Sync`).
type Batches = Vec<Vec<(Vec<f32>, Vec<i64>)>>;

fn batches() -> Batches {
    static DATA: OnceLock<Batches> = OnceLock::new();
    DATA.get_or_init(|| {
        let _guard = mgrun_models::params::GLOBAL_RNG.lock();
        tch::manual_seed(11);
        (0..STEPS)
            .map(|_| {
                (0..NUM_DOMAINS)
                    .map(|_| {
                        let x = Tensor::randn([BATCH * 3 * 8 * 8], (Kind::Float, Device::Cpu));
                        let y = Tensor::randint(NUM_CLASSES as i64, [BATCH], (Kind::Int64, Device::Cpu));
                        (Vec::<f32>::try_from(&x).unwrap(), Vec::<i64>::try_from(&y).unwrap())
                    })
                    .collect()
            })
            .collect()
    })
    .clone()
}

fn shards_of(data: &Batches, plan: &ShardingPlan, rank: usize, step: u64) -> Vec<DomainShard> {
    plan.pieces(rank)
        .iter()
        .map(|piece| {
            let (x, y) = &data[step as usize][piece.domain];
            let x = Tensor::from_slice(x).view([BATCH, 3, 8, 8]);
            let (lo, len) = (piece.lo as i64, piece.len() as i64);
            DomainShard {
                domain: piece.domain,
                offset: piece.lo,
                x: x.narrow(0, lo, len),
                y: Tensor::from_slice(y).narrow(0, lo, len),
                ids: None,
            }
        })
        .collect()
}

/// Steps `steps` of a run on `world`'s share of the plan; the losses.
#[allow(clippy::too_many_arguments)]
fn steps(
    model: &mut dyn Model,
    method: &mut dyn Method,
    adam: &mut Adam,
    plan: &ShardingPlan,
    world: &dyn Communicator,
    exact: bool,
    steps: std::ops::Range<u64>,
) -> Vec<f64> {
    let data = batches();
    let exact = exact.then_some(ExactMode { seed: 3 });
    let topology = Topology { world, plan, domain_groups: &[], bucket_bytes: 4096, exact };
    steps
        .map(|step| {
            let shards = shards_of(&data, plan, world.rank(), step);
            let mut ctx =
                UpdateContext { model, optimizer: adam, topology: &topology, step, total_steps: STEPS, seed: 3 };
            method.update(&mut ctx, &shards).unwrap().loss
        })
        .collect()
}

/// A run of STEPS from `weights`: its losses, final weights and method state.
fn run(
    cfg: &MethodConfig,
    weights: &Tensor,
    plan: &ShardingPlan,
    world: &dyn Communicator,
    exact: bool,
) -> (Vec<f64>, Tensor, Vec<(String, Tensor)>) {
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(weights).unwrap();
    let mut method = build(cfg, &*model, NUM_DOMAINS).unwrap();
    let mut adam = Adam::new(adam_config(), model.store().numel(), Device::Cpu);
    let losses = steps(&mut *model, &mut *method, &mut adam, plan, world, exact, 0..STEPS);
    (losses, model.store().flat().detach().copy(), method.state())
}

fn fixture_weights(inputs: &HashMap<String, Tensor>) -> Tensor {
    let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    let flat: Vec<Tensor> = model.store().params().iter().map(|p| inputs[&p.name].reshape([-1])).collect();
    Tensor::cat(&flat, 0)
}

fn check_reference(name: &str) {
    tch::set_num_threads(1);
    let fixture = fixture();
    let (inputs, reference) = (load(&fixture.input), load(&fixture.output));
    let cfg = cases().into_iter().find(|c| c.0 == name).unwrap().1;
    let weights = fixture_weights(&inputs);
    for micro_batch in [None, Some(MICRO_BATCH)] {
        let plan = ShardingPlan::balanced(1, NUM_DOMAINS, BATCH as usize, micro_batch.unwrap_or(1)).unwrap();
        let (losses, flat, _) = run(&cfg, &weights, &plan, &SingleRank::default(), micro_batch.is_some());
        let path = if micro_batch.is_some() { "exact path, micro-batches of 3" } else { "fast path" };
        let ref_losses = Vec::<f64>::try_from(&reference[&format!("{name}.loss")]).unwrap();
        assert_eq!(losses.len(), ref_losses.len());
        let mut worst = 0.0f64;
        for (step, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
            let err = (a - b).abs() / b.abs().max(1e-30);
            assert!(err <= TOLERANCE, "{name} ({path}): loss at step {step}: rust {a}, reference {b}");
            worst = worst.max(err);
        }
        let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
        let (mut ours, mut erm) = (Vec::new(), Vec::new());
        for p in model.store().params() {
            let got = p.unflatten(&flat);
            let expected = &reference[&format!("{name}.param.{}", p.name)];
            let err = relative_error(&got, expected);
            assert!(err <= TOLERANCE, "{name} ({path}): parameter {}: relative error {err:e}", p.name);
            worst = worst.max(err);
            ours.push(got.reshape([-1]));
            erm.push(reference[&format!("erm.param.{}", p.name)].reshape([-1]));
        }
        println!("{name} ({path}): worst relative error {worst:.2e} (losses and parameters) after {STEPS} steps");
        if name != "erm" {
            let distance = relative_error(&Tensor::cat(&ours, 0), &Tensor::cat(&erm, 0));
            println!("{name} ({path}): relative distance to ERM's final weights {distance:.2e}");
            assert!(distance > 100.0 * TOLERANCE, "{name}: final weights are within {distance:e} of ERM's");
        }
    }
}

#[test]
fn erm_matches_reference() {
    check_reference("erm");
}

#[test]
fn weight_compander_matches_reference() {
    check_reference("weight_compander");
}

const TOKEN: &str = "weight-compander-test";

/// Every rank's result of `body` on `world` threads joined by TCP communicators.
fn on_threads<T: Send>(
    world: usize,
    unit: usize,
    body: impl Fn(&ShardingPlan, &dyn Communicator) -> T + Sync,
) -> Vec<T> {
    let plan = ShardingPlan::balanced(world, NUM_DOMAINS, BATCH as usize, unit).unwrap();
    let server = StoreServer::start("127.0.0.1:0".parse().unwrap(), TOKEN.into()).unwrap();
    let addr = server.addr().to_string();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let (addr, plan, body) = (addr.clone(), &plan, &body);
                s.spawn(move || {
                    let store = StoreClient::connect(&addr, TOKEN, Duration::from_secs(30)).unwrap();
                    let comm =
                        TcpCommunicator::connect(&store, rank, world, Device::Cpu, Duration::from_secs(60)).unwrap();
                    body(plan, &comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Losses, weights and latent weights as plain values, for comparing threads.
type Outcome = (Vec<f64>, Vec<f32>, Vec<f32>);

#[test]
fn weight_compander_is_invariant_to_sharding() {
    tch::set_num_threads(1);
    let cfg = compander();
    let weights = Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap();
    let run_world = |world: usize, unit: usize| -> Vec<Outcome> {
        on_threads(world, unit, |plan, comm| {
            let (losses, flat, state) = run(&cfg, &Tensor::from_slice(&weights), plan, comm, true);
            assert_eq!(state.len(), 1, "one latent buffer");
            (losses, Vec::<f32>::try_from(&flat).unwrap(), Vec::<f32>::try_from(&state[0].1).unwrap())
        })
    };
    for unit in [1, 3] {
        let reference = run_world(1, unit).remove(0);
        assert!(reference.1 != weights, "the weights did not move");
        for world in 2..=5 {
            for (rank, result) in run_world(world, unit).iter().enumerate() {
                let at = format!("weight_compander exact path (unit {unit}), {world} ranks: rank {rank}");
                assert_eq!(result.0, reference.0, "{at} losses");
                assert!(result.1 == reference.1, "{at} weights");
                assert!(result.2 == reference.2, "{at} latent weights");
            }
        }
    }
    println!("weight_compander: exact path bit for bit on 1..5 ranks (units 1 and 3)");
}

#[test]
fn weight_compander_state_round_trip_gives_the_same_next_step() {
    tch::set_num_threads(1);
    let cfg = compander();
    let weights = mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat().detach().copy();
    let world = SingleRank::default();
    for exact in [false, true] {
        let plan = ShardingPlan::balanced(1, NUM_DOMAINS, BATCH as usize, if exact { MICRO_BATCH } else { 1 }).unwrap();
        let (losses, flat, state) = run(&cfg, &weights, &plan, &world, exact);

        // Two steps, then the model weights, optimizer and method state into fresh objects.
        let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
        model.store().set_flat(&weights).unwrap();
        let mut method = build(&cfg, &*model, NUM_DOMAINS).unwrap();
        assert!(method.state().is_empty(), "no latent before the first update");
        let mut adam = Adam::new(adam_config(), model.store().numel(), Device::Cpu);
        let first = steps(&mut *model, &mut *method, &mut adam, &plan, &world, exact, 0..STEPS - 1);
        let saved_weights = model.store().flat().detach().copy();
        let saved_method: Vec<(String, Tensor)> = method.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        let saved_adam: Vec<(String, Tensor)> = adam.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
        assert_eq!(saved_method.len(), 1);
        // The latent v is not the effective weight on the companded tensors.
        assert!(!saved_method[0].1.equal(&saved_weights), "latent equals the weights");

        let mut model = mgrun_models::build(&spec(), Device::Cpu, 1).unwrap();
        model.store().set_flat(&saved_weights).unwrap();
        let mut method = build(&cfg, &*model, NUM_DOMAINS).unwrap();
        method.load_state(&saved_method).unwrap();
        let mut adam_restored = Adam::new(adam_config(), model.store().numel(), Device::Cpu);
        adam_restored.load_state(&saved_adam).unwrap();
        let last = steps(&mut *model, &mut *method, &mut adam_restored, &plan, &world, exact, STEPS - 1..STEPS);
        let resumed: Vec<f64> = first.into_iter().chain(last).collect();
        assert_eq!(resumed, losses, "losses after the round trip (exact: {exact})");
        assert!(model.store().flat().equal(&flat), "weights after the round trip (exact: {exact})");
        assert!(method.state()[0].1.equal(&state[0].1), "latent after the round trip (exact: {exact})");

        // A latent of the wrong size is refused.
        let err =
            method.load_state(&[("weight_compander.latent".into(), Tensor::zeros([3], (Kind::Float, Device::Cpu)))]);
        assert!(err.is_err());
    }
}

#[test]
fn weight_compander_validates_and_starts_from_the_usual_network() {
    let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    for (a, mu) in [(0.0, 25.0), (0.25, -1.0), (f64::NAN, 25.0)] {
        let cfg = WeightCompanderConfig { a, mu, ..WeightCompanderConfig::default() };
        let err = MethodConfig::of::<WeightCompander>(&cfg).and_then(|c| build(&c, &*model, NUM_DOMAINS).map(|_| ()));
        let err = format!("{:#}", err.expect_err("invalid config accepted"));
        assert!(err.contains("method.weight_compander."), "{err}");
    }
    // With a learning rate of 0, a step leaves the network as it was, up to f(f^-1(w)) rounding.
    let weights = mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat().detach().copy();
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(&weights).unwrap();
    let mut method = build(&compander(), &*model, NUM_DOMAINS).unwrap();
    let mut adam = Adam::new(AdamConfig { lr: 0.0, ..adam_config() }, model.store().numel(), Device::Cpu);
    let plan = ShardingPlan::balanced(1, NUM_DOMAINS, BATCH as usize, 1).unwrap();
    steps(&mut *model, &mut *method, &mut adam, &plan, &SingleRank::default(), false, 0..1);
    let err = relative_error(model.store().flat(), &weights);
    assert!(err < 1e-6, "the starting network moved by {err:e}");
}
