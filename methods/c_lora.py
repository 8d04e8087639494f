"""C-LoRA: one LoRA per matrix whose update is routed through a learnable r x r matrix R = R_old + R_delta.

Paper: Zhang, Bai, Yang, Liang, "C-LoRA: Continual Low-Rank Adaptation for Pre-trained Models",
arXiv 2502.17920 (February 2025; preprint, venue not confirmed). Not to be confused with "CLoRA" (Controlled
LoRA), "CL-LoRA" (He et al., CVPR 2025; methods/cl_lora.py) or "C-LoRA" (Smith et al., 2023, diffusion).
Official code: none released. Spec: ../shared/specs/c_lora.md. No code was followed for the method; the
optional classifier alignment follows protocol.md §8 (PILOT SLCA / InfLoRA-CA), as methods/inflora.py does.

THIS FILE IS A RECONSTRUCTION. Provenance tags (spec §0) are kept in the comments:
    [FORMAL]  the core algebra, from a third-party Lean formalisation of the paper's Eqs. 3-17 and 26:
              dW = A R B, R = R_old + R_delta, the old route's gradient stopped, Theorem 3.1, ||Q_old^T R_delta||^2
    [SUMM]    aggregator summaries of the abstract (decomposition, orthogonality, protocol)
    [WEAK]    one third-party design document (R_delta near zero, lambda = 0.01)
    [ASSUMED] everything else; every such choice is a Config field.
No C-LoRA hyper-parameter and no result number is known.

Implements (PyTorch convention y = x W0^T + b; A = up (d_out x r), R (r x r), B = down (r x d_in)):
    dW = s A (R_old + R_delta) B                                           forward value [FORMAL]
    y_adapt = s [ x sg(B)^T R_old^T sg(A)^T + x B^T R_delta^T A^T ]        Eqs. 11-12, sg = detach [FORMAL rule,
        so grad_A = s G B^T R_delta^T, grad_B = s R_delta^T A^T G,          ASSUMED realisation]
           grad_R_delta = s A^T G B^T, with G = dL/d(dW); R_old is a buffer
    L = CE(h_t(f(x)), y - K_t) + lambda * sum_matrices ||Q_old^T R_delta||_F^2,  Q_old = R_old    Eq. 26 [FORMAL]
    task boundary: R_old <- R_old + R_delta, R_delta <- 0 (the function is unchanged); A, B keep training
    inference: logits of all seen heads concatenated, argmax, no task id; the adapter equals the merged
        weight W0 + s A R_old B (`merged_vit`)
    optional (off): SLCA-style classifier alignment of all heads on Gaussian class replay (protocol.md §8)
    Eqs. 4-5 (why one LoRA replaces many): R = blockdiag(w_t I) gives A R B = sum_t w_t A_t B_t.
The adapter's size is fixed: per matrix r (d_in + d_out) + r^2 trainable values and r^2 buffer values (R_old),
whatever the number of tasks; only the classifier grows.

Defaults (all [ASSUMED], spec §8 and §15, chosen for comparability with KeepLoRA): targets q, k, v, o of every
block; r = 16; s = alpha / r = 1; AdamW lr 1e-3, weight decay 0 (decay on A and B would rewrite the old routes,
spec C4); one-cycle schedule per batch; batch 64; 10 epochs per task; lambda = 1e-2 [WEAK]; R_delta = 0 and
A, B Kaiming-uniform (a = sqrt 5; both non-zero, spec §5, C3); a per-task cosine head (scale 30) initialised to
the normalised class means of the current backbone, trained with task-local CE and frozen after its task
(the KeepLoRA transplant head, spec §7).

Deviations (from the spec; there is no official code):
- The one-cycle schedule is written as a per-step LambdaLR (torch OneCycleLR's lr shape: 30 % warm-up from
  lr/25, cosine down to lr/1e4) without OneCycleLR's momentum cycling, and it clamps instead of raising if
  stepped past its end. The spec leaves the schedule open ("OneCycle (or cosine)").
- With `orth_normalise`, the penalty is divided by ||Q_old||_F^2 + 1e-8: the spec's ||R_old||_F^2 in the default
  mode; in `svd_topk` mode the basis is orthonormal and the divisor is k, which does not drift.
- The head scale 30 is fixed (not learned), as the KeepLoRA+ head it borrows.
- `classifier_alignment` (off by default; protocol.md §8, preset `inflora_ca`) keeps the aligned heads: the
  contract has no hook after evaluation, so PILOT's restore-after-evaluation variant is not offered. It samples
  with torch's global generator (seeded by train.py).
- The boundary test checks R_old_new == R_old_old + R_delta_old bit-exactly; the spec's literal
  "R_old_new - R_old_old == R_delta_old exactly" does not hold in floating point.

Run: python train.py --method c_lora --tasks 10
"""
from __future__ import annotations

import copy
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
    rank: int = 16
    """LoRA rank r, the size of the routing matrix R (spec §8 [ASSUMED]; sweep 8, 16)"""
    scale: float = 1.0
    """s = alpha / r with alpha = r (spec §8 [ASSUMED])"""
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
    """divide the penalty by ||Q_old||_F^2 + 1e-8 so that its weight does not grow with R_old (spec C5 [ASSUMED])"""
    r_delta_init_std: float = 0.0
    """R_delta ~ N(0, std^2) at the start of every task; 0 keeps the function unchanged (spec §5 [WEAK])"""
    head: str = "cosine_proto"
    """'cosine_proto': cosine head, prototype init (KeepLoRA transplant, spec §7); 'linear': a linear head"""
    head_scale: float = 30.0
    """scale tau of the cosine head (KeepLoRA+ head)"""
    lr: float = 1e-3
    """AdamW learning rate (spec §8 [ASSUMED])"""
    weight_decay: float = 0.0
    """AdamW weight decay; 0 on A, B and R_delta (spec C4: decay on A and B rewrites the old routes)"""
    schedule: str = "onecycle"
    """per-batch learning-rate schedule: 'onecycle', 'cosine' or 'constant' (spec §8 [ASSUMED])"""
    epochs: int = 10
    """epochs per task (spec §8, CIFAR [ASSUMED])"""
    batch_size: int = 64
    """training batch size (spec §8 [ASSUMED])"""
    classifier_alignment: bool = False
    """SLCA-style alignment of all heads after every task t >= 1 (protocol.md §8; an ablation, spec §7, C6)"""
    ca_epochs: int = 5
    """alignment epochs (protocol.md §8, preset inflora_ca: 5)"""
    ca_lr: float = 0.01
    """alignment SGD learning rate (momentum 0.9, cosine over the alignment epochs)"""
    ca_weight_decay: float = 5e-4
    """alignment SGD weight decay"""
    ca_samples: int = 256
    """Gaussian samples per class and epoch, also the alignment batch size (SLCA: 256)"""
    ca_shrink: float = 1e-4
    """covariance shrinkage delta: Sigma_c + delta I"""
    ca_logit_norm: float = 0.1
    """tau of the per-task logit normalisation during alignment (0: plain CE)"""


CHOICES = {"orth_mode": ("r_old", "svd_topk"), "head": ("cosine_proto", "linear"),
           "schedule": ("onecycle", "cosine", "constant")}

# ----------------------------------------------------------------------------------------------------
# LoRA


class LoRASite(nn.Module):
    """One adapted matrix W0 (d_out x d_in): delta(x) = s x B^T (R_old + R_delta)^T A^T, old route stop-grad."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, stopgrad: bool = True):
        super().__init__()
        self.scale, self.stopgrad = scale, stopgrad
        self.A = nn.Parameter(torch.empty(d_out, rank))  # up ("left", Output x Route)
        self.B = nn.Parameter(torch.empty(rank, d_in))  # down ("right", Route x Input)
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as Linear(r -> d_out): U(+-1/sqrt r), non-zero (C3)
        nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))  # as Linear(d_in -> r): U(+-1/sqrt d_in), non-zero
        self.R_delta = nn.Parameter(torch.zeros(rank, rank))  # fresh route, trainable, 0 at init [WEAK]
        self.register_buffer("R_old", torch.zeros(rank, rank))  # accumulated routing, frozen, 0 in task 0
        # the penalty's old basis; derived from R_old in begin_task, so it is not saved
        self.register_buffer("Q_old", torch.zeros(rank, rank), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fresh = F.linear(F.linear(F.linear(x, self.B), self.R_delta), self.A)  # x B^T R_delta^T A^T
        if self.stopgrad:  # Eqs. 11-12: the old route adds its value, but no gradient to A and B
            old = F.linear(F.linear(F.linear(x, self.B.detach()), self.R_old), self.A.detach())
        else:  # naive freeze: R_old is a buffer, A and B get the full gradient through it
            old = F.linear(F.linear(F.linear(x, self.B), self.R_old), self.A)
        return self.scale * (old + fresh)  # = x dW^T with dW = s A (R_old + R_delta) B

    def delta_weight(self) -> torch.Tensor:
        """s A (R_old + R_delta) B, (d_out, d_in): the weight this adapter adds to W0."""
        return self.scale * self.A @ (self.R_old + self.R_delta) @ self.B

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
        """Task boundary: R_old <- R_old + R_delta, R_delta <- 0. dW, hence the function, is unchanged."""
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
    """logits = tau cos(f, w_c) for the classes of one task (KeepLoRA+ head, spec §7)."""

    def __init__(self, d: int, n: int, tau: float):
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.randn(n, d) / math.sqrt(d))  # overwritten by class means in begin_task

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.tau * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).T


# ----------------------------------------------------------------------------------------------------
# Method


class CLoRA(nn.Module):
    def __init__(self, vit: ViT, num_classes: int, cfg: Config):
        super().__init__()
        d = vit.embed_dim
        if not 1 <= cfg.rank <= d:
            raise ValueError(f"rank must be between 1 and the width {d}, got {cfg.rank}")
        if not cfg.targets or not set(cfg.targets) <= set("qkvo") or len(set(cfg.targets)) != len(cfg.targets):
            raise ValueError(f"targets must be distinct letters among q, k, v, o, got '{cfg.targets}'")
        for name, allowed in CHOICES.items():
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got '{getattr(cfg, name)}'")
        if not (cfg.lr > 0 and cfg.scale > 0 and cfg.head_scale > 0):
            raise ValueError("lr, scale and head_scale must be positive")
        if cfg.lambda_orth < 0 or cfg.r_delta_init_std < 0 or cfg.weight_decay < 0:
            raise ValueError("lambda_orth, r_delta_init_std and weight_decay must be >= 0")
        if not 0 < cfg.orth_energy <= 1:
            raise ValueError(f"orth_energy must be in (0, 1], got {cfg.orth_energy}")
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if cfg.classifier_alignment and (cfg.ca_epochs < 1 or cfg.ca_samples < 1 or cfg.ca_lr <= 0
                                         or min(cfg.ca_shrink, cfg.ca_logit_norm, cfg.ca_weight_decay) < 0):
            raise ValueError("classifier alignment needs ca_epochs, ca_samples >= 1, ca_lr > 0 and "
                             "ca_shrink, ca_logit_norm, ca_weight_decay >= 0")
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        for p in vit.parameters():
            p.requires_grad_(False)
        r, s, sg = cfg.rank, cfg.scale, cfg.old_route_stopgrad
        if set(cfg.targets) & set("qkv"):
            attach(vit, "qkv_adapter", lambda i, attn: QKVAdapter(d, r, s, cfg.targets, sg))
        if "o" in cfg.targets:
            attach(vit, "out_adapter", lambda i, attn: LoRASite(d, d, r, s, sg))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        if cfg.classifier_alignment:  # class statistics, frozen at their task (fixed shapes for resume)
            self.register_buffer("ca_mean", torch.zeros(num_classes, d, dtype=torch.float64))
            self.register_buffer("ca_cov", torch.zeros(num_classes, d, d))

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
        if self.cfg.head == "cosine_proto":  # prototype init with the current backbone (spec §6)
            self.heads[t].weight.copy_(F.normalize(class_means(self.vit, data.plain, classes), dim=1))

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]  # A, B, R_delta of every site + head t
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = max(1, self.cfg.epochs * steps_per_epoch)
        factor = {"onecycle": one_cycle(total), "cosine": cosine(total), "constant": lambda step: 1.0}
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor[self.cfg.schedule])

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        K_t = self.offsets[-2]
        ce = F.cross_entropy(self.head_logits(self.heads[-1], self.vit(x)), y - K_t)  # task-local CE
        if self.cfg.lambda_orth == 0:
            return ce
        return ce + self.cfg.lambda_orth * self.orth_penalty()  # L = L_CE + lambda sum L_orth

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        for site in self.sites():
            site.consolidate()  # R_old <- R_old + R_delta; R_delta <- 0
        self.heads[t].requires_grad_(False)
        if self.cfg.classifier_alignment:
            mean, cov = class_statistics(self.vit, data.plain, classes)
            self.ca_mean[classes] = mean
            self.ca_cov[classes] = cov.float()
            if t >= 1:
                with torch.enable_grad():
                    self.align_heads(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.vit(x)
        return torch.cat([self.head_logits(h, f) for h in self.heads], dim=1)

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

    @staticmethod
    def head_logits(head: nn.Module, f: torch.Tensor) -> torch.Tensor:
        with torch.autocast(f.device.type, enabled=False):  # the head in float32
            return head(f.float())

    def align_heads(self, t: int) -> None:
        """SLCA-style classifier alignment (protocol.md §8) on Gaussian replay: only the heads h_0..h_t change."""
        cfg, C, d, n = self.cfg, self.offsets[-1], self.vit.embed_dim, self.cfg.ca_samples
        device = self.ca_mean.device
        sizes = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        task_of = torch.arange(t + 1).repeat_interleave(torch.tensor(sizes))
        gamma = 0.9 + 0.1 * (task_of + 1).double() / (t + 1)  # mean decay; the newest task gets 1
        means = (gamma.to(device)[:, None] * self.ca_mean[:C]).float()
        eye = torch.eye(d, dtype=torch.float64, device=device)
        tril = torch.linalg.cholesky(self.ca_cov[:C].double() + cfg.ca_shrink * eye).float()  # Sigma_c + delta I
        params = list(self.heads.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ca_epochs)
        with torch.autocast(device.type, enabled=False):
            for _ in range(cfg.ca_epochs):
                feats = (means[:, None, :] + torch.randn(C, n, d, device=device) @ tril.transpose(1, 2)).reshape(-1, d)
                labels = torch.arange(C, device=device).repeat_interleave(n)
                perm = torch.randperm(C * n).to(device)
                feats, labels = feats[perm], labels[perm]
                for i in range(C):  # |C_<=t| batches of n samples per epoch
                    z = torch.cat([h(feats[i * n:(i + 1) * n]) for h in self.heads], dim=1)
                    if cfg.ca_logit_norm > 0:
                        z = task_normalised(z, sizes, cfg.ca_logit_norm)
                    loss = F.cross_entropy(z, labels[i * n:(i + 1) * n])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
        for p in params:
            p.requires_grad_(False)
            p.grad = None

    @torch.no_grad()
    def merged_vit(self) -> ViT:
        """A copy of the backbone with W0 + s A (R_old + R_delta) B written into its weights and no adapters.

        For deployment: the same function as the adapted backbone in one plain pass. A and B keep training,
        so the method itself never merges.
        """
        vit = copy.deepcopy(self.vit)
        d = vit.embed_dim
        for blk in vit.blocks:
            attn = blk.attn
            if attn.qkv_adapter is not None:
                for m, site in attn.qkv_adapter.sites.items():
                    attn.qkv.weight[qkv_rows(m, d)] += site.delta_weight()
            if attn.out_adapter is not None:
                attn.proj.weight += attn.out_adapter.delta_weight()
            attn.qkv_adapter = attn.out_adapter = None
        return vit


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
    """Mean feature of every class in `classes` (rows in that order) over one pass of `loader`."""
    lo = classes[0]
    sums, counts = None, torch.zeros(len(classes), dtype=torch.float64)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    for x, y in loader:
        f = encoder(x.to(device)).double().cpu()
        if sums is None:
            sums = torch.zeros(len(classes), f.shape[1], dtype=torch.float64)
        sums.index_add_(0, y - lo, f)
        counts.index_add_(0, y - lo, torch.ones(len(y), dtype=torch.float64))
    encoder.train(was_training)
    assert (counts > 0).all(), "a class of the task has no training image"
    return (sums / counts[:, None]).float()


@torch.no_grad()
def class_statistics(encoder: nn.Module, loader, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of f(x) for every class of `classes`, in order."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, ys = [], []
    with torch.autocast(device.type, enabled=False):
        for x, y in loader:
            feats.append(encoder(x.to(device)).double())
            ys.append(y.to(device))
    encoder.train(was_training)
    feats, ys = torch.cat(feats), torch.cat(ys)
    means, covs = [], []
    for c in classes:
        f = feats[ys == c]
        assert len(f) > 0, f"class {c} has no training image"
        mu = f.mean(0)
        means.append(mu)
        covs.append((f - mu).T @ (f - mu) / max(len(f) - 1, 1))
    return torch.stack(means), torch.stack(covs)


def task_normalised(z: torch.Tensor, sizes: list[int], tau: float) -> torch.Tensor:
    """z / (tau * mean_s ||z_{C_s}||_2): the per-task logit normalisation of SLCA / InfLoRA-CA."""
    norms = torch.stack([b.norm(dim=1) + 1e-7 for b in z.split(sizes, dim=1)], dim=1).mean(1, keepdim=True)
    return z / norms / tau
