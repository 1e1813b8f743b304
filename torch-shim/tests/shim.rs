//! The shim's calls on the CPU (the CUDA ones are exercised by scripts/gpu-check.sh).
use tch::{Device, Kind, Tensor};

#[test]
fn bf16_autocast_runs_matmul_in_bf16_and_restores_the_previous_state() {
    let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
    assert!(!mgrun_torch_shim::autocast_enabled(Device::Cpu));
    {
        let _outer = mgrun_torch_shim::autocast_bf16(Device::Cpu).unwrap();
        {
            let _inner = mgrun_torch_shim::autocast_bf16(Device::Cpu).unwrap();
            assert!(mgrun_torch_shim::autocast_enabled(Device::Cpu));
        }
        // The inner exit restores "enabled" from the outer region.
        assert!(mgrun_torch_shim::autocast_enabled(Device::Cpu));
        assert_eq!(a.matmul(&b).kind(), Kind::BFloat16);
        // CUDA's key is independent of the CPU's.
        assert!(!mgrun_torch_shim::autocast_enabled(Device::Cuda(0)));
    }
    assert!(!mgrun_torch_shim::autocast_enabled(Device::Cpu));
    assert_eq!(a.matmul(&b).kind(), Kind::Float);
}

#[test]
fn deterministic_mode_toggles() {
    mgrun_torch_shim::set_deterministic(true).unwrap();
    assert!(mgrun_torch_shim::deterministic_enabled());
    mgrun_torch_shim::set_deterministic(false).unwrap();
    assert!(!mgrun_torch_shim::deterministic_enabled());
}

#[test]
fn cuda_memory_stats_fail_cleanly_without_cuda() {
    if tch::Cuda::is_available() {
        let _ = Tensor::zeros([1 << 20], (Kind::Float, Device::Cuda(0)));
        let stats = mgrun_torch_shim::cuda_memory_stats(0).unwrap();
        assert!(stats.peak_allocated >= 4 << 20, "{stats:?}");
    } else {
        let err = mgrun_torch_shim::cuda_memory_stats(0).unwrap_err();
        assert!(format!("{err:#}").contains("CUDA memory statistics"), "{err:#}");
    }
}

#[test]
fn pinned_copy_has_the_same_values_or_fails_cleanly() {
    let t = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([3, 4]);
    match mgrun_torch_shim::pin_memory(&t) {
        Ok(pinned) => {
            assert!(pinned.equal(&t));
            assert_eq!(pinned.size(), [3, 4]);
        }
        // No CUDA driver: pinning needs one; the error is reported, not a crash.
        Err(err) => {
            assert!(!tch::Cuda::is_available(), "pinning failed with CUDA available: {err:#}");
            assert!(format!("{err:#}").contains("pin_memory"), "{err:#}");
        }
    }
}

#[test]
fn set_grad_makes_backward_accumulate_into_the_given_tensor() {
    let mut param = Tensor::ones([4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let buffer = Tensor::zeros([6], (Kind::Float, Device::Cpu));
    let mut view = buffer.narrow(0, 1, 4);
    mgrun_torch_shim::set_grad(&mut param, &mut view).unwrap();
    (&param * 3.0).sum(Kind::Float).backward();
    (&param * 2.0).sum(Kind::Float).backward();
    let expected = Tensor::from_slice(&[0f32, 5.0, 5.0, 5.0, 5.0, 0.0]);
    assert!(buffer.equal(&expected), "{buffer}");
    let mut wrong = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    let err = mgrun_torch_shim::set_grad(&mut param, &mut wrong).unwrap_err();
    assert!(format!("{err:#}").contains("shape"), "{err:#}");
}

/// Three fused Adam (and AdamW) steps on `device` from fixed buffers; the parameters afterwards.
fn fused_adam_steps(device: Device, decoupled: bool) -> Tensor {
    tch::manual_seed(3);
    let n = 100_003;
    let [param, exp_avg, exp_avg_sq] =
        [0, 1, 2].map(|_| Tensor::randn([n], (Kind::Float, Device::Cpu)).to_device(device));
    let exp_avg_sq = exp_avg_sq.abs();
    let coefficients = mgrun_torch_shim::AdamCoefficients {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        weight_decay: 0.1,
        eps: 1e-8,
        decoupled,
    };
    for step in 1..=3 {
        let grad = Tensor::randn([n], (Kind::Float, Device::Cpu)).to_device(device);
        let count = Tensor::from(step as f32).to_device(device);
        mgrun_torch_shim::fused_adam(&param, &grad, &exp_avg, &exp_avg_sq, &count, coefficients).unwrap();
    }
    param.to_device(Device::Cpu)
}

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it with --include-ignored"]
fn fused_adam_on_cuda_matches_the_cpu_kernel() {
    assert!(tch::Cuda::is_available(), "this test needs CUDA");
    for decoupled in [false, true] {
        let (cpu, cuda) = (fused_adam_steps(Device::Cpu, decoupled), fused_adam_steps(Device::Cuda(0), decoupled));
        // Both evaluate the same f32 formula per element; only fused multiply-adds and the sqrt's
        // last bit differ, a few ulps per step.
        let relative = (&cpu - &cuda).norm().double_value(&[]) / cpu.norm().double_value(&[]);
        assert!(relative < 1e-6, "decoupled={decoupled}: CUDA and CPU fused Adam differ by {relative:e}");
    }
}

#[test]
fn fused_adamw_decays_the_weights_outside_the_moments() {
    // With a zero gradient, Adam's moments stay zero: AdamW only shrinks theta by lr * wd, while
    // Adam's coupled decay moves it by about lr (the normalised L2 gradient).
    let run = |decoupled: bool| {
        let param = Tensor::full([4], 2.0, (Kind::Float, Device::Cpu));
        let zeros = || Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let coefficients = mgrun_torch_shim::AdamCoefficients {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            weight_decay: 0.5,
            eps: 1e-8,
            decoupled,
        };
        let count = Tensor::from(1.0f32);
        mgrun_torch_shim::fused_adam(&param, &zeros(), &zeros(), &zeros(), &count, coefficients).unwrap();
        param.double_value(&[0])
    };
    let adamw = run(true);
    assert!((adamw - 2.0 * (1.0 - 0.1 * 0.5)).abs() < 1e-6, "AdamW gave {adamw}");
    let adam = run(false);
    assert!((adam - (2.0 - 0.1)).abs() < 1e-5, "Adam gave {adam}");
}
