// Runs the epilogue pass's vector kernels (csrc/ct3d_pass_lite.cuh) on the CPU, CTA by CTA, one
// host thread per CUDA thread, for one case file that scripts/emulate/emulate_pass.py writes,
// and writes the output storage (its own dtype) to a file. Exits 3 when the kernel would not
// run this program (lite_program_ok false).
//
//   pass_lite_harness CASE OUT
#include <cstdio>
#include <cstdlib>

#include "emu_shim.h"
#include "emu_io.h"
#include "ct3d_pass_lite.cuh"

using namespace ct3d;

namespace {

int esize(int dt) { return dt == kF32 ? 4 : dt == kF64 ? 8 : 2; }

template <typename TS, typename TO>
void run(const EpiPassParams& p) {
  if (p.lite == kLiteTranspose || p.lite == kLiteTransposeScalarOut) {
    const int64_t tiles = static_cast<int64_t>(p.N) * ((p.S + kLiteTS - 1) / kLiteTS);
    const int64_t gy = (p.C + kLiteTC - 1) / kLiteTC;
    if (p.lite == kLiteTranspose) {
      run_grid<kLiteThreads>(tiles, gy, [&] { epilogue_pass_lite_t_kernel<TS, TO, true>(p); });
    } else {
      run_grid<kLiteThreads>(tiles, gy, [&] { epilogue_pass_lite_t_kernel<TS, TO, false>(p); });
    }
  } else {
    const int64_t per_sample = static_cast<int64_t>(p.C) * p.S / kLiteE;
    const int64_t gx = (per_sample + kLiteThreads - 1) / kLiteThreads;
    if (p.src_cfast) {
      run_grid<kLiteThreads>(gx, p.N, [&] { epilogue_pass_lite_kernel<TS, TO, true>(p); });
    } else {
      run_grid<kLiteThreads>(gx, p.N, [&] { epilogue_pass_lite_kernel<TS, TO, false>(p); });
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: pass_lite_harness CASE OUT\n");
    return 2;
  }
  const std::vector<char> buf = slurp(argv[1]);
  Reader r{buf.data()};
  EpiPassParams p;
  std::memset(&p, 0, sizeof(p));
  p.src_dtype = r.get<int32_t>();
  p.out_dtype = r.get<int32_t>();
  p.N = r.get<int32_t>();
  p.C = r.get<int32_t>();
  p.D = r.get<int32_t>();
  p.H = r.get<int32_t>();
  p.W = r.get<int32_t>();
  p.S = static_cast<int64_t>(p.D) * p.H * p.W;
  p.ss_n = r.get<int64_t>();
  p.ss_c = r.get<int64_t>();
  p.ss_s = r.get<int64_t>();
  p.src_cfast = r.get<int32_t>();
  p.os_n = r.get<int64_t>();
  p.os_c = r.get<int64_t>();
  p.os_s = r.get<int64_t>();
  p.out_cfast = r.get<int32_t>();
  p.lite = r.get<int32_t>();
  const int64_t src_n = r.get<int64_t>();
  p.src = r.bytes(src_n * esize(p.src_dtype));
  const int64_t out_n = r.get<int64_t>();
  void* out = r.bytes(out_n * esize(p.out_dtype));  // the poisoned output as written
  p.out = out;
  p.bias_dtype = r.get<int32_t>();
  const int64_t bias_n = r.get<int64_t>();
  p.bias = bias_n == 0 ? nullptr : r.bytes(bias_n * esize(p.bias_dtype));
  p.epi.n_slots = r.get<int32_t>();
  for (int s = 0; s < p.epi.n_slots; ++s) {
    Slot& sl = p.epi.slot[s];
    sl.dtype = r.get<int32_t>();
    sl.like_y = r.get<int32_t>();
    for (int i = 0; i < 5; ++i) sl.s[i] = r.get<int64_t>();
    const int64_t n = r.get<int64_t>();
    sl.ptr = r.bytes(n * esize(sl.dtype));
  }
  read_program(r, p.epi);
  if (!lite_program_ok(p.epi)) return 3;
  const int s = p.src_dtype, o = p.out_dtype;
  if (s == kF32 && o == kF32) run<float, float>(p);
  else if (s == kBF16 && o == kBF16) run<__nv_bfloat16, __nv_bfloat16>(p);
  else if (s == kF16 && o == kF16) run<__half, __half>(p);
  else if (s == kBF16 && o == kF32) run<__nv_bfloat16, float>(p);
  else if (s == kF16 && o == kF32) run<__half, float>(p);
  else return 2;
  FILE* f = std::fopen(argv[2], "wb");
  std::fwrite(out, esize(p.out_dtype), out_n, f);
  std::fclose(f);
  return 0;
}
