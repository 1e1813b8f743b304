// The few libtorch calls mgrun needs that tch does not expose. Every entry point is extern "C",
// catches C++ exceptions and reports them through mgrun_shim_last_error(). Only symbols of
// libtorch_cpu / libc10 are referenced, so a binary using this runs where the CUDA libraries are
// absent; the CUDA allocator is reached through c10's allocator registry at run time.
#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/Parallel.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/DeviceType.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
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

// DSP-Reg's per-step statistics with the ratio score, fused into one pass over the P parameters
// (the tensor path in methods/src/dsp_reg.rs makes about 25). Mirrors the Rust repr(C) struct.
struct MgrunDspCoefficients {
  double k;                // number of training domains K
  double denominator;      // of the cross-domain variance: K - 1 or K
  double beta;             // EMA decay
  double correction;       // bias correction 1 - beta^t of this step's EMAs
  double epsilon;          // in the ratio score's denominator
  double tau;              // sigmoid weight's centre
  double temperature;      // sigmoid weight's temperature
  double strength;         // lambda_t (anchor, shrink) or gamma_t (gate); 0 = no penalty
  int32_t sigmoid_weight;  // 0: w = s, 1: w = sigmoid((s - tau) / temperature)
  int32_t mode;            // 0 anchor, 1 shrink, 2 gate
};

namespace {
struct DspBuffers {
  const float* sum;     // sum_e g_e
  const float* sum_sq;  // sum_e g_e^2
  float* ema_variance;
  float* ema_mean_sq;
  const float* theta;
  const float* theta0;  // anchor mode only
  const float* mask;
  float* update;
};

// Single-precision coefficients, as the tensor path's scalar arithmetic on f32 tensors uses them.
struct DspFloats {
  float inv_k, k, inv_denominator, beta, one_minus_beta, inv_correction, epsilon, tau, inv_temperature,
      twice_strength, strength;
};

// Eight floats in one register (GCC/Clang vector extension: AVX2 in the avx2 clone below, two SSE
// registers in the baseline one); arithmetic with a float scalar broadcasts it.
typedef float Floats8 __attribute__((vector_size(32)));
typedef float Floats4 __attribute__((vector_size(16)));
typedef double Doubles4 __attribute__((vector_size(32)));

inline Floats8 load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, Floats8 v) { std::memcpy(p, &v, sizeof v); }

inline float sigmoid_of(float x) { return 1.0f / (1.0f + std::exp(-x)); }

inline Floats8 sigmoid_of(Floats8 x) {
  for (int j = 0; j < 8; ++j) x[j] = sigmoid_of(x[j]);
  return x;
}

// One parameter, or eight (F = float or Floats8): the EMAs in place, the update direction, and the
// score times the mask as the result.
template <typename F, int SigmoidWeight, int Mode>
inline __attribute__((always_inline)) F dsp_lanes(F sum, F sum_sq, F& ema_v, F& ema_m, F theta, F theta0, F mask,
                                                  F& update, const DspFloats& c) {
  const F mean = sum * c.inv_k;
  F variance = (sum_sq - mean * mean * c.k) * c.inv_denominator;
  const F zero = F{};
  variance = variance < zero ? zero : variance;  // clamp_min(0), NaN kept
  ema_v = ema_v * c.beta + variance * c.one_minus_beta;
  ema_m = ema_m * c.beta + mean * mean * c.one_minus_beta;
  const F v = ema_v * c.inv_correction;
  const F score = v / (v + ema_m * c.inv_correction + c.epsilon);
  F w = SigmoidWeight ? sigmoid_of((score - c.tau) * c.inv_temperature) : score;
  w = w * mask;
  if (Mode == 0) {
    update = mean + w * (theta - theta0) * c.twice_strength;
  } else if (Mode == 1) {
    update = mean + w * theta * c.twice_strength;
  } else if (Mode == 2) {
    update = (1.0f - w * c.strength) * mean;
  } else {
    update = mean;  // no penalty this step
  }
  return score * mask;
}

// Elements [begin, end), eight at a time; the masked scores are summed in f64 lanes, so the
// result depends only on [begin, end).
template <int SigmoidWeight, int Mode>
inline __attribute__((always_inline)) double dsp_range_of(const DspBuffers& b, const DspFloats& coefficients,
                                                          int64_t begin, int64_t end) {
  // A local copy: the stores below cannot alias it, so the coefficients stay in registers.
  const DspFloats c = coefficients;
  const float* __restrict sum = b.sum;
  const float* __restrict sum_sq = b.sum_sq;
  float* __restrict ema_variance = b.ema_variance;
  float* __restrict ema_mean_sq = b.ema_mean_sq;
  const float* __restrict theta = b.theta;
  const float* __restrict mask = b.mask;
  float* __restrict update = b.update;
  Doubles4 low = {0.0, 0.0, 0.0, 0.0};
  Doubles4 high = low;
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    Floats8 ema_v = load8(ema_variance + i);
    Floats8 ema_m = load8(ema_mean_sq + i);
    Floats8 out;
    const Floats8 theta0 = Mode == 0 ? load8(b.theta0 + i) : Floats8{};
    const Floats8 scores = dsp_lanes<Floats8, SigmoidWeight, Mode>(
        load8(sum + i), load8(sum_sq + i), ema_v, ema_m, load8(theta + i), theta0, load8(mask + i), out, c);
    store8(ema_variance + i, ema_v);
    store8(ema_mean_sq + i, ema_m);
    store8(update + i, out);
    Floats4 halves[2];
    std::memcpy(halves, &scores, sizeof scores);
    low += __builtin_convertvector(halves[0], Doubles4);
    high += __builtin_convertvector(halves[1], Doubles4);
  }
  double total = 0.0;
  for (; i < end; ++i) {
    float ema_v = ema_variance[i], ema_m = ema_mean_sq[i], out = 0.0f;
    const float theta0 = Mode == 0 ? b.theta0[i] : 0.0f;
    total += dsp_lanes<float, SigmoidWeight, Mode>(sum[i], sum_sq[i], ema_v, ema_m, theta[i], theta0, mask[i], out, c);
    ema_variance[i] = ema_v;
    ema_mean_sq[i] = ema_m;
    update[i] = out;
  }
  for (int j = 0; j < 4; ++j) total += low[j] + high[j];
  return total;
}

// AVX2 where the CPU has it, chosen once at load time; the baseline build elsewhere.
__attribute__((target_clones("avx2", "default"))) double dsp_range(const DspBuffers& b, const DspFloats& c,
                                                                  int sigmoid_weight, int mode, int64_t begin,
                                                                  int64_t end) {
  switch (mode * 2 + sigmoid_weight) {
    case 0: return dsp_range_of<0, 0>(b, c, begin, end);
    case 1: return dsp_range_of<1, 0>(b, c, begin, end);
    case 2: return dsp_range_of<0, 1>(b, c, begin, end);
    case 3: return dsp_range_of<1, 1>(b, c, begin, end);
    case 4: return dsp_range_of<0, 2>(b, c, begin, end);
    case 5: return dsp_range_of<1, 2>(b, c, begin, end);
    case 6: return dsp_range_of<0, 3>(b, c, begin, end);
    default: return dsp_range_of<1, 3>(b, c, begin, end);
  }
}

// Fixed chunks: the masked score sum is added in the same order whatever the thread count.
constexpr int64_t kDspChunk = 1 << 15;

bool is_cpu_f32(const at::Tensor& t, int64_t numel) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
         t.numel() == numel;
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

// Gradient-ready hooks: after backward has accumulated a parameter's gradient into its .grad
// (torch's register_post_accumulate_grad_hook), call `ready(context, index)`. DDP-style overlap
// starts reducing a bucket once all its parameters have reported.
typedef void (*mgrun_grad_ready_fn)(void* context, int64_t index);

namespace {
struct GradReadyHook : torch::autograd::PostAccumulateGradHook {
  GradReadyHook(mgrun_grad_ready_fn ready, void* context, int64_t index)
      : ready(ready), context(context), index(index) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { ready(context, index); }
  mgrun_grad_ready_fn ready;
  void* context;
  int64_t index;
};
}  // namespace

extern "C" int mgrun_set_grad_ready_hook(void* param, mgrun_grad_ready_fn ready, void* context, int64_t index) {
  try {
    const auto& p = *static_cast<at::Tensor*>(param);
    if (!p.is_leaf() || !p.requires_grad()) {
      return fail("grad-ready hook: the tensor is not a leaf that requires grad");
    }
    // One hook slot per tensor (it holds only Python's hooks otherwise, and mgrun has none).
    torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<GradReadyHook>(ready, context, index));
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

// One Adam step as libtorch's fused kernel (torch.optim.Adam(fused=True)): a single pass over `param`,
// `grad`, `exp_avg` and `exp_avg_sq` (at::Tensor*, one flat buffer each). Weight decay is
// torch.optim.Adam's coupled L2, or AdamW's decoupled decay when `decoupled` != 0. `step` is the f32
// scalar step count on the parameters' device, already incremented, as PyTorch keeps it.
int mgrun_fused_adam(void* param, void* grad, void* exp_avg, void* exp_avg_sq, void* step, double lr, double beta1,
                     double beta2, double weight_decay, double eps, int decoupled) {
  try {
    const auto& p = *static_cast<at::Tensor*>(param);
    const auto& g = *static_cast<at::Tensor*>(grad);
    const auto& m = *static_cast<at::Tensor*>(exp_avg);
    const auto& v = *static_cast<at::Tensor*>(exp_avg_sq);
    const auto& s = *static_cast<at::Tensor*>(step);
    if (decoupled) {
      at::_fused_adamw_({p}, {g}, {m}, {v}, {}, {s}, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                        /*maximize=*/false);
    } else {
      at::_fused_adam_({p}, {g}, {m}, {v}, {}, {s}, lr, beta1, beta2, weight_decay, eps, /*amsgrad=*/false,
                       /*maximize=*/false);
    }
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

// DSP-Reg's step statistics in one pass (see MgrunDspCoefficients): from `sums` = [sum_e g_e; sum_e
// g_e^2] (2P), updates the EMAs `ema_variance` and `ema_mean_sq` in place and writes the update
// direction to `update` (all at::Tensor*, contiguous f32 on the CPU; `theta0` may be null unless
// mode is anchor). `masked_score_sum` receives sum_i s_i * mask_i.
int mgrun_dsp_ratio_step(void* sums, void* ema_variance, void* ema_mean_sq, void* theta, void* theta0, void* mask,
                         void* update, const MgrunDspCoefficients* coefficients, double* masked_score_sum) {
  try {
    const auto& sums_t = *static_cast<at::Tensor*>(sums);
    const auto& theta_t = *static_cast<at::Tensor*>(theta);
    const int64_t n = theta_t.numel();
    const auto& ev = *static_cast<at::Tensor*>(ema_variance);
    const auto& em = *static_cast<at::Tensor*>(ema_mean_sq);
    const auto& mask_t = *static_cast<at::Tensor*>(mask);
    const auto& update_t = *static_cast<at::Tensor*>(update);
    const MgrunDspCoefficients& c = *coefficients;
    const bool penalty = c.strength != 0.0;
    const int mode = penalty ? c.mode : 3;
    const at::Tensor* theta0_t = theta0 ? static_cast<at::Tensor*>(theta0) : nullptr;
    if (!is_cpu_f32(sums_t, 2 * n) || !is_cpu_f32(theta_t, n) || !is_cpu_f32(ev, n) || !is_cpu_f32(em, n) ||
        !is_cpu_f32(mask_t, n) || !is_cpu_f32(update_t, n) || (mode == 0 && !(theta0_t && is_cpu_f32(*theta0_t, n)))) {
      return fail("dsp_ratio_step: every buffer must be a contiguous f32 CPU tensor of the parameters' size");
    }
    DspBuffers b{sums_t.data_ptr<float>(),    sums_t.data_ptr<float>() + n, ev.data_ptr<float>(),
                 em.data_ptr<float>(),        theta_t.data_ptr<float>(),    mode == 0 ? theta0_t->data_ptr<float>() : nullptr,
                 mask_t.data_ptr<float>(),    update_t.data_ptr<float>()};
    DspFloats f{static_cast<float>(1.0 / c.k),
                static_cast<float>(c.k),
                static_cast<float>(1.0 / c.denominator),
                static_cast<float>(c.beta),
                static_cast<float>(1.0 - c.beta),
                static_cast<float>(1.0 / c.correction),
                static_cast<float>(c.epsilon),
                static_cast<float>(c.tau),
                static_cast<float>(1.0 / c.temperature),
                static_cast<float>(2.0 * c.strength),
                static_cast<float>(c.strength)};
    const int64_t chunks = (n + kDspChunk - 1) / kDspChunk;
    std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t chunk = first; chunk < last; ++chunk) {
        const int64_t begin = chunk * kDspChunk;
        const int64_t end = std::min(n, begin + kDspChunk);
        partial[static_cast<size_t>(chunk)] = dsp_range(b, f, c.sigmoid_weight != 0, mode, begin, end);
      }
    });
    double total = 0.0;
    for (double p : partial) total += p;
    *masked_score_sum = total;
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  }
}

}  // extern "C"
