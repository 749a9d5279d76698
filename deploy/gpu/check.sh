#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU (no internet, no Rust needed), in a few
# minutes: (1) the network on CUDA against the CPU (every conv layer's activations on a fixed
# image, the input gradient, and a short ascent; rel. error <= 1e-3 in f32, 1e-2 for the
# ascent), and the same in the reduced precisions (TF32 products, bfloat16); (2) a small render
# on the GPU; (3) filters/s per layer at 224 px, 20 steps, best batch, with GFLOP/s, in each
# precision, and one layer with the images stepped on the CPU instead of on the GPU; (4) where
# python3 has PyTorch with CUDA, the same method in PyTorch (bench/pytorch_ref.py) on the same
# GPU, layers, precisions and batches, for the ratio. One summary at the end.
#
# Usage: deploy/gpu/check.sh [BINARY] [WEIGHTS]
#   BINARY   the CUDA build (deploy/gpu/build-worker.sh; default target/cuda/vgg-atlas)
#   WEIGHTS  the weights file (default: the cached default weights, ~/.cache/vgg-atlas)
# Environment: VGG_ATLAS_DEVICE (default cuda:0), OUT (where results go; default a temp folder),
#   LAYERS (the layers to measure; default one per block), SIZE and STEPS of the measurement
#   (default 224 and 20; the test suite runs this script on the CPU with tiny ones),
#   RENDER_LAYERS (default block1_conv1,block3_conv1,block5_conv3: 832 filters), PRECISIONS
#   (the reduced precisions to check and measure besides f32; default "tf32 bf16" on CUDA,
#   none elsewhere).
set -euo pipefail
bin=${1:-target/cuda/vgg-atlas}
weights=${2:-}
dev=${VGG_ATLAS_DEVICE:-cuda:0}
out=${OUT:-$(mktemp -d)}
layers=${LAYERS:-block1_conv2 block2_conv2 block3_conv3 block4_conv3 block5_conv3}
render_layers=${RENDER_LAYERS:-block1_conv1,block3_conv1,block5_conv3}
size=${SIZE:-224}
steps=${STEPS:-20}
case $dev in cuda*) precisions=${PRECISIONS-tf32 bf16} ;; *) precisions=${PRECISIONS-} ;; esac
w=()
if [ -n "$weights" ]; then w=(--weights "$weights"); fi
mkdir -p "$out"
# The CUDA 13 libraries: where the system has none, PyTorch's CUDA 13 wheels carry them.
if ldd "$bin" 2>/dev/null | grep -E '^\s*lib(cu|nvrtc).* not found' | grep -vq libcuda.so; then
  wheels=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)
  if [ -n "$wheels" ] && [ -d "$wheels" ]; then
    export LD_LIBRARY_PATH=$wheels${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "CUDA libraries: $wheels"
  fi
fi
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)
echo "GPU: ${gpu:-unknown (no nvidia-smi)}; device $dev; results in $out"

echo "== 1. $dev against the CPU"
status=0
"$bin" check-device --device "$dev" "${w[@]}" --size "$size" | tee "$out/check-device.txt" || status=$?
declare -A reduced_status
for p in $precisions; do
  reduced_status[$p]=0
  "$bin" check-device --device "$dev" --precision "$p" "${w[@]}" --size "$size" |
    tee "$out/check-device-$p.txt" || reduced_status[$p]=$?
done

echo "== 2. a small render on $dev"
start=$(date +%s)
"$bin" render --device "$dev" "${w[@]}" --layers "$render_layers" \
  --size 64 --steps "$steps" --preset quick --batch 64 --out "$out/render" 2>&1 | tail -n 3
render_s=$(($(date +%s) - start))

echo "== 3. filters/s at $size px, $steps steps (quick preset), best batch"
bench() {
  local name=$1
  shift
  "$bin" bench --device "$dev" "${w[@]}" --size "$size" --steps "$steps" --preset quick --json "$@" \
    >"$out/bench-$name.json"
  cat "$out/bench-$name.json"
}
for layer in $layers; do
  bench "$layer" --layer "$layer"
  for p in $precisions; do bench "$layer-$p" --layer "$layer" --precision "$p"; done
done
# What keeping the ascent on the device buys: one layer with the images stepped on the CPU.
host_layer=$(echo "$layers" | awk '{print $NF}')
case $dev in cpu) ;; *) bench "$host_layer-host" --layer "$host_layer" --host-ascent ;; esac

# The first "key":value of a bench JSON is the best batch's (the batches tried come last).
# (vgg-atlas writes "key":value, Python "key": value.)
field() { grep -o "\"$1\": *[0-9.e+-]*" "$2" | head -n 1 | sed 's/.*: *//'; }
torch_ref=$(dirname "$0")/../../bench/pytorch_ref.py
if [[ $dev == cuda* ]] && [ -f "$torch_ref" ] &&
  python3 -c 'import sys, torch, safetensors; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "== 4. the same method in PyTorch on the same GPU"
  w_file=${weights:-${VGG_ATLAS_CACHE:-$HOME/.cache/vgg-atlas}/vgg16-keras-imagenet-conv.safetensors}
  for p in f32 $precisions; do
    # One process per precision (importing torch takes seconds), each layer at our best batch.
    suffix=; [ "$p" = f32 ] || suffix=-$p
    batches=$(for layer in $layers; do field batch "$out/bench-$layer$suffix.json"; done | paste -sd,)
    python3 "$torch_ref" --device "cuda:${dev#cuda:}" --precision "$p" --safetensors "$w_file" \
      --layers "$(echo "$layers" | tr ' ' ',')" --batch "$batches" --size "$size" --steps "$steps" \
      2>"$out/torch-$p.log" >"$out/torch-$p.jsonl" || echo "PyTorch ($p) failed: see $out/torch-$p.log"
    while read -r line; do
      layer=$(echo "$line" | grep -o '"layer": "[a-z0-9_]*"' | cut -d'"' -f4)
      echo "$line" >"$out/torch-$layer$suffix.json"
    done <"$out/torch-$p.jsonl"
  done
fi

echo
echo "== summary: ${gpu:-unknown GPU}, $dev"
# The largest rel. error of a check-device table (the column before the tolerance).
largest() { awk 'NR > 2 { n = ($NF == "FAILED") ? NF - 2 : NF - 1; print $n }' "$1" | sort -g | tail -n 1; }
if [ "$status" -ne 0 ]; then
  echo "device check: FAILED (see $out/check-device.txt)"
else
  echo "device check: passed, largest rel. error $(largest "$out/check-device.txt")"
fi
for p in $precisions; do
  if [ "${reduced_status[$p]}" -ne 0 ]; then
    echo "$p check: FAILED, largest rel. error $(largest "$out/check-device-$p.txt"): render in f32"
  else
    echo "$p check: passed, largest rel. error $(largest "$out/check-device-$p.txt")"
  fi
done
echo "render of $render_layers (64 px, $steps steps): ${render_s} s"
printf '%-19s %8s %12s %10s %12s %8s  (%s px, %s steps)\n' layer batch filters/s GFLOP/s \
  "torch f/s" ratio "$size" "$steps"
for f in "$out"/bench-*.json; do
  name=$(basename "$f" .json)
  name=${name#bench-}
  ours=$(field filters_per_second "$f")
  torch=-
  ratio=-
  if [ -f "$out/torch-$name.json" ]; then
    torch=$(field filters_per_second "$out/torch-$name.json")
    ratio=$(awk -v a="$ours" -v b="$torch" 'BEGIN { printf "%.2fx", a / b }')
  fi
  printf '%-19s %8s %12.2f %10.1f %12s %8s\n' "$name" "$(field batch "$f")" "$ours" \
    "$(field gflops "$f")" "$torch" "$ratio"
done
exit "$status"
