// Prints, per line of convolution parameters read from stdin, what launch_conv's size rules
// for the direct kernel give (csrc/ct3d_conv.cuh, the host functions above its launch code):
// the weight floats of the direct kernel where it applies (direct_fit_floats, else -1) and the
// dynamic shared memory of its staged form (direct_staged_smem, else -1). For the CPU test of
// the tests' mirror of the rule (tests/test_cuda_kernel.py direct_staged_smem).
//
//   in:  N C_in D H W kD kH kW C_out D_out H_out W_out groups s0 s1 s2 p0 p1 p2 d0 d1 d2 n_regs
//   out: w_floats staged_smem
//
// Input strides are those of a contiguous NCDHW tensor (they only enter the 32-bit offset
// check). Compiled with g++ against conv_emu.cuh, the header as scripts/emulate/emulate.py
// cuts it.
#include <cstdio>

#include "emu_shim.h"
#include "conv_emu.cuh"

using namespace ct3d;

int main() {
  ConvParams p;
  while (true) {
    std::memset(&p, 0, sizeof(p));
    int v[23];
    for (int i = 0; i < 23; ++i) {
      if (std::scanf("%d", &v[i]) != 1) return 0;
    }
    p.N = v[0], p.Cin = v[1], p.Di = v[2], p.Hi = v[3], p.Wi = v[4];
    p.kD = v[5], p.kH = v[6], p.kW = v[7];
    p.Cout = v[8], p.Do = v[9], p.Ho = v[10], p.Wo = v[11];
    p.groups = v[12];
    p.cin_g = p.Cin / p.groups;
    p.cout_g = p.Cout / p.groups;
    for (int i = 0; i < 3; ++i) {
      p.st[i] = v[13 + i];
      p.pad[i] = v[16 + i];
      p.dil[i] = v[19 + i];
    }
    p.epi.n_regs = v[22];
    p.xs[4] = 1;
    p.xs[3] = p.Wi;
    p.xs[2] = static_cast<int64_t>(p.Hi) * p.Wi;
    p.xs[1] = p.xs[2] * p.Di;
    p.xs[0] = p.xs[1] * p.Cin;
    const bool narrow = p.cout_g <= 8;
    const int64_t wf = narrow ? direct_fit_floats<8>(p) : direct_fit_floats<16>(p);
    const int64_t smem = narrow ? direct_staged_smem<8>(p, wf) : direct_staged_smem<16>(p, wf);
    std::printf("%lld %lld\n", static_cast<long long>(wf), static_cast<long long>(smem));
  }
}
