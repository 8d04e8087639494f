"""CL-LoRA: a task-shared LoRA in the first half of the ViT, task-specific LoRAs in the second half.

Paper: He, Duan, Zhu, "CL-LoRA: Continual Low-Rank Adaptation for Rehearsal-Free Class-Incremental
Learning", CVPR 2025, arXiv 2505.24816.
Official code: JiangpengHe/CL-LoRA @ df4e74e (a LAMDA-PILOT / EASE fork). Spec: ../shared/specs/cl_lora.md.
The official source is not in this project's search index; the gaps of the spec (epsilon of L_orth,
the reassignment formula) were checked against RL-VIG/LibContinual @ 498c43a `core/model/cl_lora.py`,
a port of the official code. Deviations from the paper and the official code are listed below the equations.

Implements (Dn = down r x d, Up = up d x r; l = split = depth // 2: 6 of 12 for ViT-B, 3 of 6 for vit_small32;
t is 0-indexed, K_t classes before task t; spec §3-§10):
    shared, block < l:   q += Up_s Dn_s u,  v likewise              Dn_s frozen orthonormal, Up_s = 0 at start,
                                                                    Up_s trained in every task
    specific, block >= l, branch i:  q += U_i[q, b] Up_i Dn_i u,  v with row v      (b = block - l)
    orthonormal Dn: QR of U[0,1)^(d x r), Dn = Q^T (code) or Dn = U V_r^T from the SVD of N(0,1)^(r x d) (Eq. 7)
    h(z) = sigma cos(z, w_c): a fresh local cosine classifier per task, w_c ~ U(+-1/sqrt d), sigma = 1
    L_ce   = CE(h^t(f_t(x)), y - K_t),   f_i(x) = norm(blocks l..L-1 of branch i on s(x))[CLS],
             s(x) = blocks 0..l-1 with the shared adapters
    L_kd   = lambda1 (-1/B) sum_b sum_c p^T_c log p^S_c,  p = softmax(h^t(e(x)) / tau),
             e(x) = norm(s(x))[CLS] (early exit), teacher e_T with the shared Up of the end of task t-1
    w_j    = d n_j / sum_j' n_j',  n_j = ||P[j, :]||, P = teacher Up; KD gradient of Up_s <- diag(w) grad (Eq. 10)
    L_orth = (1/t) sum_{i<t} |<vec U_t / ||U_t||, vec U_i / ||U_i||>|   (code's normalised form of Eq. 12)
    L      = L_ce + L_kd (reassigned) + lambda2 L_orth                   (Eq. 13; t = 0: L_ce only)
    p_c    = mean of f_t(x) over the training images of class c (test transforms), computed once after task t
    logit_c(x) = cos(f_i(x), p_c) for c in task i: the shared trunk runs once, then one branch per task

The distillation-gradient reassignment in one backward. The official code takes TWO optimiser steps per
batch: backward of L_kd, reassign the shared Up gradient, step; then backward of L_ce + lambda2 L_orth
through the graph of before the first step, step again (it fails on torch >= 2.1, CL-LoRA #1/#4; spec §6,
C1). train.py owns one backward and one step, so this file implements the spec's option (b) `kd_update =
joint`: one step on grad L_ce + diag(w) grad L_kd + lambda2 grad L_orth, computed in one backward. The KD
student runs its own pass of the shared blocks in which every shared Up enters through `ReassignGrad`
(identity forward, rows of the incoming gradient scaled by w backward); the CE path runs the shared blocks
with the plain Up. Both passes use the same weights, so only the KD part of the gradient that reaches the
shared Up is reassigned, while the classifier's KD gradient and every CE gradient are untouched. The
official code also forwards the shared blocks separately for KD, so the compute is the same.

Defaults: rank 10, split at half the depth, q and v (paper, Table 3 and Fig. 3); orth_init qr_uniform,
lambda1 = 5, tau = 2, lambda2 = 1e-4, teacher logits not detached (official code); SGD momentum 0.9,
lr 0.03, weight decay 1e-4, batch 64, 30 epochs, cosine to 0 per epoch (official `exps/cifar.json`).
The reassignment weights are normalised with the backbone's width d (768 for ViT-B, 192 for vit_small32).

Deviations:
- One optimiser step per batch (spec §6 option b, `joint`) instead of the official two (option a is the spec's
  parity default); see above. Weight decay and momentum act once per batch, and CE and KD gradients are taken
  at the same weights.
- Rank 10 (the paper's value) although the official CIFAR config uses 8 (`--rank 8` for parity).
- The block weights U_t (3 x (L - l), rows q, k, v) are stored as one 3-vector per specific block
  (`mu`); the values, the init U(0.5, 1.5) and L_orth over all 3 (L - l) entries are the code's.
- If every row of the teacher Up is zero, the reassignment weights are 1 (the official formula divides by 0).
- From the official code, as the spec recommends: only the last teacher is kept (C9); only the prototypes of
  each task's own branch are stored; the off-diagonal prototype blocks and EASE leftovers are skipped (C8);
  the local classifier of a finished task is dropped (it is never used for inference).

Run: python train.py --method cl_lora --tasks 10
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import ViT, attach

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    rank: int = 10
    """LoRA rank r of the shared and the task-specific adapters (paper: 10; official CIFAR config: 8)"""
    split: int = 0
    """number l of blocks with the task-shared adapter; 0 = half the depth (6 for ViT-B, 3 for vit_small32)"""
    orth_init: str = "qr_uniform"
    """orthonormal down-projections: 'qr_uniform' (official code) or 'svd_gaussian' (paper Eq. 7)"""
    lambda_kd: float = 5.0
    """weight lambda1 of the early-exit distillation loss (official code)"""
    temperature: float = 2.0
    """distillation temperature tau, no tau^2 factor (official code)"""
    lambda_orth: float = 1e-4
    """weight lambda2 of the block-weight orthogonality loss (official code)"""
    detach_teacher: bool = False
    """detach the teacher logits in L_kd (official code: no, the local classifier learns from both paths)"""
    lr: float = 0.03
    """SGD learning rate (official cifar.json)"""
    momentum: float = 0.9
    """SGD momentum (official code)"""
    weight_decay: float = 1e-4
    """SGD weight decay (official cifar.json)"""
    epochs: int = 30
    """epochs per task (official cifar.json)"""
    batch_size: int = 64
    """training batch size (official cifar.json)"""


CHOICES = {"orth_init": ("qr_uniform", "svd_gaussian")}
TARGETS = "qv"  # adapted slices of the fused qkv (official `msa` = [1, 0, 1])
ROW = {"q": 0, "k": 1, "v": 2}  # rows of the block weights U

# ----------------------------------------------------------------------------------------------------
# LoRA


class LoRA(nn.Module):
    """Up_m Dn_m u for m in q, v: Dn (r x d) with orthonormal rows, Up (d x r) zero."""

    def __init__(self, d: int, rank: int, orth_init: str):
        super().__init__()
        self.Dn = nn.ParameterDict({m: nn.Parameter(orthonormal_rows(rank, d, orth_init)) for m in TARGETS})
        self.Up = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank)) for m in TARGETS})


class SharedLoRA(nn.Module):
    """The task-shared adapter of one block < l, plus the teacher's Up (the shared Up of the previous task).

    `source` picks the Up of the forward: 'student' (Up), 'kd' (Up whose gradient is reassigned, Eq. 10)
    or 'teacher'. The method sets it around each pass of the shared blocks.
    """

    def __init__(self, d: int, rank: int, orth_init: str):
        super().__init__()
        self.lora = LoRA(d, rank, orth_init)
        self.lora.Dn.requires_grad_(False)  # frozen forever
        for m in TARGETS:
            self.register_buffer(f"teacher_{m}", torch.zeros(d, rank))
        self.source = "student"

    def teacher(self, m: str) -> torch.Tensor:
        return getattr(self, f"teacher_{m}")

    def forward(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for m in TARGETS:
            up = self.lora.Up[m]
            if self.source == "kd":
                up = ReassignGrad.apply(up, reassign_weights(self.teacher(m)))  # Eq. 10, KD pass only
            elif self.source == "teacher":
                up = self.teacher(m)
            out[m] = F.linear(F.linear(u, self.lora.Dn[m]), up)  # shared: q += Up_s Dn_s u
        return out


class SpecificLoRA(nn.Module):
    """The task-specific adapters of one block >= l: one LoRA and one block-weight 3-vector (q, k, v) per task.

    `active` is the branch of the forward (-1: none).
    """

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList()
        self.mu = nn.ParameterList()  # mu[i] = U_i[:, b], this block's column of task i's block weights
        self.active = -1

    def forward(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        i = self.active
        if i < 0:
            return {}
        lora = self.branches[i]
        return {m: self.mu[i][ROW[m]] * F.linear(F.linear(u, lora.Dn[m]), lora.Up[m])  # q += U_i[q,b] Up_i Dn_i u
                for m in TARGETS}


class CosineHead(nn.Module):
    """The local classifier h(z) = sigma cos(z, w_c) of one task (PILOT CosineLinear)."""

    def __init__(self, d: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d).uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d)))
        self.sigma = nn.Parameter(torch.ones(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(z, dim=1), F.normalize(self.weight, dim=1))


class ReassignGrad(torch.autograd.Function):
    """Identity on Up (d x r); the backward multiplies row j of the incoming gradient by w_j (Eq. 10)."""

    @staticmethod
    def forward(ctx, up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return up.view_as(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return grad * w[:, None].to(grad.dtype), None


# ----------------------------------------------------------------------------------------------------
# Method


class CLLoRA(nn.Module):
    def __init__(self, vit: ViT, num_classes: int, cfg: Config):
        super().__init__()
        d, depth = vit.embed_dim, len(vit.blocks)
        l = cfg.split or depth // 2
        if not 1 <= cfg.rank <= d:
            raise ValueError(f"--rank must be in [1, {d}] (the width) (got {cfg.rank})")
        if not 1 <= l < depth:
            raise ValueError(f"--split must be in [1, {depth - 1}] for a depth-{depth} backbone, or 0 "
                             f"(got {cfg.split})")
        if cfg.orth_init not in CHOICES["orth_init"]:
            raise ValueError(f"--orth-init must be one of {CHOICES['orth_init']} (got {cfg.orth_init!r})")
        if not cfg.lr > 0 or cfg.weight_decay < 0 or not 0 <= cfg.momentum < 1:
            raise ValueError(f"need --lr > 0, --weight-decay >= 0, 0 <= --momentum < 1 (got {cfg.lr}, "
                             f"{cfg.weight_decay}, {cfg.momentum})")
        if not cfg.temperature > 0 or cfg.lambda_kd < 0 or cfg.lambda_orth < 0:
            raise ValueError(f"need --temperature > 0, --lambda-kd >= 0, --lambda-orth >= 0 (got "
                             f"{cfg.temperature}, {cfg.lambda_kd}, {cfg.lambda_orth})")
        if cfg.epochs < 0 or cfg.batch_size < 1:
            raise ValueError(f"need --epochs >= 0 and --batch-size >= 1 (got {cfg.epochs}, {cfg.batch_size})")
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        self.l = l
        for p in vit.parameters():
            p.requires_grad_(False)
        attach(vit, "qkv_adapter", lambda i, attn: SharedLoRA(d, cfg.rank, cfg.orth_init) if i < l else SpecificLoRA())
        self.head: CosineHead | None = None  # the local classifier of the current task
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # The adapters live in the backbone's slots only (listed here, not registered twice in the state dict).
    @property
    def shared(self) -> list[SharedLoRA]:
        return [blk.attn.qkv_adapter for blk in self.vit.blocks[: self.l]]

    @property
    def specific(self) -> list[SpecificLoRA]:
        return [blk.attn.qkv_adapter for blk in self.vit.blocks[self.l:]]

    @property
    def task(self) -> int:
        return len(self.offsets) - 2

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == self.task + 1 and classes[0] == self.offsets[-1], "tasks must grow in order"
        d, device = self.vit.embed_dim, self.vit.cls_token.device
        U = torch.empty(3, len(self.specific)).uniform_(0.5, 1.5)  # block weights U_t, rows q, k, v
        for b, a in enumerate(self.specific):
            a.branches.append(LoRA(d, self.cfg.rank, self.cfg.orth_init).to(device))  # orthonormal Dn_t, Up_t = 0
            a.mu.append(nn.Parameter(U[:, b].clone().to(device)))
        self.head = CosineHead(d, len(classes)).to(device)
        self.register_buffer(f"protos_{t}", torch.zeros(len(classes), d, device=device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for a in self.shared:
            a.lora.Up.requires_grad_(True)  # the only parameters carried across tasks
        for a in self.specific:
            for i, (lora, mu) in enumerate(zip(a.branches, a.mu)):
                lora.requires_grad_(i == t)
                mu.requires_grad_(i == t)
            a.active = t

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, epoch_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return sum(self.loss_terms(x, y).values())

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        getattr(self, f"protos_{t}").copy_(self.class_means(data.plain, t, classes))
        for a in self.specific:
            a.branches[t].requires_grad_(False)
            a.mu[t].requires_grad_(False)
        self.head.requires_grad_(False)
        for a in self.shared:
            for m in TARGETS:
                a.teacher(m).copy_(a.lora.Up[m])  # teacher T_t := the shared adapters at the end of task t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.trunk(x)  # the shared blocks, once
        return torch.cat([self.proto_logits(self.branch(s, i), i) for i in range(self.task + 1)], dim=1)

    # -- helpers ---------------------------------------------------------------------------------
    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, reassign: bool = True) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one batch; `reassign=False` leaves the KD gradient as it is (tests)."""
        t, cfg = self.task, self.cfg
        f = self.branch(self.trunk(x), t)
        terms = {"ce": F.cross_entropy(self.head(f), y - self.offsets[t])}  # L_ce, local labels
        if t == 0:
            return terms
        with torch.no_grad():
            e_teacher = self.early_exit(self.trunk(x, "teacher"))
        z_teacher = self.head(e_teacher)  # not detached by default: h^t also learns from the teacher path
        if cfg.detach_teacher:
            z_teacher = z_teacher.detach()
        z_student = self.head(self.early_exit(self.trunk(x, "kd" if reassign else "student")))
        tau = cfg.temperature
        terms["kd"] = cfg.lambda_kd * soft_cross_entropy(z_student / tau, z_teacher / tau)  # L_kd, no tau^2
        old = [self.block_weights(i) for i in range(t)]
        terms["orth"] = cfg.lambda_orth * orth_loss(self.block_weights(t), old)  # Eq. 12
        return terms  # summed: Eq. 13

    def trunk(self, x: torch.Tensor, source: str = "student") -> torch.Tensor:
        """s(x): all tokens after the shared blocks 0..l-1, with the student's, the KD or the teacher's Up."""
        for a in self.shared:
            a.source = source
        h = self.vit.embed(x)
        for blk in self.vit.blocks[: self.l]:
            h = blk(h)
        for a in self.shared:
            a.source = "student"
        return h

    def early_exit(self, s: torch.Tensor) -> torch.Tensor:
        """e(x): the final norm on the CLS token of the shared trunk (spec C3)."""
        return self.vit.norm(s)[:, 0]

    def branch(self, s: torch.Tensor, i: int) -> torch.Tensor:
        """f_i(x): blocks l..L-1 with task i's specific adapters on the trunk output s, final norm, CLS."""
        for a in self.specific:
            a.active = i
        h = s
        for blk in self.vit.blocks[self.l:]:
            h = blk(h)
        for a in self.specific:
            a.active = self.task
        return self.vit.norm(h)[:, 0]

    def proto_logits(self, f: torch.Tensor, i: int) -> torch.Tensor:
        """cos(f_i(x), p_c) for the classes c of task i (sigma = 1), in float32 even under autocast."""
        with torch.autocast(f.device.type, enabled=False):
            return F.normalize(f.float(), dim=1) @ F.normalize(getattr(self, f"protos_{i}"), dim=1).T

    def block_weights(self, i: int) -> torch.Tensor:
        """U_i, 3 x (L - l): rows q, k, v; column b = specific block l + b."""
        return torch.stack([a.mu[i] for a in self.specific], dim=1)

    @torch.no_grad()
    def class_means(self, loader, t: int, classes: list[int]) -> torch.Tensor:
        """Mean branch-t feature of every class of task t (rows in class order), one pass of `loader`."""
        was_training = self.training
        self.eval()
        lo, d = classes[0], self.vit.embed_dim
        sums = torch.zeros(len(classes), d, dtype=torch.float64)
        counts = torch.zeros(len(classes), dtype=torch.float64)
        for x, y in loader:
            f = self.branch(self.trunk(x.to(self.vit.cls_token.device)), t).double().cpu()
            sums.index_add_(0, y - lo, f)
            counts.index_add_(0, y - lo, torch.ones(len(y), dtype=torch.float64))
        self.train(was_training)
        assert (counts > 0).all(), "a class of the task has no training image"
        return (sums / counts[:, None]).float()


Method = CLLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def orthonormal_rows(r: int, d: int, mode: str) -> torch.Tensor:
    """A random r x d matrix with orthonormal rows, drawn from the global RNG (spec §3)."""
    if mode == "qr_uniform":
        return qr_rows(torch.rand(d, r, dtype=torch.float64)).float()
    return polar_rows(torch.randn(r, d, dtype=torch.float64)).float()


def qr_rows(M: torch.Tensor) -> torch.Tensor:
    """Official init: reduced QR of M (d x r), Dn = Q^T."""
    return torch.linalg.qr(M, mode="reduced")[0].T.contiguous()


def polar_rows(M: torch.Tensor) -> torch.Tensor:
    """Paper init: M (r x d) = U S V^T, Dn = U V_r^T, the nearest matrix with orthonormal rows (Eq. 7)."""
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    return U @ Vh


def reassign_weights(P: torch.Tensor) -> torch.Tensor:
    """w_j = d n_j / sum_j' n_j' with n_j the L2 norm of row j of the teacher Up P (d x r): mean 1 (Eq. 10)."""
    n = P.norm(dim=1)
    total = n.sum()
    return torch.where(total > 0, P.shape[0] * n / total.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b sum_c softmax(teacher)_c log softmax(student)_c (inputs already divided by tau)."""
    return -(F.softmax(teacher, dim=1) * F.log_softmax(student, dim=1)).sum(dim=1).mean()


def orth_loss(U_t: torch.Tensor, olds: list[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """(1/t) sum_i |<vec U_t / (||U_t|| + eps), vec U_i / (||U_i|| + eps)>| over the earlier tasks i (Eq. 12)."""
    if not olds:
        return U_t.new_zeros(())
    u = U_t.flatten() / (U_t.norm() + eps)
    return sum((u * (U_i.flatten() / (U_i.norm() + eps))).sum().abs() for U_i in olds) / len(olds)


def epoch_cosine(epochs: int, steps_per_epoch: int):
    """CosineAnnealingLR(T_max = epochs, eta_min = 0) stepped per epoch, as a per-step multiplier."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 0.5 * (1 + math.cos(math.pi * min(e, epochs) / max(epochs, 1)))
    return factor
