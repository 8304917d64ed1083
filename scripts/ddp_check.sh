#!/usr/bin/env bash
# DDP check of a ct3d_fx-optimized model: one process per GPU via torchrun, one training step,
# gradients compared with a single-process run on the same global batch (PASS/FAIL printed by
# examples/train_ddp.py; the exit status is its).
#
#   bash scripts/ddp_check.sh                                   # NCCL, every visible GPU
#   NPROC=2 bash scripts/ddp_check.sh --backend gloo --device cpu   # CPU smoke test
#
# NPROC: number of processes (default: the number of visible GPUs, at least 2 for --device cpu).
# Further arguments go to examples/train_ddp.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."

# Mandatory on the shared GPU machine: no NVLink SHARP / multicast objects.
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1

if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(torch.cuda.device_count())")
  if [ "$NPROC" -lt 1 ]; then
    NPROC=2
  fi
fi
echo "ddp_check: $NPROC process(es), NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE," \
     "TORCH_SYMM_MEM_DISABLE_MULTICAST=$TORCH_SYMM_MEM_DISABLE_MULTICAST"
exec python3 -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
  examples/train_ddp.py "$@"
