#!/usr/bin/env bash
# Builds vgg-atlas with CUDA support (`--features cuda`: `--device cuda:N`) on a Linux x86-64
# machine that has no GPU and no CUDA install, e.g. a CPU build box or CI:
#   - the CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels (pinned to the cuda-toolkit==13.0.2
#     set: a newer nvcc emits PTX that a 580 driver rejects);
#   - the driver library is replaced, at link time only, by a stub libcuda.so (soname
#     libcuda.so.1) holding the names cudarc calls; the real one comes with the GPU's driver.
#
# Usage: deploy/gpu/build-worker.sh [OUT]      (default: target/cuda/vgg-atlas)
# Environment:
#   CUDA_COMPUTE_CAP        the GPU generation to compile kernels for (default 90: H100/H200;
#                           80 A100, 86 A10/3090, 89 L4/L40/4090, 100 B200, 120 RTX 50xx)
#   VGG_ATLAS_CUDA_PREFIX   where the toolkit is kept (default ~/.cache/vgg-atlas/cuda-13.0)
#
# The binary (~70 MB) needs on the GPU machine: the NVIDIA driver (libcuda.so.1, 580 or newer)
# and the CUDA 13 libraries libcudart, libcublas, libcublasLt, libcurand, libnvrtc on
# LD_LIBRARY_PATH (the CUDA 13 runtime image has them; so do PyTorch's CUDA 13 wheels, and so
# does $VGG_ATLAS_CUDA_PREFIX/root/lib, minus the driver). `deploy/gpu/check.sh` then checks it
# against the CPU and measures it. A cold build took 33 min on 2 busy cores.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-target/cuda/vgg-atlas}
prefix=${VGG_ATLAS_CUDA_PREFIX:-$HOME/.cache/vgg-atlas/cuda-13.0}
cap=${CUDA_COMPUTE_CAP:-90}
say() { echo "build-worker: $*" >&2; }

# 1. The toolkit, from PyPI.
cu=$prefix/py/nvidia/cu13
if [ ! -x "$cu/bin/nvcc" ]; then
  say "installing the CUDA 13.0 toolkit wheels into $prefix/py"
  python3 -m pip install --quiet --disable-pip-version-check --target "$prefix/py" \
    "cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,nvrtc,curand,cublas]==13.0.2"
fi
"$cu/bin/nvcc" --version | grep -q "release 13.0" || {
  say "$cu/bin/nvcc is not CUDA 13.0; remove $prefix and run again"
  exit 1
}

# 2. A CUDA root as the build scripts expect it: bin/, include/, nvvm/, and lib/ with the
#    unversioned names the linker looks for.
root=$prefix/root
rm -rf "$root"
mkdir -p "$root/lib"
ln -s "$cu/bin" "$root/bin"
ln -s "$cu/include" "$root/include"
ln -s "$cu/nvvm" "$root/nvvm"
for f in "$cu"/lib/lib*.so.*; do
  name=$(basename "$f")
  ln -sf "$f" "$root/lib/$name"
  ln -sf "$f" "$root/lib/${name%%.so.*}.so"
done

# 3. The link-time stub of the driver library: every cu* function cudarc's driver bindings
#    declare, doing nothing. It is never loaded: at run time the driver's libcuda.so.1 is.
cargo fetch --locked >/dev/null
cudarc=$(cargo metadata --format-version 1 --locked --features cuda 2>/dev/null |
  python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
bindings=$(dirname "$cudarc")/src/driver/sys/mod.rs
stub=$prefix/stub
mkdir -p "$stub"
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$bindings" | sed 's/pub unsafe fn //' | sort -u |
  sed 's/.*/void &(void) {}/' >"$stub/libcuda.c"
[ "$(wc -l <"$stub/libcuda.c")" -gt 100 ] || {
  say "found no driver functions in $bindings"
  exit 1
}
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$stub/libcuda.c"

# 4. The build.
say "building with CUDA_COMPUTE_CAP=$cap (this takes a while)"
export CUDA_ROOT=$root CUDA_PATH=$root CUDA_HOME=$root CUDA_COMPUTE_CAP=$cap
export PATH=$root/bin:$PATH
export LIBRARY_PATH=$root/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
cargo build --release --locked --features cuda --target-dir target/cuda-build
mkdir -p "$(dirname "$out")"
# Without the line tables of the release profile: 70 MB instead of 190.
strip --strip-debug -o "$out" target/cuda-build/release/vgg-atlas
say "built $out ($(du -h "$out" | cut -f1)); it needs libcuda.so.1 (the driver) and the CUDA 13"
say "libraries (cudart, cublas, cublasLt, curand, nvrtc) at run time; check it with deploy/gpu/check.sh"
