// The emulator harnesses' shared pieces: reading a case file (scripts/emulate/*.py write them)
// and running a kernel's grid CTA by CTA, one host thread per CUDA thread. Include after
// emu_shim.h.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "ct3d_params.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

inline std::vector<char> slurp(const char* path) {
  FILE* f = std::fopen(path, "rb");
  if (!f) std::abort();
  std::fseek(f, 0, SEEK_END);
  const long n = std::ftell(f);
  std::fseek(f, 0, SEEK_SET);
  std::vector<char> b(n);
  if (std::fread(b.data(), 1, n, f) != static_cast<size_t>(n)) std::abort();
  std::fclose(f);
  return b;
}

// Reads the case file in order; arrays are copied to heap buffers of exactly their size (arr)
// or of their size rounded up to 16 bytes, 16-byte aligned (bytes: for 16-byte vector loads),
// so AddressSanitizer sees out-of-bounds global reads and writes.
struct Reader {
  const char* p;
  template <class T>
  T get() {
    T v;
    std::memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  template <class T>
  T* arr(int64_t n) {
    T* r = static_cast<T*>(std::malloc(n > 0 ? n * sizeof(T) : 1));
    std::memcpy(r, p, n * sizeof(T));
    p += n * sizeof(T);
    return r;
  }
  void* bytes(int64_t n) {
    void* r = std::aligned_alloc(16, n > 0 ? (n + 15) / 16 * 16 : 16);
    std::memcpy(r, p, n);
    p += n;
    return r;
  }
};

// One CTA at a time, THREADS host threads each, shared memory NaN-poisoned before each CTA
// (under AddressSanitizer, dynamic shared memory past emu_smem_bytes unaddressable); gridDim is
// set for kernels that read it.
template <int THREADS, class F>
void run_grid(int64_t gx, int64_t gy, F kernel) {
  std::barrier<> bar(THREADS);
  emu_bar = &bar;
  emu_grid_dim.x = static_cast<unsigned>(gx);
  emu_grid_dim.y = static_cast<unsigned>(gy);
  emu_grid_dim.z = 1;
#if defined(__SANITIZE_ADDRESS__)
  const size_t used = (emu_smem_bytes + 7) / 8 * 8;  // ASan's 8-byte granules
  if (used < sizeof(emu_smem)) ASAN_POISON_MEMORY_REGION(emu_smem + used, sizeof(emu_smem) - used);
#else
  const size_t used = sizeof(emu_smem);
#endif
  for (int64_t by = 0; by < gy; ++by) {
    for (int64_t bx = 0; bx < gx; ++bx) {
      std::memset(emu_smem, 0xff, used < sizeof(emu_smem) ? used : sizeof(emu_smem));
      std::vector<std::thread> ts;
      for (int t = 0; t < THREADS; ++t) {
        ts.emplace_back([&, t] {
          emu_tid.x = t;
          emu_bid.x = static_cast<unsigned>(bx);
          emu_bid.y = static_cast<unsigned>(by);
          kernel();
        });
      }
      for (auto& t : ts) t.join();
    }
  }
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(emu_smem, sizeof(emu_smem));
#endif
}

// The decoded program as the case file stores it: count, registers, result register, then per
// instruction op, a, b, c, d (int32) and f0, f1 (float).
inline void read_program(Reader& r, ct3d::Epilogue& E) {
  E.n_instr = r.get<int32_t>();
  E.n_regs = r.get<int32_t>();
  E.out_reg = r.get<int32_t>();
  for (int i = 0; i < E.n_instr; ++i) {
    ct3d::Instr& I = E.ins[i];
    I.op = r.get<int32_t>();
    I.a = r.get<int32_t>();
    I.b = r.get<int32_t>();
    I.c = r.get<int32_t>();
    I.d = r.get<int32_t>();
    I.f0 = r.get<float>();
    I.f1 = r.get<float>();
  }
}
