//! A few libtorch C++ calls that `tch` does not expose, compiled from `src/shim.cpp`:
//!
//! - bf16 autocast on CUDA (or CPU) through the non-deprecated `at::autocast` functions, so logs
//!   get no per-call deprecation warnings (tch's own `autocast` prints one per call and only knows
//!   CUDA's default float16);
//! - deterministic algorithms (`at::globalContext().setDeterministicAlgorithms`, cuDNN);
//! - the CUDA caching allocator's memory statistics (what `torch.cuda.max_memory_allocated` reads);
//! - fused per-parameter passes: libtorch's fused Adam/AdamW kernels (not in tch's bindings), and
//!   DSP-Reg's step statistics as one multi-threaded CPU pass (the tensor path makes about 25).
//!
//! Only libtorch_cpu/libc10 symbols are linked: the CUDA allocator is looked up in c10's registry
//! at run time, so the same binary runs on machines without CUDA (the calls then return errors).

use anyhow::{bail, Result};
use std::ffi::CStr;
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int};
use tch::Device;

// The Rust side links the static library that build.rs compiles.
extern "C" {
    fn mgrun_shim_last_error() -> *const c_char;
    fn mgrun_set_grad(param: *mut std::ffi::c_void, grad: *mut std::ffi::c_void) -> c_int;
    fn mgrun_set_grad_ready_hook(
        param: *mut std::ffi::c_void,
        ready: GradReadyFn,
        context: *mut std::ffi::c_void,
        index: i64,
    ) -> c_int;
    fn mgrun_fused_adam(
        param: *mut std::ffi::c_void,
        grad: *mut std::ffi::c_void,
        exp_avg: *mut std::ffi::c_void,
        exp_avg_sq: *mut std::ffi::c_void,
        step: *mut std::ffi::c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        decoupled: c_int,
    ) -> c_int;
    fn mgrun_dsp_ratio_step(
        sums: *mut std::ffi::c_void,
        ema_variance: *mut std::ffi::c_void,
        ema_mean_sq: *mut std::ffi::c_void,
        theta: *mut std::ffi::c_void,
        theta0: *mut std::ffi::c_void,
        mask: *mut std::ffi::c_void,
        update: *mut std::ffi::c_void,
        coefficients: *const DspCoefficients,
        masked_score_sum: *mut f64,
    ) -> c_int;
    fn mgrun_pin_memory(src: *mut std::ffi::c_void, out: *mut *mut std::ffi::c_void) -> c_int;
    fn mgrun_autocast_enter_bf16(cuda: c_int, was_enabled: *mut c_int, previous_dtype: *mut c_int) -> c_int;
    fn mgrun_autocast_exit(cuda: c_int, was_enabled: c_int, previous_dtype: c_int) -> c_int;
    fn mgrun_autocast_enabled(cuda: c_int) -> c_int;
    fn mgrun_set_deterministic(on: c_int) -> c_int;
    fn mgrun_deterministic_enabled() -> c_int;
    fn mgrun_cuda_memory_stats(device: c_int, out4: *mut i64) -> c_int;
    fn mgrun_cuda_reset_peak_memory(device: c_int) -> c_int;
}

fn last_error(what: &str) -> anyhow::Error {
    // SAFETY: the shim returns a pointer to its thread-local, NUL-terminated error string.
    let message = unsafe { CStr::from_ptr(mgrun_shim_last_error()) }.to_string_lossy().into_owned();
    anyhow::anyhow!("libtorch: {what}: {message}")
}

/// A copy of the CPU tensor `t` in pinned (page-locked) host memory, for asynchronous copies to a
/// GPU. tch's `pin_memory(device)` passes libtorch's deprecated device argument, which logs a
/// warning at every call.
pub fn pin_memory(t: &tch::Tensor) -> Result<tch::Tensor> {
    let mut src = t.shallow_clone();
    let mut out: *mut std::ffi::c_void = std::ptr::null_mut();
    // SAFETY: `src` is a live at::Tensor handle; on success the shim stores a new heap-allocated
    // at::Tensor in `out`, which tch's Tensor takes over and frees.
    let rc = unsafe { mgrun_pin_memory(src.as_mut_ptr() as *mut _, &mut out) };
    if rc != 0 || out.is_null() {
        return Err(last_error("pin_memory"));
    }
    Ok(unsafe { tch::Tensor::from_ptr(out as *mut _) })
}

/// Coefficients of one Adam step, as `torch.optim.Adam` takes them.
#[derive(Debug, Clone, Copy)]
pub struct AdamCoefficients {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
    /// AdamW's decoupled decay `param *= 1 - lr * weight_decay` instead of Adam's coupled L2.
    pub decoupled: bool,
}

/// One Adam (or AdamW) step by libtorch's fused kernel (`torch.optim.Adam(fused=True)`,
/// `torch.optim.AdamW(fused=True)`): one pass over the parameters, gradient and both moments,
/// updated in place. `step` is the f32 scalar step count on the parameters' device, already
/// counting this step.
pub fn fused_adam(
    param: &tch::Tensor,
    grad: &tch::Tensor,
    exp_avg: &tch::Tensor,
    exp_avg_sq: &tch::Tensor,
    step: &tch::Tensor,
    c: AdamCoefficients,
) -> Result<()> {
    let mut handles = [param, grad, exp_avg, exp_avg_sq, step].map(|t| t.shallow_clone());
    let [p, g, m, v, s] = &mut handles;
    // SAFETY: the five pointers are live at::Tensor handles owned by `handles`, which outlive the
    // call; the shim only reads the handles (the kernel writes into the tensors' storage).
    let rc = unsafe {
        mgrun_fused_adam(
            p.as_mut_ptr() as *mut _,
            g.as_mut_ptr() as *mut _,
            m.as_mut_ptr() as *mut _,
            v.as_mut_ptr() as *mut _,
            s.as_mut_ptr() as *mut _,
            c.lr,
            c.beta1,
            c.beta2,
            c.weight_decay,
            c.eps,
            c_int::from(c.decoupled),
        )
    };
    if rc != 0 {
        return Err(last_error("fused Adam"));
    }
    Ok(())
}

/// The scalars of one DSP-Reg step for [`dsp_ratio_step`] (the C side's `MgrunDspCoefficients`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct DspCoefficients {
    /// Number of training domains K.
    pub k: f64,
    /// Of the cross-domain variance: K - 1 or K.
    pub denominator: f64,
    /// EMA decay.
    pub beta: f64,
    /// Bias correction 1 - beta^t of this step's EMAs.
    pub correction: f64,
    /// In the ratio score's denominator.
    pub epsilon: f64,
    /// The sigmoid weight's centre and temperature.
    pub tau: f64,
    pub temperature: f64,
    /// lambda_t (anchor, shrink) or gamma_t (gate) of this step; 0 = the plain mean gradient.
    pub strength: f64,
    /// 0: w = s; 1: w = sigmoid((s - tau) / temperature).
    pub sigmoid_weight: i32,
    /// 0 anchor, 1 shrink, 2 gate.
    pub mode: i32,
}

/// The flat buffers of one DSP-Reg step for [`dsp_ratio_step`]: contiguous f32 CPU tensors.
pub struct DspBuffers<'a> {
    /// [sum_e g_e; sum_e g_e^2], 2P values.
    pub sums: &'a tch::Tensor,
    /// The EMAs, updated in place.
    pub ema_variance: &'a tch::Tensor,
    pub ema_mean_sq: &'a tch::Tensor,
    pub theta: &'a tch::Tensor,
    /// The anchor (anchor mode only).
    pub theta0: Option<&'a tch::Tensor>,
    /// 1 where the weight applies, 0 for excluded parameters.
    pub mask: &'a tch::Tensor,
    /// Receives the update direction.
    pub update: &'a tch::Tensor,
}

/// DSP-Reg's statistics with the ratio score in one multi-threaded pass over the parameters, on the
/// CPU: the cross-domain mean and variance from the sums, the EMA updates, the score, the weight
/// and the update direction. Returns sum_i s_i * mask_i, added in fixed chunks so that it does not
/// depend on the thread count.
pub fn dsp_ratio_step(buffers: &DspBuffers<'_>, coefficients: &DspCoefficients) -> Result<f64> {
    let b = buffers;
    let mut handles = [b.sums, b.ema_variance, b.ema_mean_sq, b.theta, b.mask, b.update].map(|t| t.shallow_clone());
    let mut theta0 = b.theta0.map(|t| t.shallow_clone());
    let theta0_ptr = theta0.as_mut().map_or(std::ptr::null_mut(), |t| t.as_mut_ptr() as *mut std::ffi::c_void);
    let [sums, ema_variance, ema_mean_sq, theta, mask, update] = &mut handles;
    let mut masked_score_sum = 0.0f64;
    // SAFETY: every pointer is a live at::Tensor handle owned by `handles`/`theta0` (or null for
    // an absent anchor), which outlive the call; the shim checks devices, dtypes, sizes and
    // contiguity before touching the data, and writes only the EMAs, `update` and the sum.
    let rc = unsafe {
        mgrun_dsp_ratio_step(
            sums.as_mut_ptr() as *mut _,
            ema_variance.as_mut_ptr() as *mut _,
            ema_mean_sq.as_mut_ptr() as *mut _,
            theta.as_mut_ptr() as *mut _,
            theta0_ptr,
            mask.as_mut_ptr() as *mut _,
            update.as_mut_ptr() as *mut _,
            coefficients,
            &mut masked_score_sum,
        )
    };
    if rc != 0 {
        return Err(last_error("DSP-Reg statistics"));
    }
    Ok(masked_score_sum)
}

/// Makes `grad` the gradient of `param` (same shape, dtype and device). Later backward passes
/// accumulate into `grad`'s memory in place, so `grad` may be a view of a flat gradient buffer
/// (PyTorch DDP's `gradient_as_bucket_view`).
pub fn set_grad(param: &mut tch::Tensor, grad: &mut tch::Tensor) -> Result<()> {
    // SAFETY: both pointers are live at::Tensor handles owned by the tch tensors, which outlive
    // the call; the shim copies the handle (refcounted), it keeps no pointer.
    let rc = unsafe { mgrun_set_grad(param.as_mut_ptr() as *mut _, grad.as_mut_ptr() as *mut _) };
    if rc != 0 {
        return Err(last_error("set_grad"));
    }
    Ok(())
}

/// Called on the autograd thread once backward has accumulated the gradient of parameter `index`.
pub type GradReadyFn = extern "C" fn(context: *mut std::ffi::c_void, index: i64);

/// Registers `ready(context, index)` as `param`'s post-accumulate-grad hook (it replaces an earlier
/// one): every backward pass calls it once `param.grad` holds the pass's gradient.
///
/// # Safety
/// `context` must stay valid, and `ready` callable from the autograd thread, for as long as
/// `param` lives; `ready` must not unwind.
pub unsafe fn set_grad_ready_hook(
    param: &tch::Tensor,
    ready: GradReadyFn,
    context: *mut std::ffi::c_void,
    index: i64,
) -> Result<()> {
    // SAFETY: `param` is a live at::Tensor handle; the shim only reads it.
    let rc = mgrun_set_grad_ready_hook(param.as_ptr() as *mut _, ready, context, index);
    if rc != 0 {
        return Err(last_error("set_grad_ready_hook"));
    }
    Ok(())
}

/// Which autocast key a device uses: `Some(true)` CUDA, `Some(false)` CPU, `None` no autocast.
fn autocast_key(device: Device) -> Option<c_int> {
    match device {
        Device::Cuda(_) => Some(1),
        Device::Cpu => Some(0),
        _ => None,
    }
}

/// An active bf16 autocast region on this thread; dropping it restores the previous state.
/// Autocast state is thread-local in libtorch, hence not `Send`.
#[must_use = "autocast ends when the guard is dropped"]
pub struct AutocastGuard {
    cuda: c_int,
    was_enabled: c_int,
    previous_dtype: c_int,
    _not_send: PhantomData<*const ()>,
}

/// Runs the ops dispatched on this thread for `device` under bf16 autocast until the guard drops
/// (matmuls and convolutions in bf16, reductions and losses in fp32, as `torch.autocast`).
pub fn autocast_bf16(device: Device) -> Result<AutocastGuard> {
    let Some(cuda) = autocast_key(device) else {
        bail!("bf16 autocast: unsupported device {device:?} (CUDA or CPU only)");
    };
    let (mut was_enabled, mut previous_dtype) = (0, 0);
    // SAFETY: both out-pointers are valid for the call.
    if unsafe { mgrun_autocast_enter_bf16(cuda, &mut was_enabled, &mut previous_dtype) } != 0 {
        return Err(last_error("entering bf16 autocast"));
    }
    Ok(AutocastGuard { cuda, was_enabled, previous_dtype, _not_send: PhantomData })
}

impl Drop for AutocastGuard {
    fn drop(&mut self) {
        // SAFETY: plain values restored from the matching enter call.
        if unsafe { mgrun_autocast_exit(self.cuda, self.was_enabled, self.previous_dtype) } != 0 {
            eprintln!("mgrun: warning: {:#}", last_error("leaving bf16 autocast"));
        }
    }
}

/// Whether autocast is on for `device`'s autocast key on this thread.
pub fn autocast_enabled(device: Device) -> bool {
    // SAFETY: no pointers.
    autocast_key(device).is_some_and(|key| unsafe { mgrun_autocast_enabled(key) } == 1)
}

/// Deterministic mode for reproducibility runs: `torch.use_deterministic_algorithms(on)`, cuDNN
/// deterministic, and cuDNN benchmark off when `on`. CUDA's cuBLAS also needs
/// `CUBLAS_WORKSPACE_CONFIG=:4096:8` in the environment before its first use.
pub fn set_deterministic(on: bool) -> Result<()> {
    // SAFETY: no pointers.
    if unsafe { mgrun_set_deterministic(c_int::from(on)) } != 0 {
        return Err(last_error("setting deterministic algorithms"));
    }
    Ok(())
}

/// Whether deterministic algorithms are on (`torch.are_deterministic_algorithms_enabled()`).
pub fn deterministic_enabled() -> bool {
    // SAFETY: no pointers.
    unsafe { mgrun_deterministic_enabled() == 1 }
}

/// The CUDA caching allocator's byte counts for one device (all pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaMemoryStats {
    pub allocated: u64,
    pub peak_allocated: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
}

/// Memory statistics of CUDA device `index` (an error where CUDA is not loaded).
pub fn cuda_memory_stats(index: usize) -> Result<CudaMemoryStats> {
    let mut out = [0i64; 4];
    // SAFETY: `out` holds the 4 values the shim writes.
    if unsafe { mgrun_cuda_memory_stats(index as c_int, out.as_mut_ptr()) } != 0 {
        return Err(last_error(&format!("CUDA memory statistics of device {index}")));
    }
    let [allocated, peak_allocated, reserved, peak_reserved] = out.map(|v| v.max(0) as u64);
    Ok(CudaMemoryStats { allocated, peak_allocated, reserved, peak_reserved })
}

/// Starts a new peak of [`cuda_memory_stats`] for device `index`.
pub fn reset_cuda_peak_memory(index: usize) -> Result<()> {
    // SAFETY: no pointers.
    if unsafe { mgrun_cuda_reset_peak_memory(index as c_int) } != 0 {
        return Err(last_error(&format!("resetting the CUDA peak memory of device {index}")));
    }
    Ok(())
}
