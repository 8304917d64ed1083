"""One call of a bulk-copy wgmma configuration, for gpu_check.sh's ``bulk`` step.

    python scripts/bulk_smoke.py CONFIG

Forces ``_cuda.IGEMM_CONFIG = CONFIG`` (one of ``_cuda.IGEMM_WGMMA_BULK_CONFIGS``) on a small
stride-1 problem (3 batch elements, 64 -> 128 channels, k = 3, 9 boxes of 4 x 8 x 8, each
overhanging the output in H and W), float32 with TF32 and bfloat16, and checks that the
bulk-copy kernel ran and agrees with a float64 ConvTranspose3d (relative L2 error under 2e-2).
Run under ``timeout``: a pipeline that deadlocks hangs here rather than inside a test. Exit
status 0 when both pass.
"""
import sys

import torch
import torch.nn.functional as F

import ct3d_fx  # noqa: F401  (registers the op)
from ct3d_fx import _cuda


def main() -> int:
    config = int(sys.argv[1])
    _cuda.ALGO, _cuda.IGEMM_CONFIG, _cuda.IGEMM_SPLITS = "igemm", config, 1  # no split-K
    torch.backends.cudnn.allow_tf32 = True
    ok = True
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 64, 9, 7, 7, device="cuda", dtype=dt)  # 3 x 3 x 1 x 1 boxes
        w = torch.randn(64, 128, 3, 3, 3, device="cuda", dtype=dt) * 0.05
        y = F.conv_transpose3d(x.double(), w.double(), padding=1)
        z = torch.ops.ct3d.conv_transpose3d_epilogue(x, w, None, [1] * 3, [1] * 3, [0] * 3,
                                                     [1] * 3, 1, [], [], [])
        torch.cuda.synchronize()
        err = ((z.double() - y).norm() / y.norm()).item()
        print(f"config {config} {dt}: bulk kernel ran {_cuda.LAST_WGMMA_BULK}, "
              f"rel. L2 error {err:.2e}", flush=True)
        ok = ok and _cuda.LAST_WGMMA_BULK and err < 2e-2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
