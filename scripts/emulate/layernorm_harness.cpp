// Runs layernorm_lines (csrc/ct3d_epilogue.cuh) on the CPU, one host thread per CUDA thread of
// a 128-thread CTA with the warp shuffles emulated (emu_shim.h), on random tiles, and checks
// every element against a float64 LayerNorm:
//   - each (line, column) of the tile's whole W lines: (x - mean) / sqrt(var + eps) * w + b,
//     within 2e-5 plus 8 float32 ulps of the line's max |x| times rsqrt(var + eps) |w| (the
//     values are O(1); lines are drawn with a mean offset of 4 so that the two-pass variance
//     is tested against cancellation);
//   - rows past the lines and columns past ncols unchanged (NaN when written to another
//     register, the input when in place);
//   - W beyond kLnMaxW, or threads not a multiple of 32: the whole tile NaN.
// Weight and bias are float32 or bfloat16 slots with a stride of 2 elements. Tiles, weight and
// bias are heap buffers of exactly their size, so AddressSanitizer sees any stray access.
//
//   g++ -std=c++20 -O1 -fsanitize=address -I$CUDA_HOME/include -Icsrc -Iscripts/emulate \
//       scripts/emulate/layernorm_harness.cpp -o /tmp/ln && /tmp/ln [EVERY]
// EVERY: run every EVERY-th case only (default 1: all of them).
// (tests/test_emulated_layernorm.py builds and runs it.)
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "emu_shim.h"
#include "ct3d_epilogue.cuh"

using namespace ct3d;

namespace {

constexpr int kThreadsLn = 128;

struct Case {
  int W, lines, ncols, ld, rows, affine, wdt;  // affine: bit 0 weight, bit 1 bias
  bool inplace;
};

uint16_t to_bf16(float f) {  // round to nearest even, as __float2bfloat16_rn
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// A slot of n values at a stride of 2 elements; `vals` receives the values as the kernel reads
// them (after rounding to bfloat16).
struct SlotBuf {
  Slot slot{};
  std::vector<float> f32;
  std::vector<uint16_t> b16;
  SlotBuf(int n, int dtype, std::mt19937& rng, float lo, float hi, std::vector<float>& vals) {
    std::uniform_real_distribution<float> u(lo, hi);
    vals.resize(n);
    slot.dtype = dtype;
    slot.s[4] = 2;
    if (dtype == kBF16) {
      b16.assign(2 * n, 0);
      for (int i = 0; i < n; ++i) {
        b16[2 * i] = to_bf16(u(rng));
        vals[i] = from_bf16(b16[2 * i]);
      }
      slot.ptr = b16.data();
    } else {
      f32.assign(2 * n, 0.0f);
      for (int i = 0; i < n; ++i) vals[i] = f32[2 * i] = u(rng);
      slot.ptr = f32.data();
    }
  }
};

void run_cta(int threads, const float* A, float* D, const TileRows& base, const Slot* wt,
             const Slot* bs, float eps) {
  std::vector<EmuWarp> warps((threads + 31) / 32);
  std::barrier<> bar(threads);
  emu_bar = &bar;
  emu_warps = warps.data();
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t) {
    ts.emplace_back([&, t] {
      emu_tid.x = t;
      TileRows tr = base;
      tr.tid = t;
      layernorm_lines(A, D, tr, wt, bs, eps);
    });
  }
  for (auto& t : ts) t.join();
}

// Returns the number of wrong elements (and prints the first few).
int check(const Case& k, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int cols = 64;  // the register's columns (BN); ncols <= cols are output channels
  std::vector<float> A(static_cast<size_t>(k.ld) * cols), D;
  for (auto& v : A) v = 4.0f + 0.5f * nd(rng);
  const std::vector<float> A0 = A;
  if (!k.inplace) D.assign(A.size(), __int_as_float(0x7fc00000));
  float* dst = k.inplace ? A.data() : D.data();
  std::vector<float> wv, bv;
  SlotBuf wbuf(k.W, k.wdt, rng, 0.5f, 1.5f, wv), bbuf(k.W, k.wdt, rng, -1.0f, 1.0f, bv);
  const Slot* wt = (k.affine & 1) ? &wbuf.slot : nullptr;
  const Slot* bs = (k.affine & 2) ? &bbuf.slot : nullptr;
  const float eps = 1e-5f;
  TileRows tr{k.rows, k.ld, k.ncols, true, 0, kThreadsLn, k.W, k.lines};
  // every other case: the weight and bias read ahead as the W-line kernel does
  // (layernorm_read_ahead per thread into the shared array, then TileRows::ln_affine)
  std::vector<float> ahead(2 * kLnMaxW, __int_as_float(0x7fc00000));
  if (seed % 2 == 0) {
    static Epilogue E{};
    E.n_instr = 2;
    E.ins[0] = Instr{OP_RELU, 0, 0, 0, 0, 0.0f, 0.0f};
    E.ins[1] = Instr{OP_LAYER_NORM, 0, bs ? 1 : -1, wt ? 0 : -1, 0, eps, 0.0f};
    E.n_slots = 2;
    E.slot[0] = wbuf.slot;
    E.slot[1] = bbuf.slot;
    for (int t = 0; t < kThreadsLn; ++t) {
      float v[kLnAhead<kThreadsLn>];
      const int kk = layernorm_read_ahead<kThreadsLn>(E, k.W, t, v);
      if (kk != 1) return 1000000;  // the LayerNorm is instruction 1
      for (int r = 0; r < kLnAhead<kThreadsLn>; ++r)
        if (t + r * kThreadsLn < 2 * kLnMaxW) ahead[t + r * kThreadsLn] = v[r];
    }
    tr.ln_affine = ahead.data();
    tr.ln_k = 1;
  }
  run_cta(kThreadsLn, A.data(), dst, tr, wt, bs, eps);
  const bool poison = k.W > kLnMaxW;
  int bad = 0;
  for (int c = 0; c < cols; ++c) {
    for (int m = 0; m < k.ld; ++m) {
      const size_t i = static_cast<size_t>(c) * k.ld + m;
      const float got = dst[i];
      bool ok;
      double want = 0.0;
      if (poison) {
        ok = (m < k.rows && c < k.ncols) ? std::isnan(got)
                                          : (k.inplace ? got == A0[i] : std::isnan(got));
      } else if (c < k.ncols && m < k.lines * k.W) {
        const int line = m / k.W, w = m % k.W;
        const float* a = A0.data() + static_cast<size_t>(c) * k.ld + line * k.W;
        double mean = 0.0, var = 0.0;
        for (int j = 0; j < k.W; ++j) mean += a[j];
        mean /= k.W;
        for (int j = 0; j < k.W; ++j) var += (a[j] - mean) * (a[j] - mean);
        var /= k.W;
        double amax = 0.0;
        for (int j = 0; j < k.W; ++j) amax = std::fmax(amax, std::fabs(a[j]));
        want = (a[w] - mean) / std::sqrt(var + eps);
        if (wt) want *= wv[w];
        if (bs) want += bv[w];
        // float32 rounding of x - mean (x ~ 4) is amplified by rstd where a line's spread is
        // small (W = 2, two close values): allow 8 ulps of max |x| times rstd times |w|
        const double tol = 2e-5 + 8 * 0x1p-23 * amax / std::sqrt(var + eps) * (wt ? wv[w] : 1.0);
        ok = std::fabs(got - want) <= tol;
      } else {
        ok = k.inplace ? got == A0[i] : std::isnan(got);
      }
      if (!ok && bad++ < 3)
        std::printf("  W=%d lines=%d ncols=%d ld=%d affine=%d dtype=%d inplace=%d: element (row "
                    "%d, col %d) = %.8g, want %.8g\n",
                    k.W, k.lines, k.ncols, k.ld, k.affine, k.wdt, k.inplace, m, c, got, want);
    }
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  // optional argument: run every k-th case only (the seeds stay those of the full run)
  const int every = argc > 1 ? std::atoi(argv[1]) : 1;
  int cases = 0, failed = 0, index = 0;
  unsigned seed = 1;
  for (int rows : {64, 128}) {
    for (int W : {1, 2, 3, 7, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129}) {
      if (W > rows && W != 129) continue;
      for (int lines : {rows / W > 0 ? rows / W : 1, 1}) {
        for (int ncols : {5, 33, 64}) {
          for (int ld : {rows + 4, rows + 1}) {
            for (int affine = 0; affine < 4; ++affine) {
              for (int wdt : {static_cast<int>(kF32), static_cast<int>(kBF16)}) {
                if (affine == 0 && wdt == kBF16) continue;
                for (bool inplace : {true, false}) {
                  Case k{W, lines, ncols, ld, rows, affine, wdt, inplace};
                  if (W == 129) k.ld = rows + 4;  // the poison case: W beyond the lanes
                  ++seed;
                  if (index++ % every) continue;
                  const int bad = check(k, seed);
                  ++cases;
                  if (bad) {
                    ++failed;
                    std::printf("FAIL W=%d lines=%d ncols=%d ld=%d affine=%d dtype=%d "
                                "inplace=%d: %d wrong elements\n",
                                W, lines, ncols, ld, affine, wdt, inplace, bad);
                  }
                }
              }
            }
          }
        }
      }
    }
  }
  std::printf("layernorm_lines: %d cases, %d failed\n", cases, failed);
  return failed ? 1 : 0;
}
