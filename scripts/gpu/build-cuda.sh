#!/usr/bin/env bash
# Builds `qwenvl --features cuda` on a machine WITHOUT a GPU or a CUDA install, and packs what
# scripts/gpu/check.sh needs into .gpu/ (ignored by git; carried to the GPU machine).
#
# Recipe (CUDA 13.0 from PyPI wheels, for Hopper, sm_90):
# - nvcc, nvvm, the runtime, cuBLAS, cuRAND and NVRTC come from NVIDIA's wheels, installed into
#   $CUDA_WHEELS (default /work/cuda13/site) with pip --target;
# - cudarc 0.19 links -lcuda -lcudart -lcublas -lcublasLt -lcurand -lnvrtc; the wheels ship only
#   versioned .so files, so unversioned symlinks go into a link folder on LIBRARY_PATH;
# - libcuda comes with the driver, not with the toolkit: we link against a stub that defines every
#   driver-API function cudarc declares and carries the driver's SONAME (libcuda.so.1), as CUDA's own
#   stubs/ folder does; at run time the loader finds the real driver library;
# - CUDARC_CUDA_VERSION pins the API version cudarc binds to (13000 = CUDA 13.0, what the GPU
#   machine's driver 580 and PyTorch's cu130 libraries provide); CUDA_COMPUTE_CAP=90 because there
#   is no GPU here to ask.
# The build takes ~25 minutes on 2 cores (candle's CUDA kernels alone ~10). Debug info is left out
# so the binary fits the 64 MiB that may travel.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
wheels=${CUDA_WHEELS:-/work/cuda13/site}
work=${CUDA_WORK:-/work/cuda13}
if [ ! -x "$wheels/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target "$wheels" \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.*" \
    "nvidia-curand==10.*" "nvidia-cuda-nvrtc==13.0.*"
fi
cuda=$wheels/nvidia/cu13
mkdir -p "$work/link"
for n in cudart cublas cublasLt nvrtc; do ln -sf "$cuda/lib/lib$n.so.13" "$work/link/lib$n.so"; done
ln -sf "$cuda/lib/libcurand.so.10" "$work/link/libcurand.so"

# The libcuda stub: every `cu*` function of cudarc's driver bindings.
cargo fetch --manifest-path "$root/Cargo.toml" >/dev/null
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | head -1)
grep -oE "^pub unsafe fn (cu[A-Za-z0-9_]+)\(" "$cudarc/src/driver/sys/mod.rs" \
  | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' | sort -u > "$work/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/link/libcuda.so" "$work/libcuda_stub.c"

export CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000 LIBRARY_PATH=$work/link
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_INCREMENTAL=0
cargo build --release -p qwenvl --features cuda --manifest-path "$root/Cargo.toml"

mkdir -p "$root/.gpu"
xz -T0 -6 -c "$CARGO_TARGET_DIR/release/qwenvl" > "$root/.gpu/qwenvl.xz"
fixture=${FIXTURE:-$root/../shared/fixtures/tiny-a}
tar -C "$(dirname "$fixture")" -cJf "$root/.gpu/tiny-a.tar.xz" \
  tiny-a/config.json tiny-a/generation_config.json tiny-a/model.safetensors tiny-a/qwen.tiktoken \
  tiny-a/tokenizer_config.json tiny-a/images tiny-a/expected/cases.json tiny-a/expected/logits.safetensors
ls -la "$root/.gpu"
