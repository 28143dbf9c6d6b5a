#!/usr/bin/env bash
# Compile-check every CUDA source of qframe on its own: no torch, no GPU, only nvcc.
#
#   .ci/check_cuda.sh                 # csrc/cuda/*.cu for sm_87 (Jetson AGX Orin) and sm_90 (H100)
#   .ci/check_cuda.sh sm_80 sm_89     # other architectures
#   NVCC=/opt/cuda-12.6/bin/nvcc .ci/check_cuda.sh
#
# The .cu files include only launchers.h and common.cuh (CUDA runtime headers), so each compiles
# with `nvcc -c`; the torch binding (bindings.cpp) is compiled by the real build. Exit status:
# 0 all compiled, 1 a file failed, 2 no nvcc found. Extra nvcc flags: NVCC_FLAGS="...".
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nvcc="${NVCC:-}"
if [ -z "$nvcc" ]; then
  nvcc="$(command -v nvcc || true)"
fi
for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
  if [ -z "$nvcc" ] && [ -n "$home" ] && [ -x "$home/bin/nvcc" ]; then
    nvcc="$home/bin/nvcc"
  fi
done
if [ -z "$nvcc" ]; then
  echo "nvcc not found: install the CUDA toolkit, or set NVCC=/path/to/nvcc (see docs/building.md)" >&2
  exit 2
fi

archs=("$@")
if [ ${#archs[@]} -eq 0 ]; then
  archs=(sm_87 sm_90)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "$("$nvcc" --version | tail -n 2 | head -n 1)"
status=0
for src in "$root"/csrc/cuda/*.cu; do
  name="$(basename "$src")"
  for arch in "${archs[@]}"; do
    # shellcheck disable=SC2086  # NVCC_FLAGS is a list of flags
    if "$nvcc" -c -std=c++17 -O3 -arch="$arch" -Werror all-warnings ${NVCC_FLAGS:-} \
        -o "$tmp/$name.$arch.o" "$src" 2> "$tmp/log"; then
      echo "ok    $arch  csrc/cuda/$name"
    else
      echo "FAIL  $arch  csrc/cuda/$name"
      sed 's/^/      /' "$tmp/log"
      status=1
    fi
  done
done
exit $status
