// Channels-last implicit GEMM for the tensor cores (TF32 / FP16 / BF16), groups == 1. No torch
// header.
//
// Same gather form and stride phases as conv_transpose3d_fused_kernel (ct3d_conv.cuh), but the
// main loop reads a padded channels-last copy of the input instead of the caller's tensor:
//
//   xp (N, Dp, Hp, Wp, Cp)   made by pack_input_kernel from x of any strides: the input plus a
//                            zero halo (lo in front, enough behind) so that every tap of every
//                            phase reads inside xp, and C_in padded with zeros to Cp (a multiple
//                            of the K step); float32 values rounded to TF32 once here (cvt.rna);
//   wp (kD, kH, kW, CoutP, Cp)  the weight, C_in fastest, C_out padded to CoutP (a multiple of
//                            BN), TF32-rounded for float32 (_cuda.py packs and caches it).
//
// With both operands K-contiguous and in bounds, a K step (one tap, BKB bytes of input
// channels) is a rectangle of 16-byte rows for A and B: cp.async copies them into shared
// memory STAGES steps ahead (no registers, no bounds checks, no conversion in the main loop),
// ldmatrix.x4 forms the mma fragments, and mma.sync runs the product (m16n8k8 TF32,
// m16n8k16 FP16/BF16, FP32 accumulation). The output tile then takes the same epilogue and
// store as the other kernels (register 0 of the shared-memory tile file, run_program,
// store_tile).
//
// Shared-memory rows are padded by 16 bytes: row pitch 80 or 144 bytes, so the 8 row addresses
// of an ldmatrix phase fall in 8 distinct groups of 4 banks (no conflicts).
#pragma once

#include "ct3d_async.cuh"
#include "ct3d_conv.cuh"

namespace ct3d {

// Halo of one dimension: the input indices t + off0 - j*doff the phases read, over every phase.
inline void igemm_halo(int in, int out, int s, int pad, int dil, int k, int& lo, int& hi) {
  int mn = 0, mx = in - 1;
  for (int r = 0; r < s; ++r) {
    const PhaseDim d = phase_dim(r, out, s, pad, dil, k);
    if (d.T == 0 || d.nT == 0) continue;
    const int a = d.off0 - (d.nT - 1) * d.doff;  // smallest input index (t = 0, last tap)
    const int b = d.T - 1 + d.off0;              // largest (t = T - 1, first tap)
    mn = a < mn ? a : mn;
    mx = b > mx ? b : mx;
  }
  lo = -mn;
  hi = mx - (in - 1);
}

// Fills the extents of g for K steps of `ck` channels and output tiles of `bn` channels.
inline void igemm_geometry(const ConvParams& p, int ck, int bn, IgemmGeom& g) {
  int lo, hi;
  igemm_halo(p.Di, p.Do, p.st[0], p.pad[0], p.dil[0], p.kD, lo, hi);
  g.lo[0] = lo;
  g.Dp = p.Di + lo + hi;
  igemm_halo(p.Hi, p.Ho, p.st[1], p.pad[1], p.dil[1], p.kH, lo, hi);
  g.lo[1] = lo;
  g.Hp = p.Hi + lo + hi;
  igemm_halo(p.Wi, p.Wo, p.st[2], p.pad[2], p.dil[2], p.kW, lo, hi);
  g.lo[2] = lo;
  g.Wp = p.Wi + lo + hi;
  g.Cp = (p.Cin + ck - 1) / ck * ck;
  g.CoutP = (p.Cout + bn - 1) / bn * bn;
  const int out[3] = {p.Do, p.Ho, p.Wo}, k[3] = {p.kD, p.kH, p.kW};
  for (int i = 0; i < 3; ++i) {
    for (int r = 0; r < kMaxStride && r < p.st[i]; ++r) {
      const PhaseDim d = phase_dim(r, out[i], p.st[i], p.pad[i], p.dil[i], k[i]);
      const FastDiv f(d.T > 0 ? d.T : 1);
      g.ph[i][r] = PhaseEntry{d.T, d.k0, d.nT, d.kstep, d.off0, d.doff, f.m, f.l};
    }
  }
}

// The tabulated phase r of dimension i (igemm_geometry), as the kernels' PhaseDim and FastDiv.
__device__ __forceinline__ PhaseDim tab_phase(const IgemmGeom& g, int i, int r) {
  const PhaseEntry& e = g.ph[i][r];
  PhaseDim d;
  d.T = e.T;
  d.k0 = e.k0;
  d.nT = e.nT;
  d.kstep = e.kstep;
  d.off0 = e.off0;
  d.doff = e.doff;
  return d;
}
__device__ __forceinline__ FastDiv tab_div(const IgemmGeom& g, int i, int r) {
  const PhaseEntry& e = g.ph[i][r];
  FastDiv f;
  f.d = static_cast<uint32_t>(e.T > 0 ? e.T : 1);
  f.m = e.div_m;
  f.l = e.div_l;
  return f;
}

// ---------------------------------------------------------------------------------------
// x (any strides) -> xp, transposed through shared memory: a CTA of 256 threads takes 32
// consecutive padded voxels x one group of CC = 32 channels (16 when Cp is not a multiple of
// 32). Loads: lanes walk the 32 voxels of one channel (coalesced along W for NCDHW); stores:
// each voxel's CC channels as 16-byte vectors, the CTA's stores one contiguous run of xp when
// Cp == CC. Halo voxels and padded channels are written as zeros.
constexpr int kPackVox = 32;

template <typename T, bool ROUND_TF32>
__global__ void __launch_bounds__(256)
    pack_input_kernel(const __grid_constant__ ConvParams p, const __grid_constant__ IgemmGeom g) {
  constexpr int kVec = 16 / sizeof(T);
  __shared__ T tile[32][kPackVox + 1];
  const int cc = g.Cp % 32 == 0 ? 32 : 16;
  const int c0 = blockIdx.y * cc;
  const int64_t vox = static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * kPackVox;
  const int tid = threadIdx.x;
  {
    const int j = tid % kPackVox;  // voxel of the tile this thread loads
    const int64_t v = v0 + j;
    const T* src = nullptr;
    if (v < vox) {
      int64_t q = v;
      const int wp = static_cast<int>(q % g.Wp);
      q /= g.Wp;
      const int hp = static_cast<int>(q % g.Hp);
      q /= g.Hp;
      const int dp = static_cast<int>(q % g.Dp);
      const int n = static_cast<int>(q / g.Dp);
      const int id = dp - g.lo[0], ih = hp - g.lo[1], iw = wp - g.lo[2];
      if (static_cast<unsigned>(id) < static_cast<unsigned>(p.Di) &&
          static_cast<unsigned>(ih) < static_cast<unsigned>(p.Hi) &&
          static_cast<unsigned>(iw) < static_cast<unsigned>(p.Wi)) {
        src = static_cast<const T*>(p.x) + static_cast<int64_t>(n) * p.xs[0] +
              static_cast<int64_t>(id) * p.xs[2] + static_cast<int64_t>(ih) * p.xs[3] +
              static_cast<int64_t>(iw) * p.xs[4];
      }
    }
    for (int c = tid / kPackVox; c < cc; c += 256 / kPackVox) {
      T val = T(0);
      if (src != nullptr && c0 + c < p.Cin) val = __ldg(src + static_cast<int64_t>(c0 + c) * p.xs[1]);
      if constexpr (ROUND_TF32) val = __uint_as_float(f32_to_tf32(val));
      tile[c][j] = val;
    }
  }
  __syncthreads();
  const int per_vox = cc / kVec;  // 16-byte vectors per voxel
  for (int e = tid; e < kPackVox * per_vox; e += 256) {
    const int j = e / per_vox, k = e - j * per_vox;
    const int64_t v = v0 + j;
    if (v >= vox) continue;
    T buf[kVec];
#pragma unroll
    for (int t = 0; t < kVec; ++t) buf[t] = tile[k * kVec + t][j];
    uint4 u;
    memcpy(&u, buf, 16);
    *reinterpret_cast<uint4*>(static_cast<T*>(const_cast<void*>(g.xp)) + v * g.Cp + c0 +
                              k * kVec) = u;
  }
}

// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Tile configuration: BM voxels x BN channels, K steps of BKB bytes (64: 16 float32 / 32 half
// channels; 128: 32 / 64), STAGES-deep cp.async pipeline, WARPS_M x WARPS_N warps.
template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES>
struct IgTile {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kInDt = IN_DT, kBKB = BKB, kBM = BM, kBN = BN, kStages = STAGES;
  static_assert(BKB == 64 || BKB == 128, "K step of 64 or 128 bytes");
  using GType = typename std::conditional<IN_DT == kF32, float, uint16_t>::type;
  static constexpr int kElem = static_cast<int>(sizeof(GType));
  static constexpr int BK = BKB / kElem;          // channels per K step
  static constexpr int kPitch = BKB + 16;         // shared row pitch (bytes)
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;
  static constexpr int MT = WTM / 16, NT = WTN / 8;
  static_assert(MT * 16 == WTM && NT * 8 == WTN && NT % 2 == 0, "warp tile");
  static constexpr int CH = BKB / 16;             // 16-byte chunks per row
  static constexpr int A_RPP = kThreads / CH;     // rows per loader pass
  static constexpr int A_IT = BM / A_RPP;
  static_assert(A_IT * A_RPP == BM, "A loader");
  static constexpr int B_IT = (BN * CH + kThreads - 1) / kThreads;
  static constexpr int kAStage = BM * kPitch, kBStage = BN * kPitch;  // bytes
  static constexpr int kMainBytes = STAGES * (kAStage + kBStage);
  static constexpr int LDC = BM + 4;
  static constexpr int kTileFloats = BN * LDC;
  static constexpr int kTileBytes = kTileFloats * static_cast<int>(sizeof(float));
  // per row: output offset (int64), then n, t_d, t_h, t_w and the byte offset of its voxel
  // in xp (int)
  static constexpr int kInfoBytes = BM * static_cast<int>(sizeof(int64_t) + 5 * sizeof(int));
  static constexpr int kPer = BM * BN / kThreads;
  static __host__ __device__ int union_bytes(int n_regs) {
    const int regs = n_regs * kTileBytes;
    return kMainBytes > regs ? kMainBytes : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs) { return union_bytes(n_regs) + kInfoBytes; }
};

// The B operand's cp.async loader: a BN x BKB-byte tile of the packed weight (rows = output
// channels co0.., K-contiguous) into a shared stage of pitch kPitch, one 16-byte piece per thread
// and pass. Offsets are bytes from the tile's first row.
template <class Cfg>
struct WeightLoader {
  int off[Cfg::B_IT];
  bool on[Cfg::B_IT];
  __device__ __forceinline__ WeightLoader(const IgemmGeom& g, int co0, int tid) {
#pragma unroll
    for (int i = 0; i < Cfg::B_IT; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      on[i] = idx < Cfg::kBN * Cfg::CH;
      off[i] = (co0 + idx / Cfg::CH) * g.Cp * Cfg::kElem + (idx % Cfg::CH) * 16;
    }
  }
  // src: the packed weight at the step's tap and channel chunk
  __device__ __forceinline__ void load(uint32_t dst, const char* src) const {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < Cfg::B_IT; ++i) {
      const int idx = tid + i * Cfg::kThreads;
      if (on[i]) cp_async_16(dst + (idx / Cfg::CH) * Cfg::kPitch + (idx % Cfg::CH) * 16, src + off[i]);
    }
  }
};

// Byte offset in the packed weight of K step ki (tap jd, jh, jw of the phase, channel chunk).
__device__ __forceinline__ int tap_step(const ConvParams& p, const PhaseDim& pdd,
                                        const PhaseDim& pdh, const PhaseDim& pdw, const KIter& ki,
                                        int tap_bytes, int bkb) {
  const int kd = pdd.k0 + ki.jd * pdd.kstep;
  const int kh = pdh.k0 + ki.jh * pdh.kstep;
  const int kw = pdw.k0 + ki.jw * pdw.kstep;
  return ((kd * p.kH + kh) * p.kW + kw) * tap_bytes + ki.chunk * bkb;
}

// One K step of the warp tile: fragments by ldmatrix.x4 from shared memory (A rows at
// a_addr[mi], the 16 rows of m-fragment mi given by each lane's own address, so the rows may lie
// anywhere; B at b_base, rows of the stage's [n][k] tile), then MT x NT mma.sync.
template <class Cfg>
__device__ __forceinline__ void mma_kstep(float (&acc)[Cfg::MT][Cfg::NT][4],
                                          const uint32_t (&a_addr)[Cfg::MT], uint32_t b_base) {
  constexpr int MT = Cfg::MT, NT = Cfg::NT, kPitch = Cfg::kPitch;
#pragma unroll
  for (int kb = 0; kb < Cfg::kBKB; kb += 32) {
    uint32_t af[MT][4], bf[NT][2];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) ldmatrix_x4(af[mi], a_addr[mi] + kb);
#pragma unroll
    for (int nj = 0; nj < NT / 2; ++nj) {
      uint32_t t[4];
      ldmatrix_x4(t, b_base + nj * 16 * kPitch + kb);
      bf[2 * nj][0] = t[0];
      bf[2 * nj][1] = t[1];
      bf[2 * nj + 1][0] = t[2];
      bf[2 * nj + 1][1] = t[3];
    }
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int ni = 0; ni < NT; ++ni) {
        if constexpr (Cfg::kInDt == kF32) {
          mma_tf32(acc[mi][ni], af[mi], bf[ni]);
        } else {
          mma_16<Cfg::kInDt>(acc[mi][ni], af[mi], bf[ni]);
        }
      }
  }
}

// Split-K fix-up, after the main loop of split blockIdx.z of a tile: writes this CTA's partial
// accumulators (PER per thread, thread-fastest so the writes coalesce) to the workspace and
// counts the arrival; returns false for every split but the last to arrive, which sums all
// partials in split order (its own from registers) into acc and returns true. Uniform per CTA.
template <int THREADS, int PER>
__device__ __forceinline__ bool splitk_reduce(const IgemmGeom& g, float* acc, int tid) {
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  const int z = blockIdx.z;
  float* base = g.ws + tile * g.splits * (static_cast<int64_t>(PER) * THREADS);
  float* mine = base + static_cast<int64_t>(z) * PER * THREADS;
#pragma unroll
  for (int i = 0; i < PER; ++i) __stcg(mine + i * THREADS + tid, acc[i]);
  __threadfence();  // the partial is visible device-wide before the arrival is counted
  __shared__ int s_last;
  __syncthreads();
  if (tid == 0) {
    const int before = atomicAdd(g.counters + tile, 1);
    s_last = before == g.splits - 1;
    if (s_last) g.counters[tile] = 0;  // every split has arrived: reset for the next launch
  }
  __syncthreads();
  if (!s_last) return false;
  __threadfence();  // acquire: the other splits' partials
  float sum[PER];
#pragma unroll
  for (int i = 0; i < PER; ++i) sum[i] = 0.0f;
  for (int zz = 0; zz < g.splits; ++zz) {
    const float* part = base + static_cast<int64_t>(zz) * PER * THREADS;
#pragma unroll
    for (int i = 0; i < PER; ++i) sum[i] += zz == z ? acc[i] : __ldcg(part + i * THREADS + tid);
  }
#pragma unroll
  for (int i = 0; i < PER; ++i) acc[i] = sum[i];
  return true;
}

// The K loop of a row tile: A rows at the xp byte offsets s_xoff[0, BM), the taps of the phase
// (pdd, pdh, pdw), K steps [s_begin, s_begin + total) (channel chunk fastest, then the w, h, d
// taps) accumulated into acc (mma.sync C layout, warp tile WTM x WTN). The pipeline buffers
// are at smem_raw (STAGES A stages, then STAGES B stages). Returns with every cp.async
// complete; other warps may still read the last stage, so the caller synchronizes before it
// reuses the buffers.
template <class Cfg>
__device__ __forceinline__ void igemm_row_kloop(const ConvParams& p, const IgemmGeom& g,
                                                const int* s_xoff, const PhaseDim& pdd,
                                                const PhaseDim& pdh, const PhaseDim& pdw,
                                                int co0, int s_begin, int total,
                                                unsigned char* smem_raw,
                                                float (&acc)[Cfg::MT][Cfg::NT][4], int tid) {
  constexpr int STAGES = Cfg::kStages, BKB = Cfg::kBKB, kPitch = Cfg::kPitch;
  constexpr int MT = Cfg::MT;
  unsigned char* sA = smem_raw;
  unsigned char* sB = smem_raw + STAGES * Cfg::kAStage;
  // ---- loader state (byte offsets; launch_igemm checks that xp and wp fit in 2^31 bytes) ----
  const int chunk = tid % Cfg::CH;
  const int a_r0 = tid / Cfg::CH;
  int a_off[Cfg::A_IT];
#pragma unroll
  for (int i = 0; i < Cfg::A_IT; ++i) a_off[i] = s_xoff[a_r0 + i * Cfg::A_RPP] + chunk * 16;
  const WeightLoader<Cfg> bl(g, co0, tid);
  const uint32_t sA0 = smem_u32(sA), sB0 = smem_u32(sB);
  const uint32_t a_dst0 = sA0 + a_r0 * kPitch + chunk * 16;
  const char* __restrict__ Xp = static_cast<const char*>(g.xp);
  const char* __restrict__ Wp = static_cast<const char*>(g.wp);

  const int n_chunks = g.Cp / Cfg::BK;
  const int tap_bytes = g.CoutP * g.Cp * Cfg::kElem;

  auto load_stage = [&](int stage, const KIter& ki) {
    const int offd = pdd.off0 - ki.jd * pdd.doff;
    const int offh = pdh.off0 - ki.jh * pdh.doff;
    const int offw = pdw.off0 - ki.jw * pdw.doff;
    const int a_step = ((offd * g.Hp + offh) * g.Wp + offw) * g.Cp * Cfg::kElem + ki.chunk * BKB;
    const uint32_t a_dst = a_dst0 + stage * Cfg::kAStage;
#pragma unroll
    for (int i = 0; i < Cfg::A_IT; ++i) {
      cp_async_16(a_dst + i * Cfg::A_RPP * kPitch, Xp + (a_off[i] + a_step));
    }
    bl.load(sB0 + stage * Cfg::kBStage, Wp + tap_step(p, pdd, pdh, pdw, ki, tap_bytes, BKB));
  };

  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / (Cfg::kBN / Cfg::WTN), warp_n = warp % (Cfg::kBN / Cfg::WTN);
  // ldmatrix lane addresses. A (16 x 32 bytes per fragment): matrices (rows 0-7, bytes 0-15),
  // (rows 8-15, 0-15), (rows 0-7, 16-31), (rows 8-15, 16-31) = a0..a3 of the mma. B (stored
  // [n][k]; two n8 fragments per x4): (n 0-7, 0-15), (n 0-7, 16-31), (n 8-15, 0-15),
  // (n 8-15, 16-31) = b0, b1 of fragment ni and of ni + 1.
  const int q = lane >> 3, r8 = lane & 7;
  const uint32_t a_frag0 =
      sA0 + (warp_m * Cfg::WTM + r8 + (q & 1) * 8) * kPitch + (q >> 1) * 16;
  const uint32_t b_frag0 =
      sB0 + (warp_n * Cfg::WTN + r8 + (q >> 1) * 8) * kPitch + (q & 1) * 16;

  auto compute = [&](int stage) {
    uint32_t a_addr[MT];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) a_addr[mi] = a_frag0 + stage * Cfg::kAStage + mi * 16 * kPitch;
    mma_kstep<Cfg>(acc, a_addr, b_frag0 + stage * Cfg::kBStage);
  };

  // ---- main loop: STAGES - 1 steps in flight while one is multiplied ----
  if (total > 0) {
    KIter kl;  // step s_begin: chunk fastest, then the w, h, d taps
    {
      int t = s_begin / n_chunks;
      kl.chunk = s_begin - t * n_chunks;
      kl.jw = t % pdw.nT;
      t /= pdw.nT;
      kl.jh = t % pdh.nT;
      kl.jd = t / pdh.nT;
    }
    int loaded = 0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (loaded < total) {
        load_stage(s, kl);
        kl.next(n_chunks, pdw.nT, pdh.nT);
        ++loaded;
      }
      cp_async_commit();
    }
    for (int it = 0; it < total; ++it) {
      cp_async_wait<STAGES - 2>();
      __syncthreads();  // step it is in shared memory; step it - 1's buffer is free
      if (loaded < total) {
        load_stage(loaded % STAGES, kl);
        kl.next(n_chunks, pdw.nT, pdh.nT);
        ++loaded;
      }
      cp_async_commit();
      compute(it % STAGES);
    }
    cp_async_wait<0>();
  }
}

template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES,
          int MIN_CTAS>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_CTAS)
    conv_transpose3d_igemm_kernel(const __grid_constant__ ConvParams p,
                                  const __grid_constant__ IgemmGeom g) {
  using Cfg = IgTile<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int MT = Cfg::MT, NT = Cfg::NT;

  // ---- phase, tile position ----
  const TileOrigin to = tile_origin<BM>(p);
  if (to.m0 >= to.M) return;  // uniform for the CTA, before any barrier
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  const int rd = to.rd, rh = to.rh, rw = to.rw, Td = to.Td, Th = to.Th, Tw = to.Tw;
  const int64_t M = to.M, m0 = to.m0;
  const int co0 = blockIdx.y * BN;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias the pipeline
  int64_t* s_yoff = reinterpret_cast<int64_t*>(smem_raw + Cfg::union_bytes(p.epi.n_regs));
  int* s_n = reinterpret_cast<int*>(s_yoff + BM);
  int* s_td = s_n + BM;
  int* s_th = s_td + BM;
  int* s_tw = s_th + BM;
  int* s_xoff = s_tw + BM;

  const int tid = threadIdx.x;
  const FastDiv div_w = tab_div(g, 2, rw), div_h = tab_div(g, 1, rh), div_d = tab_div(g, 0, rd);
  // Rows past M load the last voxel's inputs (always inside xp) and are never stored.
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    int n, td, th, tw;
    split_index(m < M ? m : M - 1, M, div_w, div_h, div_d, Tw, Th, Td, n, td, th, tw);
    s_n[r] = m < M ? n : -1;
    s_xoff[r] = (((n * g.Dp + td + g.lo[0]) * g.Hp + th + g.lo[1]) * g.Wp + tw + g.lo[2]) *
                g.Cp * Cfg::kElem;
    s_td[r] = td;
    s_th[r] = th;
    s_tw[r] = tw;
    s_yoff[r] = static_cast<int64_t>(n) * p.ys[0] + static_cast<int64_t>(rd + sd * td) * p.ys[2] +
                static_cast<int64_t>(rh + sh * th) * p.ys[3] +
                static_cast<int64_t>(rw + sw * tw) * p.ys[4];
    if (m >= M) s_yoff[r] = 0;
  }
  __syncthreads();
  const PhaseDim pdd = tab_phase(g, 0, rd), pdh = tab_phase(g, 1, rh), pdw = tab_phase(g, 2, rw);

  const int n_chunks = g.Cp / Cfg::BK;
  const int all_steps = pdd.nT * pdh.nT * pdw.nT * n_chunks;
  // split-K: this CTA's K steps [s_begin, s_begin + total)
  const int split = blockIdx.z;
  const int s_begin = static_cast<int>(static_cast<int64_t>(all_steps) * split / g.splits);
  const int total =
      static_cast<int>(static_cast<int64_t>(all_steps) * (split + 1) / g.splits) - s_begin;

  const int warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  float acc[MT][NT][4];
  zero_acc(acc);
  igemm_row_kloop<Cfg>(p, g, s_xoff, pdd, pdh, pdw, co0, s_begin, total, smem_raw, acc, tid);
  if (g.splits > 1 && !splitk_reduce<kThreads, MT * NT * 4>(g, &acc[0][0][0], tid)) return;
  __syncthreads();  // the epilogue tiles alias the pipeline buffers

  // ---- epilogue: fragments + bias -> register 0, the program, the store (groups == 1) ----
  gemm_epilogue<IN_DT, BM, BN, Cfg::LDC, Cfg::WTM, Cfg::WTN, MT, NT, kThreads>(
      p, acc, sR, to, s_n, s_td, s_th, s_tw, s_yoff, 0, co0, warp_m, warp_n, tid);
}

// ---------------------------------------------------------------------------------------
// W-line tiles: the tile holds whole W lines of the output, so the epilogue may combine the W
// positions of a line (LAYER_NORM over the last dimension). W stride WM = 1 or 2, W_out a
// multiple of WM, Tw = W_out / WM outputs per line and W phase, Tw <= BM. A CTA takes
// R = (BM / Tw) * Tw consecutive voxels (whole lines) of one (d, h) stride phase in each of the
// WM W phases: it runs the K loop of each W phase in turn (the row tiles' loop), keeping the
// earlier phases' accumulators in registers (WM times a BM-row tile's), then writes all of them
// into one TM = WM * BM-row tile whose rows are the lines' outputs in W order (row
// line * W_out + w; per-phase row r of phase j goes to s_map[r] + j). The NCDHW store then
// writes whole W runs (32 consecutive floats per warp store) instead of every other float.
// Rows r >= R of a phase are computed from a valid voxel and never stored.
template <class Cfg, int WM>
struct IgWline {
  static constexpr int TM = WM * Cfg::kBM, LDC = TM + 4, kTileFloats = Cfg::kBN * LDC;
  static constexpr int kTileBytes = kTileFloats * static_cast<int>(sizeof(float));
  // per tile row: output offset (int64), n, d, h, w; per phase row: xp offset, tile row
  static constexpr int kInfoBytes =
      TM * static_cast<int>(sizeof(int64_t) + 4 * sizeof(int)) + Cfg::kBM * 2 * sizeof(int);
  static __host__ __device__ int union_bytes(int n_regs) {
    const int regs = n_regs * kTileBytes;
    return Cfg::kMainBytes > regs ? Cfg::kMainBytes : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs) { return union_bytes(n_regs) + kInfoBytes; }
};

template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES,
          int MIN_CTAS, int WM>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_CTAS)
    conv_transpose3d_igemm_wline_kernel(const __grid_constant__ ConvParams p,
                                        const __grid_constant__ IgemmGeom g) {
  using Cfg = IgTile<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  using Lay = IgWline<Cfg, WM>;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, TM = Lay::TM, LDC = Lay::LDC;

  // ---- (d, h) phase (grid x = tiles x phases, phase fastest), tile position ----
  const int sd = p.st[0], sh = p.st[1];
  const unsigned n_dh = static_cast<unsigned>(sd * sh);
  const int z = static_cast<int>(blockIdx.x % n_dh);
  const int rh = z % sh, rd = z / sh;
  const int Td = rd < p.Do ? (p.Do - rd + sd - 1) / sd : 0;
  const int Th = rh < p.Ho ? (p.Ho - rh + sh - 1) / sh : 0;
  const int Tw = p.Wo / WM;
  const int R = (BM / Tw) * Tw;
  const int64_t M = static_cast<int64_t>(p.N) * Td * Th * Tw;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x / n_dh) * R;
  if (m0 >= M) return;  // uniform for the CTA, before any barrier
  const int co0 = blockIdx.y * BN;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias the pipeline
  int64_t* s_yoff = reinterpret_cast<int64_t*>(smem_raw + Lay::union_bytes(p.epi.n_regs));
  int* s_n = reinterpret_cast<int*>(s_yoff + TM);
  int* s_d = s_n + TM;
  int* s_h = s_d + TM;
  int* s_w = s_h + TM;
  int* s_xoff = s_w + TM;
  int* s_map = s_xoff + BM;

  const int tid = threadIdx.x;
  // every W phase has Tw outputs (W_out % WM == 0): phase 0's divisor serves both
  const FastDiv div_w = tab_div(g, 2, 0), div_h = tab_div(g, 1, rh), div_d = tab_div(g, 0, rd);
  for (int r = tid; r < BM; r += kThreads) {
    const int64_t m = m0 + r;
    const bool ok = r < R && m < M;
    int n, td, th, tw;
    split_index(m < M ? m : M - 1, M, div_w, div_h, div_d, Tw, Th, Td, n, td, th, tw);
    s_xoff[r] = (((n * g.Dp + td + g.lo[0]) * g.Hp + th + g.lo[1]) * g.Wp + tw + g.lo[2]) *
                g.Cp * Cfg::kElem;
    const int base = r < R ? (r / Tw) * p.Wo + (r % Tw) * WM : r * WM;
    s_map[r] = base;
    const int d = rd + sd * td, h = rh + sh * th;
#pragma unroll
    for (int j = 0; j < WM; ++j) {
      const int w = j + WM * tw;
      s_n[base + j] = ok ? n : -1;
      s_d[base + j] = d;
      s_h[base + j] = h;
      s_w[base + j] = w;
      s_yoff[base + j] = ok ? static_cast<int64_t>(n) * p.ys[0] + static_cast<int64_t>(d) * p.ys[2] +
                                  static_cast<int64_t>(h) * p.ys[3] + static_cast<int64_t>(w) * p.ys[4]
                            : 0;
    }
  }
  __syncthreads();
  const PhaseDim pdd = tab_phase(g, 0, rd), pdh = tab_phase(g, 1, rh);
  const int n_chunks = g.Cp / Cfg::BK;
  // the LayerNorm's weight and bias: loads issued now, used after the K loop
  float ln_ahead[kLnAhead<kThreads>];
  const int ln_k = layernorm_read_ahead<kThreads>(p.epi, p.Wo, tid, ln_ahead);

  // ---- the K loop of each W phase; the accumulators of all phases stay in registers ----
  float acc[WM][MT][NT][4];
#pragma unroll
  for (int j = 0; j < WM; ++j) {
    const PhaseDim pdw = tab_phase(g, 2, j);
    zero_acc(acc[j]);
    if (j > 0) __syncthreads();  // every warp is done with the previous phase's last stage
    igemm_row_kloop<Cfg>(p, g, s_xoff, pdd, pdh, pdw, co0, 0, pdd.nT * pdh.nT * pdw.nT * n_chunks,
                         smem_raw, acc[j], tid);
  }
  __syncthreads();  // the epilogue tiles alias the pipeline buffers

  // ---- epilogue: fragments + bias -> register 0 in W order, the program, the store ----
  const int warp = tid >> 5, warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int lg = (tid & 31) >> 2, lt = tid & 3;
  __shared__ float s_col[kMaxSlots * BN];
  load_channel_slots<BN>(p.epi, s_col, co0, p.cout_g - co0, tid, kThreads);
  __shared__ float s_ln[2 * kLnMaxW];
  if (ln_k >= 0) {
#pragma unroll
    for (int r = 0; r < kLnAhead<kThreads>; ++r)
      if (tid + r * kThreads < 2 * kLnMaxW) s_ln[tid + r * kThreads] = ln_ahead[r];
  }
  int trow[MT][2];  // tile rows of this thread's fragment rows in W phase 0
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    trow[mi][0] = s_map[warp_m * Cfg::WTM + mi * 16 + lg];
    trow[mi][1] = s_map[warp_m * Cfg::WTM + mi * 16 + lg + 8];
  }
#pragma unroll
  for (int ni = 0; ni < NT; ++ni)
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int col = warp_n * Cfg::WTN + ni * 8 + 2 * lt + h2;
      float bias = 0.0f;
      if (p.bias != nullptr && co0 + col < p.cout_g) bias = load_as_float(p.bias, co0 + col, IN_DT);
#pragma unroll
      for (int j = 0; j < WM; ++j)
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          sR[col * LDC + trow[mi][0] + j] = acc[j][mi][ni][h2] + bias;
          sR[col * LDC + trow[mi][1] + j] = acc[j][mi][ni][2 + h2] + bias;
        }
    }
  __syncthreads();

  auto pos = [&](int i) {
    int m, c;
    tile_rc<TM, kThreads>(tid, i, m, c);
    ElemPos q = tile_elem<LDC>(p, m, c, s_n, s_yoff, 0, co0);
    q.d = s_d[m];
    q.h = s_h[m];
    q.w = s_w[m];
    return q;
  };
  auto rows = [&]() {
    const int ncols = p.cout_g - co0 < BN ? p.cout_g - co0 : BN;
    return TileRows{TM, LDC, ncols, co0 == 0 && p.cout_g <= BN, tid, kThreads, p.Wo, R / Tw,
                    ln_k >= 0 ? s_ln : nullptr, ln_k};
  };
  run_program<TM * BN / kThreads>(p.epi, sR, Lay::kTileFloats, pos, s_col, BN, rows);

  const bool chan_fast = p.ys[1] == 1 && p.Cout > 1;
  if (chan_fast) __syncthreads();  // the store walks the tile in the other element order
  store_tile<TM, BN, LDC, kThreads>(p, sR + p.epi.out_reg * Lay::kTileFloats, s_n, s_yoff, co0,
                                    0, tid, chan_fast);
}

// ---------------------------------------------------------------------------------------
// Box tiles. The tile's BM = BD x BH x BW rows are a box of outputs of one phase (one batch
// element), not a run of consecutive voxels. For each K chunk the CTA copies the box's input
// patch once, (BD + (nTd - 1) doff_d) x (BH + ...) x (BW + ...) voxels of xp, and every tap of
// the phase then reads its A fragments from that patch: ldmatrix takes one row address per lane,
// so the rows of tap (jd, jh, jw) are the patch rows shifted by a uniform offset. The A operand
// is read from L2 once per chunk instead of once per tap (stride 1, k = 3: 360 patch rows for a
// 4 x 4 x 8 box against 27 x 128 rows), the B tile of each tap still streams through a STAGES-deep
// cp.async ring. Patch rows past the end of xp (boxes that overhang the phase's extent) are
// clamped to the last voxel; they only feed rows that are not stored.
template <int IN_DT, int BD, int BH, int BW, int BN, int BKB, int WARPS_M, int WARPS_N,
          int STAGES>
struct IgBox : IgTile<IN_DT, BD * BH * BW, BN, BKB, WARPS_M, WARPS_N, STAGES> {
  using Base = IgTile<IN_DT, BD * BH * BW, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  static_assert(BW % 8 == 0, "8 consecutive rows of an ldmatrix matrix must be patch neighbours");
  // shared memory: [patch rows | B ring] union [epilogue registers], row info, patch offsets
  static __host__ __device__ int main_bytes(int p_rows) {
    return p_rows * Base::kPitch + STAGES * Base::kBStage;
  }
  static __host__ __device__ int union_bytes(int n_regs, int p_rows) {
    const int regs = n_regs * Base::kTileBytes;
    return main_bytes(p_rows) > regs ? main_bytes(p_rows) : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs, int p_rows) {
    return union_bytes(n_regs, p_rows) + Base::kInfoBytes + p_rows * static_cast<int>(sizeof(int));
  }
};

// Patch extent of one dimension for a phase: the box plus the span of the phase's taps.
__host__ __device__ __forceinline__ int patch_extent(const PhaseDim& d, int box) {
  return d.nT > 0 ? box + (d.nT - 1) * d.doff : 0;
}

// The box of a box-tile CTA (this kernel and the wgmma boxes, ct3d_wgmma.cuh): grid x = boxes x
// phases, phase fastest, the boxes tiling the largest phase. Sets the phase fields of `to` (M and
// m0 are 0: unused) and the box origin (td0, th0, tw0) of batch element n; false when the box lies
// past this phase's outputs (uniform for the CTA).
template <int BD, int BH, int BW>
__device__ __forceinline__ bool box_origin(const ConvParams& p, TileOrigin& to, int& td0,
                                           int& th0, int& tw0, int& n) {
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  int box = static_cast<int>(phase_origin(p, to));
  to.M = 0;
  to.m0 = 0;
  const int nbh = ((p.Ho + sh - 1) / sh + BH - 1) / BH;
  const int nbw = ((p.Wo + sw - 1) / sw + BW - 1) / BW;
  const int nbd = ((p.Do + sd - 1) / sd + BD - 1) / BD;
  tw0 = (box % nbw) * BW;
  box /= nbw;
  th0 = (box % nbh) * BH;
  box /= nbh;
  td0 = (box % nbd) * BD;
  n = box / nbd;
  return td0 < to.Td && th0 < to.Th && tw0 < to.Tw;
}

// Byte offsets in xp of the p_rows = ED x EH x EW rows of a box's input patch (row (0, 0, 0) is
// the box origin at the phase's last tap); rows past the end of xp are clamped to its last voxel
// (they only feed rows that are not stored). Threads tid, tid + threads, ... write s_prow.
__device__ __forceinline__ void box_patch_offsets(const IgemmGeom& g, const PhaseDim& pdd,
                                                  const PhaseDim& pdh, const PhaseDim& pdw,
                                                  int td0, int th0, int tw0, int n, int EH,
                                                  int EW, int p_rows, int elem, int* s_prow,
                                                  int tid, int threads) {
  const int xd0 = td0 + pdd.off0 - (pdd.nT - 1) * pdd.doff + g.lo[0];
  const int xh0 = th0 + pdh.off0 - (pdh.nT - 1) * pdh.doff + g.lo[1];
  const int xw0 = tw0 + pdw.off0 - (pdw.nT - 1) * pdw.doff + g.lo[2];
  for (int r = tid; r < p_rows; r += threads) {
    const int pw = r % EW, ph = (r / EW) % EH, pd = r / (EW * EH);
    const int xd = min(xd0 + pd, g.Dp - 1), xh = min(xh0 + ph, g.Hp - 1),
              xw = min(xw0 + pw, g.Wp - 1);
    s_prow[r] = (((n * g.Dp + xd) * g.Hp + xh) * g.Wp + xw) * g.Cp * elem;
  }
}

template <int IN_DT, int BD, int BH, int BW, int BN, int BKB, int WARPS_M, int WARPS_N,
          int STAGES, int MIN_CTAS>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32, MIN_CTAS)
    conv_transpose3d_igemm_box_kernel(const __grid_constant__ ConvParams p,
                                      const __grid_constant__ IgemmGeom g, int p_max) {
  using Cfg = IgBox<IN_DT, BD, BH, BW, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  constexpr int BM = BD * BH * BW;
  constexpr int kThreads = Cfg::kThreads;
  constexpr int MT = Cfg::MT, NT = Cfg::NT, kPitch = Cfg::kPitch;

  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];

  // ---- phase and box ----
  TileOrigin to;
  int td0, th0, tw0, n;
  if (!box_origin<BD, BH, BW>(p, to, td0, th0, tw0, n)) return;  // uniform, before any barrier
  const int co0 = blockIdx.y * BN;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* sP = smem_raw;
  unsigned char* sB = smem_raw + p_max * kPitch;
  float* sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias sP/sB
  int64_t* s_yoff =
      reinterpret_cast<int64_t*>(smem_raw + Cfg::union_bytes(p.epi.n_regs, p_max));
  int* s_n = reinterpret_cast<int*>(s_yoff + BM);
  int* s_td = s_n + BM;
  int* s_th = s_td + BM;
  int* s_tw = s_th + BM;
  int* s_prow = s_tw + 2 * BM;  // (kInfoBytes reserves a sixth int per row)

  const int tid = threadIdx.x;
  for (int r = tid; r < BM; r += kThreads) {
    const int td = td0 + r / (BH * BW), th = th0 + (r / BW) % BH, tw = tw0 + r % BW;
    const bool ok = td < to.Td && th < to.Th && tw < to.Tw;
    s_n[r] = ok ? n : -1;
    s_td[r] = td;
    s_th[r] = th;
    s_tw[r] = tw;
    s_yoff[r] = ok ? static_cast<int64_t>(n) * p.ys[0] +
                         static_cast<int64_t>(to.rd + sd * td) * p.ys[2] +
                         static_cast<int64_t>(to.rh + sh * th) * p.ys[3] +
                         static_cast<int64_t>(to.rw + sw * tw) * p.ys[4]
                   : 0;
  }
  const PhaseDim pdd = tab_phase(g, 0, to.rd), pdh = tab_phase(g, 1, to.rh),
                 pdw = tab_phase(g, 2, to.rw);
  const int taps = pdd.nT * pdh.nT * pdw.nT;
  const int ED = patch_extent(pdd, BD), EH = patch_extent(pdh, BH), EW = patch_extent(pdw, BW);
  const int p_rows = ED * EH * EW;  // <= p_max (the host sized shared memory for every phase)
  if (taps > 0) {
    box_patch_offsets(g, pdd, pdh, pdw, td0, th0, tw0, n, EH, EW, p_rows, Cfg::kElem, s_prow,
                      tid, kThreads);
  }
  __syncthreads();

  const uint32_t sP0 = smem_u32(sP), sB0 = smem_u32(sB);
  const char* __restrict__ Xp = static_cast<const char*>(g.xp);
  const char* __restrict__ Wp = static_cast<const char*>(g.wp);
  const WeightLoader<Cfg> bl(g, co0, tid);
  const int n_chunks = g.Cp / Cfg::BK;
  const int tap_bytes = g.CoutP * g.Cp * Cfg::kElem;

  const int lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  float acc[MT][NT][4];
  zero_acc(acc);

  // ldmatrix lane addresses (fragment layout as in conv_transpose3d_igemm_kernel): the lane's
  // row m of fragment mi, as patch row (a, b, c) at tap offset 0 (the phase's last tap)
  const int q = lane >> 3, r8 = lane & 7;
  uint32_t a_row[MT];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
    const int m = warp_m * Cfg::WTM + mi * 16 + r8 + (q & 1) * 8;
    const int prow = ((m / (BH * BW)) * EH + (m / BW) % BH) * EW + m % BW;
    a_row[mi] = sP0 + prow * kPitch + (q >> 1) * 16;
  }
  const uint32_t b_frag0 =
      sB0 + (warp_n * Cfg::WTN + r8 + (q >> 1) * 8) * kPitch + (q & 1) * 16;

  // ---- main loop: per chunk, the patch, then the taps with the B ring STAGES - 1 ahead ----
  if (taps > 0) {
    for (int ch = 0; ch < n_chunks; ++ch) {
      if (ch > 0) __syncthreads();  // the previous chunk's patch and B stages are free
      for (int i = tid; i < p_rows * Cfg::CH; i += kThreads) {
        const int r = i / Cfg::CH, piece = i % Cfg::CH;
        cp_async_16(sP0 + r * kPitch + piece * 16, Xp + (s_prow[r] + ch * BKB + piece * 16));
      }
      KIter kl{0, 0, 0, 0};  // the tap of the next B load (chunk field unused: ch)
      const int ch_bytes = ch * BKB;
      int loaded = 0;
#pragma unroll
      for (int s = 0; s < STAGES - 1; ++s) {
        if (loaded < taps) {
          bl.load(sB0 + s * Cfg::kBStage,
                  Wp + (tap_step(p, pdd, pdh, pdw, kl, tap_bytes, BKB) + ch_bytes));
          kl.next(1, pdw.nT, pdh.nT);
          ++loaded;
        }
        cp_async_commit();  // the first group carries the patch too
      }
      KIter kc{0, 0, 0, 0};  // the tap being multiplied
      for (int it = 0; it < taps; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tap it's B (and the patch) in shared memory; tap it - 1's stage free
        if (loaded < taps) {
          bl.load(sB0 + (loaded % STAGES) * Cfg::kBStage,
                  Wp + (tap_step(p, pdd, pdh, pdw, kl, tap_bytes, BKB) + ch_bytes));
          kl.next(1, pdw.nT, pdh.nT);
          ++loaded;
        }
        cp_async_commit();
        const int toff = (((pdd.nT - 1 - kc.jd) * pdd.doff * EH + (pdh.nT - 1 - kc.jh) * pdh.doff) *
                              EW +
                          (pdw.nT - 1 - kc.jw) * pdw.doff) *
                         kPitch;
        uint32_t a_addr[MT];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) a_addr[mi] = a_row[mi] + toff;
        mma_kstep<Cfg>(acc, a_addr, b_frag0 + (it % STAGES) * Cfg::kBStage);
        kc.next(1, pdw.nT, pdh.nT);
      }
      cp_async_wait<0>();
    }
  }
  __syncthreads();  // the epilogue tiles alias the pipeline buffers

  gemm_epilogue<IN_DT, BM, BN, Cfg::LDC, Cfg::WTM, Cfg::WTN, MT, NT, kThreads>(
      p, acc, sR, to, s_n, s_td, s_th, s_tw, s_yoff, 0, co0, warp_m, warp_n, tid);
}

// ---------------------------------------------------------------------------------------
// Host side. `g` holds the geometry (igemm_geometry with ck = BKB / element size and bn = BN)
// and the pointers of xp (scratch of N*Dp*Hp*Wp*Cp elements the caller allocated) and wp.

// x -> xp (pack_input_kernel); nothing to do for an empty input.
template <typename T, bool ROUND_TF32>
cudaError_t pack_input(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream) {
  const int64_t vox = static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp;
  if (vox == 0) return cudaSuccess;
  const int64_t pb = (vox + kPackVox - 1) / kPackVox;
  const int pc = g.Cp / (g.Cp % 32 == 0 ? 32 : 16);
  if (pb > INT_MAX || pc > 65535) return cudaErrorInvalidConfiguration;
  pack_input_kernel<T, ROUND_TF32>
      <<<dim3(static_cast<unsigned>(pb), static_cast<unsigned>(pc), 1), 256, 0, stream>>>(p, g);
  return cudaGetLastError();
}

// The largest patch (rows) of any phase for a BD x BH x BW box: per dimension the largest
// extent over that dimension's phases (the extents of the three dimensions are independent).
inline int box_patch_rows(const ConvParams& p, int bd, int bh, int bw) {
  const int out[3] = {p.Do, p.Ho, p.Wo}, k[3] = {p.kD, p.kH, p.kW}, b[3] = {bd, bh, bw};
  int rows = 1;
  for (int i = 0; i < 3; ++i) {
    int e = 0;
    for (int r = 0; r < p.st[i]; ++r) {
      const int x = patch_extent(phase_dim(r, out[i], p.st[i], p.pad[i], p.dil[i], k[i]), b[i]);
      e = x > e ? x : e;
    }
    rows *= e;
  }
  return rows;
}

// Box-tile launch (conv_transpose3d_igemm_box_kernel). Sets `fits` to false and launches
// nothing when the largest phase's patch does not fit in shared memory (long kernels, e.g.
// k = 7 in every dimension with 128-byte K steps): the caller then runs the row-tile kernel of
// the same K step and BN.
template <int IN_DT, int BD, int BH, int BW, int BN, int BKB, int WARPS_M, int WARPS_N,
          int STAGES, int MIN_CTAS = (WARPS_M * WARPS_N == 4 ? 2 : 1)>
cudaError_t launch_igemm_box(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream,
                             bool& fits) {
  using Cfg = IgBox<IN_DT, BD, BH, BW, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  using T = typename Cfg::GType;
  fits = true;
  if (g.splits != 1) return cudaErrorInvalidValue;  // split-K: row tiles only
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.groups != 1 || g.Cp % Cfg::BK != 0 || g.CoutP % BN != 0) return cudaErrorInvalidValue;
  if (p.st[0] > kMaxStride || p.st[1] > kMaxStride || p.st[2] > kMaxStride) {
    return cudaErrorInvalidValue;  // the phase table (igemm_geometry) holds kMaxStride phases
  }
  auto kernel = conv_transpose3d_igemm_box_kernel<IN_DT, BD, BH, BW, BN, BKB, WARPS_M, WARPS_N,
                                                  STAGES, MIN_CTAS>;
  const int p_max = box_patch_rows(p, BD, BH, BW);
  const int smem = Cfg::smem_bytes(p.epi.n_regs, p_max);
  int static_bytes = 0;
  cudaError_t e = kernel_static_smem(kernel, &static_bytes);
  if (e != cudaSuccess) return e;
  if (smem + static_bytes > max_smem_optin()) {
    fits = false;
    return cudaSuccess;
  }
  if (static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp == 0) return cudaSuccess;
  e = pack_input<T, IN_DT == kF32>(p, g, stream);
  if (e != cudaSuccess) return e;
  const int64_t nbd = ((p.Do + p.st[0] - 1) / p.st[0] + BD - 1) / BD;
  const int64_t nbh = ((p.Ho + p.st[1] - 1) / p.st[1] + BH - 1) / BH;
  const int64_t nbw = ((p.Wo + p.st[2] - 1) / p.st[2] + BW - 1) / BW;
  const int64_t n_phase = static_cast<int64_t>(p.st[0]) * p.st[1] * p.st[2];
  const int64_t gx = static_cast<int64_t>(p.N) * nbd * nbh * nbw * n_phase;
  const int64_t gy = g.CoutP / BN;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  e = opt_in_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), Cfg::kThreads, smem,
           stream>>>(p, g, p_max);
  return cudaGetLastError();
}

template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES,
          int MIN_CTAS = (WARPS_M * WARPS_N == 4 ? 2 : 1)>
cudaError_t launch_igemm_tile(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream) {
  using Cfg = IgTile<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  using T = typename Cfg::GType;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.groups != 1 || g.Cp % Cfg::BK != 0 || g.CoutP % BN != 0) return cudaErrorInvalidValue;
  if (p.st[0] > kMaxStride || p.st[1] > kMaxStride || p.st[2] > kMaxStride) {
    return cudaErrorInvalidValue;  // the phase table (igemm_geometry) holds kMaxStride phases
  }
  if (static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp == 0) return cudaSuccess;
  cudaError_t e = pack_input<T, IN_DT == kF32>(p, g, stream);
  if (e != cudaSuccess) return e;
  // the GEMM
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0];
  const int64_t th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t tw = (p.Wo + p.st[2] - 1) / p.st[2];
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * tw;
  const int64_t n_phase = static_cast<int64_t>(p.st[0]) * p.st[1] * p.st[2];
  const int64_t gx = (m_max + BM - 1) / BM * n_phase;
  const int64_t gy = g.CoutP / BN;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  if (g.splits < 1 || g.splits > 65535) return cudaErrorInvalidValue;
  if (g.splits > 1 && (g.ws == nullptr || g.counters == nullptr ||
                       g.ws_floats < gx * gy * g.splits * BM * BN)) {
    return cudaErrorInvalidValue;
  }
  auto kernel =
      conv_transpose3d_igemm_kernel<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES, MIN_CTAS>;
  const int smem = Cfg::smem_bytes(p.epi.n_regs);
  e = opt_in_smem(kernel, smem);
  if (e != cudaSuccess) return e;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                static_cast<unsigned>(g.splits)),
           Cfg::kThreads, smem, stream>>>(p, g);
  return cudaGetLastError();
}

// W-line tile launch (conv_transpose3d_igemm_wline_kernel, WM = the W stride). Invalid value
// unless the W stride is 1 or 2, W_out is a multiple of it and a line's outputs per W phase fit
// in BM rows (_cuda.py checks the same before it picks a W-line configuration).
template <int IN_DT, int BM, int BN, int BKB, int WARPS_M, int WARPS_N, int STAGES, int MIN_CTAS>
cudaError_t launch_igemm_wline(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream) {
  using Cfg = IgTile<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES>;
  using T = typename Cfg::GType;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.groups != 1 || g.Cp % Cfg::BK != 0 || g.CoutP % BN != 0) return cudaErrorInvalidValue;
  if (p.st[0] > kMaxStride || p.st[1] > kMaxStride || g.splits != 1) return cudaErrorInvalidValue;
  const int wm = p.st[2];
  if ((wm != 1 && wm != 2) || p.Wo % wm != 0 || p.Wo / wm > BM) return cudaErrorInvalidValue;
  if (static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp == 0) return cudaSuccess;
  cudaError_t e = pack_input<T, IN_DT == kF32>(p, g, stream);
  if (e != cudaSuccess) return e;
  const int64_t tw = p.Wo / wm;
  const int64_t rows = (BM / tw) * tw;
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0];
  const int64_t th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * tw;
  const int64_t gx = (m_max + rows - 1) / rows * p.st[0] * p.st[1];
  const int64_t gy = g.CoutP / BN;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  auto go = [&](auto kernel, int smem) {
    cudaError_t err = opt_in_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), Cfg::kThreads, smem,
             stream>>>(p, g);
    return cudaGetLastError();
  };
  if (wm == 1) {
    return go(conv_transpose3d_igemm_wline_kernel<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES,
                                                  MIN_CTAS, 1>,
              IgWline<Cfg, 1>::smem_bytes(p.epi.n_regs));
  }
  return go(conv_transpose3d_igemm_wline_kernel<IN_DT, BM, BN, BKB, WARPS_M, WARPS_N, STAGES,
                                                MIN_CTAS, 2>,
            IgWline<Cfg, 2>::smem_bytes(p.epi.n_regs));
}

// Tile configurations by id (_cuda.py IGEMM_CONFIGS mirrors this table: K step bytes, BM, BN,
// warps):
//   0-2  128-byte K steps, 3 stages, 4 warps: 128 x 64 (2 x 2), 128 x 32 (4 x 1), 128 x 16 (4 x 1)
//   3-5  64-byte K steps, 4 stages, the same tiles
//   6    128-byte K steps, 3 stages, 8 warps: 128 x 128 (2 x 4)
//   7    64-byte K steps, 3 stages, 8 warps: 256 x 64 (4 x 2)
//   8    64-byte K steps, 3 stages, 8 warps: 128 x 128 (2 x 4)
//   9    as 3, registers capped for 3 CTAs per multiprocessor
//   10   as 0, 2 stages, registers capped for 3 CTAs per multiprocessor
//   11-17 box tiles (conv_transpose3d_igemm_box_kernel), BD x BH x BW = 4 x 4 x 8 unless said;
//        each falls back to the row-tile configuration of the same K step and BN (in
//        parentheses) when its patch does not fit in shared memory:
//   11   128-byte K steps, 3 stages, BN 64, 2 x 2 warps (0)
//   12   64-byte K steps, 4 stages, BN 32, 4 x 1 warps (4)
//   13   64-byte K steps, 4 stages, BN 64, 2 x 2 warps (3)
//   14   as 11 with a 2 x 4 x 16 box (0)
//   15   64-byte K steps, 4 stages, BN 16, 4 x 1 warps (5)
//   16   64-byte K steps, 3 stages, BN 128, 2 x 4 warps (8)
//   17   128-byte K steps, 3 stages, BN 32, 4 x 1 warps (1)
//   18   row tile 64 x 64, 128-byte K steps, 2 stages, 2 x 2 warps, 4 CTAs per multiprocessor
//        (epilogues that stream a full-size tensor: more loads in flight per multiprocessor)
//   25   W-line tiles (conv_transpose3d_igemm_wline_kernel): 64 rows x 64 channels per W phase,
//        128-byte K steps, 2 stages, 2 x 2 warps, 3 CTAs per multiprocessor
//   26   as 25 with 64-byte K steps, 3 stages
// The configuration families, each instantiated per input dtype in its own translation unit
// (csrc/kernels_<dtype>_<family>.cu) so that the extension's build runs them in parallel;
// ct3d_launch.h declares them and composes them with the fallbacks (launch_igemm_any).
// Row tiles of 4 warps (0-5); cudaErrorInvalidValue for another id.
template <int IN_DT>
cudaError_t igemm_rows(const ConvParams& p, const IgemmGeom& g, int config, cudaStream_t stream) {
  switch (config) {
    case 0: return launch_igemm_tile<IN_DT, 128, 64, 128, 2, 2, 3>(p, g, stream);
    case 1: return launch_igemm_tile<IN_DT, 128, 32, 128, 4, 1, 3>(p, g, stream);
    case 2: return launch_igemm_tile<IN_DT, 128, 16, 128, 4, 1, 3>(p, g, stream);
    case 3: return launch_igemm_tile<IN_DT, 128, 64, 64, 2, 2, 4>(p, g, stream);
    case 4: return launch_igemm_tile<IN_DT, 128, 32, 64, 4, 1, 4>(p, g, stream);
    case 5: return launch_igemm_tile<IN_DT, 128, 16, 64, 4, 1, 4>(p, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Row tiles of 8 warps or capped registers (6-10, 18): a family of its own, so that the row
// tiles' two translation units take about the same time to compile.
template <int IN_DT>
cudaError_t igemm_rows_wide(const ConvParams& p, const IgemmGeom& g, int config,
                            cudaStream_t stream) {
  switch (config) {
    case 6: return launch_igemm_tile<IN_DT, 128, 128, 128, 2, 4, 3>(p, g, stream);
    case 7: return launch_igemm_tile<IN_DT, 256, 64, 64, 4, 2, 3>(p, g, stream);
    case 8: return launch_igemm_tile<IN_DT, 128, 128, 64, 2, 4, 3>(p, g, stream);
    case 9: return launch_igemm_tile<IN_DT, 128, 64, 64, 2, 2, 4, 3>(p, g, stream);
    case 10: return launch_igemm_tile<IN_DT, 128, 64, 128, 2, 2, 2, 3>(p, g, stream);
    case 18: return launch_igemm_tile<IN_DT, 64, 64, 128, 2, 2, 2, 4>(p, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Box tiles (11-17); *fits false (nothing launched) when the patch does not fit in shared
// memory: the caller then runs the row-tile fallback (ct3d_launch.h launch_igemm_any).
template <int IN_DT>
cudaError_t igemm_boxes(const ConvParams& p, const IgemmGeom& g, int config, cudaStream_t stream,
                        bool* fits) {
  bool f = true;
  cudaError_t e = cudaErrorInvalidValue;
  switch (config) {
    case 11: e = launch_igemm_box<IN_DT, 4, 4, 8, 64, 128, 2, 2, 3>(p, g, stream, f); break;
    case 12: e = launch_igemm_box<IN_DT, 4, 4, 8, 32, 64, 4, 1, 4>(p, g, stream, f); break;
    case 13: e = launch_igemm_box<IN_DT, 4, 4, 8, 64, 64, 2, 2, 4>(p, g, stream, f); break;
    case 14: e = launch_igemm_box<IN_DT, 2, 4, 16, 64, 128, 2, 2, 3>(p, g, stream, f); break;
    case 15: e = launch_igemm_box<IN_DT, 4, 4, 8, 16, 64, 4, 1, 4>(p, g, stream, f); break;
    case 16: e = launch_igemm_box<IN_DT, 4, 4, 8, 128, 64, 2, 4, 3>(p, g, stream, f); break;
    case 17: e = launch_igemm_box<IN_DT, 4, 4, 8, 32, 128, 4, 1, 3>(p, g, stream, f); break;
    default: break;
  }
  *fits = f;
  return e;
}

// W-line tiles (25, 26).
template <int IN_DT>
cudaError_t igemm_wlines(const ConvParams& p, const IgemmGeom& g, int config,
                         cudaStream_t stream) {
  switch (config) {
    case 25: return launch_igemm_wline<IN_DT, 64, 64, 128, 2, 2, 2, 3>(p, g, stream);
    case 26: return launch_igemm_wline<IN_DT, 64, 64, 64, 2, 2, 3, 3>(p, g, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace ct3d
