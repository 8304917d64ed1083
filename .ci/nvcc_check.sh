#!/usr/bin/env bash
# CI step (no GPU needed): compile the fused kernel's headers with nvcc for sm_80 and sm_90a.
#
# Every csrc/kernels_*.cu is a standalone translation unit that instantiates the kernels of
# csrc/ct3d_conv.cuh and includes no torch header, so nvcc alone compiles it. The flags are
# those torch.utils.cpp_extension passes (the __CUDA_NO_HALF*__ defines included), so code that
# compiles here compiles in the extension. Fails on any compile error or warning, and on
# register spills; prints each kernel's registers and stack frame; then links the sm_90a objects
# into one shared library with no symbol left undefined.
#
#   .ci/nvcc_check.sh            # uses nvcc from PATH or $CUDA_HOME/bin
#   NVCC_CHECK_JOBS=1 .ci/nvcc_check.sh   # compiles at once (default: nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}
[ -x "$NVCC" ] || { echo "nvcc_check: nvcc not found (set NVCC or CUDA_HOME)"; exit 2; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
FLAGS=(-std=c++17 -O3 -lineinfo --expt-relaxed-constexpr
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       -Werror all-warnings -Xptxas -v -Xptxas -warn-spills -Icsrc)
ARCHS=("-gencode=arch=compute_80,code=sm_80" "-gencode=arch=compute_90a,code=sm_90a")
"$NVCC" --version | tail -n 1
# One compile per (translation unit, architecture), as many at once as there are cores; each
# writes OUT/<unit>.<arch>.o (position-independent: the sm_90a objects are linked below) and a
# result line OUT/<unit>.<arch>.result.
compile_one() {  # compile_one SRC ARCH_FLAG
  local src=$1 arch=$2 base
  base="$OUT/$(basename "$src" .cu).${arch##*=}"
  if "$NVCC" "${FLAGS[@]}" "$arch" -Xcompiler -fPIC -c "$src" -o "$base.o" >"$base.log" 2>&1; then
    if grep -Eq "[1-9][0-9]* bytes spill (stores|loads)" "$base.log"; then
      { echo "FAIL  $src ${arch##*=}: register spills"; grep "spill" "$base.log" | sort | uniq -c; } \
        >"$base.result"
    else
      local regs stack
      regs=$(grep -o "Used [0-9]* registers" "$base.log" | awk '{print $2}' | sort -n | tr '\n' ' ')
      stack=$(grep -o "[0-9]* bytes stack frame" "$base.log" | awk '{print $1}' | sort -n | uniq |
              tr '\n' ' ')
      echo "ok    $src ${arch##*=}: registers per kernel: ${regs}; stack frames (bytes): ${stack}" \
        >"$base.result"
    fi
  else
    { echo "FAIL  $src ${arch##*=}"; cat "$base.log"; } >"$base.result"
  fi
}
export -f compile_one
export NVCC OUT
export FLAGS_STR="${FLAGS[*]}"
JOBS=${NVCC_CHECK_JOBS:-$(nproc)}
for src in csrc/kernels_*.cu; do
  for arch in "${ARCHS[@]}"; do printf '%s\0%s\0' "$src" "$arch"; done
done | xargs -0 -n 2 -P "$JOBS" bash -c 'read -ra FLAGS <<<"$FLAGS_STR"; compile_one "$1" "$2"' _
status=0
for src in csrc/kernels_*.cu; do
  for arch in "${ARCHS[@]}"; do
    result="$OUT/$(basename "$src" .cu).${arch##*=}.result"
    if [ -f "$result" ]; then cat "$result"; else echo "FAIL  $src ${arch##*=}: not compiled"; fi
    grep -q '^ok ' "$result" 2>/dev/null || status=1
  done
done
# The translation units must link together: no symbol defined twice by the headers, and none
# left undefined (-z defs: e.g. a configuration family that no kernels_*_<family>.cu instantiates).
objs=("$OUT"/kernels_*.sm_90a.o)
if ! "$NVCC" -shared -Xlinker -z -Xlinker defs "${objs[@]}" -o "$OUT/libct3d_check.so" \
    >"$OUT/link.log" 2>&1; then
  echo "FAIL  the kernel objects do not link together"; cat "$OUT/link.log"; status=1
else
  echo "ok    the ${#objs[@]} kernel objects link into one shared library"
fi
# The headers must not need torch: compile them alone, each included first.
for hdr in csrc/*.cuh csrc/*.h; do
  printf '#include "%s"\n' "$(basename "$hdr")" >"$OUT/only.cu"
  if ! "$NVCC" -std=c++17 --expt-relaxed-constexpr -Icsrc -c "$OUT/only.cu" -o "$OUT/only.o" \
      >"$OUT/only.log" 2>&1; then
    echo "FAIL  $hdr does not compile on its own"; cat "$OUT/only.log"; status=1
  fi
done
[ $status -eq 0 ] && echo "nvcc_check: all kernels compile for sm_80 and sm_90a"
exit $status
