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
