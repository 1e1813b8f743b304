// The few libtorch calls mgrun needs that tch does not expose. Every entry point is extern "C",
// catches C++ exceptions and reports them through mgrun_shim_last_error(). Only symbols of
// libtorch_cpu / libc10 are referenced, so a binary using this runs where the CUDA libraries are
// absent; the CUDA allocator is reached through c10's allocator registry at run time.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/ops/_fused_adam.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/DeviceType.h>

#include <cstdint>
#include <exception>
#include <string>

namespace {
thread_local std::string last_error;

int fail(const char* what) {
  last_error = what;
  return -1;
}

c10::DeviceType device_type(int cuda) {
  return cuda ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}
}  // namespace

extern "C" {

const char* mgrun_shim_last_error() { return last_error.c_str(); }

// A pinned (page-locked) host copy of `src`, as a new at::Tensor* that the caller owns (tch frees it
// with delete). at::Tensor::pin_memory() without the deprecated device argument: no warning.
int mgrun_pin_memory(void* src, void** out) {
  try {
    *out = new at::Tensor(static_cast<at::Tensor*>(src)->pin_memory());
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Makes `grad` the .grad of `param` (both at::Tensor*, as tch passes them). Backward then
// accumulates into it in place (AccumulateGrad adds into an existing grad when not building a
// graph), which lets gradients land directly in a flat buffer that `grad` is a view of.
int mgrun_set_grad(void* param, void* grad) {
  try {
    auto& p = *static_cast<at::Tensor*>(param);
    const auto& g = *static_cast<at::Tensor*>(grad);
    if (!g.sizes().equals(p.sizes()) || g.scalar_type() != p.scalar_type() || g.device() != p.device()) {
      return fail("set_grad: the gradient's shape, dtype or device differs from the parameter's");
    }
    p.mutable_grad() = g;
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// One Adam step as libtorch's fused kernel (torch.optim.Adam(fused=True)): a single pass over `param`,
// `grad`, `exp_avg` and `exp_avg_sq` (at::Tensor*, one flat buffer each), with torch.optim.Adam's
// coupled L2 weight decay. `step` is the f32 scalar step count, already incremented, as PyTorch keeps it.
int mgrun_fused_adam(void* param, void* grad, void* exp_avg, void* exp_avg_sq, void* step, double lr, double beta1,
                     double beta2, double weight_decay, double eps) {
  try {
    const auto& p = *static_cast<at::Tensor*>(param);
    const auto& g = *static_cast<at::Tensor*>(grad);
    const auto& m = *static_cast<at::Tensor*>(exp_avg);
    const auto& v = *static_cast<at::Tensor*>(exp_avg_sq);
    const auto& s = *static_cast<at::Tensor*>(step);
    at::_fused_adam_({p}, {g}, {m}, {v}, {}, {s}, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                     /*maximize=*/false);
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Enters a bf16 autocast region on the CUDA (cuda != 0) or CPU autocast key; stores what to
// restore on exit. The non-deprecated functions: no warnings.
int mgrun_autocast_enter_bf16(int cuda, int* was_enabled, int* previous_dtype) {
  try {
    const auto type = device_type(cuda);
    *was_enabled = at::autocast::is_autocast_enabled(type) ? 1 : 0;
    *previous_dtype = static_cast<int>(at::autocast::get_autocast_dtype(type));
    at::autocast::set_autocast_dtype(type, at::kBFloat16);
    at::autocast::set_autocast_enabled(type, true);
    at::autocast::increment_nesting();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Leaves the region entered by mgrun_autocast_enter_bf16; the outermost exit drops the cache of
// casted weights, as torch.autocast's __exit__ does.
int mgrun_autocast_exit(int cuda, int was_enabled, int previous_dtype) {
  try {
    const auto type = device_type(cuda);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(type, was_enabled != 0);
    at::autocast::set_autocast_dtype(type, static_cast<at::ScalarType>(previous_dtype));
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// 1 when autocast is on for the device type on this thread, 0 when off, -1 on error.
int mgrun_autocast_enabled(int cuda) {
  try {
    return at::autocast::is_autocast_enabled(device_type(cuda)) ? 1 : 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// Deterministic algorithms (errors on ops that have none), cuDNN deterministic, no cuDNN benchmark.
int mgrun_set_deterministic(int on) {
  try {
    auto& context = at::globalContext();
    context.setDeterministicAlgorithms(on != 0, /*warn_only=*/false);
    context.setDeterministicCuDNN(on != 0);
    context.setBenchmarkCuDNN(on == 0 ? context.benchmarkCuDNN() : false);
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// 1 when deterministic algorithms are on, 0 when off.
int mgrun_deterministic_enabled() { return at::globalContext().deterministicAlgorithms() ? 1 : 0; }

// Bytes currently allocated / peak allocated / reserved / peak reserved by the CUDA caching
// allocator on `device` (aggregate over pools), as torch.cuda.max_memory_allocated reports.
int mgrun_cuda_memory_stats(int device, int64_t* out4) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out4[0] = stats.allocated_bytes[all].current;
    out4[1] = stats.allocated_bytes[all].peak;
    out4[2] = stats.reserved_bytes[all].current;
    out4[3] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

int mgrun_cuda_reset_peak_memory(int device) {
  try {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

}  // extern "C"
