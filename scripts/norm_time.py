"""Time the normalization tail (ct3d_fx/norm_tail.py) against PyTorch's norm + activation.

    python scripts/norm_time.py [--json PATH] [--rep-ms 200]

For each case (a suite row's conv output shape, its groups and activation, float32 and bf16):
the runner's timer (``ct3d_fx.bench.time_ms``: ``triton.testing.do_bench``'s median over about
``--rep-ms`` ms) of ``norm_tail.run`` with the autotune off and of ``norm_tail.reference``
(F.group_norm / F.instance_norm, then the activation), in one process, and the kernels' byte
rate counting two reads and one write of the tensor. Inputs: fresh normal values (seeded),
never zeros. Also checks the two results against each other (max abs difference) so a timing
of a wrong kernel does not pass unseen. (v28's figures came from an earlier form of this
script: CUDA events around bursts of 10 calls, median of 50 bursts, no L2 flush.)
"""
from __future__ import annotations

import argparse
import json

import torch

from ct3d_fx import _cuda
from ct3d_fx import norm_tail as nt
from ct3d_fx.bench import time_ms

CASES = [  # name, shape, groups (None: InstanceNorm), activation
    ("l2_61 relu->group_norm(8) output", (16, 128, 34, 34, 34), 8, None),
    # l2_60's conv output is (128, 16, 31, 63, 63): rows of S = 123,039 elements, not a multiple
    # of 8, so the kernels run their strided scalar form there (v28 timed the aligned shape
    # below under l2_60's name; the model's tail did not speed up, v29 found why)
    ("l2_60 group_norm(4)->hardswish", (128, 16, 31, 63, 63), 4, "hardswish"),
    ("group_norm(4)->hardswish (128, 16, 32, 64, 64)", (128, 16, 32, 64, 64), 4, "hardswish"),
    ("instance_norm->leaky_relu (2, 32, 64^3)", (2, 32, 64, 64, 64), None, "leaky_relu"),
    ("group_norm(8)->relu (1, 64, 96^3)", (1, 64, 96, 96, 96), 8, "relu"),
    # GELU on rows that are not 16-byte aligned: the apply kernel instance with the most
    # registers (v29: 152-157 for 16-bit, one CTA per multiprocessor)
    ("group_norm(8)->gelu (2, 64, 63^3)", (2, 64, 63, 63, 63), 8, "gelu"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--rep-ms", type=float, default=200.0)
    args = ap.parse_args()
    _cuda.AUTOTUNE = False
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, shape, groups, act in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
            c = shape[1]
            w = torch.randn(c, device="cuda", dtype=dtype, generator=gen)
            b = torch.randn(c, device="cuda", dtype=dtype, generator=gen)
            with torch.no_grad():
                got = nt.run(x, groups, w, b, 1e-5, act, 0.01)
                ran = nt.LAST_KERNEL
                want = nt.reference(x, groups, w, b, 1e-5, act, 0.01)
                diff = (got.float() - want.float()).abs().max().item()
                dev = x.device
                k_ms = time_ms(lambda: nt.run(x, groups, w, b, 1e-5, act, 0.01), dev,
                               rep_ms=args.rep_ms)
                r_ms = time_ms(lambda: nt.reference(x, groups, w, b, 1e-5, act, 0.01), dev,
                               rep_ms=args.rep_ms)
            nbytes = 3 * x.numel() * x.element_size()
            # the binding's rule (csrc/binding.cpp norm_tail): 16-byte vectors where a row's
            # elements are a multiple of 8 (fresh tensors are 16-byte aligned), else strided
            form = "16-byte" if (shape[2] * shape[3] * shape[4]) % 8 == 0 else "strided"
            row = {"case": name, "shape": list(shape), "groups": groups, "act": act,
                   "dtype": str(dtype).replace("torch.", ""), "form": form, "kernel_ran": ran,
                   "kernel_ms": round(k_ms, 4), "reference_ms": round(r_ms, 4),
                   "speedup": round(r_ms / k_ms, 3),
                   "kernel_TBps": round(nbytes / k_ms / 1e9, 3), "max_abs_diff": diff}
            rows.append(row)
            print(f"{name:45s} {row['dtype']:9s} kernel {k_ms:.4f} ms "
                  f"({row['kernel_TBps']:.2f} TB/s, 2 reads + 1 write)  PyTorch {r_ms:.4f} ms  "
                  f"x{row['speedup']:.2f}  max|diff| {diff:.2e}  ran={ran} ({form})")
            del x, got, want
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "timer": "ct3d_fx.bench.time_ms (triton.testing.do_bench median, L2 flushed)",
                "rows": rows}
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
