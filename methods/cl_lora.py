"""CL-LoRA: a task-shared LoRA in the first half of the ViT, task-specific LoRAs in the second half.

Paper: He, Duan, Zhu, "CL-LoRA: Continual Low-Rank Adaptation for Rehearsal-Free Class-Incremental
Learning", CVPR 2025, arXiv 2505.24816.
Official code: JiangpengHe/CL-LoRA @ df4e74e (a LAMDA-PILOT / EASE fork). "cllora.py L<n>" below is
`models/cllora.py` line n at that commit, "vit L<n>" `backbone/vit_cllora.py`, "inc_net L<n>" `utils/inc_net.py`,
"linears L<n>" `backbone/linears.py`, "cifar.json L<n>" `exps/cifar.json`.
Where this file departs from the paper or the official code: "Deviations" below.

Implements (A = down r x d, B = up d x r, delta W = B A; the official `lora_B` is our A and its `lora_A` our B,
vit L38-39; l = split = depth // 2: 6 of 12 for ViT-B, 3 of 6 for vit_small32; t is 0-indexed, K_t classes
before task t):
    shared, block < l:   q += B_s A_s u,  v likewise;  A_s frozen orthonormal, B_s = 0 at start, trained in every
                         task (vit L710-718, L346-351)
    specific, block >= l, branch i:  q += U_i[q, b] B_i A_i u,  v with row v (b = block - l; vit L103-111)
    orthonormal A: QR of U[0,1)^(d x r), A = Q^T (vit L41-45) or A = U V_r^T from the SVD of N(0,1)^(r x d) (Eq. 7)
    h(z) = sigma cos(z, w_c): a fresh local cosine classifier per task, w_c ~ U(+-1/sqrt d), sigma = 1, learned
           (inc_net L1107-1109, linears L265-298)
    L_ce   = CE(h^t(f_t(x)), y - K_t),   f_i(x) = norm(blocks l..L-1 of branch i on s(x))[CLS],
             s(x) = blocks 0..l-1 with the shared adapters (cllora.py L344-355, vit L377-418)
    L_kd   = lambda1 (-1/B) sum_b sum_c p^T_c log p^S_c,  p = softmax(h^t(e(x)) / tau)  (cllora.py L17-20, L357-364),
             e(x) = norm(s(x))[CLS] (early exit, vit L574-602), teacher e_T with the shared B of the end of task t-1,
             the same h^t for both (inc_net L1151-1154)
    w_j    = d n_j / sum_j' n_j',  n_j = ||P[j, :]||, P = teacher B; KD gradient of B_s <- diag(w) grad; d the
             backbone's width (768 for ViT-B, 192 for vit_small32) (Eq. 10; cllora.py L370-376)
    L_orth = (1/t) sum_{i<t} |<vec U_t / (||U_t|| + eps), vec U_i / (||U_i|| + eps)>|, eps = 1e-8
             (the code's normalised form of Eq. 12; cllora.py L23-42, L378-380)
    update (t >= 1): step 1 on the reassigned grad of L_kd, step 2 on grad (L_ce + lambda2 L_orth) (cllora.py
             L351-385; `kd_update` below), or one step on the sum (`joint`, Eq. 13). t = 0: L_ce only
    p_c    = mean of f_t(x) over the training images of class c (test transforms), computed once after task t
             (cllora.py L94-134, L248, L258)
    logit_c(x) = cos(f_i(x), p_c) for c in task i (linears L301-325; the inference sigma stays 1)

Where the equations live: the adapters `SharedLoRA.forward`, `SpecificLoRA.forward`; s(x) `trunk`; f_i(x)
`stacked_branches` (training: branch t; evaluation: all); A (Eq. 7) `orthonormal_rows`; h `CosineHead`; L_ce
`ce_loss`; e(x), L_kd `early_exit`, `kd_loss`; w, reassignment (Eq. 10) `reassign_weights`, `ReassignGrad`;
L_orth (Eq. 12) `orth_loss`, `orth_term`; the update (Eq. 13, two steps) `loss`, `two_steps`; p_c `end_task`;
the logits `forward`, `proto_logits`. The adapters' modes (shared: student, KD or teacher B; specific: which
branches) are set by `swapped` around each pass, and put back after it, also on an exception.

The KD student runs its own pass of the shared blocks with every shared B behind `ReassignGrad` (identity forward,
rows of the gradient scaled by w backward): only the KD gradient reaching the shared B is reassigned (the official
code also forwards the shared blocks separately for KD, vit L574-602).

Defaults: rank 10, split at half the depth, q and v (paper, Table 3 and Fig. 3; cifar.json L40-42);
orth_init qr_uniform, lambda1 = 5, tau = 2, lambda2 = 1e-4, teacher logits not detached (cllora.py L358-364,
L380); SGD momentum 0.9 (cllora.py L282-287), lr 0.03, weight decay 1e-4, batch 64, 30 epochs, cosine to 0
stepped per epoch (cifar.json L15-23; cllora.py L305, L392-393), two optimiser steps per batch.

The two steps: `loss` yields L_kd, the caller steps, then it yields L_ce + lambda2 L_orth (L_orth after step 1,
cllora.py L378-380); gradients are None before each step (torch 2.0's zero_grad), so step 1 moves only the shared
B and h^t. The official code builds L_ce before step 1 (cllora.py L351-355) and back-propagates it after the step
(L383-384). Under torch 2.0.1, the official README's pin, that backward reads the activations saved before the
step and the stepped values of the parameters the graph saved (shared B, h^t's w and sigma): the update of the
paper's numbers, `two_step_stale`; torch >= 2.1 rejects it ("modified by an inplace operation", CL-LoRA #1, #4).
- `two_step` (default): L_ce from a fresh forward after step 1. It stays the default: its gradient is L_ce's at
  the weights it moves, the stale mix is a side effect of the torch version that neither the paper (Eq. 13 is
  one objective) nor the code describes, and this project's results use it.
- `two_step_stale`: L_ce built before step 1 with each trainable parameter behind an `Alias` (its storage, its
  own version counter), so the backward after step 1 reads the stepped values wherever the graph saved a
  parameter, under any torch. It keeps the L_ce graph through step 1, as the official code does.

Deviations:
- The default update, `two_step`, is not the one the paper's numbers come from (`two_step_stale`, above).
- The block weights U_t (3 x (L - l), rows q, k, v) are stored as one 3-vector per specific block (`mu`);
  the values, the init U(0.5, 1.5) and L_orth over all 3 (L - l) entries are the code's (vit L208-211).
- If every row of the teacher B is zero, the reassignment weights are 1 (the official formula divides by 0).
- Only the last teacher is kept (the code keeps one per task, vit L372-373) and the prototypes of each task's own
  branch; the off-diagonal prototype blocks (cllora.py L105-133) and the EASE leftovers (`replace_fc_proxy`,
  `solve_similarity`, `solve_sim_reset`, cllora.py L88-92, L136-232) are skipped: the forward never reads them
  (linears L301-325). The local classifier of a finished task is dropped.
- Evaluation runs the shared blocks once, then blocks l..L-1 on the trunk output repeated along the batch, slice
  i through branch i (batched matmuls); the official evaluation runs all L blocks once per task (cllora.py L414,
  L433; inc_net L1162-1163; vit L420-501): the same logits up to rounding. `--eval-images` caps the rows of a
  pass. No `merged()`: t + 1 branches do not fold into one backbone, so train.py evaluates `forward`.

Run: python train.py --method cl_lora --tasks 10
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import attach, check_options, embed, features

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    rank: int = 10
    """LoRA rank r of the shared and the task-specific adapters (paper Table 3: 10; cifar.json: 8, in OFFICIAL)"""
    split: int = 0
    """number l of blocks with the task-shared adapter; 0 = half the depth (6 for ViT-B, 3 for vit_small32)"""
    orth_init: str = "qr_uniform"
    """orthonormal down-projections: 'qr_uniform' (official code) or 'svd_gaussian' (paper Eq. 7)"""
    kd_update: str = "two_step"
    """'two_step': a step on the KD loss, then one on CE + L_orth from a fresh forward; 'two_step_stale': the CE
    graph built before the first step, as the official code ran under torch 2.0.1; 'joint': one step on the sum"""
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
    eval_images: int = 1024
    """images per evaluation pass of the task branches: max(1, this // batch) branches run batched; 0 = all"""


# official settings (`--preset paper --dataset NAME`), exps/{cifar,inr,ina}.json: tasks L8-9, seed L13, rank (ffn_num)
# L27, epochs L15/17, lr L16/18, batch L19, wd L20; inr L11: IN-1K fine-tuned (vit_cllora.py L610). No CUB, DomainNet.
OFFICIAL = {"cifar100": dict(tasks=20, order_seed=1993, rank=8),
            "imagenet_r": dict(tasks=40, order_seed=1993, epochs=20, lr=0.05, batch_size=32, weight_decay=5e-4,
                               weights="vit_base_patch16_224.augreg_in21k_ft_in1k"),
            "imagenet_a": dict(tasks=10, order_seed=1993, epochs=25, lr=0.05, batch_size=32, weight_decay=5e-3)}

CHOICES = {"orth_init": ("qr_uniform", "svd_gaussian"), "kd_update": ("two_step", "two_step_stale", "joint")}
TARGETS = "qv"  # adapted slices of the fused qkv (official `msa` = [1, 0, 1], cifar.json L40)
ROW = {"q": 0, "k": 1, "v": 2}  # rows of the block weights U


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run (with `vit`: also the bounds its shape sets)."""
    d, depth = (vit.embed_dim, len(vit.blocks)) if vit is not None else (0, 0)
    check_options(cfg, CHOICES, [
        ("rank", cfg.rank >= 1, ">= 1"), ("rank", vit is None or cfg.rank <= d, f"<= {d}, the width"),
        ("split", cfg.split >= 0, ">= 0"), ("split", vit is None or 1 <= (cfg.split or depth // 2) < depth,
                                            f"in [1, {depth - 1}] for a depth-{depth} backbone, or 0"),
        ("lambda_kd", cfg.lambda_kd >= 0, ">= 0"), ("temperature", cfg.temperature > 0, "> 0"),
        ("lambda_orth", cfg.lambda_orth >= 0, ">= 0"), ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"),
        ("momentum", 0 <= cfg.momentum < 1, "in [0, 1)"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("epochs", cfg.epochs >= 0, ">= 0"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("eval_images", cfg.eval_images >= 0, ">= 0")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class LoRA(nn.Module):
    """B_m A_m u for m in q, v: A (r x d) with orthonormal rows, B (d x r) zero (vit L23-63)."""

    def __init__(self, d: int, rank: int, orth_init: str):
        super().__init__()
        self.A = nn.ParameterDict({m: nn.Parameter(orthonormal_rows(rank, d, orth_init)) for m in TARGETS})
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank)) for m in TARGETS})


class SharedLoRA(nn.Module):
    """The task-shared adapter of one block < l, plus the teacher's B (the shared B of the previous task). `source`
    picks the B of the forward: 'student' (B), 'kd' (B, its gradient reassigned: Eq. 10) or 'teacher' (`trunk`)."""

    def __init__(self, d: int, rank: int, orth_init: str):
        super().__init__()
        self.lora = LoRA(d, rank, orth_init)
        self.lora.A.requires_grad_(False)  # frozen forever (vit L710-718, L346-351)
        for m in TARGETS:
            self.register_buffer(f"teacher_{m}", torch.zeros(d, rank))
        self.source = "student"

    def teacher(self, m: str) -> torch.Tensor:
        return getattr(self, f"teacher_{m}")

    def forward(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for m in TARGETS:
            up = self.teacher(m) if self.source == "teacher" else self.lora.B[m]
            if self.source == "kd":
                up = ReassignGrad.apply(up, reassign_weights(self.teacher(m)))  # Eq. 10, KD pass only
            out[m] = F.linear(F.linear(u, self.lora.A[m]), up)  # shared: q += B_s A_s u
        return out


class SpecificLoRA(nn.Module):
    """The task-specific adapters of one block >= l: one LoRA and one block-weight 3-vector (q, k, v) per task.
    `active`: the range of branches of the forward (at rest the current task's), their inputs stacked along the
    batch: u = (n B, N, d), slice k (rows k B .. (k+1) B - 1) through branch active[k] (`stacked_branches`)."""

    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList()
        self.mu = nn.ParameterList()  # mu[i] = U_i[:, b], this block's column of task i's block weights
        self.active = range(0)

    def forward(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        idx, shape = self.active, u.shape
        if not idx:
            return {}
        u = u.reshape(len(idx), -1, shape[-1])  # (n, B N, d): slice k belongs to branch idx[k]
        out = {}
        for m in TARGETS:  # q += U_i[q, b] B_i A_i u on slice i, in batched products over the branches
            A, B = (torch.stack([getattr(self.branches[i], X)[m] for i in idx]) for X in "AB")  # (n, r, d), (n, d, r)
            U = torch.stack([self.mu[i][ROW[m]] for i in idx])[:, None, None]
            out[m] = (U * ((u @ A.mT) @ B.mT)).reshape(shape)
        return out


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


class ReassignGrad(torch.autograd.Function):
    """Identity on B (d x r); the backward multiplies row j of the incoming gradient by w_j (Eq. 10)."""

    @staticmethod
    def forward(ctx, up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return up.view_as(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return grad * w[:, None].to(grad.dtype), None


class Alias(torch.autograd.Function):
    """p's storage under a version counter of its own, the gradient passed to p: a graph that saves it reads the
    values p holds at backward time, and a step on p in between is no error (`two_step_stale`)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        return p.data

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


# ----------------------------------------------------------------------------------------------------
# Method


class CLLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg, vit)
        d, l = vit.embed_dim, cfg.split or len(vit.blocks) // 2
        self.cfg, self.vit, self.l = cfg, vit, l
        for p in vit.parameters():
            p.requires_grad_(False)
        attach(vit, "qkv_adapter", lambda i, attn: SharedLoRA(d, cfg.rank, cfg.orth_init) if i < l else SpecificLoRA())
        self.head: CosineHead | None = None  # the local classifier of the current task
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == self.task + 1 and classes[0] == self.offsets[-1], "tasks must grow in order"
        d, device = self.vit.embed_dim, self.vit.cls_token.device
        U = torch.empty(3, len(self.specific)).uniform_(0.5, 1.5)  # block weights U_t, rows q, k, v (vit L366-367)
        for b, a in enumerate(self.specific):
            a.branches.append(LoRA(d, self.cfg.rank, self.cfg.orth_init).to(device))  # orthonormal A_t, B_t = 0
            a.mu.append(nn.Parameter(U[:, b].clone().to(device)))
        self.head = CosineHead(d, len(classes), nn.Parameter(torch.ones(1))).to(device)  # sigma = 1 (linears L283)
        nn.init.uniform_(self.head.weight, -1 / math.sqrt(d), 1 / math.sqrt(d))  # linears L279-281
        self.register_buffer(f"protos_{t}", torch.zeros(len(classes), d, device=device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for a in self.shared:
            a.lora.B.requires_grad_(True)  # the only parameters carried across tasks
        for a in self.specific:
            for i, (lora, mu) in enumerate(zip(a.branches, a.mu)):
                lora.requires_grad_(i == t)
                mu.requires_grad_(i == t)
            a.active = range(t, t + 1)  # at rest: the current branch (features(vit, x) = f_t(x))

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, epoch_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor):
        """L_ce at t = 0 (one step, cllora.py L355, L383-385); from t = 1 a generator of the two step losses
        (`two_step`, `two_step_stale`) or one tensor, L_ce + L_kd (reassigned) + lambda2 L_orth (`joint`, Eq. 13)."""
        if self.task == 0:
            return self.ce_loss(x, y)
        if self.cfg.kd_update == "joint":
            return self.ce_loss(x, y) + self.kd_loss(x) + self.orth_term()
        return self.two_steps(x, y)

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        # the adapters are at rest (student B, branch t), so f(x) of the backbone is f_t(x)
        getattr(self, f"protos_{t}").copy_(class_means(self.vit, data.plain, classes))
        for a in self.specific:
            a.branches[t].requires_grad_(False)
            a.mu[t].requires_grad_(False)
        self.head.requires_grad_(False)
        for a in self.shared:
            for m in TARGETS:
                a.teacher(m).copy_(a.lora.B[m])  # teacher T_t := the shared adapters at the end of task t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.trunk(x)  # the shared blocks, once
        n = self.task + 1
        k = max(1, self.cfg.eval_images // len(x)) if self.cfg.eval_images else n  # branches per pass
        f = torch.cat([self.stacked_branches(s, range(lo, min(lo + k, n))) for lo in range(0, n, k)])  # (n, B, d)
        return torch.cat([self.proto_logits(f[i], i) for i in range(n)], dim=1)

    # -- helpers ---------------------------------------------------------------------------------
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

    def two_steps(self, x: torch.Tensor, y: torch.Tensor):
        """The official update of one batch (cllora.py L351-385): the caller steps after each yield."""
        stale = self.cfg.kd_update == "two_step_stale"
        if stale:  # L_ce built before step 1, back-propagated after it (cllora.py L351-355, L383-384)
            with swapped([(mod._parameters, k, Alias.apply(p)) for mod in self.modules()
                          for k, p in mod._parameters.items() if p is not None and p.requires_grad]):
                ce = self.ce_loss(x, y)  # every trainable parameter behind its Alias
        yield self.kd_loss(x)  # step 1: the reassigned KD gradient
        yield (ce if stale else self.ce_loss(x, y)) + self.orth_term()  # step 2 (two_step: a fresh forward)

    def ce_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L_ce on the local labels through branch t and the local classifier (cllora.py L344-355)."""
        t = self.task
        f = self.stacked_branches(self.trunk(x), range(t, t + 1))[0]
        return F.cross_entropy(self.head(f), y - self.offsets[t])

    def kd_loss(self, x: torch.Tensor) -> torch.Tensor:
        """lambda1 L_kd on the early exits, the student's shared-B gradient reassigned (cllora.py L357-376)."""
        with torch.no_grad():
            e_teacher = self.early_exit(self.trunk(x, "teacher"))
        z_teacher = self.head(e_teacher)  # not detached by default: h^t also learns from the teacher path
        z_teacher = z_teacher.detach() if self.cfg.detach_teacher else z_teacher
        z_student = self.head(self.early_exit(self.trunk(x, "kd")))
        tau = self.cfg.temperature
        return self.cfg.lambda_kd * soft_cross_entropy(z_student / tau, z_teacher / tau)  # no tau^2

    def orth_term(self) -> torch.Tensor:
        """lambda2 L_orth of the current block weights against the earlier tasks' (Eq. 12; cllora.py L378-380)."""
        t = self.task
        return self.cfg.lambda_orth * orth_loss(self.block_weights(t), [self.block_weights(i) for i in range(t)])

    def trunk(self, x: torch.Tensor, source: str = "student") -> torch.Tensor:
        """s(x): all tokens after the shared blocks 0..l-1, with the student's, the KD or the teacher's B."""
        with swapped([(vars(a), "source", source) for a in self.shared]):
            h = embed(self.vit, x)
            for blk in self.vit.blocks[: self.l]:
                h = blk(h)
        return h

    def early_exit(self, s: torch.Tensor) -> torch.Tensor:
        """e(x): the final norm on the CLS token of the shared trunk (vit L590-591, L599-600)."""
        return self.vit.norm(s)[:, 0]

    def stacked_branches(self, s: torch.Tensor, idx: range) -> torch.Tensor:
        """f_i(x) for every i in idx, (len(idx), B, d): blocks l..L-1 with branch i's adapters on the trunk output s,
        final norm, CLS; in one pass on s repeated along the batch (n B, N, d), each slice through its own branch."""
        n, B, N, d = len(idx), *s.shape
        with swapped([(vars(a), "active", idx) for a in self.specific]):
            h = s.repeat(n, 1, 1)  # rows k B .. (k+1) B - 1: branch idx[k]
            for blk in self.vit.blocks[self.l:]:
                h = blk(h)
        return self.vit.norm(h)[:, 0].reshape(n, B, d)

    def proto_logits(self, f: torch.Tensor, i: int) -> torch.Tensor:
        """cos(f_i(x), p_c) for the classes c of task i (sigma = 1), in the prototypes' precision (also autocast)."""
        p = getattr(self, f"protos_{i}")
        with torch.autocast(f.device.type, enabled=False):
            return F.normalize(f.to(p.dtype), dim=1) @ F.normalize(p, dim=1).T

    def block_weights(self, i: int) -> torch.Tensor:
        """U_i, 3 x (L - l): rows q, k, v; column b = specific block l + b."""
        return torch.stack([a.mu[i] for a in self.specific], dim=1)


Method = CLLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


@contextmanager
def swapped(slots: list[tuple[dict, str, object]]):
    """d[k] = v for every (d, k, v) of `slots` inside the block; the old values are put back after, also on an
    exception (d: a module's vars() for its mode flags, its _parameters for `Alias`es)."""
    old = [(d, k, d[k]) for d, k, _ in slots]
    try:
        for d, k, v in slots:
            d[k] = v
        yield
    finally:
        for d, k, v in old:
            d[k] = v


def orthonormal_rows(r: int, d: int, mode: str) -> torch.Tensor:
    """A random r x d matrix with orthonormal rows, drawn from the global RNG: 'qr_uniform' the official reduced QR
    of M ~ U[0,1)^(d x r), A = Q^T (vit L41-45); 'svd_gaussian' the paper's M ~ N(0,1)^(r x d) = U S V^T,
    A = U V_r^T, the nearest matrix with orthonormal rows (Eq. 7)."""
    if mode == "qr_uniform":
        return torch.linalg.qr(torch.rand(d, r, dtype=torch.float64), mode="reduced")[0].T.contiguous().float()
    U, _, Vh = torch.linalg.svd(torch.randn(r, d, dtype=torch.float64), full_matrices=False)
    return (U @ Vh).float()


def reassign_weights(P: torch.Tensor) -> torch.Tensor:
    """w_j = d n_j / sum_j' n_j' with n_j the L2 norm of row j of the teacher B, P (d x r): mean 1
    (Eq. 10; cllora.py L374-375)."""
    n = P.norm(dim=1)
    total = n.sum()
    return torch.where(total > 0, P.shape[0] * n / total.clamp_min(torch.finfo(n.dtype).tiny), torch.ones_like(n))


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_b sum_c softmax(teacher)_c log softmax(student)_c, inputs already divided by tau
    (cllora.py L17-20)."""
    return -(F.softmax(teacher, dim=1) * F.log_softmax(student, dim=1)).sum(dim=1).mean()


def orth_loss(U_t: torch.Tensor, olds: list[torch.Tensor], eps: float = 1e-8) -> torch.Tensor:
    """(1/t) sum_i |<vec U_t / (||U_t|| + eps), vec U_i / (||U_i|| + eps)>| over the earlier tasks i
    (Eq. 12 normalised as in cllora.py L23-42)."""
    if not olds:
        return U_t.new_zeros(())
    u = U_t.flatten() / (U_t.norm() + eps)
    return sum((u * (U_i.flatten() / (U_i.norm() + eps))).sum().abs() for U_i in olds) / len(olds)


def epoch_cosine(epochs: int, steps_per_epoch: int):
    """CosineAnnealingLR(T_max = epochs, eta_min = 0) stepped per epoch (cllora.py L305, L392-393), per step."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 0.5 * (1 + math.cos(math.pi * min(e, epochs) / max(epochs, 1)))
    return factor


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
