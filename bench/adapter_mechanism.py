"""Seconds per training step of the adapter mechanism: forward hooks (backbone.py today) against the slots read
inside Attention.forward (backbone.py at commit 3c7fc63), measured side by side in one process.

    python bench/adapter_mechanism.py                  # vit_small32 shapes, batch 64, fp32, 10 rounds of 5 steps
    python bench/adapter_mechanism.py --rounds 1 --steps 1 --warmup 1     # a quick try

Both backbones get the same weights and a seq_lora-style LoRA (rank 10 on q and v of every block, frozen
backbone, a linear head; Adam on LoRA and head). The old backbone is read with `git show 3c7fc63:backbone.py`
into a temporary module. Before timing, the script checks that both give the same features. A third variant runs
the hooks on timm's VisionTransformer (same shapes and weights) when timm is installed. Variants are timed in
interleaved rounds, so a change in machine load hits all alike; the table gives the median over rounds and the
ratio to the old mechanism. Results go to bench/results/adapter_mechanism_<device>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import backbone as bb  # noqa: E402

OLD_COMMIT = "3c7fc63"


def old_backbone():
    """backbone.py as of OLD_COMMIT, imported as the module `backbone_old`."""
    src = subprocess.run(["git", "-C", ROOT, "show", f"{OLD_COMMIT}:backbone.py"], check=True,
                         capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "backbone_old.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("backbone_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["backbone_old"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class QVLoRA(nn.Module):
    """delta q = B_q A_q x, delta v = B_v A_v x (seq_lora's shape of adapter)."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.A = nn.ParameterDict({m: nn.Parameter(torch.randn(r, d) / d ** 0.5) for m in "qv"})
        self.B = nn.ParameterDict({m: nn.Parameter(torch.randn(d, r) * 0.01) for m in "qv"})

    def forward(self, x: torch.Tensor) -> dict:
        return {m: F.linear(F.linear(x, self.A[m]), self.B[m]) for m in "qv"}


class Model(nn.Module):
    """head(f(x)); f is the old ViT's own forward, or backbone.features for the new mechanism."""

    def __init__(self, vit: nn.Module, d: int, num_classes: int, old: bool):
        super().__init__()
        self.vit, self.head, self.old = vit, nn.Linear(d, num_classes), old

    def forward(self, x):
        return self.head(self.vit(x) if self.old else bb.features(self.vit, x))


def variants(args):
    cfg = bb.PRESETS[args.backbone]
    old = old_backbone()
    torch.manual_seed(0)
    new_vit = bb.ViT(cfg)
    old_vit = old.ViT(old.ViTConfig(**dataclasses.asdict(cfg)))
    old_vit.load_state_dict(new_vit.state_dict())
    vits = {"old (slots in Attention.forward)": old_vit, "new (hooks), backbone.ViT": new_vit}
    try:
        from timm.models.vision_transformer import VisionTransformer
        ref = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                                depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                                num_classes=0)
        bb.load_strict(ref, new_vit.state_dict())
        vits["new (hooks), timm VisionTransformer"] = ref
    except ImportError:
        pass
    torch.manual_seed(1)
    loras = [QVLoRA(cfg.embed_dim, args.rank) for _ in range(cfg.depth)]
    head = nn.Linear(cfg.embed_dim, 10)
    models = {}
    for name, vit in vits.items():
        for p in vit.parameters():
            p.requires_grad_(False)
        copies = [QVLoRA(cfg.embed_dim, args.rank) for _ in range(cfg.depth)]
        for c, lo in zip(copies, loras):
            c.load_state_dict(lo.state_dict())
        if vit is old_vit:
            for blk, c in zip(vit.blocks, copies):
                blk.attn.qkv_adapter = c
        else:
            bb.attach(vit, "qkv_adapter", lambda i, attn: copies[i])
        m = Model(vit, cfg.embed_dim, 10, old=vit is old_vit)
        m.head.load_state_dict(head.state_dict())
        models[name] = m.to(args.device).train()
    g = torch.Generator().manual_seed(2)
    x = (torch.rand(args.batch_size, 3, cfg.img_size, cfg.img_size, generator=g) * 2 - 1).to(args.device)
    y = torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device)
    with torch.no_grad():
        outs = [m(x[:8]) for m in models.values()]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-4, rtol=0)  # the same function before timing
    built = {}
    for name, m in models.items():
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=5e-4)
        built[name] = (m, opt)
    return built, x, y


def step(m, opt, x, y):
    loss = F.cross_entropy(m(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="vit_small32", choices=list(bb.PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rank", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    built, x, y = variants(args)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    for m, opt in built.values():
        for _ in range(args.warmup):
            step(m, opt, x, y)
    times = {n: [] for n in built}
    for _ in range(args.rounds):
        for n, (m, opt) in built.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(m, opt, x, y)
            sync()
            times[n].append((time.perf_counter() - t0) / args.steps)
    names = list(built)
    ref = statistics.median(times[names[0]])
    rows = [{"variant": n, "seconds_per_step": statistics.median(times[n]),
             "ratio_to_old": statistics.median(times[n]) / ref, "per_round": times[n]} for n in names]
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", f"adapter_mechanism_{args.device.split(':')[0]}.json")
    with open(out, "w") as f:
        json.dump({"args": vars(args), "old_commit": OLD_COMMIT, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    print("| variant | s/step | ratio to old |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds_per_step']:.4f} | {r['ratio_to_old']:.3f} |")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
