//! Unit tests of the methods crate's pieces that the reference comparison does not isolate.

use mgrun_methods::dsp_reg::{DspMode, DspScore};
use mgrun_methods::{DspReg, DspRegConfig, Method, MethodDef};
use mgrun_models::{Model, ModelSpec};
use tch::{Device, Kind, Tensor};

fn small_cnn() -> Box<dyn Model> {
    let spec = ModelSpec {
        arch: "small_cnn".into(),
        num_classes: 5,
        freeze_bn: false,
        dropout: 0.0,
        width: 8,
        pretrained: None,
    };
    mgrun_models::build(&spec, Device::Cpu, 3).unwrap()
}

/// Sets DSP-Reg's EMAs to `variance` and `mean_sq` with t = 1 and beta = 0 (no bias correction).
fn with_moments(cfg: DspRegConfig, model: &dyn Model, variance: &Tensor, mean_sq: &Tensor) -> DspReg {
    let mut dsp = DspReg::new(&DspRegConfig { beta: 0.0, ..cfg }, model, 3).unwrap();
    let numel = model.store().numel() as i64;
    dsp.load_state(&[
        ("dsp_reg.ema_variance".into(), variance.shallow_clone()),
        ("dsp_reg.ema_mean_sq".into(), mean_sq.shallow_clone()),
        ("dsp_reg.t".into(), Tensor::from_slice(&[1i64])),
        ("dsp_reg.theta0".into(), Tensor::zeros([numel], (Kind::Float, Device::Cpu))),
    ])
    .unwrap();
    dsp
}

#[test]
fn rank_score_counts_smaller_scores_within_each_tensor() {
    let model = small_cnn();
    let numel = model.store().numel() as i64;
    tch::manual_seed(5);
    // Tiny, tied and ordinary variances.
    let variance = Tensor::rand([numel], (Kind::Float, Device::Cpu)).pow_tensor_scalar(6);
    let _ = variance.narrow(0, 0, 20).fill_(0.0);
    let _ = variance.narrow(0, 40, 20).fill_(0.25);
    let mean_sq = Tensor::rand([numel], (Kind::Float, Device::Cpu));
    let cfg = DspRegConfig { score: DspScore::Rank, mode: DspMode::Anchor, ..DspRegConfig::default() };
    let dsp = with_moments(cfg, &*model, &variance, &mean_sq);
    let score = dsp.sensitivity().unwrap();
    let ratio = &variance / (&variance + &mean_sq + 1e-20);
    for p in model.store().params() {
        let r = ratio.narrow(0, p.offset as i64, p.numel as i64);
        let smaller = r.unsqueeze(0).lt_tensor(&r.unsqueeze(1)).sum_dim_intlist(1, false, Kind::Float);
        let expected = smaller / ((p.numel as f64 - 1.0).max(1.0));
        let got = score.narrow(0, p.offset as i64, p.numel as i64);
        let max_diff = (&got - &expected).abs().max().double_value(&[]);
        assert!(max_diff < 1e-6, "{}: rank score differs from brute force by {max_diff}", p.name);
    }
}

use mgrun_collectives::SingleRank;
use mgrun_methods::{
    build, Adam, AdamConfig, DomainShard, MethodConfig, ShardingPlan, Topology, UpdateContext, METHODS,
};

#[test]
fn exclusion_mask_keeps_only_included_parameters() {
    let model = small_cnn();
    let cfg = DspRegConfig { exclude: vec!["fc.".into(), "conv4".into()], ..DspRegConfig::default() };
    let dsp = DspReg::new(&cfg, &*model, 3).unwrap();
    let mask = dsp.weight_mask();
    assert_eq!(mask.numel(), model.store().numel());
    for p in model.store().params() {
        let part = mask.narrow(0, p.offset as i64, p.numel as i64);
        let included = ["conv1.weight", "conv2.weight", "conv3.weight"].contains(&p.name.as_str());
        let expected = if included { 1.0 } else { 0.0 };
        let (lo, hi) = (part.min().double_value(&[]), part.max().double_value(&[]));
        assert!(lo == expected && hi == expected, "{}: mask in [{lo}, {hi}], expected {expected}", p.name);
    }
    // Keeping norms and biases in: only the prefixes are excluded.
    let cfg = DspRegConfig {
        exclude_norm: false,
        exclude_bias: false,
        exclude: vec!["fc.".into()],
        ..DspRegConfig::default()
    };
    let dsp = DspReg::new(&cfg, &*model, 3).unwrap();
    let fc: i64 = model.store().params().iter().filter(|p| p.name.starts_with("fc.")).map(|p| p.numel as i64).sum();
    let kept = dsp.weight_mask().sum(Kind::Double).double_value(&[]);
    assert_eq!(kept as i64, model.store().numel() as i64 - fc);
}

#[test]
fn unknown_exclusion_prefix_is_an_error() {
    let model = small_cnn();
    let cfg = DspRegConfig { exclude: vec!["classifier.".into()], ..DspRegConfig::default() };
    let err = DspReg::new(&cfg, &*model, 3).err().unwrap().to_string();
    assert!(err.contains("method.dsp_reg.exclude[0]") && err.contains("classifier."), "{err}");
}

#[test]
fn warmup_then_linear_ramp() {
    let cfg = DspRegConfig { warmup_frac: 0.1, ramp_frac: 0.1, ..DspRegConfig::default() };
    assert_eq!(cfg.schedule_steps(100), (10, 10));
    let fraction = |step| cfg.penalty_fraction(step, 100);
    for step in 0..10 {
        assert_eq!(fraction(step), 0.0, "step {step} is warm-up");
    }
    assert!((fraction(10) - 0.1).abs() < 1e-12);
    assert!((fraction(14) - 0.5).abs() < 1e-12);
    assert_eq!(fraction(19), 1.0);
    assert_eq!(fraction(99), 1.0);
    let no_ramp = DspRegConfig { ramp_frac: 0.0, ..cfg.clone() };
    assert_eq!(no_ramp.penalty_fraction(9, 100), 0.0);
    assert_eq!(no_ramp.penalty_fraction(10, 100), 1.0);
    let no_warmup = DspRegConfig { warmup_frac: 0.0, ramp_frac: 0.0, ..cfg };
    assert_eq!(no_warmup.penalty_fraction(0, 100), 1.0);
}

#[test]
fn dsp_reg_needs_two_domains() {
    let model = small_cnn();
    let cfg = MethodConfig::named("dsp_reg");
    let err = build(&cfg, &*model, 1).err().unwrap().to_string();
    assert!(err.contains("method.dsp_reg") && err.contains("data.test_domains"), "{err}");
    assert!(build(&cfg, &*model, 2).is_ok());
}

#[test]
fn unknown_method_lists_the_available_ones() {
    let model = small_cnn();
    let cfg = MethodConfig::named("irm");
    let err = build(&cfg, &*model, 3).err().unwrap().to_string();
    assert!(err.contains("irm") && err.contains("erm, sam, dsp_reg, vrex"), "{err}");
    let err = serde_json::from_str::<MethodConfig>(r#"{"name": "irm"}"#).unwrap_err().to_string();
    assert!(err.contains("irm") && err.contains("erm, sam, dsp_reg, vrex"), "{err}");
}

#[test]
fn descriptors_list_methods_with_their_defaults() {
    let names: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    assert_eq!(
        names,
        [
            "erm",
            "sam",
            "dsp_reg",
            "vrex",
            "group_dro",
            "coral",
            "fishr",
            "disam",
            "tram",
            "udim",
            "ocnn",
            "elr",
            "ps_kd",
            "advstyle",
            "mixup",
            "weight_compander"
        ]
    );
    let documented: Vec<(String, String, &str)> =
        METHODS.iter().flat_map(|m| m.documented_defaults().unwrap()).collect();
    let find =
        |key: &str| documented.iter().find(|(k, _, _)| k == key).unwrap_or_else(|| panic!("{key} missing")).1.clone();
    assert_eq!(find("method.sam.rho"), "0.05");
    assert_eq!(find("method.sam.perturb"), "\"global\"");
    assert_eq!(find("method.dsp_reg.beta"), "0.95");
    assert_eq!(find("method.dsp_reg.mode"), "\"gate\"");
    assert_eq!(find("method.dsp_reg.variance_denominator"), "\"k_minus_1\"");
    assert_eq!(find("method.dsp_reg.epsilon"), "1e-20");
    // DomainBed's defaults (hparams_registry.py).
    assert_eq!(find("method.vrex.lambda"), "10.0");
    assert_eq!(find("method.vrex.penalty_anneal_iters"), "500");
    assert_eq!(find("method.group_dro.eta"), "0.01");
    assert_eq!(find("method.coral.gamma"), "1.0");
    assert_eq!(find("method.fishr.lambda"), "1000.0");
    assert_eq!(find("method.fishr.penalty_anneal_iters"), "1500");
    assert_eq!(find("method.fishr.ema"), "0.95");
    let dsp = mgrun_methods::descriptor("dsp_reg").unwrap();
    assert_eq!(dsp.hyperparameters.len(), 16);
    assert_eq!(dsp.domainbed_name, "DSPReg");
    let searched: Vec<&str> = dsp.hyperparameters.iter().filter_map(|h| h.search.map(|(name, _)| name)).collect();
    assert_eq!(searched, ["dsp_lambda", "dsp_beta"]);
}

#[test]
fn configs_parse_names_and_reject_unknown_fields() {
    let cfg: MethodConfig = serde_json::from_str(
        r#"{"name": "dsp_reg", "dsp_reg": {"mode": "gate", "score": "layer_norm", "weight": "sigmoid",
            "variance_denominator": "k", "exclude": ["fc."]}, "sam": {"perturb": "local"}}"#,
    )
    .unwrap();
    let dsp = cfg.config_of::<DspReg>().unwrap();
    assert_eq!(dsp.mode, DspMode::Gate);
    assert_eq!(dsp.score, DspScore::LayerNorm);
    assert_eq!(dsp.beta, 0.95);
    assert_eq!(cfg.config_of::<mgrun_methods::Sam>().unwrap().perturb, mgrun_methods::SamPerturb::Local);
    assert!(serde_json::from_str::<MethodConfig>(r#"{"dsp_reg": {"lamda": 1.0}}"#).is_err());
    assert!(serde_json::from_str::<MethodConfig>(r#"{"sam": {"perturb": "per_rank"}}"#).is_err());
    assert!(serde_json::from_str::<AdamConfig>(r#"{"lr": 1e-3, "momentum": 0.9}"#).is_err());
    // Values are checked when the config is read, and again by a method built directly.
    let err = serde_json::from_str::<MethodConfig>(r#"{"name": "dsp_reg", "dsp_reg": {"beta": 1.0}}"#).unwrap_err();
    assert!(err.to_string().contains("method.dsp_reg.beta"), "{err}");
    let bad = DspRegConfig { beta: 1.0, ..DspRegConfig::default() };
    let err = MethodConfig::of::<DspReg>(&bad).unwrap_err().to_string();
    assert!(err.contains("method.dsp_reg.beta"), "{err}");
    let err = DspReg::new(&bad, &*small_cnn(), 3).err().unwrap().to_string();
    assert!(err.contains("method.dsp_reg.beta"), "{err}");
}

fn random_shards(step: u64) -> Vec<DomainShard> {
    tch::manual_seed(100 + step as i64);
    (0..3)
        .map(|domain| DomainShard {
            domain,
            offset: 0,
            x: Tensor::randn([2, 3, 8, 8], (Kind::Float, Device::Cpu)),
            y: Tensor::randint(5, [2], (Kind::Int64, Device::Cpu)),
            ids: None,
        })
        .collect()
}

/// Runs `steps` of `method` from `start`, returning the flat weights.
fn run_steps(
    model: &mut dyn Model,
    method: &mut dyn Method,
    optimizer: &mut Adam,
    steps: std::ops::Range<u64>,
    shards: &[Vec<DomainShard>],
) -> Vec<mgrun_methods::StepStats> {
    let world = SingleRank::default();
    let plan = ShardingPlan::balanced(1, 3, 2, 1).unwrap();
    let topology =
        Topology { world: &world, plan: &plan, domain_groups: &[], bucket_bytes: 1024, exact: None, overlap: None };
    steps
        .map(|step| {
            let mut ctx = UpdateContext {
                model: &mut *model,
                optimizer: &mut *optimizer,
                topology: &topology,
                step,
                total_steps: 4,
                seed: 0,
            };
            method.update(&mut ctx, &shards[step as usize]).unwrap()
        })
        .collect()
}

/// Bound on the relative difference of two f32 evaluations of DSP-Reg's per-element statistics that
/// associate differently: about 20 roundings of 2^-24 in each path, doubled for margin, each step.
const DSP_PATHS_TOLERANCE: f64 = 2.0 * 2.0 * 20.0 * (f32::EPSILON as f64 / 2.0) * 4.0;

#[test]
fn dsp_reg_fused_cpu_pass_matches_the_tensor_path() {
    use mgrun_methods::dsp_reg::DspWeight;
    let shards: Vec<Vec<DomainShard>> = (0..4).map(random_shards).collect();
    let modes = [DspMode::Anchor, DspMode::Shrink, DspMode::Gate];
    for (mode, weight) in modes.into_iter().flat_map(|m| [(m, DspWeight::Linear), (m, DspWeight::Sigmoid)]) {
        // Warm-up at step 0 (no penalty), then a ramp: every branch of the pass runs.
        let cfg = DspRegConfig {
            mode,
            weight,
            tau: 0.2,
            lambda: 5.0,
            gamma: 0.9,
            warmup_frac: 0.25,
            ramp_frac: 0.5,
            ..DspRegConfig::default()
        };
        let run = |fused: bool| {
            let mut model = small_cnn();
            let initial = model.store().flat().copy();
            let mut dsp = DspReg::new(&cfg, &*model, 3).unwrap();
            dsp.set_fused_statistics(fused);
            let mut adam =
                Adam::new(AdamConfig { lr: 1e-2, ..AdamConfig::default() }, model.store().numel(), Device::Cpu);
            let stats = run_steps(&mut *model, &mut dsp, &mut adam, 0..4, &shards);
            let moved = (model.store().flat() - initial).to_kind(Kind::Double);
            (moved, stats, dsp.sensitivity().unwrap().to_kind(Kind::Double))
        };
        let (fused_moved, fused_stats, fused_score) = run(true);
        let (tensor_moved, tensor_stats, tensor_score) = run(false);
        let relative = |a: &Tensor, b: &Tensor| (a - b).norm().double_value(&[]) / b.norm().double_value(&[]);
        let label = format!("{mode:?}/{weight:?}");
        let moved = relative(&fused_moved, &tensor_moved);
        assert!(moved <= DSP_PATHS_TOLERANCE, "{label}: weight updates differ by {moved:e}");
        let score = relative(&fused_score, &tensor_score);
        assert!(score <= DSP_PATHS_TOLERANCE, "{label}: sensitivities differ by {score:e}");
        for (step, (f, t)) in fused_stats.iter().zip(&tensor_stats).enumerate() {
            assert!((f.loss - t.loss).abs() <= DSP_PATHS_TOLERANCE * t.loss.abs(), "{label}: loss at step {step}");
            let (a, b) = (f.extra["dsp_mean_sensitivity"], t.extra["dsp_mean_sensitivity"]);
            assert!((a - b).abs() <= DSP_PATHS_TOLERANCE * b.abs(), "{label}: mean sensitivity {a} vs {b} at {step}");
            assert_eq!(f.extra["dsp_lambda"], t.extra["dsp_lambda"]);
        }
        // The penalty (or gate) was in force in the steps compared.
        assert!(fused_stats[3].extra["dsp_lambda"] > 0.0);
    }
}

#[test]
fn dsp_reg_fused_pass_is_the_same_on_any_thread_count() {
    use mgrun_torch_shim::{dsp_ratio_step, DspBuffers, DspCoefficients};
    // Several of the pass's fixed chunks (2^15 elements), so that threads split the work.
    let n = 200_003i64;
    tch::manual_seed(9);
    let sums = Tensor::randn([2 * n], (Kind::Float, Device::Cpu)).abs();
    let theta = Tensor::randn([n], (Kind::Float, Device::Cpu));
    let theta0 = Tensor::randn([n], (Kind::Float, Device::Cpu));
    let mask = Tensor::rand([n], (Kind::Float, Device::Cpu)).gt(0.3).to_kind(Kind::Float);
    let ema = Tensor::rand([n], (Kind::Float, Device::Cpu));
    let coefficients = DspCoefficients {
        k: 3.0,
        denominator: 2.0,
        beta: 0.9,
        correction: 1.0 - 0.9f64.powi(2),
        epsilon: 1e-20,
        tau: 0.5,
        temperature: 0.1,
        strength: 0.7,
        sigmoid_weight: 0,
        mode: 0,
    };
    let run = |threads: i32| {
        let previous = tch::get_num_threads();
        tch::set_num_threads(threads);
        let (ema_variance, ema_mean_sq, update) = (ema.copy(), ema.copy(), theta.empty_like());
        let buffers = DspBuffers {
            sums: &sums,
            ema_variance: &ema_variance,
            ema_mean_sq: &ema_mean_sq,
            theta: &theta,
            theta0: Some(&theta0),
            mask: &mask,
            update: &update,
        };
        let sum = dsp_ratio_step(&buffers, &coefficients).unwrap();
        tch::set_num_threads(previous);
        (sum, [ema_variance, ema_mean_sq, update])
    };
    let (one, one_tensors) = run(1);
    let (two, two_tensors) = run(2);
    assert_eq!(one.to_bits(), two.to_bits(), "masked score sum depends on the thread count: {one} vs {two}");
    for (a, b) in one_tensors.iter().zip(&two_tensors) {
        assert!(a.equal(b), "an output depends on the thread count");
    }
    // The sum is the masked scores' (computed here by tensor ops, in f64): each f32 score is within a
    // few roundings (2^-24 relative each) of its f64 value, so the sums agree far inside 1e-5.
    let v = one_tensors[0].to_kind(Kind::Double) / coefficients.correction;
    let m = one_tensors[1].to_kind(Kind::Double) / coefficients.correction;
    let expected = (&v / (&v + &m + 1e-20) * mask.to_kind(Kind::Double)).sum(Kind::Double).double_value(&[]);
    assert!((one - expected).abs() <= 1e-5 * expected, "masked score sum {one}, expected {expected}");

    // A buffer of the wrong size is refused, not read past its end.
    let short = Tensor::zeros([n - 1], (Kind::Float, Device::Cpu));
    let buffers = DspBuffers {
        sums: &sums,
        ema_variance: &short,
        ema_mean_sq: &ema,
        theta: &theta,
        theta0: Some(&theta0),
        mask: &mask,
        update: &theta,
    };
    let err = dsp_ratio_step(&buffers, &coefficients).unwrap_err().to_string();
    assert!(err.contains("DSP-Reg statistics") && err.contains("contiguous f32 CPU"), "{err}");
}

#[test]
fn dsp_reg_and_adam_state_round_trip_continue_identically() {
    let shards: Vec<Vec<DomainShard>> = (0..4).map(random_shards).collect();
    // Anchor: its θ₀ is part of the state.
    let dsp = DspRegConfig {
        mode: DspMode::Anchor,
        warmup_frac: 0.25,
        ramp_frac: 0.25,
        lambda: 5.0,
        ..DspRegConfig::default()
    };
    let cfg = MethodConfig::of::<DspReg>(&dsp).unwrap();
    let adam_cfg = AdamConfig { lr: 1e-2, ..AdamConfig::default() };
    let mut model = small_cnn();
    let numel = model.store().numel();
    let mut method = build(&cfg, &*model, 3).unwrap();
    let mut adam = Adam::new(adam_cfg.clone(), numel, Device::Cpu);
    run_steps(&mut *model, &mut *method, &mut adam, 0..2, &shards);

    // Checkpoint, then restore into fresh objects.
    let weights = model.store().flat().copy();
    let method_state: Vec<(String, Tensor)> = method.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let adam_state: Vec<(String, Tensor)> = adam.state().into_iter().map(|(n, t)| (n, t.copy())).collect();
    let mut restored_model = small_cnn();
    restored_model.store().set_flat(&weights).unwrap();
    let mut restored = build(&cfg, &*restored_model, 3).unwrap();
    restored.load_state(&method_state).unwrap();
    let mut restored_adam = Adam::new(adam_cfg, numel, Device::Cpu);
    restored_adam.load_state(&adam_state).unwrap();
    assert_eq!(restored_adam.steps(), 2);

    let a = run_steps(&mut *model, &mut *method, &mut adam, 2..4, &shards);
    let b = run_steps(&mut *restored_model, &mut *restored, &mut restored_adam, 2..4, &shards);
    assert!(model.store().flat().equal(restored_model.store().flat()), "restored run diverged");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.loss, y.loss);
        assert_eq!(x.extra, y.extra);
    }
    assert_eq!(a[1].extra["dsp_lambda"], 5.0);
    let s = a[1].extra["dsp_mean_sensitivity"];
    assert!(s > 0.0 && s < 1.0, "mean sensitivity {s}");

    // Summaries and the sensitivity dump describe every parameter.
    let summaries = method.summaries(&*model);
    let layers = summaries["dsp_sensitivity"].as_object().unwrap();
    assert_eq!(layers.len(), model.store().params().len());
    let conv1 = &layers["conv1.weight"];
    assert!(conv1["max"].as_f64().unwrap() >= conv1["mean"].as_f64().unwrap());
    assert_eq!(layers["gn1.weight"]["w_mean"].as_f64().unwrap(), 0.0, "norm parameters are excluded");
    let state_names: Vec<&str> = method_state.iter().map(|(n, _)| n.as_str()).collect();
    assert!(state_names.contains(&"dsp_reg.theta0"), "{state_names:?}");
}

#[test]
fn sensitivity_tensors_have_parameter_shapes() {
    let model = small_cnn();
    let numel = model.store().numel() as i64;
    let variance = Tensor::full([numel], 1.0, (Kind::Float, Device::Cpu));
    let mean_sq = Tensor::full([numel], 3.0, (Kind::Float, Device::Cpu));
    let dsp = with_moments(DspRegConfig::default(), &*model, &variance, &mean_sq);
    let tensors = dsp.sensitivity_tensors(&*model).unwrap();
    assert_eq!(tensors.len(), model.store().params().len());
    for ((name, t), p) in tensors.iter().zip(model.store().params()) {
        assert_eq!(name, &p.name);
        assert_eq!(t.size(), p.shape);
        // s = V / (V + M) = 0.25 everywhere.
        assert!((t - 0.25).abs().max().double_value(&[]) < 1e-7);
    }
}
