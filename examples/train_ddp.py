"""DistributedDataParallel over a model optimized with ct3d_fx: one step, checked.

Every process (one per GPU, started by torchrun) builds the same small 3-D U-Net-like model,
optimizes it with ``ct3d_fx.optimize`` (two fused ConvTranspose3d sites), wraps it in
``torch.nn.parallel.DistributedDataParallel`` and runs one training step on its shard of a
global batch. Each process then runs the same optimized model without DDP on the whole global
batch (the single-GPU run) and compares the gradients of every parameter, and the parameters
after one SGD step, with the DDP ones. Rank 0 prints ``PASS`` or ``FAIL`` with the largest
relative difference over all ranks and parameters, max |ddp - single| / max |single| per tensor;
the exit status is 0 on PASS and 1 on FAIL.

Run it (``scripts/ddp_check.sh`` does this with the environment the shared machine needs)::

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py              # NCCL, GPUs
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --backend gloo --device cpu

Shapes: input (B, 2, S, S, S), target (B, 3, S, S, S), float32 (or ``--dtype float64``), with
B = ``--global-batch`` (divisible by the number of processes) and S = ``--size`` (even).

Limitations:
    - BatchNorm is left out of the model: in training mode it is not fused (batch statistics),
      and DDP would need SyncBatchNorm to match a single-GPU run.
    - The default tolerance (float32 on CUDA: 1e-3) allows for TF32 convolutions, which PyTorch
      enables for cuDNN by default; ``--tol`` overrides it.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

# Mandatory on the shared GPU machine (NVLink SHARP / multicast objects must stay off); set
# here too so that a direct torchrun call is safe. scripts/ddp_check.sh exports both.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

try:
    import ct3d_fx  # noqa: E402
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ct3d_fx  # noqa: E402


class SmallUNet3d(nn.Module):
    """Encoder (Conv3d), bottleneck at half resolution, two ConvTranspose3d decoder sites.

    ``forward(x)``: x (N, 2, S, S, S), S even; returns (N, 3, S, S, S) in x's dtype.
    Site ``up``: ConvTranspose3d(k2, s2) -> PReLU(C) -> + encoder skip. Site ``up2``:
    ConvTranspose3d(k3, pad 1) -> SiLU -> * 0.5.
    """

    def __init__(self, c: int = 8):
        super().__init__()
        self.enc = nn.Conv3d(2, c, 3, padding=1)
        self.down = nn.Conv3d(c, 2 * c, 2, stride=2)
        self.mid = nn.Conv3d(2 * c, 2 * c, 3, padding=1)
        self.up = nn.ConvTranspose3d(2 * c, c, 2, stride=2)
        self.up_act = nn.PReLU(c, init=0.2)
        self.up2 = nn.ConvTranspose3d(c, c, 3, padding=1)
        self.head = nn.Conv3d(c, 3, 1)

    def forward(self, x):
        e = F.relu(self.enc(x))
        m = F.leaky_relu(self.mid(F.relu(self.down(e))), 0.1)
        u = self.up_act(self.up(m)) + e
        u = F.silu(self.up2(u)) * 0.5
        return self.head(u)


def build(seed: int, device: torch.device, dtype: torch.dtype, example: torch.Tensor):
    """(original model, optimized GraphModule), identical weights for the same ``seed``."""
    torch.manual_seed(seed)
    model = SmallUNet3d().to(device=device, dtype=dtype)
    optimized = ct3d_fx.optimize(model, (example,))
    fused = [s.fqn for s in optimized.ct3d_report.sites if s.status == "fused"]
    if fused != ["up", "up2"]:
        raise RuntimeError(f"expected sites up and up2 fused, got:\n{optimized.ct3d_report}")
    return model, optimized


def max_rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (0 when both are 0)."""
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    return err / scale if scale > 0 else err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="nccl", choices=["nccl", "gloo"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--global-batch", type=int, default=4, help="samples over all processes")
    p.add_argument("--size", type=int, default=16, help="volume edge in voxels (even)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the one step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=None,
                   help="largest accepted relative difference (default: by dtype and device)")
    args = p.parse_args(argv)

    dist.init_process_group(backend=args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device (use --backend gloo --device cpu)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the number "
                         f"of processes ({world})")
    tol = args.tol
    if tol is None:
        tol = 1e-10 if dtype == torch.float64 else (1e-3 if device.type == "cuda" else 1e-5)

    # The same global batch on every process (CPU generator, then moved).
    gen = torch.Generator().manual_seed(args.seed + 1)
    s = args.size
    x = torch.randn(args.global_batch, 2, s, s, s, generator=gen).to(device, dtype)
    target = torch.randn(args.global_batch, 3, s, s, s, generator=gen).to(device, dtype)
    per = args.global_batch // world
    x_local, t_local = x[rank * per:(rank + 1) * per], target[rank * per:(rank + 1) * per]

    # DDP run: each process its shard; DDP averages the gradients over processes.
    model, optimized = build(args.seed, device, dtype, x_local)
    ddp = DDP(optimized, device_ids=[local_rank] if device.type == "cuda" else None)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)  # the original model's parameters
    opt.zero_grad(set_to_none=True)
    loss = F.mse_loss(ddp(x_local), t_local)
    loss.backward()
    ddp_grads = {n: q.grad.detach().clone() for n, q in model.named_parameters()}
    opt.step()

    # Single-process run of the same optimized model on the whole global batch.
    ref_model, ref_opt_model = build(args.seed, device, dtype, x_local)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=args.lr)
    ref_loss = F.mse_loss(ref_opt_model(x), target)
    ref_loss.backward()
    ref_grads = {n: q.grad.detach().clone() for n, q in ref_model.named_parameters()}
    ref_opt.step()

    worst, where = 0.0, ""
    for name, g in ddp_grads.items():
        d = max_rel_diff(g, ref_grads[name])
        if d > worst:
            worst, where = d, f"grad of {name}"
    for (name, q), r in zip(model.named_parameters(), ref_model.parameters()):
        d = max_rel_diff(q.detach(), r.detach())
        if d > worst:
            worst, where = d, f"{name} after the step"
    # The mean of the shard losses is the global-batch loss (equal shards).
    shard_losses = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(shard_losses, loss.detach().to(torch.float64))
    mean_loss = torch.stack(shard_losses).mean().item()

    result = torch.tensor([worst], dtype=torch.float64, device=device)
    dist.all_reduce(result, op=dist.ReduceOp.MAX)
    worst_all = result.item()
    ok = worst_all <= tol
    if rank == 0:
        print(f"ct3d_fx DDP check: {world} processes, backend {args.backend}, device "
              f"{device.type}, {args.dtype}, global batch {args.global_batch} x 2 x {s}^3, "
              f"fused sites {[s_.fqn for s_ in optimized.ct3d_report.sites]}")
        print(f"loss: DDP mean of shards {mean_loss:.8g}, single run {ref_loss.item():.8g}")
        print(f"{'PASS' if ok else 'FAIL'}: max relative difference {worst_all:.3g} "
              f"(tolerance {tol:.3g}; rank 0's largest: {where or 'none'})")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
