// Fused ConvTranspose3d + elementwise epilogue: one kernel, output written once. No torch header.
//
// Gather form: every output element is accumulated by exactly one thread (no atomics, so the
// result is deterministic). For stride s, output index o = rho + s*t splits each spatial
// dimension into s phases rho; within a phase only the kernel taps k with
// k*dilation == (rho + padding) (mod s) touch the output, and the input index is t + off(k)
// with off(k) = (rho + padding - k*dilation) / s exact. So each phase is a dense implicit GEMM
//   M = N * T_d * T_h * T_w output voxels of the phase,
//   N = C_out / groups output channels (one group per CTA column),
//   K = taps of the phase x C_in / groups,
// and no multiply is spent on the zeros a transposed convolution inserts.
//
// CTA: 128 threads, a BM x BN output tile (BM voxels, BN channels), K in steps of kBK = 16
// input channels of one tap, staged through shared memory with a register prefetch of the
// next step (two buffers, one barrier a step). Main-loop arithmetic per MODE:
//   kModeFfma        exact FP32 FFMA (float32 input)
//   kModeTensorCore  mma.sync m16n8k8 TF32 (float32 input, operands rounded with cvt.rna)
//                    or m16n8k16 FP16/BF16 (half inputs); FP32 accumulation always.
// The FFMA path computes exactly the accumulator fragments the mma path owns, so both share
// the epilogue: fragments -> shared-memory tile -> bias + program per element -> one store.
//
// Grid: x = M tiles x phases, phase fastest, so the CTAs of all phases of one region run
// together and the stride-interleaved partial writes of one 32-byte sector meet in L2 before
// it is written back; y = groups * C_out tiles.
//
// Epilogue: the accumulators (plus bias) go to a shared-memory tile, "register" 0 of a small
// register file of tiles; the decoded program (ct3d_epilogue.cuh) runs instruction by
// instruction over the tile; each output element is then stored once, lanes walking the
// output's contiguous dimension.
//
// Shapes with few input channels per group run conv_transpose3d_direct_kernel instead (below):
// FP32 FFMA without the 16-channel K steps, the same epilogue and store; its staged-input form
// (conv_transpose3d_direct_staged_kernel) copies each tile's input rows to shared memory first.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <climits>
#include <type_traits>

#include "ct3d_epilogue.cuh"
#include "ct3d_host.h"
#include "ct3d_params.h"

namespace ct3d {

constexpr int kThreads = 128;
constexpr int kBK = 16;

// ---------------------------------------------------------------------------------------
// Phase geometry of one spatial dimension.
struct PhaseDim {
  int T;      // outputs of this phase: o = rho + s*t, t in [0, T)
  int k0;     // first tap of the phase (-1: none)
  int nT;     // taps of the phase: k = k0 + j*kstep, j in [0, nT)
  int kstep;  // s / gcd(s, dilation)
  int off0;   // input index = t + off0 - j*doff
  int doff;   // dilation / gcd(s, dilation)
};

__host__ __device__ __forceinline__ int gcd_int(int a, int b) {
  while (b) {
    const int t = a % b;
    a = b;
    b = t;
  }
  return a;
}

__host__ __device__ __forceinline__ PhaseDim phase_dim(int rho, int out, int s, int pad, int dil,
                                                       int ksize) {
  PhaseDim r;
  r.T = rho < out ? (out - rho + s - 1) / s : 0;
  const int want = (rho + pad) % s;  // taps with k*dil == want (mod s)
  const int g = gcd_int(s, dil);
  r.kstep = s / g;
  r.doff = dil / g;
  r.k0 = -1;
  const int lim = ksize < r.kstep ? ksize : r.kstep;
  for (int k = 0; k < lim; ++k) {
    if ((k * dil) % s == want) {
      r.k0 = k;
      break;
    }
  }
  if (r.k0 < 0) {
    r.nT = 0;
    r.off0 = 0;
  } else {
    r.nT = (ksize - 1 - r.k0) / r.kstep + 1;
    r.off0 = (rho + pad - r.k0 * dil) / s;  // exact: the numerator is a multiple of s
  }
  return r;
}

// Division by a run-time divisor d >= 1 that stays fixed, for dividends n in [0, 2^31):
// q = (umulhi(n, m) + n) >> l with l = ceil(log2 d), m = floor(2^32 (2^l - d) / d) + 1
// (Granlund and Montgomery), a multiply-high, an add and a shift instead of the dozen
// instructions of a general integer division.
struct FastDiv {
  uint32_t d, m, l;
  FastDiv() = default;  // trivial: allowed in __shared__ (phase_dims fills it)
  __host__ __device__ explicit FastDiv(int divisor) : d(static_cast<uint32_t>(divisor)), l(0) {
    while (l < 31 && (1u << l) < d) ++l;
    m = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << l) - d)) / d + 1);
  }
  __device__ __forceinline__ int div(int n) const {
    const uint32_t u = static_cast<uint32_t>(n);
    return static_cast<int>((__umulhi(u, m) + u) >> l);
  }
};

// Splits a flat index m < M of an (N, D, H, W) grid, W fastest, into (n, d, h, w): 32-bit
// arithmetic with the precomputed divisors when M fits in an int, 64-bit division otherwise.
__device__ __forceinline__ void split_index(int64_t m, int64_t M, const FastDiv& div_w,
                                            const FastDiv& div_h, const FastDiv& div_d, int W,
                                            int H, int D, int& n, int& d, int& h, int& w) {
  if (M <= INT_MAX) {
    const int q0 = static_cast<int>(m);
    const int q1 = div_w.div(q0);
    w = q0 - q1 * W;
    const int q2 = div_h.div(q1);
    h = q1 - q2 * H;
    n = div_d.div(q2);
    d = q2 - n * D;
  } else {
    int64_t q = m;
    w = static_cast<int>(q % W);
    q /= W;
    h = static_cast<int>(q % H);
    q /= H;
    d = static_cast<int>(q % D);
    n = static_cast<int>(q / D);
  }
}

// Walks the K steps of a phase in order: input-channel chunk fastest, then w, h, d taps.
struct KIter {
  int chunk, jw, jh, jd;
  __device__ __forceinline__ void next(int n_chunks, int ntw, int nth) {
    if (++chunk == n_chunks) {
      chunk = 0;
      if (++jw == ntw) {
        jw = 0;
        if (++jh == nth) {
          jh = 0;
          ++jd;
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Tensor-core helpers.
__device__ __forceinline__ uint32_t f32_to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int IN_DT>
__device__ __forceinline__ void mma_16(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]) {
  if (IN_DT == kF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// Stores N elements of a register array to shared memory with the widest aligned vectors.
template <typename T, int N>
__device__ __forceinline__ void store_row(T* dst, const T (&src)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < N; i += kPer) {
      uint4 v;
      memcpy(&v, &src[i], 16);
      *reinterpret_cast<uint4*>(dst + i) = v;
    }
  } else if constexpr (kBytes % 8 == 0) {
    constexpr int kPer = 8 / sizeof(T);
#pragma unroll
    for (int i = 0; i < N; i += kPer) {
      uint2 v;
      memcpy(&v, &src[i], 8);
      *reinterpret_cast<uint2*>(dst + i) = v;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) dst[i] = src[i];
  }
}

// ---------------------------------------------------------------------------------------
// One store per element of a BM x BN output tile (out[c * LDC + m]: row m, channel column c;
// rows with s_n[m] < 0 and columns past the group's channels are not stored). Lanes walk the
// output's contiguous dimension: voxels (NCDHW) or channels (channels_last, chan_fast).
template <int BM, int BN, int LDC, int kThreads = ::ct3d::kThreads>
__device__ __forceinline__ void store_tile(const ConvParams& p, const float* out, const int* s_n,
                                           const int64_t* s_yoff, int co0, int grp, int tid,
                                           bool chan_fast) {
  constexpr int kPer = BM * BN / kThreads;
  const int64_t ys1 = p.ys[1];
  const int cmax = p.cout_g - co0;
  const int cog0 = grp * p.cout_g + co0;
  auto store_all = [&](auto* y) {
    using T = typename std::remove_pointer<decltype(y)>::type;
    auto put = [&](int m, int c) {
      if (s_n[m] < 0 || c >= cmax) return;
      const float v = out[c * LDC + m];
      T* dst = y + s_yoff[m] + static_cast<int64_t>(cog0 + c) * ys1;
      if constexpr (std::is_same<T, float>::value) {
        *dst = v;
      } else if constexpr (std::is_same<T, __half>::value) {
        *dst = __float2half_rn(v);
      } else {
        *dst = __float2bfloat16_rn(v);
      }
    };
    if (chan_fast) {
#pragma unroll 4
      for (int i = 0; i < kPer; ++i) {
        const int e = tid + i * kThreads;
        put(e / BN, e % BN);
      }
    } else {
      // Lanes walk rows (voxels): each store instruction writes 32 consecutive rows of one
      // channel. A thread keeps its rows fixed and walks the channels with a running pointer,
      // so the row's offset is read once and each element costs a load, an add and a store.
      constexpr int kRows = BM >= kThreads ? BM / kThreads : 1;      // rows per thread
      constexpr int kColStep = BM >= kThreads ? 1 : kThreads / BM;  // threads per row
      static_assert(BM >= kThreads ? BM % kThreads == 0 : kThreads % BM == 0, "tile rows");
      const int c_first = BM >= kThreads ? 0 : tid / BM;
      const int64_t step = ys1 * kColStep;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int m = (BM >= kThreads ? tid : tid % BM) + r * kThreads;
        if (s_n[m] < 0) continue;
        T* dst = y + s_yoff[m] + static_cast<int64_t>(cog0 + c_first) * ys1;
        const float* src = out + c_first * LDC + m;
#pragma unroll 4
        for (int c = c_first; c < BN; c += kColStep) {
          if (c < cmax) {
            const float v = *src;
            if constexpr (std::is_same<T, float>::value) {
              *dst = v;
            } else if constexpr (std::is_same<T, __half>::value) {
              *dst = __float2half_rn(v);
            } else {
              *dst = __float2bfloat16_rn(v);
            }
          }
          dst += step;
          src += kColStep * LDC;
        }
      }
    }
  };
  if (p.y_dtype == kF16) {
    store_all(static_cast<__half*>(p.y));
  } else if (p.y_dtype == kBF16) {
    store_all(static_cast<__nv_bfloat16*>(p.y));
  } else {
    store_all(static_cast<float*>(p.y));
  }
}

// ---------------------------------------------------------------------------------------
// Pieces shared by both GEMM kernels (strided-input and channels-last, ct3d_igemm.cuh).

// Where a CTA's tile lies: grid x = M tiles x phases, phase fastest.
struct TileOrigin {
  int rd, rh, rw;  // stride phase
  int Td, Th, Tw;  // outputs of the phase per dimension
  int64_t M, m0;   // rows (voxels) of the phase, first row of the tile (m0 >= M: no work)
};

// The phase of this CTA (grid x = tiles x phases, phase fastest): sets t's phase and its output
// extents; returns the CTA's tile index within the phase (blockIdx.x / phases).
__device__ __forceinline__ unsigned phase_origin(const ConvParams& p, TileOrigin& t) {
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  const int n_phase = sd * sh * sw;
  const int z = static_cast<int>(blockIdx.x % static_cast<unsigned>(n_phase));
  t.rw = z % sw;
  t.rh = (z / sw) % sh;
  t.rd = z / (sw * sh);
  t.Td = t.rd < p.Do ? (p.Do - t.rd + sd - 1) / sd : 0;
  t.Th = t.rh < p.Ho ? (p.Ho - t.rh + sh - 1) / sh : 0;
  t.Tw = t.rw < p.Wo ? (p.Wo - t.rw + sw - 1) / sw : 0;
  return blockIdx.x / static_cast<unsigned>(n_phase);
}

template <int BM>
__device__ __forceinline__ TileOrigin tile_origin(const ConvParams& p) {
  TileOrigin t;
  const unsigned tile = phase_origin(p, t);
  t.M = static_cast<int64_t>(p.N) * t.Td * t.Th * t.Tw;
  t.m0 = static_cast<int64_t>(tile) * BM;
  return t;
}

// Zeroes the mma.sync accumulator fragments of a warp tile.
template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
}

// The tap geometry of the tile's phase, computed by three threads into shared memory, and, when
// s_div is given, the divisors of the phase's W, H and D extents for split_index, by three
// more (each FastDiv costs a 64-bit division: once per CTA instead of once per thread). The
// caller's next barrier publishes them.
__device__ __forceinline__ void phase_dims(const ConvParams& p, const TileOrigin& t,
                                           PhaseDim* s_phase, int tid,
                                           FastDiv* s_div = nullptr) {
  if (tid < 3) {
    s_phase[tid] = tid == 0   ? phase_dim(t.rd, p.Do, p.st[0], p.pad[0], p.dil[0], p.kD)
                   : tid == 1 ? phase_dim(t.rh, p.Ho, p.st[1], p.pad[1], p.dil[1], p.kH)
                              : phase_dim(t.rw, p.Wo, p.st[2], p.pad[2], p.dil[2], p.kW);
  } else if (s_div != nullptr && tid < 6) {
    const int e = tid == 3 ? t.Tw : tid == 4 ? t.Th : t.Td;
    s_div[tid - 3] = FastDiv(e > 0 ? e : 1);
  }
}

// Element i of thread tid's share of a BM-row tile in voxel-fast order: e = tid + i * THREADS,
// row m = e % BM, column c = e / BM. The epilogue program recomputes this for every element of
// every instruction, so the modulo and division are resolved at compile time where THREADS and
// BM divide one another (every tile of the kernels; tid < THREADS).
template <int BM, int THREADS>
__device__ __forceinline__ void tile_rc(int tid, int i, int& m, int& c) {
  const unsigned t = static_cast<unsigned>(tid), u = static_cast<unsigned>(i);
  if constexpr (THREADS % BM == 0) {
    m = static_cast<int>(t % BM);
    c = static_cast<int>(t / BM + u * (THREADS / BM));
  } else if constexpr (BM % THREADS == 0) {
    constexpr unsigned R = BM / THREADS;
    m = static_cast<int>(t + (u % R) * THREADS);
    c = static_cast<int>(u / R);
  } else {
    const unsigned e = t + u * THREADS;
    m = static_cast<int>(e % BM);
    c = static_cast<int>(e / BM);
  }
}

// Element (row m, column c) of a tile at out[c * LDC + m]: everything of its ElemPos but the
// output position d, h, w (s_yoff: the rows' output offsets without the channel, as store_tile
// reads them).
template <int LDC>
__device__ __forceinline__ ElemPos tile_elem(const ConvParams& p, int m, int c, const int* s_n,
                                             const int64_t* s_yoff, int grp, int co0) {
  ElemPos q;
  q.idx = c * LDC + m;
  q.col = c;
  q.n = s_n[m];
  q.ok = q.n >= 0 && co0 + c < p.cout_g;
  q.c = grp * p.cout_g + co0 + c;
  q.yoff = s_yoff[m] + static_cast<int64_t>(q.c) * p.ys[1];
  return q;
}

// The end of a GEMM tile: accumulator fragments (mma.sync C layout, warp tile WTM x WTN) plus
// bias into tile register 0 (sR, pitch LDC), the epilogue program over the tile (voxel-fast
// element order), then one store per output element. Columns are channels co0.. of group grp.
// The caller has synchronized since the last use of sR's memory.
template <int IN_DT, int BM, int BN, int LDC, int WTM, int WTN, int MT, int NT, int THREADS>
__device__ __forceinline__ void gemm_epilogue(const ConvParams& p, const float (&acc)[MT][NT][4],
                                              float* sR, const TileOrigin& t, const int* s_n,
                                              const int* s_td, const int* s_th, const int* s_tw,
                                              const int64_t* s_yoff, int grp, int co0,
                                              int warp_m, int warp_n, int tid) {
  constexpr int kTileFloats = BN * LDC;
  const int lg = (tid & 31) >> 2, lt = tid & 3;
  __shared__ float s_col[kMaxSlots * BN];
  load_channel_slots<BN>(p.epi, s_col, grp * p.cout_g + co0, p.cout_g - co0, tid, THREADS);
#pragma unroll
  for (int ni = 0; ni < NT; ++ni)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int col = warp_n * WTN + ni * 8 + 2 * lt + j;
      float bias = 0.0f;
      if (p.bias != nullptr && co0 + col < p.cout_g) {
        bias = load_as_float(p.bias, grp * p.cout_g + co0 + col, IN_DT);
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const int row = warp_m * WTM + mi * 16 + lg;
        sR[col * LDC + row] = acc[mi][ni][j] + bias;
        sR[col * LDC + row + 8] = acc[mi][ni][2 + j] + bias;
      }
    }
  __syncthreads();

  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  auto pos = [&](int i) {
    int m, c;
    tile_rc<BM, THREADS>(tid, i, m, c);
    ElemPos q = tile_elem<LDC>(p, m, c, s_n, s_yoff, grp, co0);
    q.d = t.rd + sd * s_td[m];
    q.h = t.rh + sh * s_th[m];
    q.w = t.rw + sw * s_tw[m];
    return q;
  };
  auto rows = [&]() {
    const int ncols = p.cout_g - co0 < BN ? p.cout_g - co0 : BN;
    return TileRows{BM, LDC, ncols, p.groups == 1 && co0 == 0 && p.cout_g <= BN, tid, THREADS};
  };
  run_program<BM * BN / THREADS>(p.epi, sR, kTileFloats, pos, s_col, BN, rows);

  const bool chan_fast = p.ys[1] == 1 && p.Cout > 1;
  if (chan_fast) __syncthreads();  // the store walks the tile in the other element order
  store_tile<BM, BN, LDC, THREADS>(p, sR + p.epi.out_reg * kTileFloats, s_n, s_yoff, co0, grp,
                                   tid, chan_fast);
}

// ---------------------------------------------------------------------------------------
// Tile configuration.
template <int IN_DT, int MODE, int BM, int BN, int WARPS_M, int WARPS_N>
struct Tile {
  static_assert(IN_DT == kF32 || MODE == kModeTensorCore, "half inputs use tensor cores");
  static_assert(WARPS_M * WARPS_N * 32 == kThreads, "4 warps");
  static constexpr bool kHalf = IN_DT != kF32;
  using GType = typename std::conditional<kHalf, uint16_t, float>::type;  // global element
  using SType = GType;                                                     // shared element
  static constexpr int LDK = kBK + (kHalf ? 8 : 4);  // row pitch: 16 bytes of padding
  static constexpr int LDC = BM + 4;                 // epilogue tile pitch (floats)
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
  static constexpr int MT = WTM / 16, NT = WTN / 8;
  static_assert(MT * 16 == WTM && NT * 8 == WTN, "warp tile must be a multiple of 16 x 8");
  // A loader: each thread loads A_MPT rows (output voxels) x A_KPT consecutive channels.
  static constexpr int A_TPM = BM >= kThreads ? 1 : kThreads / BM;
  static constexpr int A_MPT = BM >= kThreads ? BM / kThreads : 1;
  static constexpr int A_KPT = kBK / A_TPM;
  // B loader: each thread loads one output channel x B_KPT consecutive input channels.
  static constexpr int B_TPN = kThreads / BN;
  static constexpr int B_KPT = kBK / B_TPN;
  static_assert(B_KPT >= 1 && A_KPT >= 1, "tile too small");
  static constexpr int kABytes = BM * LDK * static_cast<int>(sizeof(SType));
  static constexpr int kBBytes = BN * LDK * static_cast<int>(sizeof(SType));
  static constexpr int kMainBytes = 2 * (kABytes + kBBytes);
  static constexpr int kTileFloats = BN * LDC;  // one epilogue register
  static constexpr int kTileBytes = kTileFloats * static_cast<int>(sizeof(float));
  // per output voxel of the tile: output offset (int64), then n, t_d, t_h, t_w (int)
  static constexpr int kInfoBytes = BM * static_cast<int>(sizeof(int64_t) + 4 * sizeof(int));
  static constexpr int kPer = BM * BN / kThreads;  // epilogue elements per thread
  // The main-loop buffers and the epilogue registers share the front of shared memory.
  static __host__ __device__ int union_bytes(int n_regs) {
    const int regs = n_regs * kTileBytes;
    return kMainBytes > regs ? kMainBytes : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs) { return union_bytes(n_regs) + kInfoBytes; }
};

// ---------------------------------------------------------------------------------------
// The 64 x 64 tile fits 4 CTAs (16 warps) per multiprocessor in 128 registers; the others need
// more registers (3 CTAs) or, in exact FP32, many more (2 CTAs).
template <int IN_DT, int MODE, int BM, int BN, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(kThreads, (BM == 64 && MODE == kModeTensorCore) ? 4 : 2)
    conv_transpose3d_fused_kernel(const __grid_constant__ ConvParams p) {
  using Cfg = Tile<IN_DT, MODE, BM, BN, WARPS_M, WARPS_N>;
  using GType = typename Cfg::GType;
  using SType = typename Cfg::SType;
  constexpr int LDK = Cfg::LDK;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;

  // ---- phase, tile position ----
  const TileOrigin to = tile_origin<BM>(p);
  if (to.m0 >= to.M) return;  // uniform for the CTA, before any barrier
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  const int rd = to.rd, rh = to.rh, rw = to.rw, Td = to.Td, Th = to.Th, Tw = to.Tw;
  const int64_t M = to.M, m0 = to.m0;

  const int n_ct = (p.cout_g + BN - 1) / BN;
  const int grp = blockIdx.y / n_ct;
  const int co0 = (blockIdx.y - grp * n_ct) * BN;
  const int cig0 = grp * p.cin_g;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  SType* sA = reinterpret_cast<SType*>(smem_raw);
  SType* sB = reinterpret_cast<SType*>(smem_raw + 2 * Cfg::kABytes);
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias sA/sB
  int64_t* s_yoff = reinterpret_cast<int64_t*>(smem_raw + Cfg::union_bytes(p.epi.n_regs));
  int* s_n = reinterpret_cast<int*>(s_yoff + BM);
  int* s_td = s_n + BM;
  int* s_th = s_td + BM;
  int* s_tw = s_th + BM;

  const int tid = threadIdx.x;

  // ---- phase geometry: computed by three threads, shared through shared memory ----
  __shared__ PhaseDim s_phase[3];
  __shared__ FastDiv s_div[3];
  phase_dims(p, to, s_phase, tid, s_div);
  __syncthreads();

  // ---- decode the tile's output voxels once (64-bit only when M needs it) ----
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    if (m < M) {
      int n, td, th, tw;
      split_index(m, M, s_div[0], s_div[1], s_div[2], Tw, Th, Td, n, td, th, tw);
      s_n[r] = n;
      s_td[r] = td;
      s_th[r] = th;
      s_tw[r] = tw;
      s_yoff[r] = static_cast<int64_t>(n) * p.ys[0] + static_cast<int64_t>(rd + sd * td) * p.ys[2] +
                  static_cast<int64_t>(rh + sh * th) * p.ys[3] +
                  static_cast<int64_t>(rw + sw * tw) * p.ys[4];
    } else {
      s_n[r] = -1;
      s_td[r] = s_th[r] = s_tw[r] = 0;
      s_yoff[r] = 0;
    }
  }
  __syncthreads();
  const PhaseDim pdd = s_phase[0], pdh = s_phase[1], pdw = s_phase[2];

  // ---- loader state: each A row's offset of input channel cig0 + a_k0 at tap offset 0, and
  // the B column's offset of input channel cig0 + b_k0 at tap 0; a K step adds one offset
  // that is the same for every thread ----
  int a_row[Cfg::A_MPT], a_n[Cfg::A_MPT], a_td[Cfg::A_MPT], a_th[Cfg::A_MPT], a_tw[Cfg::A_MPT];
  int64_t a_base[Cfg::A_MPT];
  const int a_k0 = BM >= kThreads ? 0 : (tid / BM) * Cfg::A_KPT;
#pragma unroll
  for (int i = 0; i < Cfg::A_MPT; ++i) {
    a_row[i] = BM >= kThreads ? tid + i * kThreads : tid % BM;
    a_n[i] = s_n[a_row[i]];
    a_td[i] = s_td[a_row[i]];
    a_th[i] = s_th[a_row[i]];
    a_tw[i] = s_tw[a_row[i]];
    a_base[i] = static_cast<int64_t>(a_n[i] < 0 ? 0 : a_n[i]) * p.xs[0] +
                static_cast<int64_t>(cig0 + a_k0) * p.xs[1] +
                static_cast<int64_t>(a_td[i]) * p.xs[2] + static_cast<int64_t>(a_th[i]) * p.xs[3] +
                static_cast<int64_t>(a_tw[i]) * p.xs[4];
  }
  const int b_col = tid % BN;
  const int b_k0 = (tid / BN) * Cfg::B_KPT;
  const int64_t b_base =
      static_cast<int64_t>(cig0 + b_k0) * p.ws[0] + static_cast<int64_t>(co0 + b_col) * p.ws[1];
  const bool b_ok = co0 + b_col < p.cout_g;

  const GType* __restrict__ X = static_cast<const GType*>(p.x);
  const GType* __restrict__ Wt = static_cast<const GType*>(p.w);

  GType ra[Cfg::A_MPT][Cfg::A_KPT];
  GType rb[Cfg::B_KPT];

  const int n_chunks = (p.cin_g + kBK - 1) / kBK;
  const int total = pdd.nT * pdh.nT * pdw.nT * n_chunks;

  auto load_step = [&](const KIter& ki) {
    const int offd = pdd.off0 - ki.jd * pdd.doff;
    const int offh = pdh.off0 - ki.jh * pdh.doff;
    const int offw = pdw.off0 - ki.jw * pdw.doff;
    const int ci0 = ki.chunk * kBK;
    const int64_t a_step =
        static_cast<int64_t>(ci0) * p.xs[1] + static_cast<int64_t>(offd) * p.xs[2] +
        static_cast<int64_t>(offh) * p.xs[3] + static_cast<int64_t>(offw) * p.xs[4];
#pragma unroll
    for (int i = 0; i < Cfg::A_MPT; ++i) {
      const int id = a_td[i] + offd, ih = a_th[i] + offh, iw = a_tw[i] + offw;
      const bool ok = a_n[i] >= 0 && static_cast<unsigned>(id) < static_cast<unsigned>(p.Di) &&
                      static_cast<unsigned>(ih) < static_cast<unsigned>(p.Hi) &&
                      static_cast<unsigned>(iw) < static_cast<unsigned>(p.Wi);
      const int kv = ok ? p.cin_g - (ci0 + a_k0) : 0;  // channels of this row that exist
      const GType* src = X + (a_base[i] + a_step);
#pragma unroll
      for (int kk = 0; kk < Cfg::A_KPT; ++kk) {
        ra[i][kk] = kk < kv ? *src : GType(0);
        src += p.xs[1];
      }
    }
    {
      const int kd = pdd.k0 + ki.jd * pdd.kstep;
      const int kh = pdh.k0 + ki.jh * pdh.kstep;
      const int kw = pdw.k0 + ki.jw * pdw.kstep;
      const int kv = b_ok ? p.cin_g - (ci0 + b_k0) : 0;  // input channels that exist
      const GType* src =
          Wt + (b_base + static_cast<int64_t>(ci0) * p.ws[0] + static_cast<int64_t>(kd) * p.ws[2] +
                static_cast<int64_t>(kh) * p.ws[3] + static_cast<int64_t>(kw) * p.ws[4]);
#pragma unroll
      for (int kk = 0; kk < Cfg::B_KPT; ++kk) {
        rb[kk] = kk < kv ? *src : GType(0);
        src += p.ws[0];
      }
    }
  };

  auto stash = [&](int buf) {
    SType* As = sA + buf * (BM * LDK);
    SType* Bs = sB + buf * (BN * LDK);
#pragma unroll
    for (int i = 0; i < Cfg::A_MPT; ++i) {
      SType tmp[Cfg::A_KPT];
#pragma unroll
      for (int kk = 0; kk < Cfg::A_KPT; ++kk) {
        if constexpr (MODE == kModeTensorCore && IN_DT == kF32) {
          tmp[kk] = __uint_as_float(f32_to_tf32(ra[i][kk]));
        } else {
          tmp[kk] = ra[i][kk];
        }
      }
      store_row(As + a_row[i] * LDK + a_k0, tmp);
    }
    SType tmp[Cfg::B_KPT];
#pragma unroll
    for (int kk = 0; kk < Cfg::B_KPT; ++kk) {
      if constexpr (MODE == kModeTensorCore && IN_DT == kF32) {
        tmp[kk] = __uint_as_float(f32_to_tf32(rb[kk]));
      } else {
        tmp[kk] = rb[kk];
      }
    }
    store_row(Bs + b_col * LDK + b_k0, tmp);
  };

  // ---- accumulators: the mma.sync C-fragment layout in every mode ----
  // acc[mi][ni][r]: row = warp_m*WTM + mi*16 + lane/4 + (r >= 2 ? 8 : 0),
  //                 col = warp_n*WTN + ni*8 + 2*(lane%4) + (r & 1).
  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int lg = lane >> 2, lt = lane & 3;
  float acc[MT][NT][4];
  zero_acc(acc);

  auto compute = [&](int buf) {
    const SType* As = sA + buf * (BM * LDK);
    const SType* Bs = sB + buf * (BN * LDK);
    if constexpr (MODE == kModeFfma) {
      // Blocked summation: the kBK products of a step are summed apart and then added to the
      // accumulator, which keeps the rounding error of long K sums near cuDNN's.
      float part[MT][NT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) part[mi][ni][r] = 0.0f;
#pragma unroll
      for (int k = 0; k < kBK; k += 4) {
        float4 a[MT][2], b[NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int row = warp_m * Cfg::WTM + mi * 16 + lg;
          a[mi][0] = *reinterpret_cast<const float4*>(As + row * LDK + k);
          a[mi][1] = *reinterpret_cast<const float4*>(As + (row + 8) * LDK + k);
        }
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          const int col = warp_n * Cfg::WTN + ni * 8 + 2 * lt;
          b[ni][0] = *reinterpret_cast<const float4*>(Bs + col * LDK + k);
          b[ni][1] = *reinterpret_cast<const float4*>(Bs + (col + 1) * LDK + k);
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) {
            float* c = part[mi][ni];
            c[0] = fmaf(a[mi][0].x, b[ni][0].x, c[0]);
            c[1] = fmaf(a[mi][0].x, b[ni][1].x, c[1]);
            c[2] = fmaf(a[mi][1].x, b[ni][0].x, c[2]);
            c[3] = fmaf(a[mi][1].x, b[ni][1].x, c[3]);
            c[0] = fmaf(a[mi][0].y, b[ni][0].y, c[0]);
            c[1] = fmaf(a[mi][0].y, b[ni][1].y, c[1]);
            c[2] = fmaf(a[mi][1].y, b[ni][0].y, c[2]);
            c[3] = fmaf(a[mi][1].y, b[ni][1].y, c[3]);
            c[0] = fmaf(a[mi][0].z, b[ni][0].z, c[0]);
            c[1] = fmaf(a[mi][0].z, b[ni][1].z, c[1]);
            c[2] = fmaf(a[mi][1].z, b[ni][0].z, c[2]);
            c[3] = fmaf(a[mi][1].z, b[ni][1].z, c[3]);
            c[0] = fmaf(a[mi][0].w, b[ni][0].w, c[0]);
            c[1] = fmaf(a[mi][0].w, b[ni][1].w, c[1]);
            c[2] = fmaf(a[mi][1].w, b[ni][0].w, c[2]);
            c[3] = fmaf(a[mi][1].w, b[ni][1].w, c[3]);
          }
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[mi][ni][r] += part[mi][ni][r];
    } else if constexpr (IN_DT == kF32) {  // TF32 m16n8k8
#pragma unroll
      for (int ks = 0; ks < kBK; ks += 8) {
        uint32_t af[MT][4], bf[NT][2];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          const int row = warp_m * Cfg::WTM + mi * 16 + lg;
          af[mi][0] = __float_as_uint(As[row * LDK + ks + lt]);
          af[mi][1] = __float_as_uint(As[(row + 8) * LDK + ks + lt]);
          af[mi][2] = __float_as_uint(As[row * LDK + ks + lt + 4]);
          af[mi][3] = __float_as_uint(As[(row + 8) * LDK + ks + lt + 4]);
        }
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) {
          const int col = warp_n * Cfg::WTN + ni * 8 + lg;
          bf[ni][0] = __float_as_uint(Bs[col * LDK + ks + lt]);
          bf[ni][1] = __float_as_uint(Bs[col * LDK + ks + lt + 4]);
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
          for (int ni = 0; ni < NT; ++ni) mma_tf32(acc[mi][ni], af[mi], bf[ni]);
      }
    } else {  // FP16 / BF16 m16n8k16 (kBK == 16: one mma step)
      uint32_t af[MT][4], bf[NT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        const int row = warp_m * Cfg::WTM + mi * 16 + lg;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(As + row * LDK + 2 * lt);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(As + (row + 8) * LDK + 2 * lt);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(As + row * LDK + 2 * lt + 8);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(As + (row + 8) * LDK + 2 * lt + 8);
      }
#pragma unroll
      for (int ni = 0; ni < NT; ++ni) {
        const int col = warp_n * Cfg::WTN + ni * 8 + lg;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(Bs + col * LDK + 2 * lt);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(Bs + col * LDK + 2 * lt + 8);
      }
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int ni = 0; ni < NT; ++ni) mma_16<IN_DT>(acc[mi][ni], af[mi], bf[ni]);
    }
  };

  // ---- main loop: prefetch step it+1 into registers while computing step it ----
  if (total > 0) {
    KIter ki{0, 0, 0, 0};
    load_step(ki);
    stash(0);
    __syncthreads();
    for (int it = 0; it < total; ++it) {
      const int cur = it & 1;
      const bool more = it + 1 < total;
      if (more) {
        ki.next(n_chunks, pdw.nT, pdh.nT);
        load_step(ki);
      }
      compute(cur);
      if (more) stash(cur ^ 1);
      __syncthreads();
    }
  }

  // ---- epilogue: fragments + bias -> register 0, the program, the store ----
  gemm_epilogue<IN_DT, BM, BN, Cfg::LDC, Cfg::WTM, Cfg::WTN, MT, NT, kThreads>(
      p, acc, sR, to, s_n, s_td, s_th, s_tw, s_yoff, grp, co0, warp_m, warp_n, tid);
}

// ---------------------------------------------------------------------------------------
// Direct kernel, for few input channels per group.
//
// With C_in/groups small the implicit GEMM wastes most of each 16-channel K step (13 of 16 at
// C_in = 3), and its main loop, not the memory traffic, sets the time. This kernel computes
// the convolution directly with FP32 FFMA, in every precision (inputs are converted to float;
// products and sums in FP32, as in the exact-FP32 GEMM path):
//   * a CTA owns one (d, h) stride phase, CO output channels of one group and kTiles x 128
//     "W groups"; a thread owns one W group, RW = 2 consecutive output voxels along W (both W
//     phases when the W stride is 2), for all CO channels (2 x CO accumulators);
//   * the weights of the CTA's (d, h) phase, taps_d x taps_h x kW x C_in/groups x CO floats,
//     are staged once in shared memory and read as broadcast float4s;
//   * voxel j of a group runs over the W taps of its own W phase (j mod sW; the W stride is 1
//     or 2 and divides RW), the same taps for every lane, so the warp does not diverge and no
//     product is spent on an inserted zero;
//   * per (d, h) tap row and voxel, the products are summed apart and then added to the
//     accumulator (blocked summation, as in the FFMA GEMM path);
//   * input offsets are 32-bit (launch_conv checks that they fit), the tile's W groups are
//     decoded with FastDiv, and launch_conv picks this kernel by shape and precision
//     (direct_pays);
//   * the tile (rows in W order) goes through the same shared-memory epilogue and store as the
//     GEMM kernel, so a warp's store covers 32 consecutive output voxels of one channel in
//     NCDHW instead of every other one.
//
// Staged form (conv_transpose3d_direct_staged_kernel, C_in/groups <= 16). The plain kernel
// reads each tap's input element by element from global memory, each load with its own
// address, mask and channel step (~11 instructions per 4-byte load on l1_72, the largest share
// of its instructions), and each input element is read by every tap that covers it (~13 on
// l1_72). The staged form first copies the tile's input rows into shared memory, all 128
// threads with coalesced loads: one slot per (output row of the tile, d tap, h tap) holding
// the input row's positions lo .. lo + wp - 1 along W (every position a W tap of the row's
// outputs reads; zeros outside the input), a position's C_in/groups channels together as NV =
// 1, 2 or 4 float4s (zeros past C_in/groups; converted to float for half inputs). The tap loop
// then reads a voxel's channels as float4s, with no address, mask or channel walk. Products
// and their order are those of the plain kernel, so both give the same bits. The staged rows
// live in the epilogue registers' shared memory (dead while the taps run): one barrier more per
// tile before the accumulators go there.
template <int CO>
struct Direct {
  static_assert(CO % 4 == 0, "weights are read as float4");
  static constexpr int RW = 2;                // output voxels along W per thread
  static constexpr int CIB = 4;               // input channels loaded together
  static constexpr int BM = kThreads * RW;    // rows (output voxels) of the tile
  static constexpr int LDC = BM + 4;          // epilogue tile pitch (floats)
  static constexpr int kTiles = 8;            // tiles per CTA: the weights are staged once
  static constexpr int kPer = BM * CO / kThreads;
  static constexpr int kTileFloats = CO * LDC;
  static constexpr int kTileBytes = kTileFloats * static_cast<int>(sizeof(float));
  // per row: output offset (int64), then n, d, h, w of the output voxel (int)
  static constexpr int kInfoBytes = BM * static_cast<int>(sizeof(int64_t) + 4 * sizeof(int));
  static __host__ __device__ int weight_offset(int n_regs) {
    return n_regs * kTileBytes + kInfoBytes;
  }
  static __host__ __device__ int smem_bytes(int n_regs, int w_floats) {
    return weight_offset(n_regs) + w_floats * static_cast<int>(sizeof(float));
  }
  // The staged form: row info, the phase's weights, then the epilogue registers or (while the
  // taps run) the staged rows and their slot table, whichever is larger.
  static __host__ __device__ int64_t staged_smem_bytes(int n_regs, int64_t w_floats,
                                                       int64_t stage_bytes) {
    const int64_t regs = static_cast<int64_t>(n_regs) * kTileBytes;
    return kInfoBytes + w_floats * static_cast<int64_t>(sizeof(float)) +
           (regs > stage_bytes ? regs : stage_bytes);
  }
};

// ---- the staged form's geometry (host and device compute it alike) ----

// Float4s per staged position: C_in/groups channels as 4, 8 or 16 floats; 0 above 16 (the
// staged form does not apply).
__host__ __device__ __forceinline__ int stage_nv(int cin_g) {
  return cin_g <= 4 ? 1 : cin_g <= 8 ? 2 : cin_g <= 16 ? 4 : 0;
}

// Output rows a tile of kThreads consecutive W groups can touch with G >= 1 groups per row:
// 1 + floor((o + kThreads - 1) / G) for a first group at o = G - 1 of its row.
__host__ __device__ __forceinline__ int stage_rows(int G) { return (G + kThreads - 2) / G + 1; }

// Input positions along W a slot holds: every index tw + off0 - jw * doff that a W tap of a
// voxel of the row reads, voxel j of W group tg (0 <= tg < G) having phase index tw = (RW tg +
// j) >> (sW - 1) in W phase pdw[j]. W phases without taps read nothing; wp = 0 when none has.
struct StageWindow {
  int lo, wp;  // positions lo .. lo + wp - 1
};

template <int RW>
__host__ __device__ __forceinline__ StageWindow stage_window(const PhaseDim (&pdw)[RW], int sw,
                                                             int G) {
  int lo = INT_MAX, hi = INT_MIN;
  for (int j = 0; j < RW; ++j) {
    if (pdw[j].nT == 0) continue;
    const int first = pdw[j].off0 - (pdw[j].nT - 1) * pdw[j].doff;      // tw = 0, last tap
    const int last = ((RW * (G - 1) + j) >> (sw - 1)) + pdw[j].off0;    // largest tw, tap 0
    lo = first < lo ? first : lo;
    hi = last > hi ? last : hi;
  }
  return lo > hi ? StageWindow{0, 0} : StageWindow{lo, hi - lo + 1};
}

// Float4 v of staged position i lies at i * NV + (v ^ stage_swizzle<NV>(i)). An LDS.128 is
// served per quarter warp: 8 lanes, 128 bytes, the 8 16-byte bank groups. The tap loop's lanes
// read float4 v of consecutive positions (W stride 2; every other position with W stride 1):
// unswizzled, positions i and i + 4 would share a bank group with NV = 2 (2-way conflict) and
// i, i + 2, i + 4, i + 6 with NV = 4 (4-way); XOR-ing v with the bits of i above the 8 / NV
// positions of one 128-byte line spreads 8 consecutive positions over all 8 groups.
template <int NV>
__host__ __device__ __forceinline__ int stage_swizzle(int i) {
  static_assert(NV == 1 || NV == 2 || NV == 4, "4, 8 or 16 floats per position");
  constexpr int kShift = NV == 4 ? 1 : 2;  // log2(8 / NV)
  return NV == 1 ? 0 : (i >> kShift) & (NV - 1);
}

// Where a CTA's staged rows lie, in the epilogue registers' shared memory (sR, 16-byte
// aligned): slot s = (r * taps_d + jd) * taps_h + jh (output row r of the tile, taps jd, jh of
// the phase) is wp * NV float4s from float4 s * wp * NV on; the slot table, an int per slot
// from float off_at on, holds the input offset of the slot's row at channel cig0 and W
// position 0, or -1 where the row lies outside the input. Thread 0 fills it once per CTA, in
// shared memory: held in registers through the tile loop, these fields raised the kernel's
// register peak (in the epilogue program) past 128.
struct StagedRows {
  StageWindow win;
  int off_at;
  FastDiv div_wp;  // by the positions per slot
};

// The CTA's StagedRows (a function so that only the staged form allocates it).
template <int NV>
__device__ __forceinline__ StagedRows& staged_rows() {
  __shared__ StagedRows s;
  return s;
}

template <int IN_DT, typename G>
__device__ __forceinline__ float to_float(G v) {
  if constexpr (IN_DT == kF16) {
    return __half2float(__ushort_as_half(v));
  } else if constexpr (IN_DT == kBF16) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  } else {
    return v;
  }
}

// Staged form, once per tile, by all threads of the CTA: the slot table of the tile's rows, a
// barrier, the copy, a barrier. The tile's W groups gt .. gt + 127 (those below M) start at
// group tg0 of their first output row. The copy walks (slot, float4 q, position) with the
// position fastest: consecutive lanes load consecutive W positions of each of the float4's 4
// channels (coalesced for NCDHW inputs; a channels-last input gives each lane one 16-byte run
// instead) and store float4s of consecutive positions, which the swizzle keeps free of bank
// conflicts. The caller has synchronized since the last tap read of the staged rows.
template <int IN_DT, int NV, typename GType>
__device__ __forceinline__ void stage_tile_rows(const ConvParams& p, float* sR,
                                                const GType* __restrict__ X, int64_t gt,
                                                int tg0, int64_t M, const FastDiv& div_g,
                                                const FastDiv& div_th, const FastDiv& div_td,
                                                int G, int Th, int Td, const PhaseDim& pdd,
                                                const PhaseDim& pdh, int cig0, int tid) {
  const StagedRows& sx = staged_rows<NV>();
  float4* const x = reinterpret_cast<float4*>(sR);
  int* const off = reinterpret_cast<int*>(sR + sx.off_at);
  const int n_dh = pdd.nT * pdh.nT;
  const int64_t last = gt + kThreads - 1 < M ? gt + kThreads - 1 : M - 1;
  const int n_slots = (div_g.div(tg0 + static_cast<int>(last - gt)) + 1) * n_dh;
  const int xs1 = static_cast<int>(p.xs[1]), xs4 = static_cast<int>(p.xs[4]);
  for (int s = tid; s < n_slots; s += kThreads) {
    const int r = s / n_dh, jdh = s - r * n_dh;
    const int jd = jdh / pdh.nT, jh = jdh - jd * pdh.nT;
    int n, td, th, tg;  // the row's first W group is below M: the tile's last one is
    split_index(gt - tg0 + static_cast<int64_t>(r) * G, M, div_g, div_th, div_td, G, Th, Td, n,
                td, th, tg);
    const int id = td + pdd.off0 - jd * pdd.doff, ih = th + pdh.off0 - jh * pdh.doff;
    const bool ok = static_cast<unsigned>(id) < static_cast<unsigned>(p.Di) &&
                    static_cast<unsigned>(ih) < static_cast<unsigned>(p.Hi);
    off[s] = ok ? n * static_cast<int>(p.xs[0]) + cig0 * xs1 + id * static_cast<int>(p.xs[2]) +
                      ih * static_cast<int>(p.xs[3])
                : -1;
  }
  __syncthreads();
  const int wp = sx.win.wp, cin = p.cin_g;
  const int units = n_slots * NV * wp;
  for (int u = tid; u < units; u += kThreads) {
    const int sq = sx.div_wp.div(u);  // slot * NV + q
    const int i = u - sq * wp;        // position in the slot
    const int s = sq / NV, q = sq - s * NV;  // slot, float4 (channels 4q .. 4q + 3)
    const int base = off[s];
    const int iw = sx.win.lo + i;
    const int kv = base >= 0 && static_cast<unsigned>(iw) < static_cast<unsigned>(p.Wi)
                       ? cin - 4 * q
                       : 0;  // of them in the input
    const GType* src = X + (kv > 0 ? base + 4 * q * xs1 + iw * xs4 : 0);
    float4 v;
    v.x = kv > 0 ? to_float<IN_DT>(src[0]) : 0.0f;
    v.y = kv > 1 ? to_float<IN_DT>(src[xs1]) : 0.0f;
    v.z = kv > 2 ? to_float<IN_DT>(src[2 * xs1]) : 0.0f;
    v.w = kv > 3 ? to_float<IN_DT>(src[3 * xs1]) : 0.0f;
    x[(s * wp + i) * NV + (q ^ stage_swizzle<NV>(i))] = v;
  }
  __syncthreads();
}

// part[co] += xv[cc] * w[c0 + cc][co] over the channels c0 + cc < cin of a block of N, wk the
// tap's staged weights (CO floats per channel, broadcast float4 reads). The same products in
// the same order for both forms of the kernel.
template <int CO, int N>
__device__ __forceinline__ void fma_channels(float (&part)[CO], const float (&xv)[N],
                                             const float* wk, int c0, int cin) {
#pragma unroll
  for (int cc = 0; cc < N; ++cc) {
    if (c0 + cc < cin) {  // uniform
      const float4* w4 = reinterpret_cast<const float4*>(wk + (c0 + cc) * CO);
#pragma unroll
      for (int v = 0; v < CO / 4; ++v) {
        const float4 f = w4[v];
        part[4 * v] = fmaf(xv[cc], f.x, part[4 * v]);
        part[4 * v + 1] = fmaf(xv[cc], f.y, part[4 * v + 1]);
        part[4 * v + 2] = fmaf(xv[cc], f.z, part[4 * v + 2]);
        part[4 * v + 3] = fmaf(xv[cc], f.w, part[4 * v + 3]);
      }
    }
  }
}

// 4 CTAs (16 warps) per multiprocessor: at most 128 registers, which sm_90 meets without
// spills; sm_80's code for half inputs needs a few more, so 3 there.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define CT3D_DIRECT_MIN_CTAS 3
#else
#define CT3D_DIRECT_MIN_CTAS 4
#endif

// The body of both forms: NV = 0 the plain kernel, NV = 1, 2, 4 the staged form with NV
// float4s per position.
template <int IN_DT, int CO, int NV>
__device__ __forceinline__ void direct_conv(const ConvParams& p) {
  using Cfg = Direct<CO>;
  using GType = typename std::conditional<IN_DT != kF32, uint16_t, float>::type;
  constexpr int RW = Cfg::RW, CIB = Cfg::CIB, BM = Cfg::BM, LDC = Cfg::LDC;
  constexpr bool kStaged = NV > 0;
  static_assert(RW == 2, "the tile write below stores float2 pairs");

  // ---- (d, h) phase, first W group of the CTA ----
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];  // sw is 1 or 2 (launch_conv)
  const int n_phase = sd * sh;
  const int z = static_cast<int>(blockIdx.x % static_cast<unsigned>(n_phase));
  const int rh = z % sh, rd = z / sh;
  const int Td = rd < p.Do ? (p.Do - rd + sd - 1) / sd : 0;
  const int Th = rh < p.Ho ? (p.Ho - rh + sh - 1) / sh : 0;
  const int G = (p.Wo + RW - 1) / RW;  // W groups per output row
  const int64_t M = static_cast<int64_t>(p.N) * Td * Th * G;
  const int64_t g0 = static_cast<int64_t>(blockIdx.x / static_cast<unsigned>(n_phase)) *
                     (Cfg::kTiles * kThreads);
  if (g0 >= M) return;  // uniform for the CTA, before any barrier

  const int n_ct = (p.cout_g + CO - 1) / CO;
  const int grp = blockIdx.y / n_ct;
  const int co0 = (blockIdx.y - grp * n_ct) * CO;
  const int cig0 = grp * p.cin_g;
  const int cin = p.cin_g;
  const int tid = threadIdx.x;

  // plain: [epilogue registers][row info][phase weights]; staged: [row info][phase weights]
  // [epilogue registers, or the staged rows while the taps run] (sR is set below)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers
  int64_t* s_yoff = reinterpret_cast<int64_t*>(
      smem_raw + (kStaged ? 0 : p.epi.n_regs * Cfg::kTileBytes));
  int* s_n = reinterpret_cast<int*>(s_yoff + BM);
  int* s_d = s_n + BM;
  int* s_h = s_d + BM;
  int* s_w = s_h + BM;
  float* s_wt = reinterpret_cast<float*>(
      smem_raw + (kStaged ? Cfg::kInfoBytes : Cfg::weight_offset(p.epi.n_regs)));
  // phases: d, h, then the W phase (j mod sw) of each voxel j of a thread's group
  __shared__ PhaseDim s_phase[2 + RW];
  __shared__ float s_col[kMaxSlots * CO];
  __shared__ float s_bias[CO];

  if (tid < 2 + RW) {
    s_phase[tid] = tid == 0   ? phase_dim(rd, p.Do, sd, p.pad[0], p.dil[0], p.kD)
                   : tid == 1 ? phase_dim(rh, p.Ho, sh, p.pad[1], p.dil[1], p.kH)
                              : phase_dim((tid - 2) % sw, p.Wo, sw, p.pad[2], p.dil[2], p.kW);
  }
  if (tid < CO) {
    s_bias[tid] = (p.bias != nullptr && co0 + tid < p.cout_g)
                      ? load_as_float(p.bias, grp * p.cout_g + co0 + tid, IN_DT)
                      : 0.0f;
  }
  load_channel_slots<CO>(p.epi, s_col, grp * p.cout_g + co0, p.cout_g - co0, tid, kThreads);
  __syncthreads();
  const PhaseDim pdd0 = s_phase[0], pdh0 = s_phase[1];
  const int kW = p.kW;
  if constexpr (kStaged) {
    if (tid == 0) {  // published by the barrier after the weights
      const PhaseDim pw[RW] = {s_phase[2], s_phase[3]};
      StagedRows& sx = staged_rows<NV>();
      sx.win = stage_window(pw, sw, G);
      sx.off_at = 4 * stage_rows(G) * pdd0.nT * pdh0.nT * sx.win.wp * NV;
      sx.div_wp = FastDiv(sx.win.wp > 0 ? sx.win.wp : 1);
    }
  }
  const GType* __restrict__ X = static_cast<const GType*>(p.x);
  const GType* __restrict__ Wt = static_cast<const GType*>(p.w);

  // ---- the phase's weights: s_wt[((jd * taps_h + jh) * kW + kw) * cin + ci][co] ----
  {
    const int co = tid % CO;
    const bool co_ok = co0 + co < p.cout_g;
    float* dst = s_wt + tid;
    for (int jd = 0; jd < pdd0.nT; ++jd) {
      for (int jh = 0; jh < pdh0.nT; ++jh) {
        for (int kw = 0; kw < kW; ++kw) {
          const GType* src = Wt + (static_cast<int64_t>(pdd0.k0 + jd * pdd0.kstep) * p.ws[2] +
                                   static_cast<int64_t>(pdh0.k0 + jh * pdh0.kstep) * p.ws[3] +
                                   static_cast<int64_t>(kw) * p.ws[4] +
                                   static_cast<int64_t>(cig0) * p.ws[0] +
                                   static_cast<int64_t>(co0 + co) * p.ws[1]);
          for (int ci = tid / CO; ci < cin; ci += kThreads / CO) {
            dst[(ci - tid / CO) * CO] =
                co_ok ? to_float<IN_DT>(src[static_cast<int64_t>(ci) * p.ws[0]]) : 0.0f;
          }
          dst += cin * CO;
        }
      }
    }
  }
  __syncthreads();

  PhaseDim pdw0[RW];
#pragma unroll
  for (int j = 0; j < RW; ++j) pdw0[j] = s_phase[2 + j];
  const bool chan_fast = p.ys[1] == 1 && p.Cout > 1;
  // 32-bit input offsets (launch_conv checks that every offset the kernel forms fits)
  const int xs0 = static_cast<int>(p.xs[0]), xs1 = static_cast<int>(p.xs[1]);
  const int xs2 = static_cast<int>(p.xs[2]), xs3 = static_cast<int>(p.xs[3]);
  const int xs4 = static_cast<int>(p.xs[4]);
  const int cstep = cin * CO;  // weight floats per tap
  const FastDiv div_g(G), div_th(Th > 0 ? Th : 1), div_td(Td > 0 ? Td : 1);
  // staged: after this phase's weights (the host sizes the largest phase's)
  if constexpr (kStaged) sR = s_wt + pdd0.nT * pdh0.nT * kW * cstep;
  for (int t = 0; t < Cfg::kTiles; ++t) {
    const int64_t gt = g0 + static_cast<int64_t>(t) * kThreads;
    if (gt >= M) break;  // uniform
    // the phases: the staged form reads them again from shared memory for each tile (held in
    // registers through the tile loop, as by the plain form, they pushed it past 128 registers)
    const PhaseDim pdd = kStaged ? s_phase[0] : pdd0, pdh = kStaged ? s_phase[1] : pdh0;
    PhaseDim pdw[RW];
#pragma unroll
    for (int j = 0; j < RW; ++j) pdw[j] = kStaged ? s_phase[2 + j] : pdw0[j];
    // ---- this thread's W group: (n, td, th, tg), output voxels (od, oh, RW * tg + j) ----
    const int64_t g = gt + tid;
    const bool gok = g < M;
    int n = 0, td = 0, th = 0, tg = 0;
    if (gok) {
      split_index(g, M, div_g, div_th, div_td, G, Th, Td, n, td, th, tg);
    }
    const int od = rd + sd * td, oh = rh + sh * th;
#pragma unroll
    for (int j = 0; j < RW; ++j) {
      const int m = RW * tid + j;
      const int ow = RW * tg + j;
      const bool ok = gok && ow < p.Wo;
      s_n[m] = ok ? n : -1;
      s_d[m] = od;
      s_h[m] = oh;
      s_w[m] = ow;
      s_yoff[m] = ok ? static_cast<int64_t>(n) * p.ys[0] + static_cast<int64_t>(od) * p.ys[2] +
                           static_cast<int64_t>(oh) * p.ys[3] + static_cast<int64_t>(ow) * p.ys[4]
                     : 0;
    }

    // ---- staged form: the tile's input rows into shared memory; this thread's slot row ----
    [[maybe_unused]] const float4* x_row = nullptr;  // the thread's slots
    if constexpr (kStaged) {
      int tn, ttd, tth, tg0;  // the tile's first W group: group tg0 of its row
      split_index(gt, M, div_g, div_th, div_td, G, Th, Td, tn, ttd, tth, tg0);
      stage_tile_rows<IN_DT, NV>(p, sR, X, gt, tg0, M, div_g, div_th, div_td, G, Th, Td, pdd,
                                 pdh, cig0, tid);
      const int r = gok ? div_g.div(tg0 + tid) : 0;  // masked lanes read row 0, store nothing
      x_row = reinterpret_cast<const float4*>(sR) +
              r * pdd.nT * pdh.nT * staged_rows<NV>().win.wp * NV;
    }

    // ---- accumulate: voxel j = RW * tg + j has input index tw_j + off0 - jw * doff along W
    // over the taps of its W phase (pdw[j]); the same taps for every lane ----
    float acc[RW][CO];
#pragma unroll
    for (int j = 0; j < RW; ++j)
#pragma unroll
      for (int co = 0; co < CO; ++co) acc[j][co] = 0.0f;
    const int xn = n * xs0 + cig0 * xs1;
    for (int jd = 0; jd < pdd.nT; ++jd) {
      const int id = td + pdd.off0 - jd * pdd.doff;
      const bool okd = gok && static_cast<unsigned>(id) < static_cast<unsigned>(p.Di);
      for (int jh = 0; jh < pdh.nT; ++jh) {
        const int ih = th + pdh.off0 - jh * pdh.doff;
        const bool okdh = okd && static_cast<unsigned>(ih) < static_cast<unsigned>(p.Hi);
        const int xdh = xn + id * xs2 + ih * xs3;
        const float* wr = s_wt + (jd * pdh.nT + jh) * kW * cstep;
        [[maybe_unused]] const float4* x_slot = nullptr;  // staged: slot (r, jd, jh)
        if constexpr (kStaged) {
          x_slot = x_row + (jd * pdh.nT + jh) * staged_rows<NV>().win.wp * NV;
        }
#pragma unroll
        for (int j = 0; j < RW; ++j) {
          const PhaseDim& pw = pdw[j];
          if (pw.nT == 0) continue;  // uniform
          const int tw = (RW * tg + j) >> (sw - 1);  // phase index of voxel j (sw is 1 or 2)
          float part[CO];  // blocked summation: this (d, h) tap row's products, then acc
#pragma unroll
          for (int co = 0; co < CO; ++co) part[co] = 0.0f;
          for (int jw = 0; jw < pw.nT; ++jw) {
            const int iw = tw + pw.off0 - jw * pw.doff;
            const float* wk = wr + (pw.k0 + jw * pw.kstep) * cstep;
            if constexpr (kStaged) {
              // the voxel's channels at position iw - lo of the slot, 4 per float4, in the
              // plain form's channel loop
              const int i = iw - staged_rows<NV>().win.lo;
              const float4* xp = x_slot + i * NV;
              const int sz = stage_swizzle<NV>(i);
              for (int c0 = 0; c0 < cin; c0 += CIB) {
                const float4 f = xp[(c0 / CIB) ^ sz];
                const float xv[CIB] = {f.x, f.y, f.z, f.w};
                fma_channels<CO>(part, xv, wk, c0, cin);
              }
            } else {
              const bool ok = okdh && static_cast<unsigned>(iw) < static_cast<unsigned>(p.Wi);
              const GType* xp = X + (xdh + iw * xs4);  // channel c0 + cc of the tap's voxel
              for (int c0 = 0; c0 < cin; c0 += CIB) {
                float xv[CIB];
#pragma unroll
                for (int cc = 0; cc < CIB; ++cc) {
                  xv[cc] = (ok && c0 + cc < cin) ? to_float<IN_DT>(*xp) : 0.0f;
                  xp += xs1;
                }
                fma_channels<CO>(part, xv, wk, c0, cin);
              }
            }
          }
#pragma unroll
          for (int co = 0; co < CO; ++co) acc[j][co] += part[co];
        }
      }
    }
    if constexpr (kStaged) __syncthreads();  // the registers overwrite the staged rows

    // ---- accumulators + bias -> register 0 (row RW * tid + j, column co) ----
#pragma unroll
    for (int co = 0; co < CO; ++co) {
      const float b = s_bias[co];
      float2 v;
      v.x = acc[0][co] + b;
      v.y = acc[1][co] + b;
      *reinterpret_cast<float2*>(sR + co * LDC + RW * tid) = v;
    }
    __syncthreads();

    // ---- the program over the tile, then one store per element ----
    auto pos = [&](int i) {
      int m, c;
      tile_rc<BM, kThreads>(tid, i, m, c);
      ElemPos q = tile_elem<LDC>(p, m, c, s_n, s_yoff, grp, co0);
      q.d = s_d[m];
      q.h = s_h[m];
      q.w = s_w[m];
      return q;
    };
    run_program<Cfg::kPer, decltype(pos), 4, false>(p.epi, sR, Cfg::kTileFloats, pos, s_col, CO,
                                                    [] { return TileRows{}; });
    if (chan_fast) __syncthreads();
    store_tile<BM, CO, LDC>(p, sR + p.epi.out_reg * Cfg::kTileFloats, s_n, s_yoff, co0, grp, tid,
                            chan_fast);
    __syncthreads();  // the next tile rewrites the tile registers and the row info
  }
}

template <int IN_DT, int CO>
__global__ void __launch_bounds__(kThreads, CT3D_DIRECT_MIN_CTAS)
    conv_transpose3d_direct_kernel(const __grid_constant__ ConvParams p) {
  direct_conv<IN_DT, CO, 0>(p);
}

template <int IN_DT, int CO, int NV>
__global__ void __launch_bounds__(kThreads, CT3D_DIRECT_MIN_CTAS)
    conv_transpose3d_direct_staged_kernel(const __grid_constant__ ConvParams p) {
  static_assert(NV == 1 || NV == 2 || NV == 4, "4, 8 or 16 floats per staged position");
  direct_conv<IN_DT, CO, NV>(p);
}

// ---------------------------------------------------------------------------------------
// Shared memory of the direct kernels (host code; above the launch code, which the CPU
// emulator's harness cannot compile, so that it calls the same functions as launch_conv).

// Taps of the largest (d, h) stride phase along d (*nd) and h (*nh).
inline void direct_max_taps(const ConvParams& p, int* nd, int* nh) {
  *nd = *nh = 0;
  for (int r = 0; r < p.st[0]; ++r) {
    const int t = phase_dim(r, p.Do, p.st[0], p.pad[0], p.dil[0], p.kD).nT;
    *nd = t > *nd ? t : *nd;
  }
  for (int r = 0; r < p.st[1]; ++r) {
    const int t = phase_dim(r, p.Ho, p.st[1], p.pad[1], p.dil[1], p.kH).nT;
    *nh = t > *nh ? t : *nh;
  }
}

// Weight floats the direct kernel stages for its largest (d, h) phase, or -1 where it does
// not apply (W stride above 2: the stride must divide the RW = 2 voxels of a thread).
template <int CO>
inline int64_t direct_weight_floats(const ConvParams& p) {
  if (p.st[2] > 2) return -1;
  int nd = 0, nh = 0;
  direct_max_taps(p, &nd, &nh);
  return static_cast<int64_t>(nd) * nh * p.kW * p.cin_g * CO;
}

// Every input offset the direct kernel forms (indices up to a kernel extent outside the
// input, on lanes whose loads are masked off) fits in 32 bits.
inline bool direct_offsets_fit(const ConvParams& p) {
  const int64_t ext[5] = {p.N, p.Cin, static_cast<int64_t>(p.Di) + p.kD * p.dil[0],
                          static_cast<int64_t>(p.Hi) + p.kH * p.dil[1],
                          static_cast<int64_t>(p.Wi) + p.kW * p.dil[2]};
  int64_t m = 0;
  for (int i = 0; i < 5; ++i) m += ext[i] * (p.xs[i] < 0 ? -p.xs[i] : p.xs[i]);
  return m < INT_MAX;
}

// Shared memory for the phase's weights (the plain form's occupancy: 4 CTAs per SM).
constexpr int64_t kDirectMaxWeightBytes = 64 * 1024;

// direct_weight_floats where the direct kernel with CO channels per CTA applies, else -1: W
// stride 1 or 2, the phase's weights within kDirectMaxWeightBytes, grid y within CUDA's limit
// and 32-bit input offsets.
template <int CO>
inline int64_t direct_fit_floats(const ConvParams& p) {
  const int64_t wf = direct_weight_floats<CO>(p);
  const int64_t gy = static_cast<int64_t>(p.groups) * ((p.cout_g + CO - 1) / CO);
  const bool fits = wf >= 0 && wf * 4 <= kDirectMaxWeightBytes && gy <= 65535 &&
                    direct_offsets_fit(p);
  return fits ? wf : -1;
}

// Dynamic shared memory of the staged form for CO channels per CTA and w_floats weight floats
// (direct_fit_floats; -1 where the direct kernel does not apply), or -1 where the staged form
// does not apply: C_in/groups above 16, or more than kDirectStagedMaxSmem bytes. Bytes, for the
// largest (d, h) phase:
//   staged = stage_rows(G) * taps_d * taps_h * (wp * 16 NV + 4)   (slots: rows, slot table)
//   total  = Direct<CO>::kInfoBytes + 4 w_floats + max(n_regs * Direct<CO>::kTileBytes, staged)
// with G = ceil(W_out / 2) W groups per output row and wp the positions of stage_window.
// kDirectStagedMaxSmem keeps the total plus the kernel's static shared memory (~1.2 KB) within
// the 163 KB a CTA may opt into on sm_80 (227 KB on sm_90); launch_direct_staged also checks
// the current device's limit.
constexpr int64_t kDirectStagedMaxSmem = 160 * 1024;

template <int CO>
inline int64_t direct_staged_smem(const ConvParams& p, int64_t w_floats) {
  using Cfg = Direct<CO>;
  const int nv = stage_nv(p.cin_g);
  const int sw = p.st[2];
  const int G = (p.Wo + Cfg::RW - 1) / Cfg::RW;
  if (nv == 0 || w_floats < 0 || sw > 2 || G < 1) return -1;
  int nd = 0, nh = 0;
  direct_max_taps(p, &nd, &nh);
  PhaseDim pdw[Cfg::RW];
  for (int j = 0; j < Cfg::RW; ++j) {
    pdw[j] = phase_dim(j % sw, p.Wo, sw, p.pad[2], p.dil[2], p.kW);
  }
  const StageWindow win = stage_window(pdw, sw, G);
  const int64_t slots = static_cast<int64_t>(stage_rows(G)) * nd * nh;
  const int64_t staged = slots * (static_cast<int64_t>(win.wp) * 16 * nv + 4);
  const int64_t bytes = Cfg::staged_smem_bytes(p.epi.n_regs, w_floats, staged);
  return bytes <= kDirectStagedMaxSmem ? bytes : -1;
}

// ---------------------------------------------------------------------------------------
// Host side: grid, shared memory, launch on the caller's stream. Returns the launch error.
// Opts `kernel` in to `dynamic` bytes of dynamic shared memory when that plus its static shared
// memory passes the 48 KB a launch gets by default (the launch would fail otherwise).
// (Both queries are cached: ct3d_host.h.)
template <class Kernel>
inline cudaError_t opt_in_smem(Kernel kernel, int dynamic) {
  int static_bytes = 0;
  const cudaError_t e = kernel_static_smem(kernel, &static_bytes);
  if (e != cudaSuccess) return e;
  if (dynamic + static_bytes <= 48 * 1024) return cudaSuccess;
  return opt_in_dynamic_smem(kernel, dynamic);
}

template <int IN_DT, int MODE, int BM, int BN, int WARPS_M, int WARPS_N>
cudaError_t launch_tile(const ConvParams& p, cudaStream_t stream) {
  using Cfg = Tile<IN_DT, MODE, BM, BN, WARPS_M, WARPS_N>;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0];
  const int64_t th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t tw = (p.Wo + p.st[2] - 1) / p.st[2];
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * tw;
  const int64_t n_phase = static_cast<int64_t>(p.st[0]) * p.st[1] * p.st[2];
  const int64_t gx = (m_max + BM - 1) / BM * n_phase;
  const int64_t gy = static_cast<int64_t>(p.groups) * ((p.cout_g + BN - 1) / BN);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  auto kernel = conv_transpose3d_fused_kernel<IN_DT, MODE, BM, BN, WARPS_M, WARPS_N>;
  const int smem = Cfg::smem_bytes(p.epi.n_regs);
  const cudaError_t e = opt_in_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), kThreads, smem,
           stream>>>(p);
  return cudaGetLastError();
}

// The grid of both direct forms: x = CTAs of kTiles x 128 W groups x (d, h) phases, y =
// groups x channel tiles of CO. False (with *err set) where nothing is to be launched: an
// empty grid (cudaSuccess) or one beyond CUDA's limits.
template <int CO>
inline bool direct_grid(const ConvParams& p, dim3* grid, cudaError_t* err) {
  using Cfg = Direct<CO>;
  *err = cudaSuccess;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) {
    *err = cudaErrorInvalidValue;
    return false;
  }
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0];
  const int64_t th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t groups_w = (p.Wo + Cfg::RW - 1) / Cfg::RW;
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * groups_w;
  const int64_t per_cta = static_cast<int64_t>(Cfg::kTiles) * kThreads;
  const int64_t gx = (m_max + per_cta - 1) / per_cta * p.st[0] * p.st[1];
  const int64_t gy = static_cast<int64_t>(p.groups) * ((p.cout_g + CO - 1) / CO);
  if (gx == 0 || gy == 0) return false;
  if (gx > INT_MAX || gy > 65535) {
    *err = cudaErrorInvalidConfiguration;
    return false;
  }
  *grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
  return true;
}

template <int IN_DT, int CO>
cudaError_t launch_direct(const ConvParams& p, cudaStream_t stream, int64_t w_floats) {
  dim3 grid;
  cudaError_t e;
  if (!direct_grid<CO>(p, &grid, &e)) return e;
  auto kernel = conv_transpose3d_direct_kernel<IN_DT, CO>;
  const int smem = Direct<CO>::smem_bytes(p.epi.n_regs, static_cast<int>(w_floats));
  e = opt_in_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The staged form with `smem` bytes of dynamic shared memory (direct_staged_smem), NV float4s
// per position by C_in/groups. Sets *ran to false, launching nothing, where that plus the
// kernel's static shared memory passes what a CTA may opt into on the current device.
template <int IN_DT, int CO>
cudaError_t launch_direct_staged(const ConvParams& p, cudaStream_t stream, int64_t smem,
                                 bool* ran) {
  const int nv = stage_nv(p.cin_g);
  auto kernel = nv == 1   ? conv_transpose3d_direct_staged_kernel<IN_DT, CO, 1>
                : nv == 2 ? conv_transpose3d_direct_staged_kernel<IN_DT, CO, 2>
                          : conv_transpose3d_direct_staged_kernel<IN_DT, CO, 4>;
  int static_bytes = 0;
  cudaError_t e = kernel_static_smem(kernel, &static_bytes);
  if (e != cudaSuccess) return e;
  *ran = smem + static_bytes <= max_smem_optin();
  if (!*ran) return cudaSuccess;
  dim3 grid;
  if (!direct_grid<CO>(p, &grid, &e)) return e;
  e = opt_in_smem(kernel, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  kernel<<<grid, kThreads, static_cast<int>(smem), stream>>>(p);
  return cudaGetLastError();
}

// Where the direct kernel runs (p.algo == kAlgoAuto), by the FFMAs per output element,
// macs = C_in/groups x kD kH kW / (sD sH sW), and the arithmetic the GEMM would use; measured
// on the H200 suite (docs/kernel.md, v4):
//   * every mode: macs <= 32 (C_in = 3: the GEMM pads each 16-channel K step with 13 zeros);
//   * TF32 and exact FP32: also C_in/groups <= 8 with macs <= 128 (l1_72: half of every K step
//     and of every 16-channel tile is padding, so the GEMM loses even to FFMA);
//   * exact FP32: also macs <= 64 (both kernels use FFMA there; the direct one wastes none).
// FP16/BF16 MMA is twice as fast as TF32, so only the first rule applies there. Either way the
// kernel must apply (direct_fit_floats). p.algo overrides the choice (kAlgoGemm / kAlgoDirect /
// kAlgoDirectStaged; a direct request the kernel cannot take runs the GEMM, a staged one the
// staged form cannot take the plain direct kernel).
template <int IN_DT, int MODE>
inline bool direct_pays(const ConvParams& p) {
  const double macs = static_cast<double>(p.cin_g) * p.kD * p.kH * p.kW /
                      (static_cast<double>(p.st[0]) * p.st[1] * p.st[2]);
  if (macs <= 32.0) return true;
  if (IN_DT != kF32) return false;
  if (p.cin_g <= 8 && macs <= 128.0) return true;
  return MODE == kModeFfma && macs <= 64.0;
}

// Where the automatic choice takes the staged form (p.algo == kAlgoAutoStaged: the switch
// _cuda.DIRECT_STAGED_AUTO, off by default): where the direct kernel pays (direct_pays) with
// 5 to 16 input channels per group. Predicted from its instruction count (docs/kernel.md,
// Next), not yet timed: l1_72 (8 channels) ~1.7x fewer instructions; with 3 channels the
// staging costs about what it saves (each staged element feeds ~3.4 taps there).
template <int IN_DT, int MODE>
inline bool direct_staged_pays(const ConvParams& p) {
  return p.cin_g >= 5 && p.cin_g <= 16 && direct_pays<IN_DT, MODE>(p);
}

// Tile choice by output channels per group (BM * BN = 4096 outputs per CTA). *kernel is set
// to the kernel that ran (kKernelGemm, kKernelDirect or kKernelDirectStaged).
template <int IN_DT, int MODE>
cudaError_t launch_conv(const ConvParams& p, cudaStream_t stream, int* kernel) {
  // SOFTMAX runs in the GEMM, whose tile holds up to 64 channels (kMaxSoftmaxChannels); the
  // direct kernel does not run it (ct3d_epilogue.cuh run_program)
  if (p.algo != kAlgoGemm && !epilogue_spans_channels(p.epi)) {
    const bool narrow = p.cout_g <= 8;
    const int64_t wf = narrow ? direct_fit_floats<8>(p) : direct_fit_floats<16>(p);
    const bool forced = p.algo == kAlgoDirect || p.algo == kAlgoDirectStaged;
    if (wf >= 0 && (forced || direct_pays<IN_DT, MODE>(p))) {
      if (p.algo == kAlgoDirectStaged ||
          (p.algo == kAlgoAutoStaged && direct_staged_pays<IN_DT, MODE>(p))) {
        const int64_t smem = narrow ? direct_staged_smem<8>(p, wf) : direct_staged_smem<16>(p, wf);
        if (smem >= 0) {
          bool ran = false;
          const cudaError_t e = narrow ? launch_direct_staged<IN_DT, 8>(p, stream, smem, &ran)
                                       : launch_direct_staged<IN_DT, 16>(p, stream, smem, &ran);
          if (e != cudaSuccess || ran) {
            *kernel = kKernelDirectStaged;
            return e;
          }
        }
      }
      *kernel = kKernelDirect;
      return narrow ? launch_direct<IN_DT, 8>(p, stream, wf)
                    : launch_direct<IN_DT, 16>(p, stream, wf);
    }
  }
  *kernel = kKernelGemm;
  if (p.cout_g <= 16) return launch_tile<IN_DT, MODE, 256, 16, 4, 1>(p, stream);
  if (p.cout_g <= 32) return launch_tile<IN_DT, MODE, 128, 32, 4, 1>(p, stream);
  return launch_tile<IN_DT, MODE, 64, 64, 2, 2>(p, stream);
}

}  // namespace ct3d
