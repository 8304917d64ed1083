// Probe of the wgmma operand layout used by csrc/ct3d_wgmma.cuh, on its own (no torch):
// one warpgroup multiplies a 64 x K block of A by a 64 x K block of B (both K-major, in the
// plane layout: plane k = 16-byte piece k of every row), with A's rows starting at a row offset
// that is not a multiple of 8, and compares D = A B^T with a float64 CPU product. Prints the
// largest error per K chunk size and exits 1 on a mismatch.
//
//   nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Icsrc scripts/wgmma_probe.cu \
//     -o /tmp/wgmma_probe && /tmp/wgmma_probe
#include <cstdio>
#include <cmath>
#include <vector>

#include "ct3d_wgmma.cuh"

using namespace ct3d;

constexpr int kShift = 5;    // first A row: not a multiple of 8
constexpr int kPitchRows = 10;  // A's M groups are 10 rows apart (like a patch's H pitch)
constexpr int kK = 16;       // TF32 values per row: 64 bytes, 4 planes, 2 wgmma K steps

__global__ void probe(const float* A, const float* B, float* D) {
  __shared__ __align__(16) unsigned char sA[(8 * kPitchRows + kShift) * 64];
  __shared__ __align__(16) unsigned char sB[64 * 64];
  const int tid = threadIdx.x;
  constexpr int kARows = 8 * kPitchRows + kShift;
  const int a_plane = kARows * 16, b_plane = 64 * 16;
  // A row m (0..63) lives at shared row kShift + (m / 8) * kPitchRows + m % 8
  for (int i = tid; i < 64 * 4; i += 128) {
    const int m = i / 4, piece = i % 4;
    const int r = kShift + (m / 8) * kPitchRows + m % 8;
    memcpy(sA + piece * a_plane + r * 16, A + m * kK + piece * 4, 16);
    memcpy(sB + piece * b_plane + m * 16, B + m * kK + piece * 4, 16);
  }
  fence_proxy_async();
  __syncthreads();
  float acc[1][8][4];
  zero_acc(acc);
  wg_fence_acc(acc);
  wg_fence();
  const uint32_t a0 = smem_u32(sA) + kShift * 16, b0 = smem_u32(sB);
  for (int s = 0; s < 2; ++s) {
    wgmma_step<kF32, 64>(acc[0], wg_desc(a0 + 2 * s * a_plane, a_plane, kPitchRows * 16),
                         wg_desc(b0 + 2 * s * b_plane, b_plane, 128));
  }
  wg_commit();
  wg_wait<0>();
  wg_fence_acc(acc);
  const int warp = tid >> 5, lane = tid & 31;
  for (int ni = 0; ni < 8; ++ni)
    for (int r = 0; r < 4; ++r) {
      const int row = 16 * warp + lane / 4 + (r >= 2 ? 8 : 0);
      const int col = ni * 8 + 2 * (lane % 4) + (r & 1);
      D[row * 64 + col] = acc[0][ni][r];
    }
}

int main() {
  std::vector<float> A(64 * kK), B(64 * kK), D(64 * 64, NAN);
  unsigned s = 12345;
  auto rnd = [&]() {
    s = s * 1664525u + 1013904223u;
    // small integers: exact in TF32, so the product is exact
    return static_cast<float>(static_cast<int>((s >> 16) % 17) - 8);
  };
  for (auto& v : A) v = rnd();
  for (auto& v : B) v = rnd();
  float *dA, *dB, *dD;
  cudaMalloc(&dA, A.size() * 4);
  cudaMalloc(&dB, B.size() * 4);
  cudaMalloc(&dD, D.size() * 4);
  cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dD, D.data(), D.size() * 4, cudaMemcpyHostToDevice);
  probe<<<1, 128>>>(dA, dB, dD);
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    printf("wgmma_probe: launch failed: %s\n", cudaGetErrorString(e));
    return 1;
  }
  cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost);
  double worst = 0;
  int bad = 0;
  for (int m = 0; m < 64; ++m)
    for (int n = 0; n < 64; ++n) {
      double ref = 0;
      for (int k = 0; k < kK; ++k) ref += static_cast<double>(A[m * kK + k]) * B[n * kK + k];
      const double err = std::fabs(ref - D[m * 64 + n]);
      if (!(err <= 0)) {
        if (bad < 5) printf("  D[%d][%d] = %g, expected %g\n", m, n, D[m * 64 + n], ref);
        ++bad;
      }
      if (err > worst || err != err) worst = err;
    }
  printf("wgmma_probe: m64n64k8 TF32, 2 K steps, A rows from shifted start: %d of 4096 wrong, "
         "max |err| %g\n", bad, worst);
  return bad == 0 ? 0 : 1;
}
