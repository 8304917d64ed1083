// Runs ct3d_launch.h's launch_igemm_any (the channels-last GEMM's configuration id -> family
// dispatch, with the wgmma -> box -> row-tile fallbacks) on the CPU against recording stand-ins
// for the five families (a fake dtype id, so no kernel is compiled). For every configuration id
// from -1 to 32 and every combination of "the wgmma patch fits" and "the box patch fits" it
// prints one line: id, wgmma fits, box fits, the families called with their ids, the returned
// status and *wgmma. tests/test_igemm_dispatch.py builds it with g++ and checks the lines.
#include <cstdio>
#include <string>

#include "ct3d_launch.h"

namespace ct3d {
namespace {
constexpr int kFake = 7;  // not a real DType: the stand-ins below are its only definitions
std::string calls;
bool wgmma_fits = false, box_fits = false;
void note(const char* family, int config) {
  calls += family;
  calls += ":" + std::to_string(config) + " ";
}
}  // namespace

template <>
cudaError_t igemm_rows<kFake>(const ConvParams&, const IgemmGeom&, int config, cudaStream_t) {
  note("rows", config);
  return config >= 0 && config <= 5 ? cudaSuccess : cudaErrorInvalidValue;
}
template <>
cudaError_t igemm_rows_wide<kFake>(const ConvParams&, const IgemmGeom&, int config,
                                   cudaStream_t) {
  note("rows_wide", config);
  return cudaSuccess;
}
template <>
cudaError_t igemm_boxes<kFake>(const ConvParams&, const IgemmGeom&, int config, cudaStream_t,
                               bool* fits) {
  note("box", config);
  *fits = box_fits;
  return cudaSuccess;
}
template <>
cudaError_t igemm_wlines<kFake>(const ConvParams&, const IgemmGeom&, int config, cudaStream_t) {
  note("wline", config);
  return cudaSuccess;
}
template <>
cudaError_t igemm_wgmmas<kFake>(const ConvParams&, const IgemmGeom&, int config, cudaStream_t,
                                bool* fits, int* fallback) {
  note("wgmma", config);
  constexpr int kFallback[6] = {13, 16, 11, 13, 11, 16};  // ct3d_wgmma.cuh's table
  *fallback = config <= 24 ? kFallback[config - 19] : -1;  // 27-31: bulk, no fallback
  *fits = wgmma_fits;
  return cudaSuccess;
}
}  // namespace ct3d

int main() {
  ct3d::ConvParams p{};
  ct3d::IgemmGeom g{};
  for (int config = -1; config <= 32; ++config) {
    for (int wf = 0; wf < 2; ++wf) {
      for (int bf = 0; bf < 2; ++bf) {
        ct3d::calls.clear();
        ct3d::wgmma_fits = wf != 0;
        ct3d::box_fits = bf != 0;
        int wgmma = -1;
        const cudaError_t e = ct3d::launch_igemm_any<ct3d::kFake>(p, g, config, nullptr, &wgmma);
        std::printf("%d %d %d | %s| %d %d\n", config, wf, bf, ct3d::calls.c_str(),
                    static_cast<int>(e), wgmma);
      }
    }
  }
  return 0;
}
