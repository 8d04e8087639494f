"""C-LoRA: one LoRA per matrix whose update is routed through a learnable r x r matrix R = R_old + R_delta.

Paper: Zhang, Bai, Yang, Liang, "C-LoRA: Continual Low-Rank Adaptation for Pre-trained Models",
arXiv 2502.17920 (February 2025; preprint, venue not confirmed). Not to be confused with "CLoRA" (Controlled
LoRA), "CL-LoRA" (He et al., CVPR 2025; methods/cl_lora.py) or "C-LoRA" (Smith et al., 2023, diffusion).
Official code: none released. The optional classifier alignment (off by default) is InfLoRA's
(liangyanshuo/InfLoRA @ e08b00e `methods/inflora_ca1.py`, "inflora_ca1.py L<n>" below; the same code as
methods/inflora.py).

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
    inference: logits of all seen heads concatenated, argmax, no task id; the adapter equals the merged
        weight W0 + s B R_old A (`merged_vit`), so evaluation costs one pass of the plain backbone
    optional (off, --ca): classifier alignment of all heads on Gaussian class replay after every task t >= 1
        (inflora_ca1.py L101-103, L405-487): class mean mu_c and covariance Sigma_c of f(x) on the class's
        training images with test transforms, frozen at their task (L541-559); SGD momentum 0.9, cosine over
        the epochs (L411-416); per epoch n samples per class from N(gamma_c mu_c, Sigma_c + delta I)
        (L430-443), gamma_c = 0.9 + 0.1 (t_c + 1)/(t + 1) (L431-433), shuffled and cut into |C_<=t| batches
        of n (L448-455); CE on z / (tau mean_s ||z_{C_s}||) (L459-473)
    Eqs. 4-5 (why one LoRA replaces many): R = blockdiag(w_t I) gives B R A = sum_t w_t B_t A_t.
The adapter's size is fixed: per matrix r (d_in + d_out) + r^2 trainable values and r^2 buffer values (R_old),
whatever the number of tasks; only the classifier grows.

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
- Evaluation (the method in eval mode) runs `merged_vit()`, a copy with every site's s B (R_old + R_delta) A
  added into attn.qkv / attn.proj and no adapters: one pass of the plain backbone, the same logits up to float
  rounding. The copy is built on the first evaluation forward and kept outside the module tree (not in the
  state dict) until `train()`/`eval()`, `grow`, `begin_task`, `end_task` or `load_state_dict`; the eval forward
  is not differentiable in A, B, R. Training mode (and every loss) runs the adapters.
- `--ca` keeps the aligned heads: the contract has no hook after evaluation, so PILOT's restore-after-evaluation
  variant is not offered. It samples with torch's global generator (seeded by train.py). Sigma_c is stored in
  float32.

Run: python train.py --method c_lora --tasks 10
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
    ca: bool = False
    """classifier alignment after every task t >= 1 (InfLoRA's; an ablation, not part of C-LoRA)"""
    ca_epochs: int = 5
    """alignment epochs (inflora_ca1.py: 5)"""
    ca_lr: float = 0.01
    """alignment SGD learning rate (momentum 0.9, cosine over the alignment epochs)"""
    ca_weight_decay: float = 5e-4
    """alignment SGD weight decay"""
    ca_samples: int = 256
    """Gaussian samples per class and epoch, also the alignment batch size (inflora_ca1.py: 256)"""
    ca_shrink: float = 1e-4
    """covariance shrinkage delta: Sigma_c + delta I"""
    ca_logit_norm: float = 0.1
    """tau of the per-task logit normalisation (0: plain CE)"""


CHOICES = {"orth_mode": ("r_old", "svd_topk"), "head": ("cosine_proto", "linear"),
           "schedule": ("onecycle", "cosine", "constant")}


def validate(cfg: Config) -> None:
    """Raise ValueError for a Config that cannot run."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} "
                             f"(got {getattr(cfg, name)!r})")
    if not cfg.targets or not set(cfg.targets) <= set("qkvo") or len(set(cfg.targets)) != len(cfg.targets):
        raise ValueError(f"--targets must be distinct letters of q, k, v, o (got {cfg.targets!r})")
    for name, ok, rule in (("rank", cfg.rank >= 1, ">= 1"), ("scale", cfg.scale > 0, "> 0"),
                           ("lambda_orth", cfg.lambda_orth >= 0, ">= 0"),
                           ("orth_energy", 0 < cfg.orth_energy <= 1, "in (0, 1]"),
                           ("r_delta_init_std", cfg.r_delta_init_std >= 0, ">= 0"),
                           ("head_scale", cfg.head_scale > 0, "> 0"), ("lr", cfg.lr > 0, "> 0"),
                           ("weight_decay", cfg.weight_decay >= 0, ">= 0"), ("epochs", cfg.epochs >= 1, ">= 1"),
                           ("batch_size", cfg.batch_size >= 1, ">= 1"), ("ca_epochs", cfg.ca_epochs >= 1, ">= 1"),
                           ("ca_lr", cfg.ca_lr > 0, "> 0"), ("ca_weight_decay", cfg.ca_weight_decay >= 0, ">= 0"),
                           ("ca_samples", cfg.ca_samples >= 1, ">= 1"), ("ca_shrink", cfg.ca_shrink >= 0, ">= 0"),
                           ("ca_logit_norm", cfg.ca_logit_norm >= 0, ">= 0")):
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {rule} (got {getattr(cfg, name)})")


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
    """logits = tau cos(f, w_c) over the classes of one task; tau a number (fixed) or an nn.Parameter (learned)."""

    def __init__(self, d: int, n: int, tau: float | nn.Parameter):
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.zeros(n, d))  # written by the method before training

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.tau * F.linear(F.normalize(f, dim=-1), F.normalize(self.weight, dim=-1))


# ----------------------------------------------------------------------------------------------------
# Method


class CLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg)
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
        if cfg.ca:  # class statistics of the alignment, frozen at their task (fixed shapes for resume)
            self.register_buffer("ca_mean", torch.zeros(num_classes, d, dtype=torch.float64))
            self.register_buffer("ca_cov", torch.zeros(num_classes, d, d))
        self.register_load_state_dict_post_hook(CLoRA._drop_eval_cache)

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        self._drop_eval_cache()
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
        self._drop_eval_cache()
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
        ce = F.cross_entropy(self.head_logits(self.heads[-1], features(self.vit, x)), y - K_t)  # task-local CE
        if self.cfg.lambda_orth == 0:
            return ce
        return ce + self.cfg.lambda_orth * self.orth_penalty()  # L = L_CE + lambda sum L_orth

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        self._drop_eval_cache()
        for site in self.sites():
            site.consolidate()  # R_old <- R_old + R_delta; R_delta <- 0
        self.heads[t].requires_grad_(False)
        if self.cfg.ca:
            mean, cov = class_statistics(self.vit, data.plain, classes)
            self.ca_mean[classes] = mean
            self.ca_cov[classes] = cov.float()
            if t >= 1:
                self.align_heads(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit if self.training else self._eval_vit()  # evaluation: the folded copy, one plain pass
        return self.logits(features(vit, x))

    # -- helpers ---------------------------------------------------------------------------------
    def train(self, mode: bool = True):
        self._drop_eval_cache()  # eval() comes here too: the copy is built once per evaluation
        return super().train(mode)

    def _drop_eval_cache(self, *_) -> None:
        """Forget the folded copy (also the load_state_dict post hook, hence the ignored arguments)."""
        self.__dict__.pop("_eval_cache", None)

    def _eval_vit(self) -> nn.Module:
        """`merged_vit()`, built on the first call after `train`/`eval`, `grow`, `begin_task`, `end_task` or a
        load and cached outside the module tree (not in state_dict, parameters() or .to())."""
        vit = self.__dict__.get("_eval_cache")
        if vit is None:
            vit = self.__dict__["_eval_cache"] = self.merged_vit()
        return vit

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

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.head_logits(h, f) for h in self.heads], dim=1)

    @torch.enable_grad()
    def align_heads(self, t: int) -> None:
        """Classifier alignment after task t (inflora_ca1.py L405-487): only the heads h_0..h_t change."""
        cfg, C, device = self.cfg, self.offsets[-1], self.ca_mean.device
        sizes = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        task_of = torch.arange(t + 1, device=device).repeat_interleave(torch.tensor(sizes, device=device))
        means = (mean_decay(task_of, t)[:, None] * self.ca_mean[:C]).float()
        eye = torch.eye(self.ca_cov.shape[-1], dtype=torch.float64, device=device)
        trils = torch.linalg.cholesky(self.ca_cov[:C].double() + cfg.ca_shrink * eye).float()
        params = [p for h in self.heads for p in h.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ca_epochs)
        n = cfg.ca_samples
        with torch.autocast(device_type=device.type, enabled=False):
            for _ in range(cfg.ca_epochs):
                feats, labels = gaussian_replay(means, trils, n)
                perm = torch.randperm(len(labels)).to(device)
                feats, labels = feats[perm], labels[perm]
                for i in range(C):  # |C_<=t| batches of n samples per epoch
                    z = self.logits(feats[i * n:(i + 1) * n])
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
    def merged_vit(self) -> nn.Module:
        """A copy of the backbone with W0 + s B (R_old + R_delta) A written into its weights and no adapters.

        The same function as the adapted backbone in one plain pass; evaluation runs it (`_eval_vit`).
        A and B keep training, so the method never merges in place.
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
    """Mean feature f(x) of every class in `classes` (rows in that order) over one pass of `loader`."""
    lo = classes[0]
    sums, counts = None, torch.zeros(len(classes), dtype=torch.float64)
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    for x, y in loader:
        f = features(encoder, x.to(device)).double().cpu()
        if sums is None:
            sums = torch.zeros(len(classes), f.shape[1], dtype=torch.float64)
        sums.index_add_(0, y - lo, f)
        counts.index_add_(0, y - lo, torch.ones(len(y), dtype=torch.float64))
    encoder.train(was_training)
    assert (counts > 0).all(), "a class of the task has no training image"
    return (sums / counts[:, None]).float()


@torch.no_grad()
def class_statistics(vit: nn.Module, loader, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of f(x) for every class of `classes`, in that order
    (inflora_ca1.py L541-559; the 1e-4 I it adds there is added at sampling time here)."""
    was_training = vit.training
    vit.eval()
    device = next(vit.parameters()).device
    feats, ys = [], []
    with torch.autocast(device_type=device.type, enabled=False):
        for x, y in loader:
            feats.append(features(vit, x.to(device)).double())
            ys.append(y.to(device))
    vit.train(was_training)
    feats, ys = torch.cat(feats), torch.cat(ys)
    means, covs = [], []
    for c in classes:
        f = feats[ys == c]
        if len(f) == 0:
            raise ValueError(f"class {c} has no training image: cannot compute its statistics")
        mu = f.mean(0)
        means.append(mu)
        covs.append((f - mu).T @ (f - mu) / max(len(f) - 1, 1))  # one image: zero, the shrinkage keeps it PD
    return torch.stack(means), torch.stack(covs)


def mean_decay(task_of: torch.Tensor, t: int) -> torch.Tensor:
    """gamma_c = 0.9 + 0.1 (t_c + 1) / (t + 1) for a class introduced by task t_c (inflora_ca1.py L431-433)."""
    return 0.9 + 0.1 * (task_of + 1).double() / (t + 1)


def gaussian_replay(means: torch.Tensor, trils: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples per class c from N(means[c], trils[c] trils[c]^T) with torch's global generator, and their
    labels c: (C * n, d), (C * n,), class by class (inflora_ca1.py L430-443)."""
    C, d = means.shape
    z = torch.randn(C, n, d, device=means.device, dtype=means.dtype)
    x = means[:, None, :] + z @ trils.transpose(1, 2)
    return x.reshape(C * n, d), torch.arange(C, device=means.device).repeat_interleave(n)


def task_normalised(z: torch.Tensor, sizes: list[int], tau: float) -> torch.Tensor:
    """z / (tau * mean_s ||z_{C_s}||_2), s over the tasks of sizes `sizes` (inflora_ca1.py L459-472)."""
    norms = torch.stack([b.norm(dim=1) + 1e-7 for b in z.split(sizes, dim=1)], dim=1).mean(1, keepdim=True)
    return z / norms / tau
