"""EDM2's magnitude-preserving U-Net (models.edm2) against guidelab's ADM-style UNet (models.image) at a
similar size: forward (eval, no grad) and training-step (forward + backward + Adam) time, and both per
million parameters, side by side in one run.

Both nets: 3 levels (channel_mult 1, 2, 2), ``--blocks`` blocks per level, attention at resolution
size/4, class-conditional (10 classes), float32 (EDM2 ``use_fp16=False`` unless ``--fp16``). Times are
medians over ``--rounds`` (the two nets alternate). Usage:
    python bench/edm2_speed.py [--size 32] [--batch 16] [--width 32] [--edm2-width 0] [--blocks 2]
                               [--rounds 5] [--threads 1] [--device cpu] [--fp16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from guidelab.models import UNet, edm2


def nets(a):
    res, attn = a.size, [a.size // 4]
    torch.manual_seed(0)
    e = edm2.EDM2(
        img_resolution=res,
        img_channels=3,
        label_dim=10,
        use_fp16=a.fp16,
        model_channels=a.edm2_width or a.width,
        channel_mult=[1, 2, 2],
        num_blocks=a.blocks,
        attn_resolutions=attn,
        channels_per_head=32,
        logvar_channels=32,
    )
    u = UNet(
        img_channels=3,
        img_resolution=res,
        hidden=a.width,
        depth=a.blocks,
        channel_mult=[1, 2, 2],
        attn_resolutions=attn,
        emb=128,
        num_classes=10,
    )
    return {"EDM2 (models.edm2)": (e, "class_labels"), "UNet (models.image)": (u, "label")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_time(net, key, x, sigma, y):
    net.eval()
    with torch.no_grad():
        sync(x.device)
        t = time.perf_counter()
        net(x, sigma, **{key: y})
        sync(x.device)
    return time.perf_counter() - t


def train_time(net, key, opt, x, sigma, y):
    net.train()
    sync(x.device)
    t = time.perf_counter()
    loss = net.precond.loss_weight(sigma) * (
        net(x + sigma[:, None, None, None] * torch.randn_like(x), sigma, **{key: y}) - x
    ).square().flatten(1).mean(1)
    if isinstance(net, edm2.EDM2):  # the EDM2 loss: learned uncertainty weighting (eq. 21)
        u = net.logvar(sigma)
        loss = loss / u.exp() + u
    opt.zero_grad(set_to_none=True)
    loss.mean().backward()
    opt.step()
    sync(x.device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--width", type=int, default=32, help="UNet hidden (and EDM2 model_channels unless --edm2-width)")
    ap.add_argument("--edm2-width", type=int, default=0)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp16", action="store_true", help="EDM2 U-Net in float16 on CUDA (NVlabs' setting)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(a.batch, 3, a.size, a.size, generator=g) * 0.5).to(dev)
    sigma = torch.exp(torch.randn(a.batch, generator=g) * 1.2 - 0.8).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    models = {name: (net.to(dev), key, torch.optim.Adam(net.parameters(), lr=1e-4)) for name, (net, key) in nets(a).items()}
    times = {name: ([], []) for name in models}
    for _name, (net, key, opt) in models.items():  # warm-up
        forward_time(net, key, x, sigma, y)
        train_time(net, key, opt, x, sigma, y)
    for _ in range(a.rounds):
        for name, (net, key, opt) in models.items():
            times[name][0].append(forward_time(net, key, x, sigma, y))
            times[name][1].append(train_time(net, key, opt, x, sigma, y))
    print(
        f"{a.device}, {a.threads} thread(s), batch {a.batch}, {a.size}x{a.size}x3, {a.blocks} blocks/level, "
        f"median of {a.rounds}{', EDM2 fp16' if a.fp16 else ''}"
    )
    print(f"{'model':22} {'params':>9} {'forward ms':>11} {'train ms':>9} {'fwd ms/Mparam':>14} {'train ms/Mparam':>16}")
    for name, (net, _, _) in models.items():
        n = sum(p.numel() for p in net.parameters()) / 1e6
        f, t = (statistics.median(v) * 1e3 for v in times[name])
        print(f"{name:22} {n:8.3f}M {f:11.1f} {t:9.1f} {f / n:14.1f} {t / n:16.1f}")


if __name__ == "__main__":
    main()
