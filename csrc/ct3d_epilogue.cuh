// The epilogue interpreter: runs a decoded program (ct3d_params.h, struct Epilogue) on a tile
// of output elements in FP32, with shared-memory tiles as registers. No torch header.
//
// Each function mirrors the PyTorch op the reference runs (ct3d_fx/ops.py, _run_program),
// computed in float32 the way PyTorch's CUDA kernels compute float/half/bfloat16 inputs
// ("opmath" float): the result differs from the unfused model only by the rounding of
// intermediates to a half dtype, which the fused kernel does not do.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "ct3d_params.h"

namespace ct3d {

__device__ __forceinline__ float load_as_float(const void* ptr, int64_t off, int dtype) {
  switch (dtype) {
    case kF16:
      return __half2float(static_cast<const __half*>(ptr)[off]);
    case kBF16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[off]);
    case kF64:
      return static_cast<float>(static_cast<const double*>(ptr)[off]);
    default:
      return static_cast<const float*>(ptr)[off];
  }
}

__device__ __forceinline__ void store_from_float(void* ptr, int64_t off, float v, int dtype) {
  switch (dtype) {
    case kF16:
      static_cast<__half*>(ptr)[off] = __float2half_rn(v);
      break;
    case kBF16:
      static_cast<__nv_bfloat16*>(ptr)[off] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(ptr)[off] = v;
      break;
  }
}

// Element (n, c, d, h, w) of an epilogue tensor (its strides are those of the expanded view).
__device__ __forceinline__ float load_slot(const Slot& s, int n, int c, int d, int h, int w) {
  const int64_t off = static_cast<int64_t>(n) * s.s[0] + static_cast<int64_t>(c) * s.s[1] +
                      static_cast<int64_t>(d) * s.s[2] + static_cast<int64_t>(h) * s.s[3] +
                      static_cast<int64_t>(w) * s.s[4];
  return load_as_float(s.ptr, off, s.dtype);
}

// Where element i of this thread's share of the output tile lives, and whether it is a real
// output element (tiles are partial at the edges).
struct ElemPos {
  int idx;   // index into a tile register
  bool ok;   // inside the output
  int col;   // column of the tile (output channel co0 + col of the CTA's group)
  int n, c, d, h, w;  // output coordinates (c: global output channel)
  int64_t yoff;       // offset of the element in y (elements; valid where ok)
};

// A slot whose value depends on the channel alone (per-channel vectors, BatchNorm statistics,
// PReLU weights, 0-d and one-element tensors): its expanded view has stride 0 in n, d, h, w.
__host__ __device__ __forceinline__ bool slot_per_channel(const Slot& s) {
  return s.s[0] == 0 && s.s[2] == 0 && s.s[3] == 0 && s.s[4] == 0;
}

// Reads every per-channel slot once per CTA, for the COLS output channels chan0 .. chan0 +
// COLS - 1 of the tile (columns at or past `ncols` are outside the group: 0), into
// colv[slot * COLS + col]. The program then reads these values from shared memory instead
// of computing a 64-bit offset and issuing a global load per element. Needs a barrier
// before run_program.
template <int COLS>
__device__ __forceinline__ void load_channel_slots(const Epilogue& E, float* colv, int chan0,
                                                   int ncols, int tid, int nthreads) {
  const int total = E.n_slots * COLS;
  for (int i = tid; i < total; i += nthreads) {
    const int j = i / COLS, c = i - j * COLS;
    const Slot& s = E.slot[j];
    if (slot_per_channel(s)) {
      colv[i] = c < ncols ? load_as_float(s.ptr, static_cast<int64_t>(chan0 + c) * s.s[1], s.dtype)
                          : 0.0f;
    }
  }
}

// Runs the decoded program on the output tile. `buf` holds E.n_regs tile registers of `tile`
// floats each; register 0 holds the convolution output plus bias. Every thread handles the
// same PER elements (pos(i), i < PER) for every instruction, so no barrier is needed between
// instructions, except around SOFTMAX and LAYER_NORM, which read whole rows or W lines of the
// tile (`rows()`). Instruction-outer, element-inner: the opcode switch runs once per instruction.
// CT3D_EACH runs one element at a time (constants, and operands read from global memory);
// the ops on tile registers use CT3D_MAP1 / CT3D_MAP2 below.
#define CT3D_EACH(...)                   \
  _Pragma("unroll 4")                    \
  for (int i_ = 0; i_ < PER; ++i_) {     \
    const ElemPos q = pos(i_);           \
    __VA_ARGS__;                         \
  }

// Elementwise ops in two phases per batch of kMapBatch elements: the operands of every element
// of the batch are read first (into registers x, y; CT3D_MAP1: x alone), then every result is
// computed and stored. A store to D and a load of A may address the same tile register, so the
// compiler keeps an element-at-a-time loop in program order: one shared-memory round trip per
// element and instruction, which left the program a quarter of the kernel's time on l2_100
// (2 instructions) and half on l2_20 (5). Within one thread a batch's loads never read what its stores write
// (element j only ever writes index idx_j of D and reads idx_j of A and B), so the order is safe.
#define CT3D_MAP2(SRC_A, SRC_B, ...)                         \
  _Pragma("unroll 1")                                        \
  for (int i0_ = 0; i0_ < PER; i0_ += kMapBatch) {           \
    float xa_[kMapBatch], xb_[kMapBatch];                    \
    _Pragma("unroll")                                        \
    for (int j_ = 0; j_ < kMapBatch; ++j_) {                 \
      const ElemPos q = pos(i0_ + j_);                       \
      xa_[j_] = (SRC_A);                                     \
      xb_[j_] = (SRC_B);                                     \
    }                                                        \
    _Pragma("unroll")                                        \
    for (int j_ = 0; j_ < kMapBatch; ++j_) {                 \
      const ElemPos q = pos(i0_ + j_);                       \
      const float x = xa_[j_], y = xb_[j_];                  \
      (void)y;                                               \
      D[q.idx] = (__VA_ARGS__);                              \
    }                                                        \
  }
// One operand: the second reads nothing (the compiler drops it).
#define CT3D_MAP1(SRC_A, ...) CT3D_MAP2(SRC_A, 0.0f, __VA_ARGS__)

// torch.clamp on a float: NaN passes through, min wins over max.
__device__ __forceinline__ float clamp_keep_nan(float x, float lo, float hi) {
  const float r = x < lo ? lo : x;
  return r > hi ? hi : r;
}

// The elementwise ops with more than one operation, shared by run_program and the epilogue
// pass's vector kernels (ct3d_pass_lite.cuh): one definition of each op's float arithmetic.
__device__ __forceinline__ float op_relu(float x) { return x < 0.0f ? 0.0f : x; }  // keeps NaN
__device__ __forceinline__ float op_leaky_relu(float x, float slope) {
  return x > 0.0f ? x : x * slope;
}
__device__ __forceinline__ float op_prelu(float x, float wt) { return x > 0.0f ? x : wt * x; }
__device__ __forceinline__ float op_elu(float x, float alpha) {
  return x > 0.0f ? x : alpha * expm1f(x);
}
__device__ __forceinline__ float op_celu(float x, float alpha) {
  return x > 0.0f ? x : alpha * expm1f(x / alpha);
}
__device__ __forceinline__ float op_selu(float x) {
  const float alpha = 1.6732632423543772848170429916717f;
  const float scale = 1.0507009873554804934193349852946f;
  return x > 0.0f ? scale * x : scale * alpha * expm1f(x);
}
__device__ __forceinline__ float op_gelu_tanh(float x) {
  const float k0 = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * x * (1.0f + tanhf(k0 * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float op_gelu_erf(float x) {
  return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}
__device__ __forceinline__ float op_silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float op_mish(float x) { return x * tanhf(log1pf(expf(x))); }
__device__ __forceinline__ float op_hardswish(float x) {
  return x * fminf(fmaxf(x + 3.0f, 0.0f), 6.0f) / 6.0f;
}
__device__ __forceinline__ float op_hardsigmoid(float x) {
  return fminf(fmaxf(x + 3.0f, 0.0f), 6.0f) / 6.0f;
}
__device__ __forceinline__ float op_hardtanh(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}
__device__ __forceinline__ float op_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float op_softplus(float x, float beta, float threshold) {
  return (x * beta > threshold) ? x : log1pf(expf(x * beta)) / beta;
}
// Eval-mode BatchNorm of one element from its channel's statistics (affine: weight and bias).
__device__ __forceinline__ float op_batch_norm(float x, float mean, float var, float wt,
                                               float bs, float eps, bool affine) {
  const float r = (x - mean) * rsqrtf(var + eps);
  return affine ? r * wt + bs : r;
}

// LOAD_TENSOR of a tensor that varies over the output (a full-size side input, l2_26): the
// loads go out in batches of up to 16 per thread before any result is written, with the dtype
// switch outside the batch. One load in flight per element (the CT3D_EACH loop keeps about 4)
// left such epilogues latency-bound: ~4 KB in flight per multiprocessor against the ~25 KB
// that HBM3e bandwidth x latency asks for.
template <typename T>
__device__ __forceinline__ float elem_to_float(T v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(v);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __bfloat162float(v);
  } else {
    return static_cast<float>(v);
  }
}

// The other way: float -> T, round to nearest even (as PyTorch's casts).
template <typename T>
__device__ __forceinline__ T elem_from_float(float v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(v);
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(v);
  } else {
    return v;
  }
}

// The 16 bits of a half type (low bits of `bits`) -> float, and float -> those 16 bits rounded
// to nearest even (as elem_from_float).
template <typename T>
__device__ __forceinline__ float half_bits_to_float(uint32_t bits) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  } else {
    return __uint_as_float(bits << 16);
  }
}
template <typename T>
__device__ __forceinline__ uint32_t float_to_half_bits(float v) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half_as_ushort(__float2half_rn(v));
  } else {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

// A Pos with a `staged(i)` method (the epilogue pass) holds the values of the slot marked
// like_y == 2 in shared memory: element i of the thread is pos.staged(i).
template <class P, class = void>
struct PosStages : std::false_type {};
template <class P>
struct PosStages<P, decltype(void(std::declval<const P&>().staged(0)))> : std::true_type {};

template <int PER, int BATCH, class Pos>
__device__ __forceinline__ void load_tensor_batched(const Slot& s, float* D, Pos pos) {
  constexpr int kBatch = PER % BATCH == 0 ? BATCH : PER % 8 == 0 ? 8 : PER % 4 == 0 ? 4 : 1;
  if constexpr (PosStages<Pos>::value) {
    if (s.like_y == 2) {
#pragma unroll 4
      for (int i = 0; i < PER; ++i) D[pos(i).idx] = pos.staged(i);
      return;
    }
  }
  auto run = [&](const auto* ptr) {
    using T = typename std::remove_const<typename std::remove_pointer<decltype(ptr)>::type>::type;
#pragma unroll 1
    for (int i0 = 0; i0 < PER; i0 += kBatch) {
      float v[kBatch];
      int idx[kBatch];
      if (s.like_y) {  // laid out like the output: the offset the store uses
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const ElemPos q = pos(i0 + j);
          idx[j] = q.idx;
          v[j] = q.ok ? elem_to_float<T>(ptr[q.yoff]) : 0.0f;
        }
      } else {
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const ElemPos q = pos(i0 + j);
          idx[j] = q.idx;
          const int64_t off =
              static_cast<int64_t>(q.n) * s.s[0] + static_cast<int64_t>(q.c) * s.s[1] +
              static_cast<int64_t>(q.d) * s.s[2] + static_cast<int64_t>(q.h) * s.s[3] +
              static_cast<int64_t>(q.w) * s.s[4];
          v[j] = q.ok ? elem_to_float<T>(ptr[off]) : 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) D[idx[j]] = v[j];
    }
  };
  switch (s.dtype) {
    case kF16:
      run(static_cast<const __half*>(s.ptr));
      break;
    case kBF16:
      run(static_cast<const __nv_bfloat16*>(s.ptr));
      break;
    case kF64:
      run(static_cast<const double*>(s.ptr));
      break;
    default:
      run(static_cast<const float*>(s.ptr));
      break;
  }
}

// The tile as rows of channels, for SOFTMAX, which combines the channels of one output voxel,
// and LAYER_NORM, which combines the voxels of one W line: the tile's element (row m, column c)
// is register[c * ld + m] (every kernel's layout); `rows` voxels, `ncols` of the columns are
// output channels, `whole`: those are all C_out channels of the output (groups == 1, one tile
// along C_out). Threads `tid` of `threads` share the rows. `wline` > 0: the first `lines` x
// `wline` rows are whole W lines of the output in W order (row line * wline + w; the W-line
// tiles); 0 in every other tile.
struct TileRows {
  int rows, ld, ncols;
  bool whole;
  int tid, threads;
  int wline, lines;
  // LayerNorm weight and bias of instruction ln_k read ahead by the kernel (ln_affine[w] and
  // ln_affine[kLnMaxW + w], 1 and 0 where absent); nullptr: layernorm_lines reads the slots
  const float* ln_affine = nullptr;
  int ln_k = -1;
};

// softmax (log_softmax when `log`) along the columns of each row of a tile register: A -> D
// (they may be the same register). One thread per row; consecutive threads read consecutive
// rows of a column, so the shared-memory reads do not conflict. The row maximum and the sum of
// exp(x - max) are kept as 4 partials (columns c mod 4), so a thread has 4 independent chains
// in flight instead of one 64-long dependent chain. As PyTorch's CUDA softmax over a non-last
// dimension computes it: max, sum of exp(x - max), then exp(x - max) / sum (here times
// 1 / sum, within an ulp) or (x - max) - log(sum); a NaN in the row makes the whole row NaN
// (the sum). Caller: a barrier before (A complete) and after (D complete).
__device__ __forceinline__ void softmax_rows(const float* A, float* D, const TileRows& tr,
                                             bool log) {
  const int n = tr.ncols, ld = tr.ld, n4 = n & ~3;
  if (!tr.whole) {  // the host never launches this (_cuda.py, binding.cpp): poison, not garbage
    for (int m = tr.tid; m < tr.rows; m += tr.threads)
      for (int c = 0; c < n; ++c) D[c * ld + m] = __int_as_float(0x7fc00000);
    return;
  }
  for (int m = tr.tid; m < tr.rows; m += tr.threads) {
    const float* a = A + m;
    float* d = D + m;
    float mx[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (int c = 0; c < n4; c += 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) mx[j] = fmaxf(mx[j], a[(c + j) * ld]);
    }
    for (int c = n4; c < n; ++c) mx[0] = fmaxf(mx[0], a[c * ld]);
    const float rmax = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int c = 0; c < n4; c += 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = expf(a[(c + j) * ld] - rmax);
        sum[j] += e;
        if (!log) d[(c + j) * ld] = e;
      }
    }
    for (int c = n4; c < n; ++c) {
      const float e = expf(a[c * ld] - rmax);
      sum[0] += e;
      if (!log) d[c * ld] = e;
    }
    const float total = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    if (log) {
      const float lse = logf(total);
      for (int c = 0; c < n; ++c) d[c * ld] = (a[c * ld] - rmax) - lse;
    } else {
      const float inv = 1.0f / total;
      for (int c = 0; c < n; ++c) d[c * ld] *= inv;
    }
  }
}

// Sum over each aligned group of G lanes of a warp (G = 8 or 16), the same value (bit for bit)
// in every lane of the group: each butterfly step adds the same two partials in either order.
// Every lane of the warp must call it (full mask).
__device__ __forceinline__ float group_sum(float v, int G) {
  if (G > 8) v += __shfl_xor_sync(0xffffffffu, v, 8);
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v;
}

// Elements of a W line per lane in layernorm_lines: W_out <= 16 * kLnPerLane (the W-line tiles
// hold at most 64 rows of W stride 2 phases, so W_out <= 128; _cuda.WLINE_MAX_ROWS).
constexpr int kLnPerLane = 8;
// The longest W line layernorm_lines handles (16 lanes per line).
constexpr int kLnMaxW = 16 * kLnPerLane;
// (line, column) pairs per lane per iteration of layernorm_lines' loop.
constexpr int kLnPairs = 2;

// x[0] + ... + x[N-1] as a balanced tree (depth log2 N; N a power of 2).
template <int N>
__device__ __forceinline__ float tree_sum(const float* x) {
  if constexpr (N == 1) {
    return x[0];
  } else {
    return tree_sum<N / 2>(x) + tree_sum<N / 2>(x + N / 2);
  }
}

// The LayerNorm weight and bias a kernel reads ahead (TileRows::ln_affine): the first LAYER_NORM
// instruction of the program (its index, -1 if none) and this thread's share of its 2 x kLnMaxW
// values, element tid + r * THREADS for r < kLnAhead<THREADS>: weight[w] at w < kLnMaxW,
// bias[w - kLnMaxW] above (1 and 0 past W_out or where absent). Issued before the K loop, the
// global loads' latency hides behind it: loaded where the LayerNorm runs, they were 13% of the
// W-line kernel's warp-stall samples on l2_34 (v26, Nsight Compute source counters).
template <int THREADS>
constexpr int kLnAhead = (2 * kLnMaxW + THREADS - 1) / THREADS;

template <int THREADS>
__device__ __forceinline__ int layernorm_read_ahead(const Epilogue& E, int W, int tid,
                                                    float (&v)[kLnAhead<THREADS>]) {
  int k = -1;
  for (int i = 0; i < E.n_instr; ++i)
    if (E.ins[i].op == OP_LAYER_NORM) {
      k = i;
      break;
    }
#pragma unroll
  for (int r = 0; r < kLnAhead<THREADS>; ++r) {
    const int idx = tid + r * THREADS;
    const bool bias = idx >= kLnMaxW;
    const int w = bias ? idx - kLnMaxW : idx;
    const int slot = k < 0 ? -1 : bias ? E.ins[k].b : E.ins[k].c;
    v[r] = bias ? 0.0f : 1.0f;
    if (slot >= 0 && w < W && idx < 2 * kLnMaxW) {
      const Slot& s = E.slot[slot];
      v[r] = load_as_float(s.ptr, static_cast<int64_t>(w) * s.s[4], s.dtype);
    }
  }
  return k;
}

// F.layer_norm over W (normalized_shape (W_out,)) of every (line, column) of a tile register whose
// rows are whole W lines (tr.wline > 0): A -> D (they may be the same register). A group of G lanes
// per (line, column) pair, G = 8 for W <= 64 (4 pairs per warp) and 16 for W <= 128 (2 pairs): lane
// j of a group holds elements w = j, j + G, ... of the line in registers, the sums are log2(G)
// butterfly shuffles shared by the warp's pairs. Mean, then the biased variance of (x - mean), both
// in float (a lane's elements summed as a tree, then the shuffles), rstd = rsqrt(var + eps), then
// (x - mean) * rstd, times weight[w] plus bias[w] where given (slots read at w * s[4], once per
// tile: a lane's w is the same in every line). The groups of a warp take columns 8 / (32 / G) apart
// inside each block of 8 columns, so with the W-line tiles' pitch (4 mod 32 floats) their reads and
// writes fall in distinct shared-memory banks. Needs tr.threads a multiple of 32 and
// W <= kLnMaxW, else poisons the tile. Caller: a barrier before (A complete) and after (D complete).
__device__ __forceinline__ void layernorm_lines(const float* A, float* D, const TileRows& tr,
                                                const Slot* wt, const Slot* bs, float eps) {
  const int W = tr.wline, ld = tr.ld;
  if (W <= 0 || W > kLnMaxW || tr.threads % 32 != 0) {
    // the host never launches this (_cuda.py, binding.cpp): poison, not garbage
    for (int m = tr.tid; m < tr.rows; m += tr.threads)
      for (int c = 0; c < tr.ncols; ++c) D[c * ld + m] = __int_as_float(0x7fc00000);
    return;
  }
  const int G = W <= 8 * kLnPerLane ? 8 : 16;  // lanes per pair
  const int P = 32 / G;                        // pairs per warp step
  const int lane = tr.tid & 31, warp = tr.tid >> 5, warps = tr.threads >> 5;
  const int j = lane & (G - 1), grp = lane / G;
  const float inv_w = 1.0f / static_cast<float>(W);
  float wv[kLnPerLane], bv[kLnPerLane];
  const float* ahead = tr.ln_affine;
#pragma unroll
  for (int u = 0; u < kLnPerLane; ++u) {
    const int w = j + G * u;
    const bool in = w < W;
    if (ahead != nullptr) {
      wv[u] = in ? ahead[w] : 1.0f;
      bv[u] = in ? ahead[kLnMaxW + w] : 0.0f;
      continue;
    }
    wv[u] = in && wt != nullptr ? load_as_float(wt->ptr, static_cast<int64_t>(w) * wt->s[4],
                                                wt->dtype)
                                : 1.0f;
    bv[u] = in && bs != nullptr ? load_as_float(bs->ptr, static_cast<int64_t>(w) * bs->s[4],
                                                bs->dtype)
                                : 0.0f;
  }
  const int ncols = tr.ncols, pairs = tr.lines * ncols;
  const int step = warps * P;  // pairs one pass of the CTA's warps covers
  // warp-uniform loop (p0 steps by whole warps): every lane runs every shuffle. Each lane takes
  // kLnPairs pairs per iteration, step apart, and sums in trees: independent dependency chains
  // for the 3 warps per scheduler to issue from (v26's profile: one pair per lane and serial
  // sums left the W-line kernel stalled on fixed-latency dependencies).
  for (int p0 = warp * P; p0 < pairs; p0 += kLnPairs * step) {
    float x[kLnPairs][kLnPerLane], s[kLnPairs], v[kLnPairs];
    int base[kLnPairs];
    bool valid[kLnPairs];
#pragma unroll
    for (int t = 0; t < kLnPairs; ++t) {
      valid[t] = p0 + t * step + grp < pairs;
      const int pr = valid[t] ? p0 + t * step + grp : p0;  // a missing pair repeats p0, unstored
      const int line = pr / ncols;
      int c = pr - line * ncols;
      if ((c | 7) < ncols) {  // a whole block of 8 columns: spread the warp's groups over banks
        const int q = c & 7;
        c = (c & ~7) | ((q % P) * (8 / P) + q / P);
      }
      base[t] = c * ld + line * W + j;
#pragma unroll
      for (int u = 0; u < kLnPerLane; ++u) x[t][u] = j + G * u < W ? A[base[t] + G * u] : 0.0f;
      s[t] = tree_sum<kLnPerLane>(x[t]);
    }
#pragma unroll
    for (int t = 0; t < kLnPairs; ++t) s[t] = group_sum(s[t], G) * inv_w;  // the mean
#pragma unroll
    for (int t = 0; t < kLnPairs; ++t) {
      float d2[kLnPerLane];
#pragma unroll
      for (int u = 0; u < kLnPerLane; ++u) {
        const float dx = x[t][u] - s[t];
        d2[u] = j + G * u < W ? dx * dx : 0.0f;
      }
      v[t] = tree_sum<kLnPerLane>(d2);
    }
#pragma unroll
    for (int t = 0; t < kLnPairs; ++t) v[t] = rsqrtf(group_sum(v[t], G) * inv_w + eps);  // rstd
#pragma unroll
    for (int t = 0; t < kLnPairs; ++t) {
      if (!valid[t]) continue;
#pragma unroll
      for (int u = 0; u < kLnPerLane; ++u)
        if (j + G * u < W) D[base[t] + G * u] = fmaf((x[t][u] - s[t]) * v[t], wv[u], bv[u]);
    }
  }
}

// ROWS: the kernel runs SOFTMAX (its tile holds whole rows of channels, `rows()`) and
// LAYER_NORM (where `rows()` reports whole W lines); the direct kernel runs neither (at its
// 128-register cap the code spilled; launch_conv sends such programs to the GEMM), and an
// unexpected one there poisons the result. `rows()` returns the tile's TileRows; only SOFTMAX
// and LAYER_NORM call it, so the kernels keep none of its values live through the program.
// MAP_MAX caps the elementwise batch (fewer registers live at once; the epilogue pass uses 4).
template <int PER, class Pos, int LOAD_BATCH = 16, bool ROWS = true, int MAP_MAX = 16,
          class Rows>
__device__ __forceinline__ void run_program(const Epilogue& E, float* buf, int tile, Pos pos,
                                            const float* colv, int cols, Rows rows) {
  constexpr int kMapNatural = (LOAD_BATCH >= 16 && PER % 16 == 0) ? 16
                              : PER % 8 == 0                       ? 8
                              : PER % 4 == 0                       ? 4
                                                                   : 1;
  constexpr int kMapBatch = kMapNatural < MAP_MAX ? kMapNatural : MAP_MAX;
  static_assert(PER % kMapBatch == 0, "MAP_MAX must divide the elements per thread");
  const int count = E.n_instr;
  for (int k = 0; k < count; ++k) {
    const Instr I = E.ins[k];
    float* D = buf + I.d * tile;
    const float* A = buf + (I.a > 0 ? I.a : 0) * tile;
    const float* B = buf + (I.b > 0 ? I.b : 0) * tile;
    const bool imm_a = I.a < 0, imm_b = I.b < 0;
    const float f0 = I.f0, f1 = I.f1;
    switch (I.op) {
      case OP_LOAD_SCALAR:
        CT3D_EACH(D[q.idx] = f0);
        break;
      case OP_LOAD_TENSOR: {
        const Slot s = E.slot[I.c];
        if (slot_per_channel(s)) {
          const float* cv = colv + I.c * cols;
          CT3D_MAP1(cv[q.col], x);
        } else {
          load_tensor_batched<PER, LOAD_BATCH>(s, D, pos);
        }
        break;
      }
      case OP_ADD:
        CT3D_MAP2(imm_a ? f0 : A[q.idx], imm_b ? f1 : B[q.idx], x + y);
        break;
      case OP_SUB:
        CT3D_MAP2(imm_a ? f0 : A[q.idx], imm_b ? f1 : B[q.idx], x - y);
        break;
      case OP_MUL:
        CT3D_MAP2(imm_a ? f0 : A[q.idx], imm_b ? f1 : B[q.idx], x * y);
        break;
      case OP_DIV:
        if (imm_b) {
          // a scalar divisor: a * (1 / b), as PyTorch's CUDA division by a CPU scalar computes
          // it (BinaryDivTrueKernel.cu): the unfused model's result, without an IEEE division
          // per element
          const float inv = __fdiv_rn(1.0f, f1);
          CT3D_MAP1(A[q.idx], x * inv);
        } else {
          CT3D_MAP2(imm_a ? f0 : A[q.idx], B[q.idx], x / y);
        }
        break;
      case OP_NEG:
        CT3D_MAP1(A[q.idx], -x);
        break;
      case OP_ABS:
        CT3D_MAP1(A[q.idx], fabsf(x));
        break;
      case OP_SQUARE:
        CT3D_MAP1(A[q.idx], x * x);
        break;
      case OP_RELU:  // keeps NaN, like torch.relu
        CT3D_MAP1(A[q.idx], op_relu(x));
        break;
      case OP_LEAKY_RELU:
        CT3D_MAP1(A[q.idx], op_leaky_relu(x, f0));
        break;
      case OP_PRELU: {
        const Slot s = E.slot[I.c];
        if (slot_per_channel(s)) {
          const float* cv = colv + I.c * cols;
          CT3D_MAP2(A[q.idx], cv[q.col], op_prelu(x, y));
        } else {
          CT3D_EACH(const float x = A[q.idx];
                    const float wt = q.ok ? load_slot(s, q.n, q.c, q.d, q.h, q.w) : 0.0f;
                    D[q.idx] = op_prelu(x, wt));
        }
        break;
      }
      case OP_ELU:
        CT3D_MAP1(A[q.idx], op_elu(x, f0));
        break;
      case OP_CELU:
        CT3D_MAP1(A[q.idx], op_celu(x, f0));
        break;
      case OP_SELU:
        CT3D_MAP1(A[q.idx], op_selu(x));
        break;
      case OP_GELU:
        if (I.b) {
          CT3D_MAP1(A[q.idx], op_gelu_tanh(x));
        } else {
          CT3D_MAP1(A[q.idx], op_gelu_erf(x));
        }
        break;
      case OP_SILU:
        CT3D_MAP1(A[q.idx], op_silu(x));
        break;
      case OP_MISH:
        CT3D_MAP1(A[q.idx], op_mish(x));
        break;
      case OP_HARDSWISH:
        CT3D_MAP1(A[q.idx], op_hardswish(x));
        break;
      case OP_HARDSIGMOID:
        CT3D_MAP1(A[q.idx], op_hardsigmoid(x));
        break;
      case OP_HARDTANH:
        CT3D_MAP1(A[q.idx], op_hardtanh(x, f0, f1));
        break;
      case OP_SIGMOID:
        CT3D_MAP1(A[q.idx], op_sigmoid(x));
        break;
      case OP_TANH:
        CT3D_MAP1(A[q.idx], tanhf(x));
        break;
      case OP_SOFTPLUS:
        CT3D_MAP1(A[q.idx], op_softplus(x, f0, f1));
        break;
      case OP_CLAMP:  // NaN passes through; min wins over max, like torch.clamp
        CT3D_MAP1(A[q.idx], clamp_keep_nan(x, f0, f1));
        break;
      case OP_BATCH_NORM: {
        const Slot sm = E.slot[I.c], sv = E.slot[I.c + 1];
        const bool chan = slot_per_channel(sm) && slot_per_channel(sv) &&
                          (!I.b || (slot_per_channel(E.slot[I.c + 2]) &&
                                    slot_per_channel(E.slot[I.c + 3])));
        if (chan) {  // the usual case: 1-D statistics (the Python side only passes those)
          const float* cm = colv + I.c * cols;
          const float* cvar = cm + cols;
          const float* cw = cvar + cols;
          const float* cb = cw + cols;
          // the statistics of each element's channel are loaded with its value, before any
          // result of the batch is stored (see CT3D_MAP1)
#pragma unroll 1
          for (int i0 = 0; i0 < PER; i0 += kMapBatch) {
            float x[kMapBatch], mean[kMapBatch], var[kMapBatch], wt[kMapBatch], bs[kMapBatch];
#pragma unroll
            for (int j = 0; j < kMapBatch; ++j) {
              const ElemPos q = pos(i0 + j);
              x[j] = A[q.idx];
              mean[j] = cm[q.col];
              var[j] = cvar[q.col];
              wt[j] = I.b ? cw[q.col] : 1.0f;
              bs[j] = I.b ? cb[q.col] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < kMapBatch; ++j) {
              const ElemPos q = pos(i0 + j);
              D[q.idx] = op_batch_norm(x[j], mean[j], var[j], wt[j], bs[j], f0, I.b);
            }
          }
        } else if (I.b) {
          const Slot sw = E.slot[I.c + 2], sb = E.slot[I.c + 3];
          CT3D_EACH(const float x = A[q.idx];
                    float mean = 0.0f, var = 1.0f, wt = 0.0f, bs = 0.0f;
                    if (q.ok) {
                      mean = load_slot(sm, q.n, q.c, q.d, q.h, q.w);
                      var = load_slot(sv, q.n, q.c, q.d, q.h, q.w);
                      wt = load_slot(sw, q.n, q.c, q.d, q.h, q.w);
                      bs = load_slot(sb, q.n, q.c, q.d, q.h, q.w);
                    }
                    D[q.idx] = (x - mean) * rsqrtf(var + f0) * wt + bs);
        } else {
          CT3D_EACH(const float x = A[q.idx];
                    float mean = 0.0f, var = 1.0f;
                    if (q.ok) {
                      mean = load_slot(sm, q.n, q.c, q.d, q.h, q.w);
                      var = load_slot(sv, q.n, q.c, q.d, q.h, q.w);
                    }
                    D[q.idx] = (x - mean) * rsqrtf(var + f0));
        }
        break;
      }
      case OP_SOFTMAX:
        if constexpr (ROWS) {
          // reads other threads' elements (as LAYER_NORM): every thread of the CTA runs the
          // program (the instruction sequence is uniform), so the barriers are safe
          __syncthreads();
          softmax_rows(A, D, rows(), I.b != 0);
          __syncthreads();
          break;
        }
        [[fallthrough]];
      case OP_LAYER_NORM:
        if constexpr (ROWS) {  // barriers as for SOFTMAX
          __syncthreads();
          TileRows tr = rows();
          if (tr.ln_k != k) tr.ln_affine = nullptr;  // another LayerNorm: read its slots
          layernorm_lines(A, D, tr, I.c >= 0 ? &E.slot[I.c] : nullptr,
                          I.b >= 0 ? &E.slot[I.b] : nullptr, f0);
          __syncthreads();
          break;
        }
        [[fallthrough]];
      default:  // the Python side validates opcodes; an unknown one poisons the result
        CT3D_EACH(D[q.idx] = __int_as_float(0x7fc00000));
        break;
    }
  }
}

#undef CT3D_EACH
#undef CT3D_MAP1
#undef CT3D_MAP2

}  // namespace ct3d
