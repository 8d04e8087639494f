"""KeepLoRA: a frozen, gradient-initialised LoRA down-projection in the residual of a protected subspace.

Paper: Luo, Zhou, Zhang, Wan, Wei, Zhang, "KeepLoRA: Continual Learning with Residual Gradient Adaptation",
ICLR 2026, arXiv 2601.19659.
Official code: MaolinLuo/KeepLoRA @ a17f9c2 (CLIP multi-domain task-incremental learning in MTIL/, LLaVA in
MCITlib/). There is no official ViT class-incremental code: this file follows the spec's transplant.
Spec: ../shared/specs/keep_lora.md (algorithm §3-§6, transplant §8-§9, invariants §12, pitfalls K1-K13).

Implements (row convention y = x W^T + b; for every adapted matrix W (d_out x d_in), the q, k, v row blocks
of the fused qkv and o = attn.proj, in every block; A (d_in x r) frozen, B (r x d_out) trained, s = alpha / r;
Q (d_in x k) the protected basis, orthonormal columns). The equation labels are this file's own: the spec
quotes the paper through third-party notes, without the paper's numbering.
    Eq. 1  y = x W^T + b + s (x A) B                                  the adapter: dW^T = s A B
    Eq. 2  W = U S V^T,  W_p = V[:, :p]  (input side; U[:, :p] for the MTIL output side), p by eps_w
    Eq. 3  G = mean over the task's batches of dL/dW^T,  G_hat = G - Q Q^T G,  Q = [W_p, M_{t-1}]
    Eq. 4  G_hat = U S V^T,  A = U[:, :r],  B_0 = diag(S[:r]) V[:, :r]^T
    Eq. 5  W^T <- W^T - s A B_0          (the function is unchanged at the start of the task)
    Eq. 6  W^T <- W^T + s A B,  then A, B <- 0   (merge at the end of the task)
    Eq. 7  E = tr C, c_0 = (E - tr(P C P)) / E, P = I - Q Q^T, P C P = U_hat diag(s_hat^2) U_hat^T,
           m = min{m : c_0 + sum_{i<=m} s_hat_i^2 / E >= eps_f},  Q <- [Q, U_hat[:, :m]]
           with C the input features of the merged model: 'covariance' C = sum over tokens x x^T;
           'official_mean' C = R R^T, R = mean_b X_b^T / N_b (MTIL's accumulator, spec §4c, K1)
    Eq. 8  logits = tau cos(f(x), w_c) over the heads of all seen tasks; loss = CE over the task's own classes
Prop. 3.1: with A frozen, dW^T = s A dB has its rows in col(A), which is orthogonal to span(Q), so inputs
in span(Q) keep their outputs exactly, whatever the optimiser does to B; no gradient projection is needed.

Per task t (spec §9): reset A, B; (t = 0) Q <- W_p; head_t <- normalised class means of the current backbone
(training images, test transforms, K5); G over the task's data with the adapters off (task-local CE through
head_t); A, B_0 per matrix; shift W; train B and head_t; merge; collect the merged model's features; grow Q.

Defaults (spec §7 "transplant defaults", the MTIL vision values where they exist): targets q, k, v, o of every
block; r = 16, alpha = 1 (s = 1/16); eps_w = 0.85 [CODE]; eps_f = 0.99 [CODE] with feature_mode = covariance
[ASSUMED, K1]; weight_basis_side = input (K2); threshold_rule = official (K3); full-data gradient (K4);
B_0 from the SVD with the W shift (MTIL per spec §3); AdamW lr 1e-3, wd 0.01 on B and the head; torch
OneCycleLR stepped per batch with its default beta_1 cycling (K9); batch 64; 10 epochs per task; cosine head
tau = 30 (KeepLoRA+) [ASSUMED transplant].

Deviations:
- Exact float64 torch.linalg.svd / eigh instead of the official randomised torch.svd_lowrank(q = 4r, niter = 4)
  (K10: deterministic; d <= 768 is cheap). The shift and the merge are computed in float64 and written into the
  float32 weights (K8).
- K6 guard: if ||G_hat||^2 <= 1e-8 ||G||^2 a matrix gets no adapter in this task (A = 0); otherwise its rank is
  min(r, d_in - k, numerical rank of G_hat), and A is re-orthogonalised against Q (twice) and re-orthonormalised
  by QR, with B_0 = A^T G_hat (equal to diag(S) V^T for the exact SVD). The official code has no guard.
- Basis growth: the new columns are re-orthogonalised against Q and re-orthonormalised by QR; m never exceeds
  d_in - k nor the number of non-negligible residual eigenvalues (> 1e-12 of the largest), so no direction of
  span(Q) is ever appended. The eigendecomposition of P C P gives the same U_hat and s_hat^2 as the SVD of P R.
- All three passes over the task's data (prototypes, gradient, features) read data.plain (training images, test
  transforms, fixed order). The spec asks for test transforms for the prototypes and a "shuffled, drop_last"
  training set for the gradient and the features; the official trainer feeds one loader to the gradient pass and
  to the prototype pass. The mean gradient and the covariance do not depend on the order; for the gradient and
  'official_mean' a short last batch is skipped (drop_last), unless it is the only batch.
- 'official_mean' averages the batch-slot-aligned columns of data.plain's fixed-order batches, not of shuffled
  ones; it is MTIL's quirk either way (K1) and not the default.
- grad_fraction < 1 takes evenly spaced batches (LLaVA takes 20 % evenly spaced samples).
- The cosine head, its prototype initialisation and task-local CE are the spec's transplant (§8), not KeepLoRA.
- Classifier alignment (protocol.md §8, an optional ablation, not part of KeepLoRA) is not implemented.
- The official MTIL trainer stored in the search index (commit 7abf7ec) zeroes B after the SVD, so its shift
  is a no-op there (B_0 = 0, like LLaVA); this file follows the spec (B_0 = S V^T with the shift), and
  b0_init = 'zero' gives the other variant.

Run: python train.py --method keep_lora --tasks 10
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
    rank: int = 16
    """LoRA rank r (MTIL vision: 16)"""
    alpha: float = 1.0
    """LoRA alpha; the adapter scale is s = alpha / rank (MTIL: alpha 1, s = 1/16; LLaVA: alpha = r/4)"""
    targets: str = "qkvo"
    """adapted matrices of every block, any of q, k, v (slices of the fused qkv) and o (attn.proj) [CODE]"""
    eps_w: float = 0.85
    """energy threshold of the pretrained weight basis W_p (MTIL vision 0.85; <= 1e-8: no W_p)"""
    eps_f: float = 0.99
    """energy threshold of the task-feature basis growth (MTIL 0.99; spec sweeps 0.95, 0.97, 0.99)"""
    feature_mode: str = "covariance"
    """task features: 'covariance' (sum of x x^T over all tokens, the paper's reading) or 'official_mean' (MTIL)"""
    weight_basis_side: str = "input"
    """W_p from the input-space ('input', paper and LLaVA) or output-space ('output', MTIL) singular vectors"""
    threshold_rule: str = "official"
    """W_p size: 'official' p = max(1, #{cumulative energy < eps_w}); 'paper' the first p reaching eps_w"""
    b0_init: str = "svd"
    """'svd': B_0 = S_r V_r^T with the weight shift (paper, MTIL); 'zero': B_0 = 0, no shift (LLaVA code)"""
    grad_fraction: float = 1.0
    """share of the task's batches (evenly spaced) in the gradient estimate (MTIL: 1; LLaVA: 0.2)"""
    head_scale: float = 30.0
    """scale tau of the per-task cosine head (the KeepLoRA+ head, spec §8)"""
    lr: float = 1e-3
    """AdamW learning rate, also OneCycleLR's max_lr (MTIL)"""
    weight_decay: float = 0.01
    """AdamW weight decay on B and the head (MTIL)"""
    epochs: int = 10
    """epochs per task (MTIL: about 10 per dataset)"""
    batch_size: int = 64
    """training batch size (MTIL)"""


CHOICES = {"feature_mode": ("covariance", "official_mean"), "weight_basis_side": ("input", "output"),
           "threshold_rule": ("official", "paper"), "b0_init": ("svd", "zero")}

# ----------------------------------------------------------------------------------------------------
# LoRA


class Site(nn.Module):
    """One adapted matrix W (d_out x d_in): delta(x) = s (x A) B, and its protected basis Q[:, :k]."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("A", torch.zeros(d_in, rank), persistent=False)  # frozen down factor (K11)
        self.B = nn.Parameter(torch.zeros(rank, d_out))  # the only trained tensor of the adapter
        self.register_buffer("Q", torch.zeros(d_in, d_in))  # columns [:k] = [W_p, M_t], fixed shape
        self.register_buffer("k", torch.zeros((), dtype=torch.long))
        self.rank_used = 0  # effective rank of this task (K6), for the log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.A) @ self.B  # Eq. 1

    def basis(self) -> torch.Tensor:
        """The protected basis, (d_in, k), orthonormal columns."""
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
    """The sites reading one input: q, k, v read norm1(h) (`qkv_adapter`); o reads proj's input (`out_adapter`).

    While `stats` is set (end_task), every input passing through is added to it. While `active` is False
    (between tasks, after the merge), the adapter adds nothing.
    """

    def __init__(self, d: int, rank: int, scale: float, names: str):
        super().__init__()
        self.sites = nn.ModuleDict({m: Site(d, d, rank, scale) for m in names})
        self.stats: FeatureStats | None = None
        self.active = False

    def forward(self, x: torch.Tensor):
        if self.stats is not None:
            self.stats.add(x)
        deltas = {m: site(x) for m, site in self.sites.items()} if self.active else {}
        if "o" in self.sites:  # the out_adapter slot takes a tensor
            return deltas.get("o", x.new_zeros(()))
        return deltas


class CosineHead(nn.Module):
    """logits = tau cos(f, w_c) for the classes of one task (the KeepLoRA+ head, spec §8)."""

    def __init__(self, d: int, n: int, tau: float):
        super().__init__()
        self.tau = tau
        self.weight = nn.Parameter(torch.zeros(n, d))  # class means written in begin_task

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.tau * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).T  # Eq. 8


# ----------------------------------------------------------------------------------------------------
# Method


class KeepLoRA(nn.Module):
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
        if not (cfg.lr > 0 and cfg.alpha > 0 and cfg.head_scale > 0):
            raise ValueError("lr, alpha and head_scale must be positive")
        if cfg.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
        if not (0 <= cfg.eps_w <= 1 and 0 < cfg.eps_f <= 1):
            raise ValueError(f"eps_w must be in [0, 1] and eps_f in (0, 1], got {cfg.eps_w} and {cfg.eps_f}")
        if not 0 < cfg.grad_fraction <= 1:
            raise ValueError(f"grad_fraction must be in (0, 1], got {cfg.grad_fraction}")
        if cfg.epochs < 0 or cfg.batch_size < 1:
            raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {cfg.epochs} and {cfg.batch_size}")
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        for p in vit.parameters():
            p.requires_grad_(False)
        r, s = cfg.rank, cfg.alpha / cfg.rank
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
        with torch.no_grad(), torch.autocast(self.vit.cls_token.device.type, enabled=False):
            for _, _, site in self.sites():
                site.reset()  # step 1: A, B <- 0 (they already are after a merge)
            for a in self.adapters():
                a.active = False  # the prototypes and the gradient see the plain (merged) backbone
            if t == 0:
                self.init_weight_bases()  # Q <- W_p, once, from the pretrained weights
            # step 2 (K5): the head starts at the normalised class means, before the gradient is estimated
            self.heads[t].weight.copy_(F.normalize(class_means(self.vit, data.plain, classes), dim=1))
        grads = self.estimate_gradient(data.plain)  # step 3, adapters off
        self.init_from_gradient(grads)  # steps 4-6
        ks = [int(site.k) for _, _, site in self.sites()]
        ranks = [site.rank_used for _, _, site in self.sites()]
        print(f"keep_lora task {t}: protected dims {min(ks)}-{max(ks)} of {self.vit.embed_dim} "
              f"(mean {sum(ks) / len(ks):.1f}), LoRA rank {min(ranks)}-{max(ranks)} of {self.cfg.rank}")

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]  # every B and head t (K-I12)
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.cfg.lr,  # beta_1 cycles 0.85-0.95 (K9)
                                                    total_steps=max(1, self.cfg.epochs * steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        K_t = self.offsets[-2]
        return F.cross_entropy(self.head_logits(self.heads[-1], self.vit(x)), y - K_t)  # task-local CE

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        self.merge()  # step 8
        self.heads[t].requires_grad_(False)
        self.grow_bases(data.plain)  # steps 9-10, with the merged model
        ks = [int(site.k) for _, _, site in self.sites()]
        print(f"keep_lora task {t}: bases grown to {min(ks)}-{max(ks)} of {self.vit.embed_dim} "
              f"(mean {sum(ks) / len(ks):.1f})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.vit(x)
        return torch.cat([self.head_logits(h, f) for h in self.heads], dim=1)

    # -- helpers ---------------------------------------------------------------------------------
    def adapters(self) -> list[Adapter]:
        return [a for blk in self.vit.blocks for a in (blk.attn.qkv_adapter, blk.attn.out_adapter) if a is not None]

    def sites(self) -> list[tuple[nn.Module, str, Site]]:
        """(attn, name, site) for every adapted matrix, in block order (q, k, v, then o)."""
        return [(blk.attn, m, site) for blk in self.vit.blocks
                for a in (blk.attn.qkv_adapter, blk.attn.out_adapter) if a is not None
                for m, site in a.sites.items()]

    @staticmethod
    def head_logits(head: nn.Module, f: torch.Tensor) -> torch.Tensor:
        with torch.autocast(f.device.type, enabled=False):  # the head in float32
            return head(f.float())

    @torch.no_grad()
    def init_weight_bases(self) -> None:
        """Q <- W_p(eps_w) for every matrix (spec §4a)."""
        c = self.cfg
        for attn, m, site in self.sites():
            W, rows = target(attn, m)
            site.set_basis(weight_basis(W[rows].double(), c.eps_w, c.weight_basis_side, c.threshold_rule))

    def estimate_gradient(self, loader) -> dict[torch.Tensor, torch.Tensor]:
        """Mean over the task's batches of dL/dW for every adapted weight tensor (float64), adapters off."""
        device, K_t = self.vit.cls_token.device, self.offsets[-2]
        weights = [attn.qkv.weight if m in "qkv" else attn.proj.weight for attn, m, _ in self.sites()]
        weights = list({id(w): w for w in weights}.values())
        sums = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
        n = 0
        for w in weights:
            w.requires_grad_(True)
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                for x, y in task_batches(loader, self.cfg.grad_fraction, drop_last=True):
                    logits = self.head_logits(self.heads[-1], self.vit(x.to(device)))
                    loss = F.cross_entropy(logits, y.to(device) - K_t)
                    for s, g in zip(sums, torch.autograd.grad(loss, weights)):
                        s += g.double()
                    n += 1
        finally:
            for w in weights:
                w.requires_grad_(False)
        return {w: s / max(n, 1) for w, s in zip(weights, sums)}  # Eq. 3 (mean of per-batch gradients)

    @torch.no_grad()
    def init_from_gradient(self, grads: dict[torch.Tensor, torch.Tensor]) -> None:
        """A, B_0 from the residual gradient; W shifted so that the function is unchanged (steps 4-6)."""
        for attn, m, site in self.sites():
            W, rows = target(attn, m)
            G = grads[W][rows].T  # d_in x d_out, the transpose of PyTorch's weight gradient
            A, B0, site.rank_used = residual_lora_init(G, site.basis().double(), self.cfg.rank)  # Eqs. 3-4
            site.A.copy_(A)
            if self.cfg.b0_init == "svd":
                site.B.copy_(B0)
                W[rows] -= (site.scale * A @ B0).T.to(W.dtype)  # Eq. 5
        for a in self.adapters():
            a.active = True

    @torch.no_grad()
    def merge(self) -> None:
        """W^T <- W^T + s A B, then A, B <- 0 and the adapters off: the function is unchanged (Eq. 6)."""
        for attn, m, site in self.sites():
            W, rows = target(attn, m)
            W[rows] += (site.scale * site.A.double() @ site.B.double()).T.to(W.dtype)  # Eq. 6
            site.reset()
        for a in self.adapters():
            a.active = False

    @torch.no_grad()
    def grow_bases(self, loader) -> None:
        """Collect every input site's features with the current (merged) model and grow its bases (Eq. 7)."""
        device = self.vit.cls_token.device
        adapters = self.adapters()
        for a in adapters:
            a.stats = FeatureStats(self.cfg.feature_mode)
        try:
            with torch.autocast(device.type, enabled=False):
                for x, _ in task_batches(loader):
                    self.vit(x.to(device))
            for a in adapters:
                C = a.stats.gram()  # q, k, v read the same input: one C for the three
                for site in a.sites.values():
                    site.set_basis(grow_basis(site.basis().double(), C, self.cfg.eps_f))
        finally:
            for a in adapters:
                a.stats = None


Method = KeepLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def target(attn: nn.Module, m: str) -> tuple[torch.Tensor, slice]:
    """The weight tensor holding matrix m and its rows: q, k, v are row blocks of the fused qkv, o is proj."""
    if m == "o":
        return attn.proj.weight, slice(None)
    return attn.qkv.weight, qkv_rows(m, attn.proj.weight.shape[0])


def weight_basis(W: torch.Tensor, eps: float, side: str = "input", rule: str = "official") -> torch.Tensor:
    """W_p (spec §4a, Eq. 2): leading singular vectors of W (d_out x d_in) holding the energy share eps.

    side 'input': right singular vectors (columns in R^{d_in}); 'output': left ones (MTIL; square W only).
    rule 'official': p = max(1, #{j : cumulative energy of the first j < eps}) (energy just below eps);
    'paper': the smallest p whose cumulative energy reaches eps. eps <= 1e-8 gives an empty basis.
    """
    d_out, d_in = W.shape
    if eps <= 1e-8:
        return W.new_zeros(d_in, 0)
    if side == "output" and d_out != d_in:
        raise ValueError("weight_basis_side 'output' needs a square weight")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    share = (S**2).cumsum(0) / (S**2).sum()
    below = int((share < eps).sum())
    p = max(1, below) if rule == "official" else min(below + 1, len(S))
    return (Vh.T if side == "input" else U)[:, :p]  # Eq. 2


def residual_lora_init(G: torch.Tensor, Q: torch.Tensor, rank: int, tol: float = 1e-8):
    """A (d_in x rank), B_0 (rank x d_out) from G_hat = G - Q Q^T G (Eqs. 3-4); returns (A, B_0, r_used).

    Only the first r_used = min(rank, d_in - k, numerical rank of G_hat) columns of A are non-zero (K6/K13);
    r_used = 0 if G_hat holds no more than `tol` of G's energy. A is orthonormal and orthogonal to Q.
    """
    d_in, d_out = G.shape
    A, B0 = G.new_zeros(d_in, rank), G.new_zeros(rank, d_out)
    G_hat = G - Q @ (Q.T @ G)  # Eq. 3
    if G_hat.square().sum() <= tol * G.square().sum() or Q.shape[1] >= d_in:
        return A, B0, 0
    U, S, _ = torch.linalg.svd(G_hat, full_matrices=False)  # Eq. 4
    r = min(rank, d_in - Q.shape[1], int((S > tol * S[0]).sum()))
    Ur = U[:, :r]
    for _ in range(2):  # rounding guard: no direction of span(Q) may enter A
        Ur = Ur - Q @ (Q.T @ Ur)
    Ur = torch.linalg.qr(Ur).Q
    A[:, :r] = Ur
    B0[:r] = Ur.T @ G_hat  # = diag(S[:r]) V[:, :r]^T up to the signs of A's columns
    return A, B0, r


def grow_basis(Q: torch.Tensor, C: torch.Tensor, eps: float) -> torch.Tensor:
    """GPM growth (spec §4b, Eq. 7): Q (d x k, orthonormal) and C = R R^T (d x d) -> [Q, U_hat[:, :m]]."""
    d, k = Q.shape
    E = torch.trace(C)
    if E <= 0 or k >= d:
        return Q
    P = torch.eye(d, dtype=C.dtype, device=C.device) - Q @ Q.T
    C_hat = P @ C @ P
    C_hat = (C_hat + C_hat.T) / 2
    c0 = float((E - torch.trace(C_hat)) / E)  # energy share already captured
    if c0 >= eps:
        return Q
    lam, U = torch.linalg.eigh(C_hat)
    lam, U = lam.flip(0).clamp_min(0), U.flip(1)  # descending: s_hat_i^2 and U_hat
    reach = c0 + lam.cumsum(0) / E
    m = int((reach < eps).sum()) + 1  # the smallest m with c0 + sum_{i<=m} s_hat_i^2 / E >= eps
    m = min(m, d - k, int((lam > 1e-12 * lam[0]).sum()))
    if m <= 0:
        return Q
    new = U[:, :m]
    for _ in range(2):
        new = new - Q @ (Q.T @ new)
    return torch.cat([Q, torch.linalg.qr(new).Q], dim=1)  # Eq. 7


class FeatureStats:
    """The feature matrix of one input site over a task (spec §4c), kept as C = R R^T (d x d, float64).

    'covariance': C = sum over every token x of x x^T.
    'official_mean': R = mean_b X_b^T / N_b, X_b the (N_b x d) token rows of batch b (MTIL's running average of
    X_b^T); batches whose row count differs from the first are skipped (drop_last).
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.total: torch.Tensor | None = None
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        X = x.detach().reshape(-1, x.shape[-1]).double()
        if self.mode == "covariance":
            self.total = X.T @ X if self.total is None else self.total + X.T @ X
        elif self.total is None:
            self.total, self.batches = X.T.clone(), 1
        elif X.shape[0] == self.total.shape[1]:
            self.total += X.T
            self.batches += 1

    def matrix(self) -> torch.Tensor:
        """C ('covariance') or R ('official_mean')."""
        if self.mode == "covariance":
            return self.total
        return self.total / (self.batches * self.total.shape[1])

    def gram(self) -> torch.Tensor:
        M = self.matrix()
        return M if self.mode == "covariance" else M @ M.T


def task_batches(loader, fraction: float = 1.0, drop_last: bool = False):
    """The loader's batches; fraction < 1 keeps evenly spaced ones; drop_last skips a short batch after the first."""
    n = len(loader)
    keep = set(torch.linspace(0, n - 1, max(1, math.ceil(fraction * n))).round().long().tolist())
    size = None
    for i, (x, y) in enumerate(loader):
        if i not in keep or (drop_last and size is not None and len(y) != size):
            continue
        size = len(y) if size is None else size
        yield x, y


@torch.no_grad()
def class_means(encoder: nn.Module, loader, classes: list[int]) -> torch.Tensor:
    """Mean feature of every class in `classes` (rows in that order) over one pass of `loader`."""
    lo = classes[0]
    sums, counts = None, torch.zeros(len(classes), dtype=torch.float64)
    was_training = encoder.training
    encoder.eval()
    for x, y in loader:
        f = encoder(x.to(_device(encoder))).double().cpu()
        if sums is None:
            sums = torch.zeros(len(classes), f.shape[1], dtype=torch.float64)
        sums.index_add_(0, y - lo, f)
        counts.index_add_(0, y - lo, torch.ones(len(y), dtype=torch.float64))
    encoder.train(was_training)
    assert (counts > 0).all(), "a class of the task has no training image"
    return (sums / counts[:, None]).float()


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device
