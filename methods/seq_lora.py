"""Sequential LoRA: the lower bound (and, with `--tasks 1`, joint training: the upper bound).

Paper: none of its own. The "SeqLoRA" baseline of the LoRA-CIL literature (PILOT `finetune` with a LoRA
instead of full fine-tuning; the lower bound in InfLoRA, CVPR 2024, arXiv 2404.00228, and SD-LoRA,
ICLR 2025, arXiv 2501.13198). Joint training is the same file run with one task holding every class.
Code followed: liangyanshuo/InfLoRA @ e08b00e for the LoRA, the optimiser and the schedule, so that the
baseline is trained like InfLoRA; sun-hailong/LAMDA-PILOT @ 2647455 `models/finetune.py` for the masked
(local) loss.

Implements (A = down-projection r x d, B = up-projection d x r):
    W_m <- W_m + B_m A_m  for m in the targets (q and v) of every block, one (A, B) shared by all tasks
    A: Kaiming-uniform (a = sqrt 5), B: 0, no alpha/r scaling (InfLoRA models/vit_inflora.py L202-207)
    loss "local":  CE(h_t(f(x)), y - K_t)          (PILOT models/finetune.py L137-139; InfLoRA
                                                    methods/inflora.py L220-225); the reported SeqLoRA
    loss "full":   CE([h_0; ...; h_t](f(x)), y)    (plain CE over every seen class)
    inference:     argmax over [h_0(f); ...; h_t(f)], no task id
    Adam (0.9, 0.999), lr 5e-4, wd 0, batch 128, 20 epochs (InfLoRA configs/cifar100_inflora.json,
    methods/inflora.py L178-180); InfLoRA's epoch cosine eta_e = eta_0 cos(99 pi max(e - 1, 0) / (200 (E - 1)))
    for e = 0..E-1 (utils/schedulers.py L19-20, L53-54; see `inflora_cosine`)
The LoRA is never frozen, never expanded, and trained on task after task with a new optimiser per task.

Deviations:
- Targets q and v by default, as SD-LoRA and CL-LoRA; InfLoRA adapts k and v: `--targets kv`.
- Heads are sized per task (InfLoRA's heads all have init_cls rows, models/sinet_inflora.py L72-77),
  which makes uneven splits work.
- Evaluation runs a folded copy: `merged_vit()` writes B A into the qkv rows of a copy of the ViT, built once
  per evaluation (`_eval_vit`), so inference costs one plain backbone forward (InfLoRA's code, which this
  baseline follows, adds its LoRA in every forward, models/vit_inflora.py L245-249). The logits differ only by
  float rounding; training keeps the adapter.

Run: python train.py --method seq_lora --tasks 10
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import attach, features, qkv_rows

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


CHOICES = {"loss": ("local", "full")}


def validate(cfg: Config) -> None:
    """Raise ValueError for a Config that cannot run."""
    if cfg.rank < 1:
        raise ValueError(f"--rank must be >= 1 (got {cfg.rank})")
    if not cfg.targets or not set(cfg.targets) <= set("qkv") or len(set(cfg.targets)) != len(cfg.targets):
        raise ValueError(f"--targets must be distinct letters of q, k, v (got {cfg.targets!r})")
    if cfg.loss not in CHOICES["loss"]:
        raise ValueError(f"--loss must be one of {', '.join(CHOICES['loss'])} (got {cfg.loss!r})")


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

    def delta_weight(self, m: str) -> torch.Tensor:
        return self.B[m] @ self.A[m]


# ----------------------------------------------------------------------------------------------------
# Method


class SeqLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        d = vit.embed_dim
        attach(vit, "qkv_adapter", lambda i, attn: Adapter(d, cfg.rank, cfg.targets))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        self.register_load_state_dict_post_hook(lambda mod, keys: mod._drop_eval_vit())

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        self._drop_eval_vit()
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        device = self.vit.cls_token.device
        self.heads.append(nn.Linear(self.vit.embed_dim, len(classes)).to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for s, h in enumerate(self.heads):
            h.requires_grad_(s == t)

    def begin_task(self, t: int, classes: list[int], data) -> None:
        self._drop_eval_vit()

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = features(self.vit, x)
        K_t = self.offsets[-2]
        if self.cfg.loss == "local":
            return F.cross_entropy(self.heads[-1](f), y - K_t)
        return F.cross_entropy(self.logits(f), y)

    def end_task(self, t: int, classes: list[int], data) -> None:
        self._drop_eval_vit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit if self.training else self._eval_vit()  # evaluation: one forward of the folded copy
        return self.logits(features(vit, x))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[Adapter]:
        """The per-block adapters, registered once: under vit.blocks.{i}.attn.qkv_adapter."""
        return [blk.attn.qkv_adapter for blk in self.vit.blocks if blk.attn.qkv_adapter is not None]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    def train(self, mode: bool = True):
        self._drop_eval_vit()  # train() and eval(): the next evaluation folds the adapters as they are then
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._drop_eval_vit()  # .to(), .double(), ...: the folded copy would keep the old device and dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def merged_vit(self) -> nn.Module:
        """A copy of the ViT with every adapter's delta folded into its qkv rows, and no adapters."""
        vit = copy.deepcopy(self.vit, {id(ad): None for ad in self.adapters})  # copied without the adapters
        d = vit.embed_dim
        for blk, ad in zip(vit.blocks, self.adapters):
            for m in ad.targets:
                blk.attn.qkv.weight[qkv_rows(m, d)] += ad.delta_weight(m)
        return vit

    def _eval_vit(self) -> nn.Module:
        """merged_vit(), built by the first evaluation forward and kept until the adapters can change (train(),
        grow, begin_task, end_task, load_state_dict, merge); held outside the module tree, so it is in no
        state_dict() and no parameters()."""
        vit = self.__dict__.get("_eval_cache")
        if vit is None:
            vit = self.__dict__["_eval_cache"] = self.merged_vit()
        return vit

    def _drop_eval_vit(self) -> None:
        self.__dict__.pop("_eval_cache", None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold B A into the qkv weights and zero every B: the function is unchanged."""
        self._drop_eval_vit()
        d = self.vit.embed_dim
        for blk, ad in zip(self.vit.blocks, self.adapters):
            for m in ad.targets:
                blk.attn.qkv.weight[qkv_rows(m, d)] += ad.delta_weight(m)
            for b in ad.B.values():
                b.zero_()


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
