"""C-LoRA: one LoRA per matrix whose update is routed through a learnable r x r matrix R = R_old + R_delta.

Paper: Zhang, Bai, Yang, Liang, "C-LoRA: Continual Low-Rank Adaptation for Pre-trained Models",
arXiv 2502.17920 (February 2025; preprint, venue not confirmed). Not to be confused with "CLoRA" (Controlled
LoRA), "CL-LoRA" (He et al., CVPR 2025; methods/cl_lora.py) or "C-LoRA" (Smith et al., 2023, diffusion).
Official code: none released.

THIS FILE IS A RECONSTRUCTION (its choices beyond the sources: "Deviations" below). Where each part comes
from is marked in the comments:
    [FORMAL]  the core algebra of the paper's Eqs. 3-17 and 26 and Theorem 3.1, as restated by a third-party
              Lean formalisation (`ContinualLowRankRouting.lean`, MeTTapedia project): delta W = left R right,
              R = R_old + R_delta, the old route's gradient stopped, Theorem 3.1, ||Q_old^T R_delta||_F^2
    [SUMM]    summaries of the paper's abstract (decomposition, orthogonality, protocol)
    [WEAK]    one third-party design document (R_delta near zero, lambda = 0.01)
    [ASSUMED] everything else; every such choice is a Config field.
No C-LoRA hyper-parameter and no result number is known.

Implements (PyTorch convention y = x W0^T + b; A = down (r x d_in), R (r x r), B = up (d_out x r); the paper
writes delta W = A R B with A the up ("left") and B the down ("right") factor, the reverse of this file):
    delta W = s B (R_old + R_delta) A                                      forward value [FORMAL]
    y_adapt = s [ x sg(A)^T R_old^T sg(B)^T + x A^T R_delta^T B^T ]        Eqs. 11-12, sg = detach [FORMAL rule,
        so grad_B = s G A^T R_delta^T, grad_A = s R_delta^T B^T G,          ASSUMED realisation]
           grad_R_delta = s B^T G A^T, with G = dL/d(delta W); R_old is a buffer
    L = CE(h_t(f(x)), y - K_t) + lambda * sum_matrices ||Q_old^T R_delta||_F^2,  Q_old = R_old    Eq. 26 [FORMAL]
    task boundary: R_old <- R_old + R_delta, R_delta <- 0 (the function is unchanged); A, B keep training
    inference: logits of all seen heads concatenated, argmax, no task id
    Eqs. 4-5 (why one LoRA replaces many): R = blockdiag(w_t I) gives B R A = sum_t w_t B_t A_t.
The adapter's size is fixed: per matrix r (d_in + d_out) + r^2 trainable values and r^2 buffer values (R_old),
whatever the number of tasks; only the classifier grows.

Where the equations live:
    delta W = s B (R_old + R_delta) A        LoRASite.delta_weight; folded into the weights by CLoRA.merged
    Eqs. 11-12 (old route stop-gradient)     LoRASite.forward
    Eq. 26 (orthogonality penalty)           LoRASite.set_old_basis (Q_old), LoRASite.penalty, CLoRA.orth_penalty;
                                             the sum L = CE + lambda L_orth in CLoRA.loss
    task boundary (R_old <- R_old + R_delta) LoRASite.consolidate, called by CLoRA.end_task
    Eqs. 4-5, Theorem 3.1                    properties of the above, no code of their own (tests/test_c_lora.py)
    head (cosine, prototype init)            CosineHead, class_means, CLoRA.begin_task; inference: CLoRA.forward

Defaults (all [ASSUMED], chosen for comparability with KeepLoRA, methods/keep_lora.py): targets q, k, v, o of
every block; r = 16; s = alpha / r = 1; AdamW lr 1e-3, weight decay 0 (decay on A and B would rewrite the old
routes, whose value still moves with A and B); one-cycle schedule per batch; batch 64; 10 epochs per task;
lambda = 1e-2 [WEAK]; R_delta = 0 and A, B Kaiming-uniform (a = sqrt 5). Both factors are non-zero: with
R_delta = 0 the stop-gradient makes grad_A = grad_B = 0, and with a zero factor grad_R_delta would be 0 too, so
nothing would learn. A per-task cosine head (scale 30) initialised to the normalised class means of the current
backbone, trained with task-local CE and frozen after its task (the KeepLoRA transplant head).

Deviations (there is no official code; these are choices beyond the sources above):
- The one-cycle schedule is written as a per-step LambdaLR (torch OneCycleLR's lr shape: 30 % warm-up from
  lr/25, cosine down to lr/1e4) without OneCycleLR's momentum cycling, and it clamps instead of raising if
  stepped past its end. The sources leave the schedule open ("OneCycle (or cosine)").
- With `orth_normalise`, the penalty is divided by ||Q_old||_F^2 + 1e-8, which keeps its weight from growing
  with R_old over tasks: ||R_old||_F^2 in the default mode; in `svd_topk` mode the basis is orthonormal and the
  divisor is k, which does not drift.
- The head scale 30 is fixed (not learned), as the KeepLoRA+ head it borrows.
- train.py evaluates `merged()`: every site's s B (R_old + R_delta) A written into attn.qkv / attn.proj of a copy
  of the ViT, one plain backbone forward; the logits of `forward` (which runs the adapters) up to rounding.
- The classifier-alignment ablation (`--ca`, not part of C-LoRA) was removed: InfLoRA's `--ca` is where it lives.

Run: python train.py --method c_lora --tasks 10
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
    rank: int = 16
    """LoRA rank r, the size of the routing matrix R [ASSUMED; sweep 8, 16]"""
    scale: float = 1.0
    """s = alpha / r with alpha = r [ASSUMED]"""
    targets: str = "qkvo"
    """adapted matrices of every block, any of q, k, v (slices of the fused qkv) and o (attn.proj) [ASSUMED]"""
    old_route_stopgrad: bool = True
    """stop the old route's gradient to A and B (Eqs. 11-12 [FORMAL]); False = naive freeze of R_old (ablation)"""
    lambda_orth: float = 1e-2
    """weight of the orthogonality penalty ||Q_old^T R_delta||_F^2 (Eq. 26; 0.01 [WEAK]; sweep 0, 1e-3, 1e-2, 1e-1)"""
    orth_mode: str = "r_old"
    """old basis Q_old of the penalty: 'r_old' (Q_old = R_old) or 'svd_topk' (top left singular vectors of R_old)"""
    orth_energy: float = 0.95
    """'svd_topk': keep the fewest singular vectors of R_old whose squared singular values reach this share"""
    orth_normalise: bool = False
    """divide the penalty by ||Q_old||_F^2 + 1e-8 so that its weight does not grow with R_old [ASSUMED]"""
    r_delta_init_std: float = 0.0
    """R_delta ~ N(0, std^2) at the start of every task; 0 keeps the function unchanged ("near zero" [WEAK])"""
    head: str = "cosine_proto"
    """'cosine_proto': cosine head, prototype init (the KeepLoRA transplant); 'linear': a linear head"""
    head_scale: float = 30.0
    """scale tau of the cosine head (KeepLoRA+ head)"""
    lr: float = 1e-3
    """AdamW learning rate [ASSUMED]"""
    weight_decay: float = 0.0
    """AdamW weight decay; 0 on A, B and R_delta (decay on A and B rewrites the old routes) [ASSUMED]"""
    schedule: str = "onecycle"
    """per-batch learning-rate schedule: 'onecycle', 'cosine' or 'constant' [ASSUMED]"""
    epochs: int = 10
    """epochs per task (CIFAR) [ASSUMED]"""
    batch_size: int = 64
    """training batch size [ASSUMED]"""


CHOICES = {"orth_mode": ("r_old", "svd_topk"), "head": ("cosine_proto", "linear"),
           "schedule": ("onecycle", "cosine", "constant")}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run."""
    check_options(cfg, CHOICES, [
        ("rank", cfg.rank >= 1, ">= 1"), ("scale", cfg.scale > 0, "> 0"),
        ("targets", len(cfg.targets) == len(set(cfg.targets)) >= 1 and set(cfg.targets) <= set("qkvo"),
         "distinct letters of q, k, v, o"),
        ("lambda_orth", cfg.lambda_orth >= 0, ">= 0"), ("orth_energy", 0 < cfg.orth_energy <= 1, "in (0, 1]"),
        ("r_delta_init_std", cfg.r_delta_init_std >= 0, ">= 0"), ("head_scale", cfg.head_scale > 0, "> 0"),
        ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("epochs", cfg.epochs >= 1, ">= 1"), ("batch_size", cfg.batch_size >= 1, ">= 1")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class LoRASite(nn.Module):
    """One adapted matrix W0 (d_out x d_in): delta(x) = s x A^T (R_old + R_delta)^T B^T, old route stop-grad."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, stopgrad: bool = True):
        super().__init__()
        self.scale, self.stopgrad = scale, stopgrad
        self.A = nn.Parameter(torch.empty(rank, d_in))  # down (the paper's "right", Route x Input)
        self.B = nn.Parameter(torch.empty(d_out, rank))  # up (the paper's "left", Output x Route)
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))  # as Linear(r -> d_out): U(+-1/sqrt r), non-zero
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as Linear(d_in -> r): U(+-1/sqrt d_in), non-zero
        self.R_delta = nn.Parameter(torch.zeros(rank, rank))  # fresh route, trainable, 0 at init [WEAK]
        self.register_buffer("R_old", torch.zeros(rank, rank))  # accumulated routing, frozen, 0 in task 0
        # the penalty's old basis; derived from R_old in begin_task, so it is not saved
        self.register_buffer("Q_old", torch.zeros(rank, rank), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fresh = F.linear(F.linear(F.linear(x, self.A), self.R_delta), self.B)  # x A^T R_delta^T B^T
        if self.stopgrad:  # Eqs. 11-12: the old route adds its value, but no gradient to A and B
            old = F.linear(F.linear(F.linear(x, self.A.detach()), self.R_old), self.B.detach())
        else:  # naive freeze: R_old is a buffer, A and B get the full gradient through it
            old = F.linear(F.linear(F.linear(x, self.A), self.R_old), self.B)
        return self.scale * (old + fresh)  # = x delta W^T with delta W = s B (R_old + R_delta) A

    def delta_weight(self) -> torch.Tensor:
        """s B (R_old + R_delta) A, (d_out, d_in): the weight this adapter adds to W0."""
        return self.scale * self.B @ (self.R_old + self.R_delta) @ self.A

    @torch.no_grad()
    def set_old_basis(self, mode: str, energy: float) -> None:
        """Q_old for Eq. 26: R_old itself, or the fewest left singular vectors of R_old holding `energy`."""
        if mode == "r_old":
            self.Q_old.copy_(self.R_old)
            return
        U, S, _ = torch.linalg.svd(self.R_old.double())
        share = (S**2).cumsum(0) / (S**2).sum().clamp_min(1e-300)
        k = 0 if S[0] == 0 else int((share < energy).sum()) + 1  # fewest with share >= energy; 0 if R_old = 0
        self.Q_old.zero_()[:, :k] = U[:, :k].to(self.Q_old.dtype)

    def penalty(self, normalise: bool) -> torch.Tensor:
        """||Q_old^T R_delta||_F^2 (Eq. 26), in float32 even under autocast."""
        with torch.autocast(self.R_delta.device.type, enabled=False):
            pen = (self.Q_old.T @ self.R_delta).square().sum()  # Eq. 26
            return pen / (self.Q_old.square().sum() + 1e-8) if normalise else pen

    @torch.no_grad()
    def consolidate(self) -> None:
        """Task boundary: R_old <- R_old + R_delta, R_delta <- 0. delta W, hence the function, is unchanged."""
        self.R_old += self.R_delta
        self.R_delta.zero_()


class QKVAdapter(nn.Module):
    """The q, k, v sites of one block's fused qkv (the backbone's `qkv_adapter` slot)."""

    def __init__(self, d: int, rank: int, scale: float, targets: str, stopgrad: bool):
        super().__init__()
        self.sites = nn.ModuleDict({m: LoRASite(d, d, rank, scale, stopgrad) for m in "qkv" if m in targets})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: site(x) for m, site in self.sites.items()}


class CosineHead(nn.Module):
    """logits = tau cos(f, w_c) over the classes of one task; tau a number (fixed) or an nn.Parameter (learned).
    Computed in the head's own precision, also under autocast."""

    def __init__(self, d: int, n: int, tau: float | nn.Parameter):
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.zeros(n, d))  # written by the method before training

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        with torch.autocast(f.device.type, enabled=False):
            w = self.weight
            return self.tau * F.linear(F.normalize(f.to(w.dtype), dim=-1), F.normalize(w, dim=-1))


# ----------------------------------------------------------------------------------------------------
# Method


class CLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg, vit)
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        d = vit.embed_dim
        r, s, sg = cfg.rank, cfg.scale, cfg.old_route_stopgrad
        if set(cfg.targets) & set("qkv"):
            attach(vit, "qkv_adapter", lambda i, attn: QKVAdapter(d, r, s, cfg.targets, sg))
        if "o" in cfg.targets:
            attach(vit, "out_adapter", lambda i, attn: LoRASite(d, d, r, s, sg))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        d, device = self.vit.embed_dim, self.vit.cls_token.device
        head = CosineHead(d, len(classes), self.cfg.head_scale) if self.cfg.head == "cosine_proto" \
            else nn.Linear(d, len(classes))
        self.heads.append(head.to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for i, h in enumerate(self.heads):
            h.requires_grad_(i == t)  # old heads frozen

    @torch.no_grad()
    def begin_task(self, t: int, classes: list[int], data) -> None:
        for site in self.sites():
            site.R_delta.zero_()
            if self.cfg.r_delta_init_std > 0:
                site.R_delta.normal_(0.0, self.cfg.r_delta_init_std)
            site.set_old_basis(self.cfg.orth_mode, self.cfg.orth_energy)
        if self.cfg.head == "cosine_proto":  # prototype init with the current backbone
            self.heads[t].weight.copy_(F.normalize(class_means(self.vit, data.plain, classes), dim=1))

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]  # A, B, R_delta of every site + head t
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = max(1, self.cfg.epochs * steps_per_epoch)
        factor = {"onecycle": one_cycle(total), "cosine": cosine(total), "constant": lambda step: 1.0}
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor[self.cfg.schedule])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        K_t = self.offsets[-2]
        ce = F.cross_entropy(self.heads[-1](features(self.vit, x)), y - K_t)  # task-local CE
        if self.cfg.lambda_orth == 0:
            return ce
        return ce + self.cfg.lambda_orth * self.orth_penalty()  # L = L_CE + lambda sum L_orth

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        for site in self.sites():
            site.consolidate()  # R_old <- R_old + R_delta; R_delta <- 0
        self.heads[t].requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(features(self.vit, x))

    def merged(self) -> nn.Module:
        """The inference model: the heads over a copy of the ViT with every site's s B (R_old + R_delta) A added
        into its qkv rows (q, k, v) or attn.proj (o), no adapters. A and B keep training: never merged in place."""
        def delta(i: int, m: str) -> torch.Tensor | None:
            if m not in self.cfg.targets:
                return None
            attn = self.vit.blocks[i].attn
            return (attn.out_adapter if m == "o" else attn.qkv_adapter.sites[m]).delta_weight()
        return Merged(fold(self.vit, delta), copy.deepcopy(self.heads))

    # -- helpers ---------------------------------------------------------------------------------
    def sites(self) -> list[LoRASite]:
        """Every adapted matrix, in block order (q, k, v, then o)."""
        out = []
        for blk in self.vit.blocks:
            if blk.attn.qkv_adapter is not None:
                out += list(blk.attn.qkv_adapter.sites.values())
            if blk.attn.out_adapter is not None:
                out.append(blk.attn.out_adapter)
        return out

    def orth_penalty(self) -> torch.Tensor:
        """sum over adapted matrices of ||Q_old^T R_delta||_F^2 (Eq. 26); 0 in the first task (R_old = 0)."""
        return torch.stack([site.penalty(self.cfg.orth_normalise) for site in self.sites()]).sum()

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)


Method = CLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def one_cycle(total: int, pct_start: float = 0.3, div: float = 25.0, final_div: float = 1e4):
    """OneCycleLR's lr shape as a per-step multiplier: cosine up from 1/div, then cosine down to 1/(div*final_div)."""
    up = max(1, int(pct_start * total))

    def factor(step: int) -> float:
        step = min(step, total)
        if step < up:
            start, end, p = 1 / div, 1.0, step / up
        else:
            start, end, p = 1.0, 1 / (div * final_div), (step - up) / max(1, total - up)
        return end + (start - end) * (1 + math.cos(math.pi * p)) / 2
    return factor


def cosine(total: int):
    """Per-step cosine decay from 1 to 0 over `total` steps."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


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
