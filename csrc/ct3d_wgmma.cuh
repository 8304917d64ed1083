// Box tiles on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a only). No torch header.
//
// The same implicit GEMM as conv_transpose3d_igemm_box_kernel (ct3d_igemm.cuh): xp and wp
// packed channels-last, a CTA's rows a box of outputs of one stride phase, the box's input
// patch copied once per K chunk and read by every tap at a uniform row shift, the B tile of
// each tap streamed through a cp.async ring. What changes is the multiply: one warpgroup (the
// CTA's 4 warps) issues wgmma.mma_async with both operands read by the tensor cores straight
// from shared memory (no ldmatrix, no operand registers; the accumulators stay in registers),
// and keeps one tap's MMAs in flight while the next tap's B tile lands.
//
// wgmma reads K-major operands as "core matrices" of 8 rows x 16 bytes stored contiguously
// (128 bytes; no swizzle). Shared memory is therefore laid out in planes, one per 16-byte
// piece of the K chunk: plane k holds piece k of every row, 16 bytes a row. Then
//   * 8 consecutive rows of a plane are one core matrix, wherever the first row starts;
//   * one wgmma K step (32 bytes: 8 TF32 or 16 FP16/BF16 values) spans two planes, so the
//     descriptor's leading-dimension byte offset (the K direction) is the plane size;
//   * the stride-dimension byte offset (between 8-row groups of M or N) is 8 rows for B, and
//     for A the patch's row pitch in H (EW rows): a box is BD x 8 x 8 voxels, each m64 MMA takes
//     one D slice of it (8 H rows x 8 W voxels), so its 8 core matrices in M are the 8 H rows of
//     the patch shifted by the tap.
// The accumulator fragments of m64nN (warp w of the warpgroup owns rows 16w..16w+15 of each
// m64 slice, in the mma.sync C layout per n8 block) go to the shared epilogue
// (gemm_epilogue) with the tile's rows numbered so that its mma.sync row formula holds:
// epilogue row w * 16 * BD + b * 16 + l is row 16 w + l of slice b, the voxel (b, 2 w + l / 8,
// l % 8) of the box.
#pragma once

#include "ct3d_igemm.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define CT3D_HAS_WGMMA 1
#else
#define CT3D_HAS_WGMMA 0
#endif

namespace ct3d {

// Shared-memory matrix descriptor of wgmma: start address, leading-dimension (K) and
// stride-dimension (M/N) byte offsets between core matrices, no swizzle. All in 16-byte units.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32);
}

__device__ __forceinline__ void wg_fence() {
#if CT3D_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wg_commit() {
#if CT3D_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wg_wait() {
#if CT3D_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared memory written through the generic proxy (cp.async, plain stores) and read next by
// the tensor cores (async proxy): each writing thread fences before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
#if CT3D_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving accesses of the accumulators across a wgmma fence or wait.
template <int MT, int NT>
__device__ __forceinline__ void wg_fence_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int r = 0; r < 4; ++r) asm volatile("" : "+f"(acc[mi][ni][r])::"memory");
}

#define CT3D_WG_F4(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])
#define CT3D_WG_R32                          \
  "{%0,%1,%2,%3,%4,%5,%6,%7,"                \
  "%8,%9,%10,%11,%12,%13,%14,%15,"           \
  "%16,%17,%18,%19,%20,%21,%22,%23,"         \
  "%24,%25,%26,%27,%28,%29,%30,%31},"
#define CT3D_WG_R64                          \
  "{%0,%1,%2,%3,%4,%5,%6,%7,"                \
  "%8,%9,%10,%11,%12,%13,%14,%15,"           \
  "%16,%17,%18,%19,%20,%21,%22,%23,"         \
  "%24,%25,%26,%27,%28,%29,%30,%31,"         \
  "%32,%33,%34,%35,%36,%37,%38,%39,"         \
  "%40,%41,%42,%43,%44,%45,%46,%47,"         \
  "%48,%49,%50,%51,%52,%53,%54,%55,"         \
  "%56,%57,%58,%59,%60,%61,%62,%63},"

// One wgmma K step (32 bytes of K) of an m64 x BN slice: d += A * B^T, FP32 accumulation.
// TF32: m64nNk8 (inputs already rounded to TF32 when packed); FP16/BF16: m64nNk16, both
// operands K-major.
template <int IN_DT, int BN>
__device__ __forceinline__ void wgmma_step(float (&d)[BN / 8][4], uint64_t da, uint64_t db) {
#if CT3D_HAS_WGMMA
  static_assert(BN == 64 || BN == 128, "wgmma tiles of 64 or 128 channels");
  if constexpr (BN == 64) {
    if constexpr (IN_DT == kF32) {
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 " CT3D_WG_R32
                   " %32, %33, p, 1, 1;\n}\n"
                   : CT3D_WG_F4(0), CT3D_WG_F4(1), CT3D_WG_F4(2), CT3D_WG_F4(3), CT3D_WG_F4(4),
                     CT3D_WG_F4(5), CT3D_WG_F4(6), CT3D_WG_F4(7)
                   : "l"(da), "l"(db), "r"(1));
    } else if constexpr (IN_DT == kF16) {
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " CT3D_WG_R32
                   " %32, %33, p, 1, 1, 0, 0;\n}\n"
                   : CT3D_WG_F4(0), CT3D_WG_F4(1), CT3D_WG_F4(2), CT3D_WG_F4(3), CT3D_WG_F4(4),
                     CT3D_WG_F4(5), CT3D_WG_F4(6), CT3D_WG_F4(7)
                   : "l"(da), "l"(db), "r"(1));
    } else {
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " CT3D_WG_R32
                   " %32, %33, p, 1, 1, 0, 0;\n}\n"
                   : CT3D_WG_F4(0), CT3D_WG_F4(1), CT3D_WG_F4(2), CT3D_WG_F4(3), CT3D_WG_F4(4),
                     CT3D_WG_F4(5), CT3D_WG_F4(6), CT3D_WG_F4(7)
                   : "l"(da), "l"(db), "r"(1));
    }
  } else {
    if constexpr (IN_DT == kF32) {
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n128k8.f32.tf32.tf32 " CT3D_WG_R64
                   " %64, %65, p, 1, 1;\n}\n"
                   : CT3D_WG_F4(0), CT3D_WG_F4(1), CT3D_WG_F4(2), CT3D_WG_F4(3), CT3D_WG_F4(4),
                     CT3D_WG_F4(5), CT3D_WG_F4(6), CT3D_WG_F4(7), CT3D_WG_F4(8), CT3D_WG_F4(9),
                     CT3D_WG_F4(10), CT3D_WG_F4(11), CT3D_WG_F4(12), CT3D_WG_F4(13),
                     CT3D_WG_F4(14), CT3D_WG_F4(15)
                   : "l"(da), "l"(db), "r"(1));
    } else if constexpr (IN_DT == kF16) {
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " CT3D_WG_R64
                   " %64, %65, p, 1, 1, 0, 0;\n}\n"
                   : CT3D_WG_F4(0), CT3D_WG_F4(1), CT3D_WG_F4(2), CT3D_WG_F4(3), CT3D_WG_F4(4),
                     CT3D_WG_F4(5), CT3D_WG_F4(6), CT3D_WG_F4(7), CT3D_WG_F4(8), CT3D_WG_F4(9),
                     CT3D_WG_F4(10), CT3D_WG_F4(11), CT3D_WG_F4(12), CT3D_WG_F4(13),
                     CT3D_WG_F4(14), CT3D_WG_F4(15)
                   : "l"(da), "l"(db), "r"(1));
    } else {
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                   "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " CT3D_WG_R64
                   " %64, %65, p, 1, 1, 0, 0;\n}\n"
                   : CT3D_WG_F4(0), CT3D_WG_F4(1), CT3D_WG_F4(2), CT3D_WG_F4(3), CT3D_WG_F4(4),
                     CT3D_WG_F4(5), CT3D_WG_F4(6), CT3D_WG_F4(7), CT3D_WG_F4(8), CT3D_WG_F4(9),
                     CT3D_WG_F4(10), CT3D_WG_F4(11), CT3D_WG_F4(12), CT3D_WG_F4(13),
                     CT3D_WG_F4(14), CT3D_WG_F4(15)
                   : "l"(da), "l"(db), "r"(1));
    }
  }
#endif
}

#undef CT3D_WG_F4
#undef CT3D_WG_R32
#undef CT3D_WG_R64

// Tile configuration: a BD x 8 x 8 box (BM = 64 BD rows, BD = SPW x WGS m64 slices) x BN
// channels, K chunks of BKB bytes, a STAGES-deep B ring; WGS warpgroups, each multiplying SPW
// slices of the box with the whole B tile (two warpgroups halve the B traffic per output).
template <int IN_DT, int SPW, int WGS, int BN, int BKB, int STAGES>
struct WgBox {
  static constexpr int kThreads = 128 * WGS;
  static constexpr int BD = SPW * WGS, BH = 8, BW = 8, BM = BD * 64;
  static constexpr int MT = SPW, NT = BN / 8;
  static_assert(BKB == 64 || BKB == 128, "K chunks of 64 or 128 bytes");
  static_assert(STAGES >= 3, "one tap in flight while the next lands needs 3 stages");
  using GType = typename std::conditional<IN_DT == kF32, float, uint16_t>::type;
  static constexpr int kElem = static_cast<int>(sizeof(GType));
  static constexpr int BK = BKB / kElem;  // channels per chunk
  static constexpr int BKB_ = BKB;
  static constexpr int kInDt = IN_DT;
  static constexpr int kBN = BN;
  static constexpr int CH = BKB / 16;     // planes (16-byte pieces) per chunk
  static constexpr int kBStage = BN * BKB;
  static constexpr int LDC = BM + 4;
  static constexpr int kTileBytes = BN * LDC * static_cast<int>(sizeof(float));
  static constexpr int kInfoBytes = BM * static_cast<int>(sizeof(int64_t) + 4 * sizeof(int));
  static __host__ __device__ int main_bytes(int p_rows) {
    return p_rows * BKB + STAGES * kBStage;
  }
  static __host__ __device__ int union_bytes(int n_regs, int p_rows) {
    const int regs = n_regs * kTileBytes;
    return main_bytes(p_rows) > regs ? main_bytes(p_rows) : regs;
  }
  static __host__ __device__ int smem_bytes(int n_regs, int p_rows) {
    return union_bytes(n_regs, p_rows) + kInfoBytes + p_rows * static_cast<int>(sizeof(int));
  }
};

// Shared memory and row bookkeeping of a wgmma box CTA (both kernels below). Dynamic shared
// memory: the patch (p_max rows in CH planes), the B ring after it, the epilogue's tile
// registers aliasing both; then each row's output offset and phase coordinates and the patch
// rows' offsets in xp.
struct WgBoxState {
  PhaseDim pdd, pdh, pdw;
  int taps, EH, EW, p_rows;
  unsigned char* sB;
  float* sR;
  int64_t* s_yoff;
  int *s_n, *s_td, *s_th, *s_tw, *s_prow;
};

// Fills `st` for the box (td0, th0, tw0) of batch element n in the phase of `to`: the rows'
// bookkeeping (a row is stored only when inside the phase and `store`; both kernels pass true:
// false served the removed 2-CTA cluster form, whose padding CTA stored nothing) and the patch
// row offsets. No barrier: the caller synchronizes before anything reads them.
template <class Cfg>
__device__ __forceinline__ void wg_box_setup(const ConvParams& p, const IgemmGeom& g, int p_max,
                                             unsigned char* smem_raw, const TileOrigin& to,
                                             int td0, int th0, int tw0, int n, bool store,
                                             WgBoxState& st) {
  constexpr int BM = Cfg::BM, SPW = Cfg::MT, kThreads = Cfg::kThreads;
  const int sd = p.st[0], sh = p.st[1], sw = p.st[2];
  st.sB = smem_raw + p_max * Cfg::BKB_;
  st.sR = reinterpret_cast<float*>(smem_raw);  // epilogue registers, alias patch and ring
  st.s_yoff = reinterpret_cast<int64_t*>(smem_raw + Cfg::union_bytes(p.epi.n_regs, p_max));
  st.s_n = reinterpret_cast<int*>(st.s_yoff + BM);
  st.s_td = st.s_n + BM;
  st.s_th = st.s_td + BM;
  st.s_tw = st.s_th + BM;
  st.s_prow = st.s_tw + BM;
  const int tid = threadIdx.x;
  for (int r = tid; r < BM; r += kThreads) {
    // epilogue row r = v * 16 SPW + j * 16 + l (v: warp of the CTA, j: its warpgroup's slice):
    // row 16 (v % 4) + l of slice b = (v / 4) SPW + j
    const int v = r / (16 * SPW), j = (r / 16) % SPW, l = r % 16;
    const int td = td0 + (v / 4) * SPW + j, th = th0 + 2 * (v % 4) + l / 8, tw = tw0 + l % 8;
    const bool ok = store && td < to.Td && th < to.Th && tw < to.Tw;
    st.s_n[r] = ok ? n : -1;
    st.s_td[r] = td;
    st.s_th[r] = th;
    st.s_tw[r] = tw;
    st.s_yoff[r] = ok ? static_cast<int64_t>(n) * p.ys[0] +
                            static_cast<int64_t>(to.rd + sd * td) * p.ys[2] +
                            static_cast<int64_t>(to.rh + sh * th) * p.ys[3] +
                            static_cast<int64_t>(to.rw + sw * tw) * p.ys[4]
                      : 0;
  }
  st.pdd = tab_phase(g, 0, to.rd);
  st.pdh = tab_phase(g, 1, to.rh);
  st.pdw = tab_phase(g, 2, to.rw);
  st.taps = st.pdd.nT * st.pdh.nT * st.pdw.nT;
  const int ED = patch_extent(st.pdd, Cfg::BD);
  st.EH = patch_extent(st.pdh, Cfg::BH);
  st.EW = patch_extent(st.pdw, Cfg::BW);
  st.p_rows = ED * st.EH * st.EW;  // <= p_max
  if (st.taps > 0) {
    box_patch_offsets(g, st.pdd, st.pdh, st.pdw, td0, th0, tw0, n, st.EH, st.EW, st.p_rows,
                      Cfg::kElem, st.s_prow, tid, kThreads);
  }
}

// Copies chunk `ch` of the patch rows (byte offsets s_prow in xp) into the patch planes:
// cp.async by every thread of the CTA (the caller commits, waits and fences).
template <class Cfg>
__device__ __forceinline__ void wg_load_patch(uint32_t sP0, int p_plane, const char* Xp,
                                              const int* s_prow, int p_rows, int ch, int tid) {
  constexpr int CH = Cfg::CH;
  for (int i = tid; i < p_rows * CH; i += Cfg::kThreads) {
    const int r = i / CH, piece = i % CH;
    cp_async_16(sP0 + piece * p_plane + r * 16, Xp + (s_prow[r] + ch * Cfg::BKB_ + piece * 16));
  }
}

// First patch row tap kc reads (the phase's last tap reads from row 0).
__device__ __forceinline__ int wg_tap_row(const PhaseDim& pdd, const PhaseDim& pdh,
                                          const PhaseDim& pdw, const KIter& kc, int EH, int EW) {
  return ((pdd.nT - 1 - kc.jd) * pdd.doff * EH + (pdh.nT - 1 - kc.jh) * pdh.doff) * EW +
         (pdw.nT - 1 - kc.jw) * pdw.doff;
}

// One tap of one K chunk for this warpgroup's SPW slices: A = the patch planes from byte
// address a0 (the slice's first row at this tap), B = the stage at b0; issued and committed as
// one wgmma group.
template <class Cfg>
__device__ __forceinline__ void wg_tap_mma(float (&acc)[Cfg::MT][Cfg::NT][4], uint32_t a0,
                                           uint32_t b0, int p_plane, int EH, int EW) {
  constexpr int BN = Cfg::NT * 8;
  wg_fence();
#pragma unroll
  for (int s = 0; s < Cfg::BKB_ / 32; ++s) {
    const uint64_t db = wg_desc(b0 + 2 * s * (BN * 16), BN * 16, 128);
#pragma unroll
    for (int j = 0; j < Cfg::MT; ++j) {
      const uint64_t da = wg_desc(a0 + j * (EH * EW * 16) + 2 * s * p_plane, p_plane, EW * 16);
      wgmma_step<Cfg::kInDt, BN>(acc[j], da, db);
    }
  }
  wg_commit();
}

template <int IN_DT, int SPW, int WGS, int BN, int BKB, int STAGES, int MIN_CTAS>
__global__ void __launch_bounds__(128 * WGS, MIN_CTAS)
    conv_transpose3d_igemm_wgmma_kernel(const __grid_constant__ ConvParams p,
                                        const __grid_constant__ IgemmGeom g, int p_max) {
#if CT3D_HAS_WGMMA
  using Cfg = WgBox<IN_DT, SPW, WGS, BN, BKB, STAGES>;
  constexpr int BD = Cfg::BD, BH = Cfg::BH, BW = Cfg::BW, BM = Cfg::BM;
  constexpr int kThreads = Cfg::kThreads, MT = Cfg::MT, NT = Cfg::NT, CH = Cfg::CH;

  // ---- phase and box (as the mma.sync box kernel) ----
  TileOrigin to;
  int td0, th0, tw0, n;
  if (!box_origin<BD, BH, BW>(p, to, td0, th0, tw0, n)) return;  // uniform, before any barrier
  const int co0 = blockIdx.y * BN;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int tid = threadIdx.x;
  WgBoxState st;
  wg_box_setup<Cfg>(p, g, p_max, smem_raw, to, td0, th0, tw0, n, true, st);
  const PhaseDim pdd = st.pdd, pdh = st.pdh, pdw = st.pdw;
  const int taps = st.taps, EH = st.EH, EW = st.EW;
  const int p_plane = p_max * 16;  // bytes of one plane of the patch
  const int* s_prow = st.s_prow;
  const int p_rows = st.p_rows;
  unsigned char* sB = st.sB;
  __syncthreads();

  const uint32_t sP0 = smem_u32(smem_raw), sB0 = smem_u32(sB);
  const char* __restrict__ Xp = static_cast<const char*>(g.xp);
  const char* __restrict__ Wp = static_cast<const char*>(g.wp);
  const int n_chunks = g.Cp / Cfg::BK;
  const int tap_bytes = g.CoutP * g.Cp * Cfg::kElem;
  // B loader: piece `piece` of weight row co0 + row into plane `piece` of a stage
  auto load_b = [&](int stage, int src_off) {
    const uint32_t dst = sB0 + stage * Cfg::kBStage;
    for (int i = tid; i < BN * CH; i += kThreads) {
      const int row = i / CH, piece = i % CH;
      cp_async_16(dst + piece * (BN * 16) + row * 16,
                  Wp + (src_off + (co0 + row) * g.Cp * Cfg::kElem + piece * 16));
    }
  };
  // this warpgroup's first slice: patch row offset (bytes) at the phase's last tap
  const int slice0 = (tid >> 7) * SPW;

  float acc[MT][NT][4];
  zero_acc(acc);
  wg_fence_acc(acc);

  constexpr int PF = STAGES - 2;  // taps of B loaded ahead
  if (taps > 0) {
    for (int ch = 0; ch < n_chunks; ++ch) {
      if (ch > 0) {
        wg_wait<0>();
        wg_fence_acc(acc);
        __syncthreads();  // the previous chunk's MMAs are done: patch and ring are free
      }
      wg_load_patch<Cfg>(sP0, p_plane, Xp, s_prow, p_rows, ch, tid);
      KIter kl{0, 0, 0, 0};  // tap of the next B load
      const int ch_bytes = ch * BKB;
      int loaded = 0;
#pragma unroll
      for (int s = 0; s < PF; ++s) {
        if (loaded < taps) {
          load_b(loaded % STAGES, tap_step(p, pdd, pdh, pdw, kl, tap_bytes, BKB) + ch_bytes);
          kl.next(1, pdw.nT, pdh.nT);
          ++loaded;
        }
        cp_async_commit();  // the first group carries the patch too
      }
      KIter kc{0, 0, 0, 0};  // tap being multiplied
      for (int it = 0; it < taps; ++it) {
        cp_async_wait<PF - 1>();  // tap it's B (and the patch) landed, for this thread
        fence_proxy_async();
        wg_wait<1>();  // tap it - 2's MMAs are done: its stage may be refilled
        __syncthreads();
        if (loaded < taps) {
          load_b(loaded % STAGES, tap_step(p, pdd, pdh, pdw, kl, tap_bytes, BKB) + ch_bytes);
          kl.next(1, pdw.nT, pdh.nT);
          ++loaded;
        }
        cp_async_commit();
        wg_tap_mma<Cfg>(acc, sP0 + (slice0 * EH * EW + wg_tap_row(pdd, pdh, pdw, kc, EH, EW)) * 16,
                        sB0 + (it % STAGES) * Cfg::kBStage, p_plane, EH, EW);
        kc.next(1, pdw.nT, pdh.nT);
      }
      cp_async_wait<0>();
    }
    wg_wait<0>();
    wg_fence_acc(acc);
  }
  __syncthreads();  // the epilogue tiles alias the patch and the ring

  gemm_epilogue<IN_DT, BM, BN, Cfg::LDC, 16 * SPW, BN, MT, NT, kThreads>(
      p, acc, st.sR, to, st.s_n, st.s_td, st.s_th, st.s_tw, st.s_yoff, 0, co0, tid >> 5, 0, tid);
#endif
}

// ---------------------------------------------------------------------------------------
// The B ring by the bulk-copy engine (v24). The kernel above has every thread copy 16-byte
// pieces of each tap's B tile with cp.async and the whole CTA meet at a barrier per tap. Here:
//   * the weight is packed blocked (`_cuda._packed_weight_wgmma_bulk`): within a tap, the
//     BN x BKB bytes of one (K chunk, channel block) are contiguous and already in the stage's
//     plane order, so one cp.async.bulk by one thread copies a stage;
//   * each stage has a "full" mbarrier (the copy's bytes, completed by the copy engine) and an
//     "empty" one (one arrival per warpgroup once its MMAs of the stage are done); the
//     warpgroups wait on barriers, not on each other: no CTA barrier per tap, only at a K
//     chunk's patch reload;
//   * thread 0 is the producer and issues the copies PF = STAGES - 2 steps ahead (a step is one
//     (K chunk, tap) pair, counted across chunks, so the ring runs on through a chunk's patch
//     reload); the patch stays a cp.async copy by every thread at each chunk start.
// Measured (H200, v24): what pays is the deeper stage, not the copy engine: with 128-byte
// chunks and BN 128 (configuration 28) a step carries twice the MMAs of configuration 24's, and
// l2_61 / l2_77 ran 1.35-1.47x faster; with 64-byte chunks and BN 128 the bulk ring ran no faster
// than 24's cp.async ring at 4 or 8 stages. Clusters of two CTAs multicasting each B tile
// (halving its L2 reads) ran 1.5-1.7x slower than without: the remote releases lengthen every
// step's critical path, and the kernel is not bound by L2 bandwidth.

// mbarrier and bulk-copy primitives (sm_90). Addresses are shared-memory window addresses.
__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if CT3D_HAS_WGMMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, int bytes) {
#if CT3D_HAS_WGMMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if CT3D_HAS_WGMMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}
// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if CT3D_HAS_WGMMA
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], "
        "%2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
#endif
}
// `bytes` (a multiple of 16) from global src to shared dst, completing on the barrier at bar.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, int bytes, uint32_t bar) {
#if CT3D_HAS_WGMMA
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
      "[%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
#endif
}

template <int IN_DT, int SPW, int WGS, int BN, int BKB, int STAGES, int MIN_CTAS>
__global__ void __launch_bounds__(128 * WGS, MIN_CTAS)
    conv_transpose3d_igemm_wgmma_bulk_kernel(const __grid_constant__ ConvParams p,
                                             const __grid_constant__ IgemmGeom g, int p_max) {
#if CT3D_HAS_WGMMA
  using Cfg = WgBox<IN_DT, SPW, WGS, BN, BKB, STAGES>;
  constexpr int BD = Cfg::BD, BH = Cfg::BH, BW = Cfg::BW, BM = Cfg::BM;
  constexpr int kThreads = Cfg::kThreads, MT = Cfg::MT, NT = Cfg::NT;
  constexpr int PF = STAGES - 2;  // steps of B issued ahead

  // ---- phase and box (as the mma.sync box kernel) ----
  TileOrigin to;
  int td0, th0, tw0, n;
  if (!box_origin<BD, BH, BW>(p, to, td0, th0, tw0, n)) return;  // uniform, before any barrier
  const int co0 = blockIdx.y * BN;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t s_full[STAGES], s_empty[STAGES];
  const int tid = threadIdx.x;
  WgBoxState st;
  wg_box_setup<Cfg>(p, g, p_max, smem_raw, to, td0, th0, tw0, n, true, st);
  const PhaseDim pdd = st.pdd, pdh = st.pdh, pdw = st.pdw;
  const int EH = st.EH, EW = st.EW;
  const int p_plane = p_max * 16;
  const uint32_t full0 = smem_u32(s_full), empty0 = smem_u32(s_empty);
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, WGS);
    }
  }
  __syncthreads();

  const uint32_t sP0 = smem_u32(smem_raw), sB0 = smem_u32(st.sB);
  const char* __restrict__ Xp = static_cast<const char*>(g.xp);
  const char* __restrict__ Wp = static_cast<const char*>(g.wp);
  const int taps = st.taps;
  const int total = (g.Cp / Cfg::BK) * taps;  // steps: K chunks x taps
  const int tap_bytes = g.CoutP * g.Cp * Cfg::kElem;
  const int n_cob = g.CoutP / BN;

  // producer (thread 0): step q's B tile, the blob (chunk, blockIdx.y) of its tap, into stage
  // q % STAGES once every consumer has released the stage's previous use
  KIter kl{0, 0, 0, 0};
  int lch = 0;
  auto issue = [&](int q) {
    const int s = q % STAGES;
    if (q >= STAGES) mbar_wait(empty0 + 8 * s, ((q / STAGES) + 1) & 1);
    const int kd = pdd.k0 + kl.jd * pdd.kstep, kh = pdh.k0 + kl.jh * pdh.kstep,
              kw = pdw.k0 + kl.jw * pdw.kstep;
    const char* src = Wp + (((kd * p.kH + kh) * p.kW + kw) * tap_bytes +
                            (lch * n_cob + static_cast<int>(blockIdx.y)) * Cfg::kBStage);
    const uint32_t bar = full0 + 8 * s, dst = sB0 + s * Cfg::kBStage;
    mbar_expect_tx(bar, Cfg::kBStage);
    bulk_copy(dst, src, Cfg::kBStage, bar);
    kl.next(1, pdw.nT, pdh.nT);
    if (kl.jd == pdd.nT) {
      kl = KIter{0, 0, 0, 0};
      ++lch;
    }
  };
  // warpgroup release of stage s (its MMAs reading the stage are done)
  auto release = [&](int s) {
    if ((tid & 127) == 0) mbar_arrive(empty0 + 8 * s);
  };

  const int slice0 = (tid >> 7) * SPW;  // this warpgroup's first slice
  float acc[MT][NT][4];
  zero_acc(acc);
  wg_fence_acc(acc);

  if (tid == 0) {
    for (int q = 0; q < PF && q < total; ++q) issue(q);
  }
  KIter kc{0, 0, 0, 0};  // tap being multiplied
  int ch = 0;
  for (int q = 0; q < total; ++q) {
    if (kc.jd == 0 && kc.jh == 0 && kc.jw == 0) {  // a K chunk starts: reload the patch
      if (q > 0) {
        wg_wait<0>();
        wg_fence_acc(acc);
        release((q - 1) % STAGES);
      }
      __syncthreads();  // every warpgroup's MMAs of the last chunk are done: the patch is free
      wg_load_patch<Cfg>(sP0, p_plane, Xp, st.s_prow, st.p_rows, ch, tid);
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();
      __syncthreads();
    }
    if (tid == 0 && q + PF < total) issue(q + PF);
    const int s = q % STAGES;
    mbar_wait(full0 + 8 * s, (q / STAGES) & 1);
    wg_tap_mma<Cfg>(acc, sP0 + (slice0 * EH * EW + wg_tap_row(pdd, pdh, pdw, kc, EH, EW)) * 16,
                    sB0 + s * Cfg::kBStage, p_plane, EH, EW);
    if (q > 0 && !(kc.jd == 0 && kc.jh == 0 && kc.jw == 0)) {
      wg_wait<1>();  // step q - 1's MMAs are done: release its stage
      release((q - 1) % STAGES);
    }
    kc.next(1, pdw.nT, pdh.nT);
    if (kc.jd == pdd.nT) {
      kc = KIter{0, 0, 0, 0};
      ++ch;
    }
  }
  wg_wait<0>();
  wg_fence_acc(acc);
  __syncthreads();  // the epilogue tiles alias the patch and the ring

  gemm_epilogue<IN_DT, BM, BN, Cfg::LDC, 16 * SPW, BN, MT, NT, kThreads>(
      p, acc, st.sR, to, st.s_n, st.s_td, st.s_th, st.s_tw, st.s_yoff, 0, co0, tid >> 5, 0, tid);
#endif
}

// Whether the current device runs the sm_90a wgmma kernels (compute capability 9.0).
inline bool device_has_wgmma() {
  int major = 0, minor = 0;  // (cached: ct3d_host.h)
  return current_device_attribute(cudaDevAttrComputeCapabilityMajor, &major) &&
         current_device_attribute(cudaDevAttrComputeCapabilityMinor, &minor) && major == 9 &&
         minor == 0;
}

// wgmma box launches. Each sets `fits` to false and launches nothing where its kernel cannot
// run: not a compute capability 9.0 device, split-K, or the largest phase's patch does not fit
// in shared memory; the caller then runs a configuration of the same K step and BN
// (ct3d_launch.h launch_igemm_any).
// wgmma_prepare: the checks, shared memory and grid of `kernel` (a Cfg box kernel), then the
// input pack. Returns with fits false, or gx == 0, where nothing is to be launched.
template <class Cfg, class Kernel>
cudaError_t wgmma_prepare(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream,
                          Kernel kernel, bool& fits, int& p_max, int& smem, int64_t& gx,
                          int64_t& gy) {
  using T = typename Cfg::GType;
  fits = false;
  gx = gy = 0;
  if (g.splits != 1 || !device_has_wgmma()) return cudaSuccess;
  if (p.epi.n_regs < 1 || p.epi.n_regs > kMaxRegs) return cudaErrorInvalidValue;
  if (p.groups != 1 || g.Cp % Cfg::BK != 0 || g.CoutP % Cfg::kBN != 0) {
    return cudaErrorInvalidValue;
  }
  if (p.st[0] > kMaxStride || p.st[1] > kMaxStride || p.st[2] > kMaxStride) {
    return cudaErrorInvalidValue;
  }
  // (the descriptors' 14-bit fields hold offsets up to 256 KB, more than shared memory)
  p_max = box_patch_rows(p, Cfg::BD, Cfg::BH, Cfg::BW);
  smem = Cfg::smem_bytes(p.epi.n_regs, p_max);
  int static_bytes = 0;
  cudaError_t e = kernel_static_smem(kernel, &static_bytes);
  if (e != cudaSuccess) return e;
  if (smem + static_bytes > max_smem_optin()) return cudaSuccess;
  fits = true;
  if (static_cast<int64_t>(p.N) * g.Dp * g.Hp * g.Wp == 0) return cudaSuccess;
  e = pack_input<T, Cfg::kInDt == kF32>(p, g, stream);
  if (e != cudaSuccess) return e;
  const int64_t nbd = ((p.Do + p.st[0] - 1) / p.st[0] + Cfg::BD - 1) / Cfg::BD;
  const int64_t nbh = ((p.Ho + p.st[1] - 1) / p.st[1] + Cfg::BH - 1) / Cfg::BH;
  const int64_t nbw = ((p.Wo + p.st[2] - 1) / p.st[2] + Cfg::BW - 1) / Cfg::BW;
  const int64_t n_phase = static_cast<int64_t>(p.st[0]) * p.st[1] * p.st[2];
  gx = static_cast<int64_t>(p.N) * nbd * nbh * nbw * n_phase;
  gy = g.CoutP / Cfg::kBN;
  if (gx == 0 || gy == 0) {
    gx = 0;
    return cudaSuccess;
  }
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidConfiguration;
  return opt_in_smem(kernel, smem);
}

template <int IN_DT, int SPW, int WGS, int BN, int BKB, int STAGES, int MIN_CTAS>
cudaError_t launch_igemm_wgmma(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream,
                               bool& fits) {
  using Cfg = WgBox<IN_DT, SPW, WGS, BN, BKB, STAGES>;
  auto kernel = conv_transpose3d_igemm_wgmma_kernel<IN_DT, SPW, WGS, BN, BKB, STAGES, MIN_CTAS>;
  int p_max = 0, smem = 0;
  int64_t gx = 0, gy = 0;
  const cudaError_t e = wgmma_prepare<Cfg>(p, g, stream, kernel, fits, p_max, smem, gx, gy);
  if (e != cudaSuccess || !fits || gx == 0) return e;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), Cfg::kThreads, smem,
           stream>>>(p, g, p_max);
  return cudaGetLastError();
}

// The bulk-copy B ring (v24); the packed weight must be blocked (_cuda.py
// _packed_weight_wgmma_bulk).
template <int IN_DT, int SPW, int WGS, int BN, int BKB, int STAGES, int MIN_CTAS>
cudaError_t launch_igemm_wgmma_bulk(const ConvParams& p, const IgemmGeom& g, cudaStream_t stream,
                                    bool& fits) {
  using Cfg = WgBox<IN_DT, SPW, WGS, BN, BKB, STAGES>;
  auto kernel =
      conv_transpose3d_igemm_wgmma_bulk_kernel<IN_DT, SPW, WGS, BN, BKB, STAGES, MIN_CTAS>;
  int p_max = 0, smem = 0;
  int64_t gx = 0, gy = 0;
  const cudaError_t e = wgmma_prepare<Cfg>(p, g, stream, kernel, fits, p_max, smem, gx, gy);
  if (e != cudaSuccess || !fits || gx == 0) return e;
  kernel<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1), Cfg::kThreads, smem,
           stream>>>(p, g, p_max);
  return cudaGetLastError();
}

// The wgmma configurations (_cuda.py IGEMM_CONFIGS; each falls back to the
// mma.sync box configuration of the same K step and BN, in parentheses). Box BD x 8 x 8,
// warpgroups, BN, K chunk bytes, stages:
//   19   2 x 8 x 8, 1 warpgroup, BN 64, 64-byte chunks, 4 stages (13)
//   20   2 x 8 x 8, 1 warpgroup, BN 128, 64-byte chunks, 4 stages (16)
//   21   2 x 8 x 8, 1 warpgroup, BN 64, 128-byte chunks, 4 stages (11)
//   22   4 x 8 x 8, 2 warpgroups, BN 64, 64-byte chunks, 6 stages (13)
//   23   4 x 8 x 8, 2 warpgroups, BN 64, 128-byte chunks, 4 stages (11)
//   24   4 x 8 x 8, 2 warpgroups, BN 128, 64-byte chunks, 4 stages (16)
// and with the bulk-copy B ring (v24; blocked weight, no fallback), 4 x 8 x 8, 2 warpgroups:
//   27   BN 64, 64-byte chunks, 8 stages, 2 CTAs per SM
//   28   BN 128, 128-byte chunks, 4 stages
// *fits false (nothing launched) when the configuration's patch does not fit in shared memory
// or the device is not sm_90: the caller then runs *fallback (the id in parentheses above;
// ct3d_launch.h launch_igemm_any), or, for the bulk configurations (*fallback -1), reports
// that nothing ran: their weight layout is theirs alone.
template <int IN_DT>
cudaError_t igemm_wgmmas(const ConvParams& p, const IgemmGeom& g, int config, cudaStream_t stream,
                         bool* fits, int* fallback) {
  bool f = false;
  cudaError_t e = cudaErrorInvalidValue;
  *fallback = -1;
  switch (config) {
    case 19:
      e = launch_igemm_wgmma<IN_DT, 2, 1, 64, 64, 4, 3>(p, g, stream, f);
      *fallback = 13;
      break;
    case 20:
      e = launch_igemm_wgmma<IN_DT, 2, 1, 128, 64, 4, 1>(p, g, stream, f);
      *fallback = 16;
      break;
    case 21:
      e = launch_igemm_wgmma<IN_DT, 2, 1, 64, 128, 4, 2>(p, g, stream, f);
      *fallback = 11;
      break;
    case 22:
      e = launch_igemm_wgmma<IN_DT, 2, 2, 64, 64, 6, 2>(p, g, stream, f);
      *fallback = 13;
      break;
    case 23:
      e = launch_igemm_wgmma<IN_DT, 2, 2, 64, 128, 4, 1>(p, g, stream, f);
      *fallback = 11;
      break;
    case 24:
      e = launch_igemm_wgmma<IN_DT, 2, 2, 128, 64, 4, 1>(p, g, stream, f);
      *fallback = 16;
      break;
    // the bulk-copy B ring (blocked weight: no fallback, *fallback = -1)
    case 27:
      e = launch_igemm_wgmma_bulk<IN_DT, 2, 2, 64, 64, 8, 2>(p, g, stream, f);
      break;
    case 28:
      e = launch_igemm_wgmma_bulk<IN_DT, 2, 2, 128, 128, 4, 1>(p, g, stream, f);
      break;
    default: break;
  }
  *fits = f;
  return e;
}

}  // namespace ct3d
