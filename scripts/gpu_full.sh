#!/usr/bin/env bash
# Everything GPU-side in one call: install, build, the whole test suite (GPU tests included),
# compute-sanitizer, examples, backward timing. Logs go to $1 (default $OUT), packed into one
# tarball (the device tool returns at most 8 files).
set -u -o pipefail
LOG=${1:-${OUT:-/tmp/ct3d_out}}/logs
mkdir -p "$LOG"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/ct3d_fx_extensions}
bash scripts/gpu_check.sh "$LOG" install build sanitize example
echo "=== full test suite"
python3 -m pytest -q -p no:cacheprovider -rfE 2>&1 | tee "$LOG/pytest_all.log" | tail -n 25
echo "=== examples"
for e in unet_decoder gan_generator; do
  timeout 300 python3 examples/$e.py 2>&1 | tee "$LOG/$e.log" | tail -n 12
done
echo "=== backward timing"
timeout 300 python3 scripts/bwd_bench.py --json "$LOG/bwd.json" 2>&1 | tee "$LOG/bwd.log"
tar -czf "$(dirname "$LOG")/logs.tgz" -C "$(dirname "$LOG")" logs && rm -rf "$LOG"
