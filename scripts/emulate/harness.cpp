// Runs one convolution, described by a binary case file (scripts/emulate/emulate.py writes it),
// through the direct kernel (plain or staged form) or the FFMA GEMM of csrc/ct3d_conv.cuh on the
// CPU, CTA by CTA, and writes the output storage (float32) to a file.
//
//   harness CASE OUT      (the case names the kernel: CO 8 / 16 = direct, 0 = GEMM; its last
//                          int 1 = the staged form, which runs only where launch_conv would
//                          take it: the harness prints "staged taken SMEM" or "staged not_taken")
#include <cstdio>
#include <cstdlib>

#include "emu_shim.h"
#include "emu_io.h"
#include "conv_emu.cuh"

using namespace ct3d;

namespace {

template <int BM, int BN, int WM, int WN>
void run_gemm(const ConvParams& p) {
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0], th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t tw = (p.Wo + p.st[2] - 1) / p.st[2];
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * tw;
  const int64_t gx = (m_max + BM - 1) / BM * p.st[0] * p.st[1] * p.st[2];
  const int64_t gy = static_cast<int64_t>(p.groups) * ((p.cout_g + BN - 1) / BN);
  run_grid<kThreads>(gx, gy, [&] { conv_transpose3d_fused_kernel<kF32, kModeFfma, BM, BN, WM, WN>(p); });
}

template <int CO>
void direct_grid(const ConvParams& p, int64_t* gx, int64_t* gy) {
  using Cfg = Direct<CO>;
  const int64_t td = (p.Do + p.st[0] - 1) / p.st[0], th = (p.Ho + p.st[1] - 1) / p.st[1];
  const int64_t groups_w = (p.Wo + Cfg::RW - 1) / Cfg::RW;
  const int64_t m_max = static_cast<int64_t>(p.N) * td * th * groups_w;
  const int64_t per = static_cast<int64_t>(Cfg::kTiles) * kThreads;
  *gx = (m_max + per - 1) / per * p.st[0] * p.st[1];
  *gy = static_cast<int64_t>(p.groups) * ((p.cout_g + CO - 1) / CO);
}

template <int CO>
void run_direct(const ConvParams& p, int in_dt) {
  int64_t gx, gy;
  direct_grid<CO>(p, &gx, &gy);
  emu_smem_bytes = Direct<CO>::smem_bytes(p.epi.n_regs,
                                          static_cast<int>(direct_weight_floats<CO>(p)));
  if (in_dt == kF32) {
    run_grid<kThreads>(gx, gy, [&] { conv_transpose3d_direct_kernel<kF32, CO>(p); });
  } else {
    run_grid<kThreads>(gx, gy, [&] { conv_transpose3d_direct_kernel<kBF16, CO>(p); });
  }
}

template <int IN_DT, int CO>
void run_staged_nv(const ConvParams& p, int64_t gx, int64_t gy) {
  const int nv = stage_nv(p.cin_g);
  if (nv == 1) {
    run_grid<kThreads>(gx, gy, [&] { conv_transpose3d_direct_staged_kernel<IN_DT, CO, 1>(p); });
  } else if (nv == 2) {
    run_grid<kThreads>(gx, gy, [&] { conv_transpose3d_direct_staged_kernel<IN_DT, CO, 2>(p); });
  } else {
    run_grid<kThreads>(gx, gy, [&] { conv_transpose3d_direct_staged_kernel<IN_DT, CO, 4>(p); });
  }
}

// The staged form where launch_conv would run it (p.algo = kAlgoDirectStaged; the device's
// opt-in limit aside), with exactly its dynamic shared memory addressable.
template <int CO>
void run_direct_staged(const ConvParams& p, int in_dt) {
  const int64_t smem = direct_staged_smem<CO>(p, direct_fit_floats<CO>(p));
  if (smem < 0) {
    std::printf("staged not_taken\n");
    return;
  }
  std::printf("staged taken %lld\n", static_cast<long long>(smem));
  int64_t gx, gy;
  direct_grid<CO>(p, &gx, &gy);
  emu_smem_bytes = static_cast<size_t>(smem);
  if (in_dt == kF32) {
    run_staged_nv<kF32, CO>(p, gx, gy);
  } else {
    run_staged_nv<kBF16, CO>(p, gx, gy);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: harness CASE OUT\n");
    return 2;
  }
  const std::vector<char> buf = slurp(argv[1]);
  Reader r{buf.data()};
  ConvParams p;
  std::memset(&p, 0, sizeof(p));
  const int in_dt = r.get<int32_t>();  // kF32 or kBF16
  p.N = r.get<int32_t>();
  p.Cin = r.get<int32_t>();
  p.Di = r.get<int32_t>();
  p.Hi = r.get<int32_t>();
  p.Wi = r.get<int32_t>();
  for (int i = 0; i < 5; ++i) p.xs[i] = r.get<int64_t>();
  const int64_t xn = r.get<int64_t>();
  p.x = in_dt == kF32 ? static_cast<void*>(r.arr<float>(xn)) : r.arr<uint16_t>(xn);
  p.kD = r.get<int32_t>();
  p.kH = r.get<int32_t>();
  p.kW = r.get<int32_t>();
  for (int i = 0; i < 5; ++i) p.ws[i] = r.get<int64_t>();
  const int64_t wn = r.get<int64_t>();
  p.w = in_dt == kF32 ? static_cast<void*>(r.arr<float>(wn)) : r.arr<uint16_t>(wn);
  const int64_t bn = r.get<int64_t>();
  p.bias = bn == 0 ? nullptr
                   : (in_dt == kF32 ? static_cast<void*>(r.arr<float>(bn)) : r.arr<uint16_t>(bn));
  p.Cout = r.get<int32_t>();
  p.Do = r.get<int32_t>();
  p.Ho = r.get<int32_t>();
  p.Wo = r.get<int32_t>();
  for (int i = 0; i < 5; ++i) p.ys[i] = r.get<int64_t>();
  const int64_t yn = r.get<int64_t>();
  float* y = static_cast<float*>(std::malloc(yn * sizeof(float)));
  for (int64_t i = 0; i < yn; ++i) y[i] = NAN;
  p.y = y;
  p.y_dtype = kF32;
  p.groups = r.get<int32_t>();
  p.cin_g = r.get<int32_t>();
  p.cout_g = r.get<int32_t>();
  for (int i = 0; i < 3; ++i) p.st[i] = r.get<int32_t>();
  for (int i = 0; i < 3; ++i) p.pad[i] = r.get<int32_t>();
  for (int i = 0; i < 3; ++i) p.dil[i] = r.get<int32_t>();
  p.epi.n_slots = r.get<int32_t>();
  for (int s = 0; s < p.epi.n_slots; ++s) {
    Slot& sl = p.epi.slot[s];
    sl.dtype = r.get<int32_t>();
    for (int i = 0; i < 5; ++i) sl.s[i] = r.get<int64_t>();
    const int64_t n = r.get<int64_t>();
    sl.ptr = sl.dtype == kF64 ? static_cast<void*>(r.arr<double>(n)) : r.arr<float>(n);
  }
  read_program(r, p.epi);
  const int co = r.get<int32_t>();
  const int staged = r.get<int32_t>();
  if (co == 8) {
    staged ? run_direct_staged<8>(p, in_dt) : run_direct<8>(p, in_dt);
  } else if (co == 16) {
    staged ? run_direct_staged<16>(p, in_dt) : run_direct<16>(p, in_dt);
  } else if (p.cout_g <= 16) {
    run_gemm<256, 16, 4, 1>(p);
  } else if (p.cout_g <= 32) {
    run_gemm<128, 32, 4, 1>(p);
  } else {
    run_gemm<64, 64, 2, 2>(p);
  }
  FILE* f = std::fopen(argv[2], "wb");
  std::fwrite(y, sizeof(float), yn, f);
  std::fclose(f);
  return 0;
}
