"""InfLoRA: interference-free low-rank adaptation, with DualGPM memory and optional classifier alignment.

Paper: Liang and Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024,
arXiv 2404.00228. Official code: liangyanshuo/InfLoRA @ e08b00e (`methods/inflora.py`: design of A and
`update_DualGPM`; `models/vit_inflora.py`: the per-layer input statistic; `methods/inflora_ca.py`,
`inflora_ca1.py`: classifier alignment and plain `update_GPM`). Spec: ../shared/specs/baselines.md §4, §7,
§8; classifier alignment: ../shared/specs/protocol.md §8 (preset `inflora_ca`).

Implements (notation of baselines.md: A = down (r x d), designed and frozen; B = up (d x r), trained. The
paper swaps the names: its "B_t" is our A_t. The anchors (1)-(4) number the equations below and follow
baselines.md §4.1, §4.3, §4.5; the paper's own equation numbers were not checked against its text):
    W_m^(t) = W_m + sum_{s<=t} B_s^m A_s,  m in {k, v}, one A_s per block shared by k and v   # (1)
    M_t = (1/n) sum_x x x^T over every token x of LN1's output on the task's training images  (§4.2)
    M_hat = M_t (t = 0) | (I - P P^T) M_t ('remove') | Q Q^T M_t ('retain')                  # (2)
    A_t = U_hat[:, :r]^T / sqrt(3),  M_hat = U_hat S_hat V_hat^T                             # (3)
    train only B_t^k, B_t^v and head h_t with CE(h_t(f(x)), y - K_t); A_t and all s < t frozen
    DualGPM after task t (§4.5): eps_t = lamb + (lame - lamb) t / T; energy of a singular value s of M is
    s^(p/2) with p = energy_power (4: the code's s^2 = sigma(H)^4; 2: the paper's sigma(H)^2);
    'remove' appends top directions of (I - P P^T) M until the captured fraction >= eps_t, 'retain' drops
    top directions of Q Q^T M from Q while the residual fraction >= 1 - eps_t; a 'remove' basis wider than
    d/2 is replaced by its complement ('retain').                                            # (4)
    inference: sum of all branches, heads concatenated, argmax (no task id)
    optional classifier alignment (--ca, SLCA style, protocol.md §8 preset `inflora_ca`) after task t >= 1:
    class means/covariances of f(x) (test transforms) frozen at their task; 5 epochs of SGD 0.01 (momentum
    0.9, wd 5e-4, cosine T_max 5) on all heads with 256 samples per class from N(gamma_c mu_c, Sigma_c +
    1e-4 I), gamma_c = 0.9 + 0.1 (t_c + 1)/(t + 1); CE on z / (tau * mean per-task block norm), tau = 0.1.
Defaults (official CIFAR-100 config `cifar100_inflora.json`): r = 10 on K and V of every block; Adam (0.9,
0.999), lr 5e-4, wd 0, batch 128, 20 epochs, epoch-level cosine cos(99 pi e / (200 (E - 1)));
lamb 0.95, lame 1.0; energy_power 4 (the code); memory 'auto' = DualGPM, or plain GPM with --ca (I7).
T, the total task count of the schedule, is the Config field `total_tasks`; 0 (default) derives it as
ceil(num_classes / |task 0|), exact for equal tasks and for a smaller remainder task last.

Deviations:
- First-task 'retain' branch stores the complement U[:, k:] (pitfall I3; the code stores U[:, :k]).
- Numerical hygiene: memory updates never take directions of M_hat with a (numerically) zero singular
  value (the code would only when eps_t >= 1), and the appended directions are re-orthogonalised against
  the stored basis. Statistics and memory are float64 (the code: float32 statistic, numpy SVD).
- energy_power = 2 uses the paper's sigma(H)^2 weighting on the singular values of the code's projected
  matrix (I - P P^T) M; this equals the GPM / paper criterion for the first task; for later tasks the
  paper's sigma((I - P P^T) H)^2 are the eigenvalues of (I - P P^T) M (I - P P^T), slightly different.
- Heads are sized per task (I8). The K-means task keys of the code (unused at inference) are omitted.
- Branches are summed one by one (sum_s B_s (A_s x)), not through the code's dense sum_s B_s A_s, so that
  a new zero branch leaves outputs bit-identical; `merge()` folds them into W when wanted.
- CA: Sigma_c is stored in float32 (sampled in float32 as the code does); the alignment runs only for
  t >= 1, as in the code. inflora_ca.py turns the logit norm off on CIFAR-100, inflora_ca1.py (the CIFAR
  config's class) keeps tau = 0.1: we follow protocol.md (tau = 0.1; --ca-logit-norm 0 turns it off).
  Heads are kept after alignment (no restore). CA samples with torch's global generator (seeded by train.py).
  --ca keeps InfLoRA's own training recipe; the official CIFAR CA config (`cifar100_infloraca.json`) also
  changes it (SGD 1e-3, heads 1e-2, wd 1e-3, step decay at epoch 18, r = 5) and inflora_ca1.py replaces
  the pretrained final LayerNorm by a fresh one on CIFAR; neither is reproduced.

Run: python train.py --method inflora --tasks 10          (InfLoRA+CA: add --ca; InfLoRA-b5: --blocks 5)
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
    """rank r of every task's branch (InfLoRA: 10)"""
    targets: str = "kv"
    """adapted slices of the fused qkv; all share the designed A (InfLoRA: k and v)"""
    blocks: int = 0
    """adapt only the first N blocks (0: all; InfLoRA-b5: 5 of ViT-B's 12, 3 of the small ViT's 6)"""
    lamb: float = 0.95
    """threshold of the first task, eps_0 (CIFAR-100 0.95, ImageNet-R 0.98)"""
    lame: float = 1.0
    """threshold end point: eps_t = lamb + (lame - lamb) t / T (official: 1.0)"""
    total_tasks: int = 0
    """T in the threshold schedule (0: ceil(num_classes / size of the first task))"""
    energy_power: int = 4
    """energy of the memory criterion in powers of sigma(H): 4 (official code) or 2 (paper, GPM)"""
    memory: str = "auto"
    """'dualgpm' (inflora.py), 'gpm' (always 'remove'; inflora_ca.py) or 'auto' (gpm with --ca, else dualgpm)"""
    lr: float = 5e-4
    """Adam learning rate (InfLoRA config)"""
    weight_decay: float = 0.0
    """Adam weight decay (InfLoRA config)"""
    epochs: int = 20
    """epochs per task (InfLoRA CIFAR-100 config)"""
    batch_size: int = 128
    """training batch size (InfLoRA config)"""
    ca: bool = False
    """classifier alignment after every task t >= 1 (InfLoRA+CA, reported separately)"""
    ca_epochs: int = 5
    """alignment epochs (inflora_ca.py: 5)"""
    ca_lr: float = 0.01
    """alignment SGD learning rate (momentum 0.9, cosine over the alignment epochs)"""
    ca_weight_decay: float = 5e-4
    """alignment SGD weight decay"""
    ca_samples: int = 256
    """Gaussian samples per class and epoch, also the alignment batch size (SLCA: 256)"""
    ca_shrink: float = 1e-4
    """covariance shrinkage delta: Sigma_c + delta I"""
    ca_logit_norm: float = 0.1
    """tau of the per-task logit normalisation (0: plain CE)"""


CHOICES = {"memory": ("auto", "dualgpm", "gpm")}

# ----------------------------------------------------------------------------------------------------
# LoRA


class QKVLoRA(nn.Module):
    """Per-task branches on the slices m of one block's fused qkv: delta_m = sum_s B_s^m (A_s x).

    Also holds the layer's subspace memory (a fixed-shape d x d basis whose first `width` columns are used,
    and the mode 0 = 'remove' / 1 = 'retain') and, while `recording`, accumulates sum_x x x^T of its input.
    """

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.d, self.rank, self.targets = d, rank, targets
        self.A = nn.ParameterList()  # designed down-projections (r, d), one per task, frozen
        self.B = nn.ModuleList()  # per task: {m: (d, r)} up-projections, trained during their task only
        self.register_buffer("basis", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("width", torch.zeros((), dtype=torch.long))
        self.register_buffer("mode", torch.zeros((), dtype=torch.long))
        self.recording = False
        self.moment, self.count = None, 0

    def grow(self) -> None:
        device = self.basis.device
        self.A.append(nn.Parameter(torch.zeros(self.rank, self.d, device=device), requires_grad=False))
        self.B.append(nn.ParameterDict({m: nn.Parameter(torch.zeros(self.d, self.rank, device=device))
                                        for m in self.targets}))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.recording:  # §4.2: running sum of x x^T over all tokens
            xf = x.detach().reshape(-1, self.d).double()
            self.moment = self.moment + xf.T @ xf
            self.count += xf.shape[0]
        delta = {m: 0 for m in self.targets}
        for A, B in zip(self.A, self.B):  # Eq. (1), branch by branch
            h = F.linear(x, A)
            for m in self.targets:
                delta[m] = delta[m] + F.linear(h, B[m])
        return delta

    def stored(self) -> torch.Tensor:
        return self.basis[:, : int(self.width)]

    def delta_weight(self, m: str) -> torch.Tensor:
        return sum(B[m] @ A for A, B in zip(self.A, self.B))


# ----------------------------------------------------------------------------------------------------
# Method


class InfLoRA(nn.Module):
    def __init__(self, vit: ViT, num_classes: int, cfg: Config):
        super().__init__()
        d, depth = vit.embed_dim, len(vit.blocks)
        if not 1 <= cfg.rank <= d:
            raise ValueError(f"--rank must be in [1, {d}] (the width), got {cfg.rank}")
        if not cfg.targets or not set(cfg.targets) <= set("qkv") or len(set(cfg.targets)) != len(cfg.targets):
            raise ValueError(f"--targets must be distinct letters of q, k, v (got '{cfg.targets}')")
        if not 0 <= cfg.blocks <= depth:
            raise ValueError(f"--blocks must be in [0, {depth}] (0: all), got {cfg.blocks}")
        if not 0 < cfg.lamb <= cfg.lame <= 1:
            raise ValueError(f"thresholds need 0 < lamb <= lame <= 1 (got lamb {cfg.lamb}, lame {cfg.lame})")
        if cfg.energy_power not in (2, 4):
            raise ValueError(f"--energy-power must be 4 (official code) or 2 (paper), got {cfg.energy_power}")
        if cfg.total_tasks < 0:
            raise ValueError(f"--total-tasks must be >= 0 (0: derived), got {cfg.total_tasks}")
        if cfg.memory not in CHOICES["memory"]:
            raise ValueError(f"--memory must be one of {', '.join(CHOICES['memory'])}, got '{cfg.memory}'")
        if cfg.ca and (cfg.ca_epochs < 1 or cfg.ca_samples < 1 or cfg.ca_lr <= 0 or cfg.ca_shrink < 0
                       or cfg.ca_logit_norm < 0 or cfg.ca_weight_decay < 0):
            raise ValueError("classifier alignment needs ca_epochs, ca_samples >= 1, ca_lr > 0 and "
                             "ca_shrink, ca_logit_norm, ca_weight_decay >= 0")
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        self.dual = cfg.memory == "dualgpm" or (cfg.memory == "auto" and not cfg.ca)  # I7
        for p in vit.parameters():
            p.requires_grad_(False)
        n_blocks = cfg.blocks or depth
        mods = attach(vit, "qkv_adapter", lambda i, attn: QKVLoRA(d, cfg.rank, cfg.targets) if i < n_blocks else None)
        self.loras = nn.ModuleList(m for m in mods if m is not None)
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        self.T = cfg.total_tasks
        if cfg.ca:  # class statistics of the alignment, frozen at their task (fixed shapes for resume)
            self.register_buffer("ca_mean", torch.zeros(num_classes, d, dtype=torch.float64))
            self.register_buffer("ca_cov", torch.zeros(num_classes, d, d))

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        if t == 0 and self.cfg.total_tasks == 0:
            self.T = math.ceil(self.num_classes / len(classes))
        device = self.vit.cls_token.device
        self.heads.append(nn.Linear(self.vit.embed_dim, len(classes)).to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for lora in self.loras:
            lora.grow()
            for s, B in enumerate(lora.B):
                B.requires_grad_(s == t)
        for s, h in enumerate(self.heads):
            h.requires_grad_(s == t)

    @torch.no_grad()
    def begin_task(self, t: int, classes: list[int], data) -> None:
        ranks = []
        for lora, M in zip(self.loras, self.input_moments(data.train)):
            M_hat = M if t == 0 else project(M, lora.stored(), int(lora.mode))  # Eq. (2)
            A, rank = design_down(M_hat, self.cfg.rank)  # Eq. (3)
            lora.A[t].copy_(A)
            ranks.append(rank)
        print(f"[inflora] task {t + 1}: designed A_t; numerical rank of M_hat per block "
              f"{' '.join(map(str, ranks))} (r = {self.cfg.rank})")

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        K_t = self.offsets[-2]
        return F.cross_entropy(self.heads[-1](self.vit(x)), y - K_t)

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        for p in self.parameters():  # task t is finished: freeze its branch and head
            p.requires_grad_(False)
            p.grad = None
        eps = threshold(t, self.T, self.cfg.lamb, self.cfg.lame)
        for lora, M in zip(self.loras, self.input_moments(data.train)):  # M with the trained branches <= t
            P, mode = memory_update(M, lora.stored(), int(lora.mode), eps, self.cfg.energy_power,
                                    first=t == 0, dual=self.dual)  # Eq. (4)
            lora.basis.zero_()
            lora.basis[:, : P.shape[1]] = P
            lora.width.fill_(P.shape[1])
            lora.mode.fill_(mode)
        widths = " ".join(f"{int(l.width)}{'R' if int(l.mode) else ''}" for l in self.loras)
        print(f"[inflora] task {t + 1}: eps_t {eps:.4f}, memory width per block {widths} (R: 'retain' complement)")
        if self.cfg.ca:
            mean, cov = class_statistics(self.vit, data.plain, classes)
            self.ca_mean[classes] = mean
            self.ca_cov[classes] = cov.float()
            if t >= 1:
                with torch.enable_grad():
                    self.align_heads(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.vit(x))

    # -- helpers ---------------------------------------------------------------------------------
    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    @torch.no_grad()
    def input_moments(self, loader) -> list[torch.Tensor]:
        """M = (1/n) sum x x^T (float64) of every adapted block's attention input, over one pass of loader."""
        was_training = self.vit.training
        self.vit.eval()
        for lora in self.loras:
            lora.recording, lora.moment, lora.count = True, torch.zeros(lora.d, lora.d, dtype=torch.float64,
                                                                        device=lora.basis.device), 0
        device = self.vit.cls_token.device
        try:
            with torch.autocast(device_type=device.type, enabled=False):
                for x, _ in loader:
                    self.vit(x.to(device))
            return [lora.moment / max(lora.count, 1) for lora in self.loras]
        finally:
            for lora in self.loras:
                lora.recording, lora.moment = False, None
            self.vit.train(was_training)

    def align_heads(self, t: int) -> None:
        """SLCA-style classifier alignment (protocol.md §8): only the heads h_0..h_t change."""
        cfg, C, d = self.cfg, self.offsets[-1], self.vit.embed_dim
        device = self.ca_mean.device
        sizes = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        gamma = mean_decay(torch.arange(t + 1).repeat_interleave(torch.tensor(sizes)), t)
        eye = torch.eye(d, dtype=torch.float64, device=device)
        tril = torch.linalg.cholesky(self.ca_cov[:C].double() + cfg.ca_shrink * eye).float()  # Sigma_c + delta I
        means = (gamma.to(device)[:, None] * self.ca_mean[:C]).float()
        params = [p for h in self.heads for p in h.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ca_epochs)
        n = cfg.ca_samples
        with torch.autocast(device_type=device.type, enabled=False):
            for _ in range(cfg.ca_epochs):
                feats, labels = gaussian_replay(means, tril, n)
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
    def merge(self) -> None:
        """Fold sum_s B_s A_s into the qkv weights and zero every B: the function is unchanged."""
        d = self.vit.embed_dim
        for blk, lora in zip(self.vit.blocks, self.loras):
            for m in lora.targets:
                blk.attn.qkv.weight[qkv_rows(m, d)] += lora.delta_weight(m)
            for B in lora.B:
                for b in B.values():
                    b.zero_()


Method = InfLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def inflora_cosine(epochs: int, steps_per_epoch: int):
    """InfLoRA's epoch-level cosine, as a per-step multiplier: cos(99 pi e / (200 (E - 1))), e = epoch."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 1.0 if epochs <= 1 else math.cos(99 * math.pi * min(e, epochs - 1) / (200 * (epochs - 1)))
    return factor


def threshold(t: int, T: int, lamb: float, lame: float) -> float:
    """eps_t = lamb + (lame - lamb) t / T, t 0-indexed (official update_DualGPM)."""
    return lamb + (lame - lamb) * t / max(T, 1)


def project(M: torch.Tensor, P: torch.Tensor, mode: int) -> torch.Tensor:
    """(I - P P^T) M in 'remove' mode (0), P P^T M in 'retain' mode (1; P is then the complement Q)."""
    return M - P @ (P.T @ M) if mode == 0 else P @ (P.T @ M)  # Eq. (2)


def design_down(M_hat: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """A = U_hat[:, :r]^T / sqrt(3) from the thin SVD of M_hat; also the numerical rank of M_hat (I6)."""
    U, S, _ = torch.linalg.svd(M_hat)
    tol = S.max() * max(M_hat.shape) * torch.finfo(S.dtype).eps
    return U[:, :rank].T / math.sqrt(3), int((S > tol).sum())  # Eq. (3)


def memory_update(M: torch.Tensor, P: torch.Tensor, mode: int, eps: float, power: int,
                  first: bool, dual: bool = True) -> tuple[torch.Tensor, int]:
    """One DualGPM (dual) or GPM step of a layer. M: d x d statistic of the finished task; P: stored
    orthonormal columns; mode 0 = 'remove' (P spans the old space), 1 = 'retain' (P spans its complement).
    Returns the new basis and mode. The energy of a singular value s is s^(power/2)."""
    d = M.shape[0]
    U, S, _ = torch.linalg.svd(M)
    total = (S ** (power / 2)).sum()
    tol = S.max() * d * torch.finfo(S.dtype).eps  # singular values at or below are numerically zero
    if first:
        k = int(((S ** (power / 2)).cumsum(0) / total < eps).sum())  # Eq. (4), first task
        if not dual or k < d / 2:
            P, mode = U[:, : max(k, 1)], 0
        else:
            P, mode = U[:, k:], 1  # I3: the complement of the top-k space
    elif mode == 0:
        Uh, Sh, _ = torch.linalg.svd(project(M, P, 0))
        e = Sh ** (power / 2) / total
        a, k = 1 - e.sum(), 0  # Eq. (4): captured fraction of the stored space
        while k < d and a < eps and Sh[k] > tol:
            a, k = a + e[k], k + 1
        if k > 0:
            new = Uh[:, :k] - P @ (P.T @ Uh[:, :k])  # re-orthogonalise against P (numerical hygiene)
            P = torch.cat([P, torch.linalg.qr(new).Q], dim=1)[:, :d]
    else:
        Uh, Sh, _ = torch.linalg.svd(project(M, P, 1))
        e = Sh ** (power / 2) / total
        a, k = e.sum(), 0  # residual fraction in the free space
        while k < P.shape[1] and a >= 1 - eps and Sh[k] > tol:
            a, k = a - e[k], k + 1
        if k > 0:
            Ui, _, _ = torch.linalg.svd(P - Uh[:, :k] @ (Uh[:, :k].T @ P))
            P = Ui[:, : P.shape[1] - k]
    if dual and mode == 0 and P.shape[1] > d / 2:  # switch: keep the narrower complement
        Ui, _, _ = torch.linalg.svd(P)
        P, mode = Ui[:, P.shape[1]:], 1
    return P, mode


@torch.no_grad()
def class_statistics(encoder: nn.Module, loader, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (float64) and unbiased covariance (float64) of f(x) for every class of `classes`, in order."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats, ys = [], []
    with torch.autocast(device_type=device.type, enabled=False):
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


def mean_decay(task_of: torch.Tensor, t: int) -> torch.Tensor:
    """gamma_c = 0.9 + 0.1 (t_c + 1) / (t + 1) for a class introduced by task t_c; the newest task gets 1."""
    return 0.9 + 0.1 * (task_of + 1).double() / (t + 1)


def gaussian_replay(means: torch.Tensor, trils: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples per class c from N(means[c], trils[c] trils[c]^T), torch's global generator; labels c."""
    C, d = means.shape
    z = torch.randn(C, n, d, device=means.device, dtype=means.dtype)
    x = means[:, None, :] + z @ trils.transpose(1, 2)
    return x.reshape(C * n, d), torch.arange(C, device=means.device).repeat_interleave(n)


def task_normalised(z: torch.Tensor, sizes: list[int], tau: float) -> torch.Tensor:
    """z / (tau * mean_s ||z_{C_s}||_2): the per-task logit normalisation of SLCA / InfLoRA-CA."""
    norms = torch.stack([b.norm(dim=1) + 1e-7 for b in z.split(sizes, dim=1)], dim=1).mean(1, keepdim=True)
    return z / norms / tau
