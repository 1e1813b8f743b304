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
