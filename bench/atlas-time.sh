#!/usr/bin/env bash
# The whole atlas's compute time on this machine, before and after Winograd, in one run: for
# each of the 13 conv layers, `vgg-atlas bench` with the default preset (128 px, 64 steps) at a
# fixed batch (a CPU worker's default, 16), once with the direct conv path everywhere
# (VGG_ATLAS_CONV=direct) and once as it is, interleaved; a layer's time is its filter count
# over its filters/s, and the atlas's time is their sum.
# Needs: cargo build --release, and the weights (vgg-atlas weights fetch). Run by hand, not in
# CI: about 30 minutes on 2 cores. LAYERS=a,b and BATCH=n narrow it.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=./target/release/vgg-atlas
batch=${BATCH:-16}
all=block1_conv1,block1_conv2,block2_conv1,block2_conv2,block3_conv1,block3_conv2,block3_conv3,block4_conv1,block4_conv2,block4_conv3,block5_conv1,block5_conv2,block5_conv3
layers=${LAYERS:-$all}
fps() {
  "$bin" bench --layer "$1" --batch "$batch" --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["filters_per_second"])'
}
filters() {
  case "$1" in
    block1_*) echo 64 ;;
    block2_*) echo 128 ;;
    block3_*) echo 256 ;;
    *) echo 512 ;;
  esac
}
printf '%-14s %8s %12s %12s %12s %12s %8s\n' layer filters 'direct f/s' 'f/s' 'direct min' 'min' speedup
sum_direct=0
sum=0
for layer in ${layers//,/ }; do
  n=$(filters "$layer")
  d=$(VGG_ATLAS_CONV=direct fps "$layer")
  w=$(fps "$layer")
  read -r md mw s < <(python3 -c "print($n/$d/60, $n/$w/60, $w/$d)")
  printf '%-14s %8d %12.3f %12.3f %12.1f %12.1f %7.2fx\n' "$layer" "$n" "$d" "$w" "$md" "$mw" "$s"
  sum_direct=$(python3 -c "print($sum_direct + $md)")
  sum=$(python3 -c "print($sum + $mw)")
done
printf '%-14s %8s %12s %12s %12.1f %12.1f %7.2fx\n' total '' '' '' "$sum_direct" "$sum" \
  "$(python3 -c "print($sum_direct/$sum)")"
echo "(default preset, 128 px, 64 steps, batch $batch, $(nproc) threads, $(lscpu | sed -n 's/^Model name: *//p'); minutes of compute per layer)"
