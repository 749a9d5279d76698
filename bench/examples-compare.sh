#!/usr/bin/env bash
# The dataset-examples pass against PyTorch, side by side on the same images, and its memory as
# the folder grows.
#
# 1. Speed: IMAGES (default 256) distinct photos made from tests/fixtures/photos (random crops,
#    flips, turns and colour shifts, 320 to 640 px JPEGs); `vgg-atlas examples` (224 px, batch
#    16, the store included) against bench/pytorch_examples.py (the same decode, fit and
#    forward through the 13 convs, nothing stored; malloc tuned), ROUNDS times alternating.
#    images/s and peak RSS of each; for vgg-atlas both the pass and the whole command (weights
#    loaded, the folder scanned, and the crops made at the end: a cost per pass, not per image).
# 2. Memory: `vgg-atlas examples --size 32` over folders of SMALL and LARGE tiny images (default
#    1000 and 10000): the peak RSS must not grow with the folder (images are streamed, the top K
#    kept in the store).
#
# Needs: cargo build --release, the weights (vgg-atlas weights fetch), python3 with torch,
# safetensors, pillow, numpy. Run by hand on an idle machine, not in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$PWD/target/release/vgg-atlas
weights=${WEIGHTS:-$HOME/.cache/vgg-atlas/vgg16-keras-imagenet-conv.safetensors}
n=${IMAGES:-256}
rounds=${ROUNDS:-2}
threads=${THREADS:-2}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work/photos" "$n" <<'EOF'
import os, random, sys
from PIL import Image, ImageEnhance
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out)
src = [Image.open(os.path.join("tests/fixtures/photos", f)).convert("RGB")
       for f in sorted(os.listdir("tests/fixtures/photos")) if not f.endswith(".md")]
rng = random.Random(0)
for i in range(n):
    img = src[i % len(src)]
    w, h = img.size
    cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch)).rotate(rng.uniform(-20, 20), expand=False)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))
    side = rng.randint(320, 640)
    img = img.resize((side, side * 3 // 4), Image.BILINEAR)
    img.save(os.path.join(out, f"{i:05d}.jpg"), quality=90)
EOF

rss() { sed -n 's/.*Maximum resident set size (kbytes): //p' "$1" | awk '{printf "%.0f", $1/1024}'; }

echo "examples pass vs PyTorch: $n images, 224 px, batch 16, $threads threads, $(lscpu | sed -n 's/^Model name: *//p')"
wall() { sed -n 's/.*Elapsed (wall clock) time (h:mm:ss or m:ss): //p' "$1" | awk -F: '{print ($1 * 60 + $2)}'; }

printf '%-8s %-30s %12s %12s %10s\n' round side 'images/s' seconds 'peak MB'
for r in $(seq "$rounds"); do
  rm -f "$work"/ex.db*
  /usr/bin/time -v "$bin" examples --images "$work/photos" --db "sqlite://$work/ex.db" \
    --threads "$threads" >"$work/ours.out" 2>"$work/ours.err"
  line=$(grep 'examined here' "$work/ours.err")
  secs=$(sed -n 's/.* in \([0-9.]*\) s .*/\1/p' <<<"$line")
  ips=$(sed -n 's/.*(\([0-9.]*\) images\/s).*/\1/p' <<<"$line")
  printf '%-8s %-30s %12s %12s %10s\n' "$r" 'vgg-atlas: the pass' "$ips" "$secs" "$(rss "$work/ours.err")"
  w=$(wall "$work/ours.err")
  printf '%-8s %-30s %12s %12s %10s\n' "$r" 'vgg-atlas: the whole command' \
    "$(python3 -c "print(round($n / $w, 3))")" "$w" "(crops: $(sed -n 's/.* made in \([0-9.]*\) s/\1 s/p' "$work/ours.err"))"
  MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \
    /usr/bin/time -v python3 bench/pytorch_examples.py --images "$work/photos" \
    --safetensors "$weights" --threads "$threads" >"$work/torch.json" 2>"$work/torch.err"
  read -r tips tsecs < <(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(round(d["images_per_second"],3), round(d["seconds"],1))' "$work/torch.json")
  printf '%-8s %-30s %12s %12s %10s\n' "$r" 'PyTorch (malloc tuned)' "$tips" "$tsecs" "$(rss "$work/torch.err")"
done
echo "block5_conv3 filter 0's top image: vgg-atlas $("$bin" query --db "sqlite://$work/ex.db" --format csv \
  "SELECT image FROM filter_examples WHERE layer = 'block5_conv3' AND filter = 0 AND rank = 1" | tail -1), \
PyTorch $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["block5_conv3_filter0_top"])' "$work/torch.json")"

[ "${MEMORY:-1}" = 0 ] && exit 0
small=${SMALL:-1000}
large=${LARGE:-10000}
echo
echo "memory as the folder grows (--size 32; tiny generated PNGs)"
printf '%-10s %12s %10s\n' images 'images/s' 'peak MB'
for count in "$small" "$large"; do
  dir="$work/tiny-$count"
  python3 - "$dir" "$count" <<'EOF'
import os, sys, random
from PIL import Image
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out)
rng = random.Random(n)
for i in range(n):
    sub = os.path.join(out, f"{i // 1000:03d}")
    os.makedirs(sub, exist_ok=True)
    Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))).save(os.path.join(sub, f"{i:06d}.png"))
EOF
  rm -f "$work"/tiny.db*
  /usr/bin/time -v "$bin" examples --images "$dir" --size 32 --db "sqlite://$work/tiny.db" \
    --threads "$threads" >/dev/null 2>"$work/tiny.err"
  ips=$(sed -n 's/.*(\([0-9.]*\) images\/s).*/\1/p' "$work/tiny.err")
  printf '%-10s %12s %10s\n' "$count" "$ips" "$(rss "$work/tiny.err")"
done
