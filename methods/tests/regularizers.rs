//! The regularizer methods (OCNN, ELR, PS-KD, AdvStyle: ERM plus a regularizer each) and
//! `weight_compander` (our mu-law variant of Weight Compander: w = f(v) on conv/linear weights, Adam on
//! the latent v) against an independent PyTorch reference (tests/reference/regularizers_ref.py; for
//! weight_compander autograd through f with v as the leaf, torch.optim.Adam on v), in the setting of
//! tests/reference.rs: SmallCnn width 8, 3 domains x 4 images of 8x8, 3 steps, on the fast path and on
//! the exact path with micro-batches of 3; and their invariance to sharding on 1..5 ranks (threads
//! joined by TCP communicators), bit for bit on the exact path. The images carry ids that repeat across
//! steps (and once within a step), so the per-sample tables of ELR and PS-KD are read back, and an
//! image drawn twice in a step checks that its last copy's value is kept. Also the checkpoint round
//! trip of weight_compander's latent weights.

mod common;

use common::{
    fixture_dir, fixture_weights, load, on_threads, relative_error, run_reference, shards_of, spec, steps, Batches,
    Fixture, BATCH, NUM_CLASSES, NUM_DOMAINS, STEPS, WIDTH,
};
use mgrun_collectives::{Communicator, SingleRank};
use mgrun_methods::{
    build, Adam, AdamConfig, AdvStyle, AdvStyleConfig, DomainShard, Elr, ElrConfig, MethodConfig, Ocnn, OcnnConfig,
    PsKd, PsKdConfig, ShardingPlan, Topology, UpdateContext, WeightCompander, WeightCompanderConfig,
};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;
const MICRO_BATCH: usize = 3;
const TOKEN: &str = "regularizers-test";
/// Each image's id per step (the same in every domain): ids come back at later steps, and id 2 is
/// drawn twice at step 1.
const IDS: [[i64; 4]; 3] = [[0, 1, 2, 3], [2, 3, 2, 5], [5, 0, 4, 1]];

fn adam_config() -> AdamConfig {
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
        // Its defaults.
        ("weight_compander", MethodConfig::of::<WeightCompander>(&WeightCompanderConfig::default()).unwrap()),
    ]
}

fn case(name: &str) -> MethodConfig {
    cases().into_iter().find(|c| c.0 == name).unwrap().1
}

fn compander() -> MethodConfig {
    case("weight_compander")
}

/// Writes the initial weights, batches and ids once and runs the Python reference once.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = fixture_dir("regularizers");
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
        let case_json: Vec<serde_json::Value> = cases()
            .iter()
            .map(|(name, m)| {
                serde_json::json!({
                    "name": name, "method": m.name, "adam": adam_config(), "total_steps": STEPS,
                    "section": m.section(&m.name).unwrap(),
                })
            })
            .collect();
        let config = serde_json::json!({
            "width": WIDTH, "num_classes": NUM_CLASSES, "steps": STEPS, "num_domains": NUM_DOMAINS,
            "cases": case_json,
        });
        run_reference(&dir, "tests/reference/regularizers_ref.py", &tensors, &config)
    })
}

/// `[step][domain]` batches: random normal images (fixed seed) and labels.
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
fn shards(plan: &ShardingPlan, rank: usize, step: u64) -> Vec<DomainShard> {
    shards_of(&batches(), plan, rank, step, Some(&IDS[step as usize]))
}

/// Steps `range` of a run on `world`'s share of the plan; the losses.
fn run_steps(
    model: &mut dyn mgrun_models::Model,
    method: &mut dyn mgrun_methods::Method,
    adam: &mut Adam,
    plan: &ShardingPlan,
    world: &dyn Communicator,
    exact: bool,
    range: std::ops::Range<u64>,
) -> Vec<f64> {
    steps(model, method, adam, plan, world, exact, range, |step| shards(plan, world.rank(), step))
}

/// A run of STEPS from `weights` on `world`'s share of the plan: its per-step losses, final weights
/// and method state.
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
    let losses = run_steps(&mut *model, &mut *method, &mut adam, plan, world, exact, 0..STEPS);
    (losses, model.store().flat().detach().copy(), method.state())
}

fn check_reference(name: &str) {
    // One intra-op thread, as the invariance tests in this process set anyway: the summation order
    // (and so the rounding) then does not depend on which tests ran first.
    tch::set_num_threads(1);
    let fixture = fixture();
    let (inputs, reference) = (load(&fixture.input), load(&fixture.output));
    let cfg = case(name);
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

/// Losses, weights and method state (the per-sample tables, the latent weights) as plain values, for
/// comparing threads.
type Outcome = (Vec<f64>, Vec<f32>, Vec<(String, Vec<f32>)>);

/// Checks the exact path bit for bit on 1..5 ranks (units 1 and 3); the one-rank outcomes.
fn check_invariance(name: &str) -> Vec<Outcome> {
    tch::set_num_threads(1);
    let cfg = case(name);
    let weights = Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap();
    let run_world = |world: usize, unit: usize| -> Vec<Outcome> {
        on_threads(TOKEN, world, unit, |plan, comm| {
            let (losses, flat, state) = run(&cfg, &Tensor::from_slice(&weights), plan, comm, true);
            let state = state.into_iter().map(|(n, t)| (n, Vec::<f32>::try_from(&t.reshape([-1])).unwrap())).collect();
            (losses, Vec::<f32>::try_from(&flat).unwrap(), state)
        })
    };
    let mut references = Vec::new();
    for unit in [1, 3] {
        let reference = run_world(1, unit).remove(0);
        assert!(reference.1 != weights, "{name}: the weights did not move");
        for world in 2..=5 {
            for (rank, result) in run_world(world, unit).iter().enumerate() {
                let at = format!("{name} exact path (unit {unit}), {world} ranks: rank {rank}");
                assert_eq!(result.0, reference.0, "{at} losses");
                assert!(result.1 == reference.1, "{at} weights");
                assert!(result.2 == reference.2, "{at} method state");
            }
        }
        references.push(reference);
    }
    references
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
fn weight_compander_matches_reference() {
    check_reference("weight_compander");
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
fn weight_compander_is_invariant_to_sharding() {
    for (_, _, state) in check_invariance("weight_compander") {
        assert_eq!(state.len(), 1, "one latent buffer");
    }
    println!("weight_compander: exact path bit for bit on 1..5 ranks (units 1 and 3)");
}

#[test]
fn per_sample_methods_need_ids_and_restore_their_tables() {
    let weights = Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap();
    for name in ["elr", "ps_kd"] {
        let cfg = case(name);
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
        let mut adam = Adam::new(adam_config(), model.store().numel(), Device::Cpu);
        let topology =
            Topology { world: &world, plan: &plan, domain_groups: &[], bucket_bytes: 4096, exact: None, overlap: None };
        let mut shards = shards(&plan, 0, 0);
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
        let first = run_steps(&mut *model, &mut *method, &mut adam, &plan, &world, exact, 0..STEPS - 1);
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
        let last = run_steps(&mut *model, &mut *method, &mut adam_restored, &plan, &world, exact, STEPS - 1..STEPS);
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
    run_steps(&mut *model, &mut *method, &mut adam, &plan, &SingleRank::default(), false, 0..1);
    let err = relative_error(model.store().flat(), &weights);
    assert!(err < 1e-6, "the starting network moved by {err:e}");
}
