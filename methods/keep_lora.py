"""KeepLoRA: a frozen, gradient-initialised LoRA down-projection in the residual of a protected subspace.

Paper: Luo, Zhou, Zhang, Wan, Wei, Zhang, "KeepLoRA: Continual Learning with Residual Gradient Adaptation",
ICLR 2026, arXiv 2601.19659. Official code: MaolinLuo/KeepLoRA @ a17f9c2 (CLIP multi-domain task-incremental
learning in MTIL/, LLaVA in MCITlib/). There is no official ViT class-incremental code: the head, the loss of the
gradient estimate and the evaluation are a transplant (see Deviations). The paper's full text was not available
when this file was written, so its equation numbers are not cited: every formula below cites the official file
and line at a17f9c2 (paths under MTIL/; "Prop. 3.1" is the paper's label as quoted by third-party notes).

Implements, for every adapted matrix W (d_out x d_in): the q, k, v row blocks of the fused qkv and o = attn.proj,
in every block. A (r x d_in) is the frozen down-projection, B (d_out x r) the trained up-projection,
delta W = s B A with s = alpha / r; Q (d_in x k) is the protected basis, orthonormal columns. (The official code
stores the transposes, lora_A = A^T and lora_B = B^T, and writes y = x lora_A lora_B.) Per task t, each step with
the code that implements it (begin_task: 1-6, loss: 7, end_task: 8-9):
 1. A, B <- 0, adapters off: Site.reset                                           model/keeplora_helper.py L16-30
 2. (b) t = 0: W = U S V^T, Q <- W_p = V[:, :p] (input side; MTIL's output side U[:, :p]),
    p = max(1, #{j : sum_{i<=j} S_i^2 / sum S^2 < eps_w}): weight_basis, first_basis_size
                   trainer/framework4MTIL.py L123-126, model/prin_subspace_helper.py L47-70, prin_subspace.py L20-29
 3. head_t <- the normalised class means of the current backbone: class_means          model/customClip.py L103-150
 4. (c) G = mean over the task's batches of dL/dW (adapters off, task-local CE through head_t),
    G_hat = G (I - Q Q^T), Q = [W_p, M_{t-1}]: estimate_gradient, task_batches  trainer/trainer.py L29-106, L108-121
 5. (d) G_hat = U S V^T, A = V[:, :r]^T, B_0 = U[:, :r] diag(S[:r]): residual_lora_init  trainer/trainer.py L123-125
 6. (e) W <- W - s B_0 A (the function is unchanged), adapters on: init_from_gradient     trainer/trainer.py L317
 7. (a) y = x W^T + b + s x A^T B^T: Site.forward                              model/peft_modules.py L17, L67-71
    (h) logits = tau cos(f(x), w_c), tau = 30, over all seen heads; CE over the task's own classes: CosineHead, loss
    (model/classifiers.py L33-41; trainer/trainer.py L346-349); B and head_t train with AdamW, OneCycleLR stepped
    per batch: optimizer                                                 trainer/trainer.py L260-305, L336-355
 8. (f) W <- W + s B A, then A, B <- 0: merge (merged() folds the same s B A into a copy for evaluation)
                                                    model/customClip.py L180-239, trainer/framework4MTIL.py L131-135
 9. (g) grow Q from the merged model's input features C at each site over the task's data: grow_bases,
    FeatureStats, grow_basis. E = tr C, P = I - Q Q^T, P C P = U_hat diag(s_hat^2) U_hat^T, c_0 = (E - tr(P C P)) / E,
    m = min{m : c_0 + sum_{i<=m} s_hat_i^2 / E >= eps_f}, Q <- [Q, U_hat[:, :m]] (model/prin_subspace.py L31-59);
    the first basis (no W_p, eps_w <= 1e-8): m = max(1, #{j : sum_{i<=j} s_hat_i^2 / E < eps_f})
    (model/prin_subspace.py L16, L20-29; trainer/framework4MTIL.py L123). 'covariance' C = sum over tokens x x^T;
    'official_mean' C = R R^T, R = mean_b X_b^T / N_b (MTIL's accumulator, model/peft_modules.py L44-65;
    trainer/framework4MTIL.py L136-139)
Prop. 3.1: with A frozen, delta W = s (delta B) A has its rows in the row space of A, orthogonal to span(Q), so
inputs in span(Q) keep their outputs exactly, whatever the optimiser does to B (one SGD step moves W by
-eta s^2 G A^T A, a projected gradient step): Site holds A as a buffer and B as the only trained tensor.

Defaults: the MTIL vision values (configs/keeplora_order1.yaml @ a17f9c2, the line after each Config field), except
feature_mode = covariance (the paper's feature matrix; MTIL's accumulator is 'official_mean') and
weight_basis_side = input (the paper's and LLaVA's; MTIL's output side fits square W only).

Deviations:
- Exact float64 torch.linalg.svd / eigh, not the official randomised torch.svd_lowrank(q = 4r, niter = 4)
  (trainer/trainer.py L123-141): deterministic, cheap for d <= 768. Shift and merge are computed in float64 into
  the float32 weights (MTIL trains under fp16 autocast, configs/keeplora_order1.yaml L3).
- Guards (not official), so that no direction of span(Q) enters A or Q: a matrix with ||G_hat||^2 <= 1e-8 ||G||^2
  gets no adapter this task; else its rank is min(r, d_in - k, numerical rank of G_hat), A is re-orthogonalised
  against Q twice and QR-orthonormalised, B_0 = G_hat A^T (= U diag(S) for the exact SVD). New basis columns are
  re-orthogonalised and QR'd alike; m <= d_in - k (the code truncates to d_in columns, model/prin_subspace.py
  L55-59) and <= the residual eigenvalues > 1e-12 of the largest (eigh of P C P: the official SVD of P R's U_hat).
- The three passes (prototypes, gradient, features) read data.plain (test transforms, fixed order); MTIL feeds one
  shuffled drop_last loader to all three (trainer/framework4MTIL.py L120, L136; trainer/trainer.py L315, L323).
  Mean gradient and covariance do not depend on the order; the gradient and 'official_mean' skip a short last
  batch unless it is the only one. grad_fraction < 1 takes evenly spaced batches (LLaVA: evenly spaced samples,
  MCITlib/KeepLoRA/llava/train/extract_gradients.py L57-58).
- The head: MTIL estimates the gradient through CLIP's zero-shot text head and adds the KeepLoRA+ head after the
  LoRA init (trainer/trainer.py L315-323); a ViT has no text head, so head_t starts from the class means, before
  the gradient estimate. Task-local CE and the concatenated heads at inference are the class-incremental transplant.
- train.py evaluates `merged()` (the active s B A folded into a copy, as (f)); the official forward, like `forward`,
  always runs the adapters, zero after the merge (model/peft_vit.py L211-219, L230-236; peft_modules.py L67-71).
- No classifier alignment (SLCA's Gaussian replay is not part of KeepLoRA). Snapshot 7abf7ec of the official code
  zeroes B after the SVD (B_0 = 0, no shift, as the LLaVA code): b0_init = 'zero'.

Run: python train.py --method keep_lora --tasks 10
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import Merged, attach, check_options, features, fold, qkv_rows

# ----------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Config:
    rank: int = 16
    """LoRA rank r (MTIL vision: 16, L22)"""
    alpha: float = 1.0
    """LoRA alpha; the adapter scale is s = alpha / rank (MTIL: 1, model/peft_vit.py L69, s = 1/16; LLaVA: r/4)"""
    targets: str = "qkvo"
    """adapted matrices of every block, any of q, k, v (slices of the fused qkv) and o (attn.proj) (MTIL: all, L20)"""
    eps_w: float = 0.85
    """energy threshold of the pretrained weight basis W_p (MTIL vision 0.85, L26; <= 1e-8: no W_p)"""
    eps_f: float = 0.99
    """energy threshold of the task-feature basis growth (MTIL 0.99, L24)"""
    feature_mode: str = "covariance"
    """task features: 'covariance' (sum of x x^T over all tokens, the paper's reading) or 'official_mean' (MTIL)"""
    weight_basis_side: str = "input"
    """W_p from the input-space ('input', paper and LLaVA) or output-space ('output', MTIL) singular vectors"""
    threshold_rule: str = "official"
    """size of the first basis (W_p, or the first feature basis when there is no W_p): 'official'
    p = max(1, #{cumulative energy < eps}); 'paper' the first p whose cumulative energy reaches eps"""
    b0_init: str = "svd"
    """'svd': B_0 = U_r S_r, W shifted (paper; trainer/trainer.py L184-191, L205-207, L317); 'zero': B_0 = 0 (LLaVA)"""
    grad_fraction: float = 1.0
    """share of the task's batches (evenly spaced) in the gradient estimate (MTIL: 1; LLaVA: 0.2)"""
    head_scale: float = 30.0
    """scale tau of the per-task cosine head (the KeepLoRA+ head, model/classifiers.py L34)"""
    lr: float = 1e-3
    """AdamW learning rate, OneCycleLR's max_lr (per batch, beta_1 cycled; L14-16; trainer/trainer.py L297-301, L355)"""
    weight_decay: float = 0.01
    """AdamW weight decay on B and the head (MTIL, L14-16)"""
    epochs: int = 10
    """epochs per task (MTIL order I: 10 per dataset, L17)"""
    batch_size: int = 64
    """training batch size (MTIL, L13)"""


CHOICES = {"feature_mode": ("covariance", "official_mean"), "weight_basis_side": ("input", "output"),
           "threshold_rule": ("official", "paper"), "b0_init": ("svd", "zero")}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run (with `vit`: also the bounds its shape sets)."""
    check_options(cfg, CHOICES, [
        ("targets", len(cfg.targets) == len(set(cfg.targets)) >= 1 and set(cfg.targets) <= set("qkvo"),
         "distinct letters of q, k, v, o"),
        ("rank", cfg.rank >= 1, ">= 1"), ("alpha", cfg.alpha > 0, "> 0"),
        ("eps_w", 0 <= cfg.eps_w <= 1, "in [0, 1]"), ("eps_f", 0 < cfg.eps_f <= 1, "in (0, 1]"),
        ("grad_fraction", 0 < cfg.grad_fraction <= 1, "in (0, 1]"), ("head_scale", cfg.head_scale > 0, "> 0"),
        ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("epochs", cfg.epochs >= 0, ">= 0"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("rank", vit is None or cfg.rank <= vit.embed_dim, f"<= {getattr(vit, 'embed_dim', None)}, the width")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class Site(nn.Module):
    """One adapted matrix W (d_out x d_in): delta(x) = s x A^T B^T, and its protected basis Q[:, :k]."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        # the frozen down-projection, not saved (a plain tensor in the official code, model/peft_modules.py L23)
        self.register_buffer("A", torch.zeros(rank, d_in), persistent=False)
        self.B = nn.Parameter(torch.zeros(d_out, rank))  # the up-projection, the only trained tensor
        self.register_buffer("Q", torch.zeros(d_in, d_in))  # columns [:k] = [W_p, M_t], fixed shape
        self.register_buffer("k", torch.zeros((), dtype=torch.long))
        self.rank_used = 0  # effective rank of this task (the saturation guard), for the log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.linear(x, self.A), self.B)  # (a)

    def delta(self) -> torch.Tensor:
        """s B A in float64, what (f) adds to W."""
        return self.scale * self.B.double() @ self.A.double()

    def basis(self) -> torch.Tensor:  # the protected basis, (d_in, k), orthonormal columns
        return self.Q[:, : int(self.k)]

    @torch.no_grad()
    def set_basis(self, Q: torch.Tensor) -> None:
        Q = Q.to(self.Q.dtype, copy=True)  # Q may be a view of the buffer itself
        self.Q.zero_()[:, : Q.shape[1]] = Q
        self.k.fill_(Q.shape[1])

    @torch.no_grad()
    def reset(self) -> None:
        self.A.zero_()
        self.B.zero_()
        self.rank_used = 0


class Adapter(nn.Module):
    """The sites reading one input x: q, k, v (`qkv_adapter`, x = norm1(h)) or o (`out_adapter`, x = proj's input).
    While `stats` is set (end_task) every x is added to it; while `active` is False (merged) it adds nothing."""

    def __init__(self, d: int, rank: int, scale: float, names: str):
        super().__init__()
        self.sites = nn.ModuleDict({m: Site(d, d, rank, scale) for m in names})
        self.stats: FeatureStats | None = None
        self.active = False

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor] | torch.Tensor:
        if self.stats is not None:
            self.stats.add(x)
        if "o" in self.sites:
            return self.sites["o"](x) if self.active else torch.zeros_like(x)
        return {m: site(x) for m, site in self.sites.items()} if self.active else {}


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


class KeepLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        validate(cfg, vit)
        super().__init__()
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        d, r, s = vit.embed_dim, cfg.rank, cfg.alpha / cfg.rank
        qkv = "".join(m for m in "qkv" if m in cfg.targets)
        if qkv:
            attach(vit, "qkv_adapter", lambda i, attn: Adapter(d, r, s, qkv))
        if "o" in cfg.targets:
            attach(vit, "out_adapter", lambda i, attn: Adapter(d, r, s, "o"))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        head = CosineHead(self.vit.embed_dim, len(classes), self.cfg.head_scale)
        self.heads.append(head.to(self.vit.cls_token.device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for i, h in enumerate(self.heads):
            h.requires_grad_(i == t)  # old heads frozen

    def begin_task(self, t: int, classes: list[int], data) -> None:
        c = self.cfg
        with torch.no_grad(), torch.autocast(self.vit.cls_token.device.type, enabled=False):
            for _, _, site in self.sites():
                site.reset()  # step 1: A, B <- 0 (they already are after a merge)
            for a in self.adapters():
                a.active = False  # the prototypes and the gradient see the plain (merged) backbone
            if t == 0:  # step 2: Q <- W_p(eps_w), (b)
                for attn, m, site in self.sites():
                    W, rows = target(attn, m)
                    site.set_basis(weight_basis(W[rows].double(), c.eps_w, c.weight_basis_side, c.threshold_rule))
            # step 3: the head starts at the normalised class means, before the gradient is estimated
            self.heads[t].weight.copy_(F.normalize(class_means(self.vit, data.plain, classes), dim=1))
        self.init_from_gradient(self.estimate_gradient(data.plain))  # step 4 (adapters off), steps 5-6
        ks, ranks = [int(site.k) for _, _, site in self.sites()], [site.rank_used for _, _, site in self.sites()]
        print(f"keep_lora task {t}: protected dims {min(ks)}-{max(ks)} of {self.vit.embed_dim} (mean "
              f"{sum(ks) / len(ks):.1f}), LoRA rank {min(ranks)}-{max(ranks)} of {c.rank}")

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]  # every B and head t
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg.lr,  # cycles beta_1 0.85-0.95 as well
                                                    total_steps=max(1, self.cfg.epochs * steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.heads[-1](features(self.vit, x)), y - self.offsets[-2])  # step 7, (h)

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        self.merge()  # step 8
        self.heads[t].requires_grad_(False)
        self.grow_bases(data.plain)  # step 9, with the merged model
        ks, d = [int(site.k) for _, _, site in self.sites()], self.vit.embed_dim
        print(f"keep_lora task {t}: bases grown to {min(ks)}-{max(ks)} of {d} (mean {sum(ks) / len(ks):.1f})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = features(self.vit, x)
        return torch.cat([h(f) for h in self.heads], dim=1)  # (h), over the heads of all seen tasks

    def merged(self) -> nn.Module:
        """The inference model: the heads over a copy of the ViT with the active adapters' s B A folded into its
        weights as merge() does, (f), and no adapters (between tasks: the plain merged backbone)."""
        on = any(a.active for a in self.adapters())  # all on during a task, all off (merged) between tasks
        deltas = {(attn, m): site.delta() for attn, m, site in self.sites()} if on else {}
        return Merged(fold(self.vit, lambda i, m: deltas.get((self.vit.blocks[i].attn, m))), copy.deepcopy(self.heads))

    # -- helpers ---------------------------------------------------------------------------------
    def adapters(self) -> list[Adapter]:
        return [a for blk in self.vit.blocks for a in (blk.attn.qkv_adapter, blk.attn.out_adapter) if a is not None]

    def sites(self) -> list[tuple[nn.Module, str, Site]]:
        """(attn, name, site) for every adapted matrix, in block order (q, k, v, then o)."""
        return [(blk.attn, m, site) for blk in self.vit.blocks
                for a in (blk.attn.qkv_adapter, blk.attn.out_adapter) if a is not None
                for m, site in a.sites.items()]

    def estimate_gradient(self, loader) -> dict[torch.Tensor, torch.Tensor]:
        """Mean over the task's batches of dL/dW for every adapted weight tensor (float64), adapters off, (c)."""
        device, K_t = self.vit.cls_token.device, self.offsets[-2]
        weights = list({id(w): w for w in (target(attn, m)[0] for attn, m, _ in self.sites())}.values())
        sums, n = [torch.zeros_like(w, dtype=torch.float64) for w in weights], 0
        for w in weights:
            w.requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                for x, y in task_batches(loader, self.cfg.grad_fraction, drop_last=True):
                    loss = F.cross_entropy(self.heads[-1](features(self.vit, x.to(device))), y.to(device) - K_t)
                    for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                        s += g.double()
                    n += 1
        finally:
            for w in weights:
                w.requires_grad_(False)
        return {w: s / max(n, 1) for w, s in zip(weights, sums)}  # the mean of the per-batch gradients

    @torch.no_grad()
    def init_from_gradient(self, grads: dict[torch.Tensor, torch.Tensor]) -> None:
        """A, B_0 from the residual gradient (d); W shifted so that the function is unchanged (e)."""
        for attn, m, site in self.sites():
            W, rows = target(attn, m)
            A, B0, site.rank_used = residual_lora_init(grads[W][rows], site.basis().double(), self.cfg.rank)
            site.A.copy_(A)
            if self.cfg.b0_init == "svd":
                site.B.copy_(B0)
                W[rows] -= (site.scale * B0 @ A).to(W.dtype)  # (e)
        for a in self.adapters():
            a.active = True

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + s B A, then A, B <- 0 and the adapters off: the function is unchanged, (f)."""
        for attn, m, site in self.sites():
            W, rows = target(attn, m)
            W[rows] += site.delta().to(W.dtype)
            site.reset()
        for a in self.adapters():
            a.active = False

    @torch.no_grad()
    def grow_bases(self, loader) -> None:
        """Collect every input site's features with the current (merged) model and grow its bases, (g)."""
        device, adapters = self.vit.cls_token.device, self.adapters()
        for a in adapters:
            a.stats = FeatureStats(self.cfg.feature_mode)
        try:
            with torch.autocast(device.type, enabled=False):
                for x, _ in task_batches(loader):
                    features(self.vit, x.to(device))
            for a in adapters:
                C = a.stats.gram()  # q, k, v read the same input: one C for the three
                for site in a.sites.values():
                    site.set_basis(grow_basis(site.basis().double(), C, self.cfg.eps_f, self.cfg.threshold_rule))
        finally:
            for a in adapters:
                a.stats = None


Method = KeepLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def target(attn: nn.Module, m: str) -> tuple[torch.Tensor, slice]:
    """The weight tensor holding matrix m and its rows: q, k, v are row blocks of the fused qkv, o is proj."""
    return (attn.proj.weight, slice(None)) if m == "o" else (attn.qkv.weight, qkv_rows(m, attn.proj.weight.shape[0]))


def first_basis_size(share: torch.Tensor, eps: float, rule: str) -> int:
    """p from the cumulative energy shares (ascending, ending at 1): 'official' p = max(1, #{share < eps})
    (model/prin_subspace.py L28-29), keeping the energy just below eps; 'paper' the smallest p with share >= eps."""
    below = int((share < eps).sum())
    return max(1, below) if rule == "official" else min(below + 1, len(share))


def weight_basis(W: torch.Tensor, eps: float, side: str = "input", rule: str = "official") -> torch.Tensor:
    """W_p, (b): the leading singular vectors of W (d_out x d_in) holding the energy share eps: right ones for side
    'input', left ones for 'output' (MTIL; square W only); none if eps <= 1e-8 (model/prin_subspace.py L16)."""
    d_out, d_in = W.shape
    if eps <= 1e-8:
        return W.new_zeros(d_in, 0)
    if side == "output" and d_out != d_in:
        raise ValueError("weight_basis_side 'output' needs a square weight")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    p = first_basis_size((S**2).cumsum(0) / (S**2).sum(), eps, rule)
    return (Vh.T if side == "input" else U)[:, :p]


def residual_lora_init(G: torch.Tensor, Q: torch.Tensor, rank: int, tol: float = 1e-8):
    """(A (rank x d_in), B_0, r_used) from G_hat = G (I - Q Q^T), (c)-(d), G (d_out x d_in) the weight's gradient (the
    code works on its transpose), Q (d_in x k): A's first r_used = min(rank, d_in - k, rank of G_hat) rows (none if
    G_hat holds <= `tol` of G's energy) are orthonormal, orthogonal to span(Q); B_0 A best approximates G_hat."""
    d_out, d_in = G.shape
    A, B0 = G.new_zeros(rank, d_in), G.new_zeros(d_out, rank)
    G_hat = G - (G @ Q) @ Q.T  # (c)
    if G_hat.square().sum() <= tol * G.square().sum() or Q.shape[1] >= d_in:
        return A, B0, 0
    _, S, Vh = torch.linalg.svd(G_hat, full_matrices=False)  # (d)
    r = min(rank, d_in - Q.shape[1], int((S > tol * S[0]).sum()))
    V = Vh[:r].T  # the leading input-side directions, d_in x r
    for _ in range(2):  # rounding guard: no direction of span(Q) may enter A
        V = V - Q @ (Q.T @ V)
    V = torch.linalg.qr(V).Q
    A[:r] = V.T
    B0[:, :r] = G_hat @ V  # = U[:, :r] diag(S[:r]) up to the signs of A's rows
    return A, B0, r


def grow_basis(Q: torch.Tensor, C: torch.Tensor, eps: float, rule: str = "official") -> torch.Tensor:
    """The basis growth, (g): Q (d x k, orthonormal) and C = R R^T (d x d) -> [Q, U_hat[:, :m]]; k > 0: the smallest
    m with c_0 + sum_{i<=m} s_hat_i^2 / E >= eps (model/prin_subspace.py L31-59); k = 0 (no W_p): the first
    basis, sized by `rule` as W_p is (model/prin_subspace.py L20-29)."""
    d, k = Q.shape
    E = torch.trace(C)
    if E <= 0 or k >= d:
        return Q
    P = torch.eye(d, dtype=C.dtype, device=C.device) - Q @ Q.T
    C_hat = P @ C @ P
    c0 = float((E - torch.trace(C_hat)) / E)  # energy share already captured
    if c0 >= eps:
        return Q
    lam, U = torch.linalg.eigh((C_hat + C_hat.T) / 2)
    lam, U = lam.flip(0).clamp_min(0), U.flip(1)  # descending: s_hat_i^2 and U_hat
    reach = c0 + lam.cumsum(0) / E
    # k > 0: the smallest m with c0 + sum_{i<=m} s_hat_i^2 / E >= eps; k = 0: the first basis, sized by `rule`
    m = first_basis_size(reach, eps, rule) if k == 0 else int((reach < eps).sum()) + 1
    m = min(m, d - k, int((lam > 1e-12 * lam[0]).sum()))
    if m <= 0:
        return Q
    new = U[:, :m]
    for _ in range(2):
        new = new - Q @ (Q.T @ new)
    return torch.cat([Q, torch.linalg.qr(new).Q], dim=1)


class FeatureStats:
    """The feature matrix C (d x d, float64) of one input site over a task, (g): 'covariance' sums x x^T over every
    token; 'official_mean' is R R^T, R = mean_b X_b^T / N_b over the (N_b x d) token rows X_b of each batch (MTIL's
    running average, model/peft_modules.py L58-65), skipping batches of another row count than the first."""

    def __init__(self, mode: str):
        self.mode, self.total, self.batches = mode, None, 0

    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).double()
        if self.mode == "covariance":
            self.total = X.T @ X if self.total is None else self.total + X.T @ X
        elif self.total is None or X.shape[0] == self.total.shape[1]:
            self.total, self.batches = X.T.clone() if self.total is None else self.total + X.T, self.batches + 1

    def matrix(self) -> torch.Tensor:
        """C ('covariance') or R ('official_mean')."""
        return self.total if self.mode == "covariance" else self.total / (self.batches * self.total.shape[1])

    def gram(self) -> torch.Tensor:
        return self.matrix() if self.mode == "covariance" else self.matrix() @ self.matrix().T


def task_batches(loader, fraction: float = 1.0, drop_last: bool = False):
    """The loader's batches; fraction < 1 keeps evenly spaced ones; drop_last skips a short batch after the first."""
    n, size = len(loader), None
    keep = set(torch.linspace(0, n - 1, max(1, math.ceil(fraction * n))).round().long().tolist())
    for i, (x, y) in enumerate(loader):
        if i not in keep or (drop_last and size is not None and len(y) != size):
            continue
        size = len(y) if size is None else size
        yield x, y


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
