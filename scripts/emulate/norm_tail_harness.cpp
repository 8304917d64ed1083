// Runs the normalization tail's three kernels (csrc/kernels_norm_tail.cu: statistics per (row,
// chunk), the per-(n, group) merge, normalize + affine + activation) on the CPU, one host thread
// per CUDA thread (emu_shim.h, warp shuffles emulated), and checks every output element against
// a float64 GroupNorm followed by the activation:
//   - float32, bfloat16 and float16 tensors; rows of S elements from 1 to past three chunks,
//     S % 8 == 0 and not (the 16-byte vector form, VEC, where the binding would take it, and
//     the strided scalar form on every S, as the binding runs it when S % 8 != 0), l2_60's odd
//     S = 31 x 63 x 63 among them;
//   - one group, several, and one channel per group (InstanceNorm); weight and bias present or
//     absent; no activation, ReLU, LeakyReLU, GELU (erf and tanh), SiLU, Sigmoid, Tanh,
//     Hardswish;
//   - values with a mean of 3 and a spread of 1, so that the variance is tested against
//     cancellation.
// The reference rounds the normalized value to the tensor's dtype before the activation and
// the result after it, as PyTorch's two ops do; the bounds allow a few units in the last place
// of the dtype (float32: 2e-5 + 1e-5 |ref|), plus float32's rounding of a * mean, which the kernel's
// a * x + (bias - a * mean) carries (as PyTorch's). Outputs are NaN-poisoned first and must all be
// written; input and output are heap buffers of exactly their size under AddressSanitizer.
//
//   (tests/test_emulated_norm_tail.py cuts csrc/kernels_norm_tail.cu's launch code off into
//    norm_tail_emu.cuh, builds this file with g++ -std=c++20 -fsanitize=address and runs it)
//   norm_tail_harness [EVERY]      EVERY: run every EVERY-th case only (default 1: all)
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "emu_shim.h"
#include "emu_io.h"
#include "norm_tail_emu.cuh"

using namespace ct3d;

namespace {

struct Case {
  int dtype, N, C, groups, act, act_flag, affine;  // affine: bit 0 weight, bit 1 bias
  int64_t S;
  bool vec;
};

float round_to(float v, int dtype) {
  if (dtype == kBF16) return __bfloat162float(__float2bfloat16_rn(v));
  if (dtype == kF16) return __half2float(__float2half_rn(v));
  return v;
}

double act64(double x, int act, int flag, double alpha) {
  switch (act) {
    case OP_RELU: return x < 0 ? 0 : x;
    case OP_LEAKY_RELU: return x > 0 ? x : x * alpha;
    case OP_GELU:
      return flag ? 0.5 * x * (1 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
                  : 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case OP_SILU: return x / (1 + std::exp(-x));
    case OP_SIGMOID: return 1 / (1 + std::exp(-x));
    case OP_TANH: return std::tanh(x);
    case OP_HARDSWISH: return x * std::min(std::max(x + 3, 0.0), 6.0) / 6;
    default: return x;
  }
}

int esize(int dtype) { return dtype == kF32 ? 4 : 2; }

float load_elem(const void* p, int64_t i, int dtype) {
  if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == kF16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

void store_elem(void* p, int64_t i, float v, int dtype) {
  if (dtype == kBF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else if (dtype == kF16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

template <typename T>
void launch(const NormTailParams& p) {
  const int64_t grid = p.rows * p.chunks;
  const int64_t n_groups = p.rows / p.C * p.groups;
  std::vector<EmuWarp> warps(kNormThreads / 32);
  emu_warps = warps.data();
  if (p.vec) {
    run_grid<kNormThreads>(grid, 1, [&] { norm_stats_kernel<T, true>(p); });
  } else {
    run_grid<kNormThreads>(grid, 1, [&] { norm_stats_kernel<T, false>(p); });
  }
  run_grid<kFinalizeWarps * 32>((n_groups + kFinalizeWarps - 1) / kFinalizeWarps, 1,
                                [&] { norm_finalize_kernel(p, n_groups); });
  // the apply kernel of the activation, picked as launch_typed picks it
  const int code = norm_act_code(p.act, p.act_flag);
  const NormKernel apply = p.vec ? norm_apply_for<T, true>(code) : norm_apply_for<T, false>(code);
  run_grid<kNormThreads>(grid, 1, [&] { apply(p); });
}

// Runs one case; returns the worst error over the bound (<= 1 passes), or 1e30 for an element
// left unwritten.
double run_case(const Case& cs, std::mt19937& rng) {
  const int64_t rows = static_cast<int64_t>(cs.N) * cs.C, n = rows * cs.S;
  const int es = esize(cs.dtype);
  void* x = std::aligned_alloc(16, (n * es + 15) / 16 * 16);
  void* out = std::aligned_alloc(16, (n * es + 15) / 16 * 16);
  std::normal_distribution<float> g(3.0f, 1.0f);
  for (int64_t i = 0; i < n; ++i) store_elem(x, i, g(rng), cs.dtype);
  for (int64_t i = 0; i < n; ++i) store_elem(out, i, NAN, cs.dtype);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  std::vector<float> w(cs.C), b(cs.C);
  for (int c = 0; c < cs.C; ++c) {
    w[c] = u(rng);
    b[c] = u(rng) - 1.0f;
  }
  float* wp = (cs.affine & 1) ? static_cast<float*>(std::malloc(cs.C * 4)) : nullptr;
  float* bp = (cs.affine & 2) ? static_cast<float*>(std::malloc(cs.C * 4)) : nullptr;
  if (wp) std::memcpy(wp, w.data(), cs.C * 4);
  if (bp) std::memcpy(bp, b.data(), cs.C * 4);
  NormTailParams p{};
  p.x = x;
  p.out = out;
  p.weight = wp;
  p.bias = bp;
  p.rows = rows;
  p.S = cs.S;
  p.C = cs.C;
  p.groups = cs.groups;
  p.dtype = cs.dtype;
  p.chunks = static_cast<int32_t>((cs.S + norm_chunk(cs.dtype) - 1) / norm_chunk(cs.dtype));
  p.act = cs.act;
  p.act_flag = cs.act_flag;
  p.alpha = 0.125f;
  p.eps = 1e-5f;
  p.vec = cs.vec ? 1 : 0;
  std::vector<float> partial(rows * p.chunks * 3), stats(cs.N * cs.groups * 2);
  p.partial = partial.data();
  p.stats = stats.data();
  switch (cs.dtype) {
    case kF32: launch<float>(p); break;
    case kBF16: launch<__nv_bfloat16>(p); break;
    default: launch<__half>(p); break;
  }
  const double rtol = cs.dtype == kF32 ? 1e-5 : cs.dtype == kBF16 ? 1.6e-2 : 2e-3;
  const double atol = cs.dtype == kF32 ? 2e-5 : cs.dtype == kBF16 ? 1e-2 : 2e-3;
  const int64_t cg = cs.C / cs.groups, span = cg * cs.S;
  double worst = 0.0;
  for (int64_t gi = 0; gi < static_cast<int64_t>(cs.N) * cs.groups; ++gi) {
    const int64_t first = gi * span;  // a group's channels are consecutive rows
    double mean = 0.0, m2 = 0.0;
    for (int64_t i = 0; i < span; ++i) mean += load_elem(x, first + i, cs.dtype);
    mean /= static_cast<double>(span);
    for (int64_t i = 0; i < span; ++i) {
      const double d = load_elem(x, first + i, cs.dtype) - mean;
      m2 += d * d;
    }
    const double rstd = 1.0 / std::sqrt(m2 / static_cast<double>(span) + 1e-5);
    for (int64_t i = 0; i < span; ++i) {
      const int c = static_cast<int>((gi % cs.groups) * cg + i / cs.S);
      double y = (load_elem(x, first + i, cs.dtype) - mean) * rstd;
      if (cs.affine & 1) y *= w[c];
      if (cs.affine & 2) y += b[c];
      double ref = y;
      if (cs.act) ref = act64(round_to(static_cast<float>(y), cs.dtype), cs.act, cs.act_flag, 0.125);
      const double got = load_elem(out, first + i, cs.dtype);
      if (std::isnan(got)) return 1e30;
      // the kernel's a * x + b with b = bias - a * mean in float (PyTorch's form): where
      // x - mean is small against mean, the result carries float32's rounding of a * mean
      // (groups of one element: rstd = 1 / sqrt(eps), the output 0 up to that rounding)
      const double a = rstd * ((cs.affine & 1) ? w[c] : 1.0f);
      const double cancel = 4.0 * 1.2e-7 * std::fabs(a * mean);
      const double over = std::fabs(got - ref) / (atol + cancel + rtol * std::fabs(ref));
      if (over > worst) worst = over;
    }
  }
  std::free(x);
  std::free(out);
  std::free(wp);
  std::free(bp);
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  const int every = argc > 1 ? std::atoi(argv[1]) : 1;
  std::vector<Case> cases;
  // l2_60's rows (S = 31 x 63 x 63, odd: the strided form) with its GroupNorm(4) -> Hardswish,
  // first, so that every stride runs it
  cases.push_back({kF32, 1, 4, 1, OP_HARDSWISH, 0, 3, 31 * 63 * 63, false});
  cases.push_back({kBF16, 1, 4, 1, OP_HARDSWISH, 0, 3, 31 * 63 * 63, false});
  const int dtypes[] = {kF32, kBF16, kF16};
  const int64_t sizes[] = {1, 7, 9, 255, 257, 2049, 8191, 8192, 8200, 16383, 16389, 3 * 8192 + 123};
  const int acts[][2] = {{0, 0},         {OP_RELU, 0},    {OP_LEAKY_RELU, 0}, {OP_GELU, 0},
                         {OP_GELU, 1},   {OP_SILU, 0},    {OP_SIGMOID, 0},    {OP_TANH, 0},
                         {OP_HARDSWISH, 0}};
  const int shapes[][3] = {{2, 4, 1}, {1, 8, 2}, {2, 3, 3}};  // N, C, groups (3 = InstanceNorm)
  for (int dt : dtypes)
    for (int64_t S : sizes)
      for (const auto& sh : shapes)
        for (const auto& a : acts)
          for (int affine = 0; affine < 4; affine += 3)  // none, weight and bias
            for (int vec = 0; vec < 2; ++vec) {
              if (vec && S % 8 != 0) continue;  // the binding's rule for the 16-byte form
              cases.push_back({dt, sh[0], sh[1], sh[2], a[0], a[1], affine, S, vec == 1});
            }
  std::mt19937 rng(1234);
  int run = 0, failed = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (i >= 2 && i % every != 0) continue;
    const Case& cs = cases[i];
    const double worst = run_case(cs, rng);
    ++run;
    const bool ok = worst <= 1.0;
    failed += !ok;
    if (!ok || i < 2) {
      std::printf("%s dtype %d N %d C %d groups %d S %lld act %d/%d affine %d %s: worst %.3g of "
                  "the bound%s\n",
                  ok ? "ok  " : "FAIL", cs.dtype, cs.N, cs.C, cs.groups,
                  static_cast<long long>(cs.S), cs.act, cs.act_flag, cs.affine,
                  cs.vec ? "vec" : "strided", worst, worst >= 1e30 ? " (unwritten)" : "");
    }
  }
  std::printf("norm_tail: %d cases, %d failed\n", run, failed);
  return failed ? 1 : 0;
}
