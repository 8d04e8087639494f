"""Sequential LoRA: the lower bound (and, with `--tasks 1`, joint training: the upper bound).

Paper: none of its own. The "SeqLoRA" baseline of the LoRA-CIL literature (PILOT `finetune` with a LoRA
instead of full fine-tuning; the lower bound in InfLoRA, CVPR 2024, arXiv 2404.00228, and SD-LoRA,
ICLR 2025). Spec: ../shared/specs/baselines.md §1 (SeqLoRA), §2 (joint).
Code followed: liangyanshuo/InfLoRA @ e08b00e for the optimiser and schedule (baselines.md §4.4, §8:
"same optimiser as InfLoRA for comparability"); sun-hailong/LAMDA-PILOT @ 2647455 `finetune` for the
masked (local) loss.

Implements (notation of baselines.md: A = down (r x d), B = up (d x r)):
    W_m <- W_m + B_m A_m    for m in the targets (q and v) of every block, one (A, B) shared by all tasks
    A: Kaiming-uniform (a = sqrt 5), B: 0, no alpha/r scaling (InfLoRA lineage)
    loss "local":  CE(h_t(f(x)), y - K_t)          (baselines.md §1 (a), the reported SeqLoRA)
    loss "full":   CE([h_0; ...; h_t](f(x)), y)    (baselines.md §1 (b))
    inference:     argmax over [h_0(f); ...; h_t(f)], no task id
    Adam (0.9, 0.999), lr 5e-4, wd 0, batch 128, epoch-level cosine eta_e = eta_0 cos(99 pi e / (200 (E-1)))
The LoRA is never frozen, never expanded, and trained on task after task with a new optimiser per task.

Deviations:
- Targets q and v (the issue's choice, as SD-LoRA and CL-LoRA); baselines.md allows K,V or Q,V and
  gives K,V for the small setting. `--targets kv` gives that.
- Heads are sized per task (InfLoRA pitfall I8), which makes uneven splits work.

Run: python train.py --method seq_lora --tasks 10
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import ViT, attach, qkv_rows

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    rank: int = 10
    """LoRA rank r (InfLoRA / SD-LoRA: 10)"""
    targets: str = "qv"
    """adapted slices of the fused qkv, any of q, k, v (issue: q and v)"""
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


CHOICES = {"loss": ("local", "full")}

# ----------------------------------------------------------------------------------------------------
# LoRA


class QKVLoRA(nn.Module):
    """Delta B_m A_m x on the slices m of the fused qkv (one block)."""

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.A = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d)) for m in targets})  # down
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank)) for m in targets})  # up
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: F.linear(F.linear(x, self.A[m]), self.B[m]) for m in self.A}

    def delta_weight(self, m: str) -> torch.Tensor:
        return self.B[m] @ self.A[m]


# ----------------------------------------------------------------------------------------------------
# Method


class SeqLoRA(nn.Module):
    def __init__(self, vit: ViT, num_classes: int, cfg: Config):
        super().__init__()
        if cfg.rank < 1:
            raise ValueError(f"--rank must be >= 1 (got {cfg.rank})")
        if not cfg.targets or not set(cfg.targets) <= set("qkv"):
            raise ValueError(f"--targets must be letters of q, k, v (got {cfg.targets!r})")
        if cfg.loss not in CHOICES["loss"]:
            raise ValueError(f"--loss must be one of {CHOICES['loss']}")
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        for p in vit.parameters():
            p.requires_grad_(False)
        d = vit.embed_dim
        attach(vit, "qkv_adapter", lambda i, attn: QKVLoRA(d, cfg.rank, cfg.targets))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        device = self.vit.cls_token.device
        self.heads.append(nn.Linear(self.vit.embed_dim, len(classes)).to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for i, h in enumerate(self.heads):
            h.requires_grad_(i == t)

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.vit(x)
        if self.cfg.loss == "local":
            K_t = self.offsets[-2]
            return F.cross_entropy(self.heads[-1](f), y - K_t)
        return F.cross_entropy(self.logits(f), y)

    def end_task(self, t: int, classes: list[int], data) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.vit(x))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def loras(self) -> list[QKVLoRA]:
        return [blk.attn.qkv_adapter for blk in self.vit.blocks]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B A into the qkv weights and zero B: the function is unchanged, the adapter becomes a no-op."""
        d = self.vit.embed_dim
        for blk, lora in zip(self.vit.blocks, self.loras):
            for m in lora.A:
                blk.attn.qkv.weight[qkv_rows(m, d)] += lora.delta_weight(m)
                lora.B[m].zero_()


Method = SeqLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def inflora_cosine(epochs: int, steps_per_epoch: int):
    """InfLoRA's epoch-level cosine, as a per-step multiplier: cos(99 pi e / (200 (E - 1))), e = epoch."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 1.0 if epochs <= 1 else math.cos(99 * math.pi * min(e, epochs - 1) / (200 * (epochs - 1)))
    return factor
