#!/usr/bin/env python3
"""PyTorch peer of `vgg-atlas examples`: every image of a folder through VGG16's 13 conv layers.

Run by hand (bench/examples-compare.sh runs it beside vgg-atlas), not in CI. The same work as the
examples pass's compute: each image decoded, scaled so its shorter side is --size (bilinear,
antialiased) and cropped to the centre square, caffe-preprocessed, then in batches of --batch
one forward pass through all 13 convs (ReLU, 2x2 max-pools), keeping per layer and filter the
post-ReLU spatial mean and the position of its maximum. No database, no crops: what vgg-atlas
stores on top is its own cost.

Needs: pip install torch safetensors pillow numpy

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \\
        python3 bench/pytorch_examples.py --images DIR --threads 2 \\
        --safetensors ~/.cache/vgg-atlas/vgg16-keras-imagenet-conv.safetensors

Prints one JSON line: images, seconds, images_per_second, forward_seconds (the forward passes
alone) and the top-1 image of block5_conv3 filter 0 (a sanity check against vgg-atlas's table).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

BLOCKS = [2, 2, 3, 3, 3]
LAYERS = [f"block{b + 1}_conv{c + 1}" for b, n in enumerate(BLOCKS) for c in range(n)]
POOL_AFTER = {"block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3"}
BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)


def fit(path, side):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = side / min(w, h)
    img = img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))


def preprocess(img):
    x = np.asarray(img, dtype=np.float32)[:, :, ::-1] - BGR_MEAN  # RGB -> BGR, caffe
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def peaks(x, weights):
    out = []
    h = x
    for layer in LAYERS:
        w, b = weights[layer]
        h = F.relu(F.conv2d(h, w, b, padding=1))
        flat = h.flatten(2)
        out.append((flat.mean(2), flat.argmax(2)))
        if layer in POOL_AFTER:
            h = F.max_pool2d(h, 2)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--safetensors", required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = load_file(args.safetensors)
    weights = {l: (t[f"{l}.weight"].float(), t[f"{l}.bias"].float()) for l in LAYERS}
    names = sorted(
        os.path.relpath(os.path.join(d, f), args.images)
        for d, _, fs in os.walk(args.images)
        for f in fs
        if not f.startswith(".")
    )
    best = (-1.0, None)
    started = time.perf_counter()
    forward = 0.0
    with torch.inference_mode():
        for i in range(0, len(names), args.batch):
            chunk = names[i : i + args.batch]
            x = torch.stack([preprocess(fit(os.path.join(args.images, n), args.size)) for n in chunk])
            t0 = time.perf_counter()
            out = peaks(x, weights)
            forward += time.perf_counter() - t0
            means = out[-1][0][:, 0]
            k = int(means.argmax())
            if float(means[k]) > best[0]:
                best = (float(means[k]), chunk[k])
    seconds = time.perf_counter() - started
    print(json.dumps({
        "images": len(names),
        "seconds": seconds,
        "images_per_second": len(names) / seconds,
        "forward_seconds": forward,
        "threads": args.threads,
        "batch": args.batch,
        "size": args.size,
        "block5_conv3_filter0_top": best[1],
    }))


if __name__ == "__main__":
    sys.exit(main())
