"""Sequential LoRA: the lower bound (and, with `--tasks 1`, joint training: the upper bound).

Paper: none of its own: the "SeqLoRA" baseline of LoRA-CIL papers (PILOT `finetune` with a LoRA instead of full
fine-tuning; the lower bound of InfLoRA, CVPR 2024, arXiv 2404.00228, and SD-LoRA, ICLR 2025, arXiv 2501.13198).
Code followed: liangyanshuo/InfLoRA @ e08b00e (LoRA, optimiser, schedule: the baseline trains like InfLoRA) and
sun-hailong/LAMDA-PILOT @ 2647455 `models/finetune.py` (the masked, local loss).

Implements (A = down-projection r x d, B = up-projection d x r):
    W_m <- W_m + B_m A_m  for m in the targets (q, v) of every block, one (A, B) for all tasks: `Adapter`
    A: Kaiming-uniform (a = sqrt 5), B: 0, no alpha/r scaling (InfLoRA models/vit_inflora.py L202-207)
    loss "local":  CE(h_t(f(x)), y - K_t), the reported SeqLoRA (PILOT models/finetune.py L137-139;
                   InfLoRA methods/inflora.py L220-225): `loss`
    loss "full":   CE([h_0; ...; h_t](f(x)), y)    (plain CE over every seen class): `loss`
    inference:     argmax over [h_0(f); ...; h_t(f)], no task id: `forward`, `merged`
    Adam (0.9, 0.999), lr 5e-4, wd 0, batch 128, 20 epochs (InfLoRA configs/cifar100_inflora.json, methods/inflora.py
    L178-180); epoch cosine eta_e = eta_0 cos(99 pi max(e - 1, 0) / (200 (E - 1))), e = 0..E-1 (`inflora_cosine`)
    ImageNet-R: 50 epochs, as InfLoRA's configs/mimg10_inflora.json L18 and L23 (`OFFICIAL`, per dataset)
The LoRA is never frozen, never expanded, and trained on task after task with a new optimiser per task.

Deviations:
- Targets q and v by default, as SD-LoRA and CL-LoRA; InfLoRA adapts k and v: `--targets kv`.
- Heads are sized per task (InfLoRA's all have init_cls rows, models/sinet_inflora.py L72-77): uneven splits work.
- train.py evaluates `merged()`: B A written into the qkv rows of a copy of the ViT, one plain backbone forward
  (InfLoRA adds its LoRA in every forward, models/vit_inflora.py L245-249); the logits of `forward` up to rounding.

Run: python train.py --method seq_lora --tasks 10
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import Merged, attach, check_options, features, fold

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    rank: int = 10
    """LoRA rank r (InfLoRA / SD-LoRA: 10)"""
    targets: str = "qv"
    """adapted slices of the fused qkv, any of q, k, v (SD-LoRA, CL-LoRA: q and v; InfLoRA: k and v)"""
    loss: str = "local"
    """'local': CE on the current task's logits only (PILOT finetune); 'full': CE over all seen logits"""
    lr: float = 5e-4
    """Adam learning rate (InfLoRA config)"""
    weight_decay: float = 0.0
    """Adam weight decay (InfLoRA config)"""
    epochs: int = 20
    """epochs per task (InfLoRA CIFAR-100 config)"""
    batch_size: int = 128
    """training batch size (InfLoRA config)"""


OFFICIAL = {"cifar100": {}, "imagenet_r": dict(epochs=50)}  # `--preset paper --dataset NAME`: as InfLoRA's configs

CHOICES = {"loss": ("local", "full")}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run."""
    check_options(cfg, CHOICES, [
        ("rank", cfg.rank >= 1, ">= 1"),
        ("targets", len(cfg.targets) == len(set(cfg.targets)) >= 1 and set(cfg.targets) <= set("qkv"),
         "distinct letters of q, k, v"),
        ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("epochs", cfg.epochs >= 0, ">= 0"), ("batch_size", cfg.batch_size >= 1, ">= 1")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class Adapter(nn.Module):
    """One LoRA on the slices m of one block's fused qkv: delta_m = B_m (A_m x)."""

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.targets = targets
        self.A = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d)) for m in targets})  # down
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank)) for m in targets})  # up
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: F.linear(F.linear(x, self.A[m]), self.B[m]) for m in self.targets}


# ----------------------------------------------------------------------------------------------------
# Method


class SeqLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg, vit)
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        attach(vit, "qkv_adapter", lambda i, attn: Adapter(vit.embed_dim, cfg.rank, cfg.targets))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        device = self.vit.cls_token.device
        self.heads.append(nn.Linear(self.vit.embed_dim, len(classes)).to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for s, h in enumerate(self.heads):
            h.requires_grad_(s == t)

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = features(self.vit, x)
        if self.cfg.loss == "local":  # y - K_t
            return F.cross_entropy(self.heads[-1](f), y - self.offsets[-2])
        return F.cross_entropy(self.logits(f), y)

    def end_task(self, t: int, classes: list[int], data) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(features(self.vit, x))

    def merged(self) -> nn.Module:
        """The inference model: the heads over a copy of the ViT with every B_m A_m in its qkv rows, no adapters."""
        ads = [blk.attn.qkv_adapter for blk in self.vit.blocks]
        return Merged(fold(self.vit, lambda i, m: ads[i].B[m] @ ads[i].A[m] if m in ads[i].targets else None),
                      copy.deepcopy(self.heads))

    # -- helpers ---------------------------------------------------------------------------------
    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)


Method = SeqLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def inflora_cosine(epochs: int, steps_per_epoch: int):
    """InfLoRA's epoch cosine as a per-step multiplier: epoch e trains at cos(99 pi max(e - 1, 0) / (200 (E - 1))).

    The official CosineSchedule (utils/schedulers.py L19-20 and L53-54, the same file in InfLoRA @ e08b00e and
    SR-2-LoRA @ ea5da65) steps once in its constructor and then resets last_epoch, so its first per-epoch step
    returns the base rate again: epochs 0 and 1 both train at the base rate.
    """
    def factor(step: int) -> float:
        e = min(step // max(steps_per_epoch, 1), epochs - 1)
        return 1.0 if epochs <= 1 else math.cos(99 * math.pi * max(e - 1, 0) / (200 * (epochs - 1)))
    return factor

