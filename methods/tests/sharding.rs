//! Sharding invariance in one process: ranks are threads joined by real TCP communicators (and
//! their splits) through an in-process rendezvous store, each holding its pieces of the balanced
//! plan. For W = 1..5 ranks over 3 domains of 4 images (W < K, W = K, W > K, W not a multiple of K):
//! - exact path (deterministic mode, micro-batches of 1 and of 3 images): every method's losses and
//!   weights over several steps are bit for bit those of one rank;
//! - fast path: the batch gradient and every domain gradient equal the one-rank ones within the
//!   float32 error bound of reassociating their sums, |d| <= 2 gamma_n A (gamma_n = n u / (1 - n u),
//!   u = 2^-24, n the number of summed terms, A the sum of the terms' magnitudes, computed here from
//!   per-image gradients). Over several steps Adam amplifies such differences in parameters whose
//!   gradient is near zero, so no fixed tolerance holds for trajectories: that is what the exact
//!   path is for.

mod common;

use common::{on_threads, shards_of, spec, steps, Batches, BATCH, NUM_DOMAINS as DOMAINS, STEPS};
use mgrun_collectives::Communicator;
use mgrun_methods::dsp_reg::DspMode;
use mgrun_methods::gradients::{batch_gradient, domain_gradients, Pass};
use mgrun_methods::{
    build, domain_groups, Adam, AdamConfig, Coral, CoralConfig, Disam, DisamConfig, DspReg, DspRegConfig, Fishr,
    FishrConfig, GroupDro, GroupDroConfig, MethodConfig, Mixup, MixupConfig, MixupTransport, Sam, SamConfig,
    SamPerturb, ShardingPlan, Topology, Tram, TramConfig, TramTarget, Udim, UdimConfig, Vrex, VrexConfig,
};
use tch::{Device, Kind, Tensor};

const TOKEN: &str = "sharding-test";

/// `[step][domain]` batches of deterministic images (sines) and labels.
fn batches() -> Batches {
    let values = |n: i64, salt: f64| {
        let t = (Tensor::arange(n, (Kind::Double, Device::Cpu)) * (0.7311 + salt)).sin().to_kind(Kind::Float);
        Vec::<f32>::try_from(&t).unwrap()
    };
    (0..STEPS)
        .map(|step| {
            (0..DOMAINS)
                .map(|e| {
                    let salt = (step as usize * DOMAINS + e) as f64 * 0.1;
                    let y = (0..BATCH).map(|i| (i + step as i64 + e as i64) % 5).collect();
                    (values(BATCH * 3 * 8 * 8, salt), y)
                })
                .collect()
        })
        .collect()
}

/// One rank's run in deterministic mode; returns its final flat weights and per-step losses.
fn run_rank(
    cfg: &MethodConfig,
    weights: &[f32],
    data: &Batches,
    plan: &ShardingPlan,
    world: &dyn Communicator,
) -> (Vec<f32>, Vec<f64>) {
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(&Tensor::from_slice(weights)).unwrap();
    let mut method = build(cfg, &*model, DOMAINS).unwrap();
    let mut adam = Adam::new(AdamConfig { lr: 1e-2, ..AdamConfig::default() }, model.store().numel(), Device::Cpu);
    let losses = steps(&mut *model, &mut *method, &mut adam, plan, world, true, 0..STEPS, |step| {
        shards_of(data, plan, world.rank(), step, None)
    });
    (Vec::<f32>::try_from(model.store().flat()).unwrap(), losses)
}

fn initial_weights() -> Vec<f32> {
    Vec::<f32>::try_from(mgrun_models::build(&spec(), Device::Cpu, 5).unwrap().store().flat()).unwrap()
}

fn check_invariance(cfg: MethodConfig) {
    tch::set_num_threads(1);
    let data = batches();
    let weights = initial_weights();
    let name = cfg.name.clone();
    let run_world = |world: usize, unit: usize| {
        on_threads(TOKEN, world, unit, |plan, comm| run_rank(&cfg, &weights, &data, plan, comm))
    };
    // Exact path: the same bits on every rank and every world size.
    for unit in [1, 3] {
        let reference = run_world(1, unit).remove(0);
        assert!(reference.0 != weights, "{name}: the weights did not move");
        for world in 2..=5 {
            for (rank, result) in run_world(world, unit).iter().enumerate() {
                assert_eq!(result.1, reference.1, "{name} exact path (unit {unit}), {world} ranks: rank {rank} losses");
                assert!(result.0 == reference.0, "{name} exact path (unit {unit}), {world} ranks: rank {rank} weights");
            }
        }
    }
}

#[test]
fn erm_is_invariant_to_sharding() {
    check_invariance(MethodConfig::named("erm"));
}

#[test]
fn sam_global_is_invariant_to_sharding() {
    check_invariance(MethodConfig::named("sam"));
}

#[test]
fn sam_local_is_invariant_to_sharding() {
    let sam = SamConfig { perturb: SamPerturb::Local, ..SamConfig::default() };
    check_invariance(MethodConfig::of::<Sam>(&sam).unwrap());
}

#[test]
fn dsp_reg_is_invariant_to_sharding() {
    let dsp_reg = DspRegConfig {
        mode: DspMode::Anchor,
        lambda: 10.0,
        warmup_frac: 0.0,
        ramp_frac: 0.0,
        ..DspRegConfig::default()
    };
    check_invariance(MethodConfig::of::<DspReg>(&dsp_reg).unwrap());
}

#[test]
fn vrex_is_invariant_to_sharding() {
    // The penalty switches on (and Adam restarts) at step 1.
    check_invariance(MethodConfig::of::<Vrex>(&VrexConfig { lambda: 10.0, penalty_anneal_iters: 1 }).unwrap());
}

#[test]
fn group_dro_is_invariant_to_sharding() {
    check_invariance(MethodConfig::of::<GroupDro>(&GroupDroConfig { eta: 0.5 }).unwrap());
}

#[test]
fn coral_is_invariant_to_sharding() {
    check_invariance(MethodConfig::of::<Coral>(&CoralConfig { gamma: 1.0 }).unwrap());
}

#[test]
fn fishr_is_invariant_to_sharding() {
    let fishr = FishrConfig { lambda: 100.0, penalty_anneal_iters: 1, ema: 0.9 };
    check_invariance(MethodConfig::of::<Fishr>(&fishr).unwrap());
}

#[test]
fn disam_is_invariant_to_sharding() {
    check_invariance(MethodConfig::of::<Disam>(&DisamConfig { rho: 0.05, lambda: 5.0 }).unwrap());
}

#[test]
fn tram_is_invariant_to_sharding() {
    // Not target = "noise": its per-unit noise comes from libtorch's global generator, which these
    // rank threads share (processes do not; tests/world_size_invariance.rs checks it there).
    for target in [TramTarget::Previous, TramTarget::Initial] {
        check_invariance(
            MethodConfig::of::<Tram>(&TramConfig { target, logit_scale: 100.0, ..TramConfig::default() }).unwrap(),
        );
    }
}

#[test]
fn udim_is_invariant_to_sharding() {
    for domain_wise in [true, false] {
        let udim = UdimConfig { warmup_frac: 1.0 / 3.0, domain_wise, ..UdimConfig::default() };
        check_invariance(MethodConfig::of::<Udim>(&udim).unwrap());
    }
}

#[test]
fn mixup_is_invariant_to_sharding() {
    // These batches are not 8-bit pixels (tests/world_size_invariance.rs runs the uint8 transport).
    let mixup = MixupConfig { alpha: 0.5, transport: MixupTransport::Float32 };
    check_invariance(MethodConfig::of::<Mixup>(&mixup).unwrap());
}

/// What one rank of the fast path computed at step 0: the batch gradient and its domain gradients.
struct FastGradients {
    batch: Vec<f32>,
    domains: Vec<(usize, Vec<f32>)>,
}

fn fast_gradients(weights: &[f32], data: &Batches, plan: &ShardingPlan, world: &dyn Communicator) -> FastGradients {
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(&Tensor::from_slice(weights)).unwrap();
    let groups = domain_groups(world, plan).unwrap();
    let topology = Topology { world, plan, domain_groups: &groups, bucket_bytes: 4096, exact: None, overlap: None };
    let shards = shards_of(data, plan, world.rank(), 0, None);
    // The batch gradient aliases the model's gradient buffer: read it before the next backward.
    let batch =
        Vec::<f32>::try_from(&batch_gradient(&mut *model, &topology, &shards, &Pass::plain(0, 0)).unwrap().grad)
            .unwrap();
    let domains = domain_gradients(&mut *model, &topology, &shards, &Pass::plain(0, 0)).unwrap();
    FastGradients {
        batch,
        domains: domains.domains.iter().map(|d| (d.domain, Vec::<f32>::try_from(&d.grad).unwrap())).collect(),
    }
}

/// A = sum over the images of |grad of the image's loss|, scaled as the batch gradient (1/(KB)) and
/// as each domain's gradient (1/B).
fn magnitude_sums(weights: &[f32], data: &Batches) -> (Tensor, Vec<Tensor>) {
    let mut model = mgrun_models::build(&spec(), Device::Cpu, 0).unwrap();
    model.store().set_flat(&Tensor::from_slice(weights)).unwrap();
    let mut domains = Vec::new();
    for (x, y) in &data[0] {
        let x = Tensor::from_slice(x).view([BATCH, 3, 8, 8]);
        let y = Tensor::from_slice(y);
        let mut sum = Tensor::zeros([model.store().numel() as i64], (Kind::Double, Device::Cpu));
        for i in 0..BATCH {
            let loss = model.forward_t(&x.narrow(0, i, 1), true).cross_entropy_for_logits(&y.narrow(0, i, 1));
            model.store_mut().zero_grad();
            loss.backward();
            sum += model.store().flat_grad().abs().to_kind(Kind::Double);
        }
        domains.push(sum / BATCH as f64);
    }
    let mut batch = domains[0].zeros_like();
    for d in &domains {
        batch += d / DOMAINS as f64;
    }
    (batch, domains)
}

#[test]
fn fast_path_gradients_match_one_rank_within_the_summation_error_bound() {
    tch::set_num_threads(1);
    let data = batches();
    let weights = initial_weights();
    let (batch_magnitude, domain_magnitudes) = magnitude_sums(&weights, &data);
    // Terms of a weight gradient's sum: every image and output position (8 x 8) of the batch.
    let n = (DOMAINS as i64 * BATCH * 64) as f64;
    let u = f32::EPSILON as f64 / 2.0;
    let gamma = n * u / (1.0 - n * u);
    let within = |label: &str, got: &[f32], want: &[f32], magnitude: &Tensor| {
        let bound = magnitude * (2.0 * gamma) + f32::MIN_POSITIVE as f64 * n;
        let diff =
            (Tensor::from_slice(got).to_kind(Kind::Double) - Tensor::from_slice(want).to_kind(Kind::Double)).abs();
        let excess = (&diff - &bound).max().double_value(&[]);
        assert!(excess <= 0.0, "{label}: a gradient element differs by more than its bound (excess {excess:e})");
        // Reassociation shows: the comparison is not vacuous when the sums are cut differently.
        diff.max().double_value(&[])
    };
    let single = on_threads(TOKEN, 1, 1, |plan, comm| fast_gradients(&weights, &data, plan, comm)).remove(0);
    let mut largest = 0.0f64;
    for world in 2..=5 {
        for (rank, got) in
            on_threads(TOKEN, world, 1, |plan, comm| fast_gradients(&weights, &data, plan, comm)).iter().enumerate()
        {
            largest = largest.max(within(
                &format!("{world} ranks, rank {rank}, batch"),
                &got.batch,
                &single.batch,
                &batch_magnitude,
            ));
            for (domain, grad) in &got.domains {
                let want = &single.domains.iter().find(|(d, _)| d == domain).unwrap().1;
                let label = format!("{world} ranks, rank {rank}, domain {domain}");
                largest = largest.max(within(&label, grad, want, &domain_magnitudes[*domain]));
            }
        }
    }
    println!("largest element difference from one rank: {largest:e} (bound factor 2 gamma_n = {:e})", 2.0 * gamma);
}
