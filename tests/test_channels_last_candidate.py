"""The autotune's cuDNN channels_last_3d candidate (ct3d_fx/_cuda.py ``_reference_channels_last``)
on the CPU: the same values as the reference, in the layout the fused kernel allocates, with the
user's cudnn.benchmark flag left as it was. tests/test_cuda_autotune.py runs it on the GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ct3d_fx import _cuda, ops
from ct3d_fx.ops import Opcode as O


def _args(seed=0, groups=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, 4, 5, generator=g, dtype=dtype)
    w = torch.randn(4, 6 // groups, 3, 2, 3, generator=g, dtype=dtype) * 0.3
    b = torch.randn(6, generator=g, dtype=dtype)
    t0 = torch.randn(6, 1, 1, 1, generator=g, dtype=dtype)
    program = [int(O.LOAD_TENSOR), 0, -1, -1, -1, -1, int(O.ADD), 0, 1, -1, -1, -1,
               int(O.LEAKY_RELU), 2, 0, -1, -1, -1]
    return (x, w, b, [2, 1, 2], [1, 0, 1], [1, 0, 0], [1, 1, 1], groups, program, [0.1], [t0])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bench_flag", [False, True])
def test_same_values_and_layout_as_the_reference(groups, bench_flag, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", bench_flag)
    args = _args(groups=groups)
    ref = ops.reference(*args)
    contiguous = torch.empty(ref.shape, dtype=ref.dtype).stride()
    out = _cuda._reference_channels_last(args, tuple(ref.shape), contiguous, ref.dtype)
    assert out.stride() == contiguous and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.backends.cudnn.benchmark is bench_flag


def test_result_dtype_and_strides_follow_the_plan(monkeypatch):
    """The result is written into the plan's allocation: here float32 with the strides of a
    channels-last output (what the kernel allocates for a channels-last input)."""
    args = _args()
    ref = ops.reference(*args)
    cl = torch.empty(ref.shape, dtype=torch.float32).contiguous(
        memory_format=torch.channels_last_3d).stride()
    out = _cuda._reference_channels_last(args, tuple(ref.shape), cl, torch.float32)
    assert out.stride() == cl and out.dtype == torch.float32
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)


def test_the_benchmark_flag_is_restored_when_the_conv_raises(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    x, w, *rest = _args()
    bad = (x, w[:, :, :, :, :1].transpose(0, 1), *rest)  # wrong C_in: conv_transpose3d raises
    with pytest.raises(RuntimeError):
        _cuda._reference_channels_last(bad, (1,), (1,), torch.float64)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize("value,on", [(None, True), ("1", True), ("0", False)])
def test_the_candidate_is_on_unless_the_environment_turns_it_off(value, on):
    env = {k: v for k, v in os.environ.items() if k != "CT3D_FX_CUDNN_CHANNELS_LAST"}
    if value is not None:
        env["CT3D_FX_CUDNN_CHANNELS_LAST"] = value
    out = subprocess.run([sys.executable, "-c", "from ct3d_fx import _cuda; "
                          "print(_cuda.CUDNN_CHANNELS_LAST)"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(on)


def test_the_candidate_applies_only_to_ncdhw_cuda_inputs(monkeypatch):
    monkeypatch.setattr(_cuda, "CUDNN_CHANNELS_LAST", True)
    assert not _cuda._channels_last_applies(torch.randn(1, 2, 3, 4, 5))  # a CPU tensor
    monkeypatch.setattr(_cuda, "CUDNN_CHANNELS_LAST", False)
    assert not _cuda._channels_last_applies(torch.randn(1, 2, 3, 4, 5))
