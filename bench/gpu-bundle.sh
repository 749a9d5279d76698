#!/usr/bin/env bash
# Packs what deploy/gpu/check.sh needs for a GPU machine that has no internet and takes files
# only through a size-limited copy (this project's lent GPU machines take 64 MiB, the source
# tree included): the CUDA build, stripped and xz'd (about 10 MB of 70), and the default weights
# with the bytes of each float split into four planes before xz (49 MB instead of 54 as one
# stream: the sign-and-exponent bytes compress, the mantissa bytes do not).
#
# Usage:
#   bench/gpu-bundle.sh pack BINARY DIR      here: writes DIR/vgg-atlas.xz and DIR/weights.planes.xz
#   bench/gpu-bundle.sh unpack DIR OUTDIR    there (python3 with numpy): OUTDIR/vgg-atlas and
#                                            OUTDIR/weights.safetensors, checked against the pin
# Then, there: deploy/gpu/check.sh OUTDIR/vgg-atlas OUTDIR/weights.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."

planes() {
  # $1 pack|unpack, $2 input, $3 output
  python3 - "$@" <<'EOF'
import lzma, sys
import numpy as np
mode, src, dst = sys.argv[1:4]
if mode == "pack":
    data = open(src, "rb").read()
    header = 8 + int.from_bytes(data[:8], "little")
    body = np.frombuffer(data[header:], dtype=np.uint8).reshape(-1, 4).T.copy()
    with lzma.open(dst, "wb", preset=6) as f:
        f.write(header.to_bytes(8, "little"))
        f.write(data[:header])
        f.write(body.tobytes())
else:
    with lzma.open(src, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        head = f.read(header)
        body = np.frombuffer(f.read(), dtype=np.uint8).reshape(4, -1).T.copy()
    with open(dst, "wb") as f:
        f.write(head)
        f.write(body.tobytes())
EOF
}

case ${1:-} in
  pack)
    [ $# -eq 3 ] || { echo "usage: $0 pack BINARY DIR" >&2; exit 2; }
    mkdir -p "$3"
    strip --strip-all -o "$3/vgg-atlas" "$2"
    xz -T0 -6 -f "$3/vgg-atlas"
    weights=${VGG_ATLAS_CACHE:-$HOME/.cache/vgg-atlas}/vgg16-keras-imagenet-conv.safetensors
    [ -f "$weights" ] || { echo "no weights at $weights: run vgg-atlas weights fetch" >&2; exit 1; }
    planes pack "$weights" "$3/weights.planes.xz"
    du -b "$3"/* >&2
    ;;
  unpack)
    [ $# -eq 3 ] || { echo "usage: $0 unpack DIR OUTDIR" >&2; exit 2; }
    mkdir -p "$3"
    # Python's lzma rather than xz, which a bare image may lack.
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$2/vgg-atlas.xz" "$3/vgg-atlas"
    chmod +x "$3/vgg-atlas"
    planes unpack "$2/weights.planes.xz" "$3/weights.safetensors"
    pin=$(grep -o 'WEIGHTS_SHA256: &str = "[0-9a-f]*"' worker/src/engine/fetch.rs | grep -o '[0-9a-f]\{64\}')
    echo "$pin  $3/weights.safetensors" | sha256sum -c - >&2
    ;;
  *)
    echo "usage: $0 pack BINARY DIR | unpack DIR OUTDIR" >&2
    exit 2
    ;;
esac
