"""SimpleCIL: a frozen pretrained backbone and class-mean prototypes with a cosine classifier.

Paper: Zhou, Cai, Ye, Zhan, Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024, arXiv 2303.07338.
Official code: zhoudw-zdw/RevisitingCIL; followed: sun-hailong/LAMDA-PILOT @ 2647455 (`models/simplecil.py`,
`utils/inc_net.py` SimpleVitNet, `backbone/linears.py` CosineLinear; line numbers at that commit).

Implements (no training at all: the backbone stays bit-identical and old prototypes never change):
    p_c = mean of f(x) over class c's training images with test transforms, after the task of c
        (models/simplecil.py L27-50, the loader of L66-67 uses mode="test"): `end_task`, `class_means`
    logit_c(x) = sigma * cos(f(x), p_c), sigma = 1, untrained (backbone/linears.py L51-65; SimpleVitNet's
        fc is a CosineLinear, utils/inc_net.py L570-572): `forward`
Deviations: none. train.py evaluates it through its own forward (there is no adapter to fold).
Run: python train.py --method simple_cil --tasks 10
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import check_options, features

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    sigma: float = 1.0
    """cosine-classifier scale (untrained; PILOT: 1)"""
    lr: float = 0.0
    """unused: nothing trains (a field of every Config)"""
    epochs: int = 0
    """unused: nothing trains (a field of every Config)"""
    batch_size: int = 128
    """batch size of the prototype pass"""


# the official settings per dataset (`train.py --preset paper --dataset NAME`), LAMDA-PILOT @ 2647455
# exps/simplecil.json and simplecil_inr.json: tasks L8-9, seed L13, L11 "pretrained_vit_b16_224" = timm 0.6.12's
# vit_base_patch16_224, IN-21K -> IN-1K fine-tuned (utils/inc_net.py L12-13). No other dataset has a config.
OFFICIAL = {d: dict(tasks=10, order_seed=1993, weights="vit_base_patch16_224.augreg_in21k_ft_in1k")
            for d in ("cifar100", "imagenet_r")}

CHOICES: dict = {}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run."""
    check_options(cfg, CHOICES, [("sigma", cfg.sigma > 0, "> 0"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
                                 ("lr", cfg.lr >= 0, ">= 0"), ("epochs", cfg.epochs >= 0, ">= 0")])


# ----------------------------------------------------------------------------------------------------
# Method


class SimpleCIL(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg, vit)
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        self.register_buffer("protos", torch.zeros(num_classes, vit.embed_dim))
        self.register_buffer("n_seen", torch.zeros((), dtype=torch.long))

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert classes[0] == int(self.n_seen), "tasks must grow in order"
        self.n_seen.fill_(classes[-1] + 1)

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        return None, None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("SimpleCIL does not train")

    def end_task(self, t: int, classes: list[int], data) -> None:
        self.protos[classes] = class_means(self.vit, data.plain, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.protos[: int(self.n_seen)]
        return self.cfg.sigma * F.linear(F.normalize(features(self.vit, x).to(p.dtype), dim=1), F.normalize(p, dim=1))


Method = SimpleCIL

# ----------------------------------------------------------------------------------------------------
# Utilities


@torch.no_grad()
def class_means(encoder: nn.Module, loader, classes: list[int]) -> torch.Tensor:
    """Mean feature f(x) of every class in `classes` (rows in that order) over one pass of `loader`."""
    was_training, device = encoder.training, next(encoder.parameters()).device
    encoder.eval()
    f, y = zip(*[(features(encoder, x.to(device)).double().cpu(), y - classes[0]) for x, y in loader])
    encoder.train(was_training)
    f, y = torch.cat(f), torch.cat(y)
    counts = torch.bincount(y, minlength=len(classes))
    assert (counts > 0).all(), "a class of the task has no training image"
    return (f.new_zeros(len(classes), f.shape[1]).index_add_(0, y, f) / counts[:, None]).float()
