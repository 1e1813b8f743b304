//! The regularizer methods (OCNN, ELR, PS-KD, AdvStyle: ERM plus a regularizer each) against an
//! independent PyTorch reference (tests/reference/regularizers_ref.py), in the setting of
//! tests/reference.rs: SmallCnn width 8, 3 domains x 4 images of 8x8, 3 steps, on the fast path and on
//! the exact path with micro-batches of 3; and their invariance to sharding on 1..5 ranks (threads
//! joined by TCP communicators), bit for bit on the exact path. The images carry ids that repeat across
//! steps (and once within a step), so the per-sample tables of ELR and PS-KD are read back, and an
//! image drawn twice in a step checks that its last copy's value is kept.

use mgrun_collectives::store::{StoreClient, StoreServer};
use mgrun_collectives::tcp::TcpCommunicator;
use mgrun_collectives::{Communicator, SingleRank};
use mgrun_methods::{
    build, Adam, AdamConfig, AdvStyle, AdvStyleConfig, DomainShard, Elr, ElrConfig, ExactMode, MethodConfig, Ocnn,
    OcnnConfig, PsKd, PsKdConfig, ShardingPlan, Topology, UpdateContext,
};
use mgrun_models::ModelSpec;
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
/// Each image's id per step (the same in every domain): ids come back at later steps, and id 2 is
/// drawn twice at step 1.
const IDS: [[i64; 4]; 3] = [[0, 1, 2, 3], [2, 3, 2, 5], [5, 0, 4, 1]];

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

fn adam() -> AdamConfig {
    AdamConfig { lr: 1e-2, ..AdamConfig::default() }
}

fn cases() -> Vec<(&'static str, MethodConfig)> {
    vec![
        ("erm", MethodConfig::named("erm")),
        (
            "ocnn",
            MethodConfig::of::<Ocnn>(&OcnnConfig {
                lambda: 0.1,
                strided: vec!["conv2.weight".into()],
                ..OcnnConfig::default()
            })
            .unwrap(),
        ),
        ("elr", MethodConfig::of::<Elr>(&ElrConfig { beta: 0.7, lambda: 1.0 }).unwrap()),
        // The largest alpha, so that the previous predictions weigh.
        ("ps_kd", MethodConfig::of::<PsKd>(&PsKdConfig { alpha_t: 1.0 }).unwrap()),
        // A large step: the restyled images must move for the test to see them.
        ("advstyle", MethodConfig::of::<AdvStyle>(&AdvStyleConfig { lr: 50.0 }).unwrap()),
    ]
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

/// Writes the initial weights, batches and ids once and runs the Python reference once.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("regularizers_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = mgrun_models::build(&spec(), Device::Cpu, 7).unwrap();
        let mut tensors: Vec<(String, Tensor)> = model.store().named_tensors();
        let data = batches();
        for (step, domains) in data.iter().enumerate() {
            for (e, (x, y)) in domains.iter().enumerate() {
                tensors.push((format!("x.{step}.{e}"), Tensor::from_slice(x).view([BATCH, 3, 8, 8])));
                tensors.push((format!("y.{step}.{e}"), Tensor::from_slice(y)));
                tensors.push((format!("ids.{step}.{e}"), Tensor::from_slice(&IDS[step])));
            }
        }
        let input = dir.join("input.safetensors");
        Tensor::write_safetensors(&tensors, &input).unwrap();
        let case_json: Vec<serde_json::Value> = cases()
            .iter()
            .map(|(name, m)| {
                serde_json::json!({
                    "name": name, "method": m.name, "adam": adam(), "total_steps": STEPS,
                    "section": m.section(&m.name).unwrap(),
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
        let script = workspace_root().join("tests/reference/regularizers_ref.py");
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

/// `[step][domain]` batches of BATCH images as plain vectors (tch tensors are not `Sync`): random
/// normal images (fixed seed) and labels.
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

/// This rank's shards of `step`, with ids.
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
                ids: Some(Tensor::from_slice(&IDS[step as usize]).narrow(0, lo, len)),
            }
        })
        .collect()
}

/// A run from `weights` on `world`'s share of the plan; its per-step losses and final weights.
fn run(
    cfg: &MethodConfig,
    weights: &Tensor,
    plan: &ShardingPlan,
    world: &dyn Communicator,
    exact: bool,
) -> (Vec<f64>, Tensor, Vec<(String, Tensor)>) {
    let data = batches();
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(weights).unwrap();
    let mut method = build(cfg, &*model, NUM_DOMAINS).unwrap();
    let mut adam = Adam::new(adam(), model.store().numel(), Device::Cpu);
    let exact = exact.then_some(ExactMode { seed: 3 });
    let topology = Topology { world, plan, domain_groups: &[], bucket_bytes: 4096, exact };
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let shards = shards_of(&data, plan, world.rank(), step);
        let mut ctx = UpdateContext {
            model: &mut *model,
            optimizer: &mut adam,
            topology: &topology,
            step,
            total_steps: STEPS,
            seed: 3,
        };
        losses.push(method.update(&mut ctx, &shards).unwrap().loss);
    }
    (losses, model.store().flat().detach().copy(), method.state())
}

fn fixture_weights(inputs: &HashMap<String, Tensor>) -> Tensor {
    let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    let flat: Vec<Tensor> = model.store().params().iter().map(|p| inputs[&p.name].reshape([-1])).collect();
    Tensor::cat(&flat, 0)
}

fn check_reference(name: &str) {
    // One intra-op thread, as the invariance tests in this process set anyway: the summation order
    // (and so the rounding) then does not depend on which tests ran first.
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
        let mut worst = 0.0f64;
        for (step, (a, b)) in losses.iter().zip(&ref_losses).enumerate() {
            let err = (a - b).abs() / b.abs().max(1e-30);
            assert!(err <= TOLERANCE, "{name} ({path}): loss at step {step}: rust {a}, reference {b}");
            worst = worst.max(err);
        }
        let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
        let (mut ours, mut theirs, mut erm) = (Vec::new(), Vec::new(), Vec::new());
        for p in model.store().params() {
            let got = p.unflatten(&flat);
            let expected = &reference[&format!("{name}.param.{}", p.name)];
            let err = relative_error(&got, expected);
            assert!(err <= TOLERANCE, "{name} ({path}): parameter {}: relative error {err:e}", p.name);
            worst = worst.max(err);
            ours.push(got.reshape([-1]));
            theirs.push(expected.reshape([-1]));
            erm.push(reference[&format!("erm.param.{}", p.name)].reshape([-1]));
        }
        println!("{name} ({path}): worst relative error {worst:.2e} (losses and parameters) after {STEPS} steps");
        if name != "erm" {
            let distance = relative_error(&Tensor::cat(&ours, 0), &Tensor::cat(&erm, 0));
            assert!(distance > 100.0 * TOLERANCE, "{name}: final weights are within {distance:e} of ERM's");
        }
    }
}

const TOKEN: &str = "regularizers-test";

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

/// Losses, weights and method state (the per-sample tables) as plain values, for comparing threads.
type Outcome = (Vec<f64>, Vec<f32>, Vec<(String, Vec<f32>)>);

fn check_invariance(name: &str) {
    tch::set_num_threads(1);
    let cfg = cases().into_iter().find(|c| c.0 == name).unwrap().1;
    let weights = Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap();
    let run_world = |world: usize, unit: usize| -> Vec<Outcome> {
        on_threads(world, unit, |plan, comm| {
            let (losses, flat, state) = run(&cfg, &Tensor::from_slice(&weights), plan, comm, true);
            let state = state.into_iter().map(|(n, t)| (n, Vec::<f32>::try_from(&t.reshape([-1])).unwrap())).collect();
            (losses, Vec::<f32>::try_from(&flat).unwrap(), state)
        })
    };
    for unit in [1, 3] {
        let reference = run_world(1, unit).remove(0);
        assert!(reference.1 != weights, "{name}: the weights did not move");
        for world in 2..=5 {
            for (rank, result) in run_world(world, unit).iter().enumerate() {
                let at = format!("{name} exact path (unit {unit}), {world} ranks: rank {rank}");
                assert_eq!(result.0, reference.0, "{at} losses");
                assert!(result.1 == reference.1, "{at} weights");
                assert!(result.2 == reference.2, "{at} per-sample tables");
            }
        }
    }
}

#[test]
fn erm_matches_reference() {
    check_reference("erm");
}

#[test]
fn ocnn_matches_reference() {
    check_reference("ocnn");
}

#[test]
fn elr_matches_reference() {
    check_reference("elr");
}

#[test]
fn ps_kd_matches_reference() {
    check_reference("ps_kd");
}

#[test]
fn advstyle_matches_reference() {
    check_reference("advstyle");
}

#[test]
fn ocnn_is_invariant_to_sharding() {
    check_invariance("ocnn");
}

#[test]
fn elr_is_invariant_to_sharding() {
    check_invariance("elr");
}

#[test]
fn ps_kd_is_invariant_to_sharding() {
    check_invariance("ps_kd");
}

#[test]
fn advstyle_is_invariant_to_sharding() {
    check_invariance("advstyle");
}

#[test]
fn per_sample_methods_need_ids_and_restore_their_tables() {
    let weights = Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap();
    for name in ["elr", "ps_kd"] {
        let cfg = cases().into_iter().find(|c| c.0 == name).unwrap().1;
        let plan = ShardingPlan::balanced(1, NUM_DOMAINS, BATCH as usize, 1).unwrap();
        let world = SingleRank::default();
        let (_, _, state) = run(&cfg, &Tensor::from_slice(&weights), &plan, &world, true);
        assert_eq!(state.len(), NUM_DOMAINS, "{name}: one table per domain");
        // The largest id seen is 5: six rows.
        assert_eq!(state[0].1.size()[0], 6, "{name}: table rows");
        let model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
        let mut method = build(&cfg, &*model, NUM_DOMAINS).unwrap();
        method.load_state(&state).unwrap();
        let restored = method.state();
        for ((a, x), (b, y)) in state.iter().zip(&restored) {
            assert!(a == b && x.equal(y), "{name}: state {a} round trip");
        }
        // Shards without ids: a clear error naming the method.
        let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
        let mut adam = Adam::new(adam(), model.store().numel(), Device::Cpu);
        let topology = Topology { world: &world, plan: &plan, domain_groups: &[], bucket_bytes: 4096, exact: None };
        let mut shards = shards_of(&batches(), &plan, 0, 0);
        shards.iter_mut().for_each(|s| s.ids = None);
        let mut ctx = UpdateContext {
            model: &mut *model,
            optimizer: &mut adam,
            topology: &topology,
            step: 0,
            total_steps: 1,
            seed: 0,
        };
        let err = format!("{:#}", method.update(&mut ctx, &shards).err().unwrap());
        assert!(err.contains(&format!("method.{name}")) && err.contains("ids"), "{err}");
    }
}
