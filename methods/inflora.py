"""InfLoRA: interference-free low-rank adaptation, with DualGPM memory and optional classifier alignment.

Paper: Liang and Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024,
arXiv 2404.00228. Official code: liangyanshuo/InfLoRA @ e08b00e; line numbers below are at that commit
(`methods/inflora.py` unless another file is named). Where this file departs from it: "Deviations" below.

Implements (A = down-projection r x d, designed, frozen; B = up-projection d x r, trained; the paper's B_t is our A_t):
 (1) W_m^(t) = W_m + sum_{s<=t} B_s^m A_s, m in {k, v}, one A_s per block shared by k and v
        (models/vit_inflora.py L191-194, L246-247; A copied to k and v: L127-128, L154-155)
 (2) M_t = (1/n) sum_x x x^T over every token x of the attention input on the task's training images
        (models/vit_inflora.py L237-238; collected before training: L116-119)
 (3) M_hat = M_t (t = 0) | (I - P P^T) M_t ('remove') | Q Q^T M_t ('retain')              (L144-152)
 (4) A_t = U_hat[:, :r]^T / sqrt(3),  M_hat = U_hat S_hat V_hat^T                         (L126-127, L153-154)
 (5) train only B_t^k, B_t^v and the head h_t (L93-108) with CE(h_t(f(x)), y - K_t) (L220-225)
 (6) after task t, M_t again with the trained branches (L188-197), then the memory update (L200):
        DualGPM (`update_DualGPM`, L321-412) or plain GPM (`update_GPM`, L415-456);
        eps_t = lamb + (lame - lamb) t / T (L322); the energy of a singular value s of M is s^(p/2) with
        p = energy_power (4: the code's S**2 of M, i.e. sigma(H)^4, L330; 2: the paper's sigma(H)^2);
        first task: k = #{cumulative energy < eps_0} (L332), 'remove' with U[:, :max(k, 1)] if k < d/2
        (L333-335); 'remove' appends top directions of (I - P P^T) M until the captured fraction >= eps_t
        (L341-368); 'retain' drops top directions of Q Q^T M from Q while the residual fraction >= 1 - eps_t
        (L369-396); a 'remove' basis wider than d/2 is replaced by its complement, 'retain' (L401-408)
 (7) inference: every branch summed, every head concatenated, argmax, no task id (models/sinet_inflora.py L122-133)
 (8) optional classifier alignment (--ca; methods/inflora_ca1.py, the class configs/cifar100_infloraca.json names),
        after every task t >= 1 (inflora_ca1.py L101-103): class mean mu_c and covariance Sigma_c of f(x) on the
        class's training images with test transforms, frozen at their task (L541-559); 5 epochs (L409) of SGD
        lr 0.01, momentum 0.9, wd 5e-4, cosine T_max 5 (L411-416) on every head; per epoch 256 samples per class
        (L428) from N(gamma_c mu_c, Sigma_c + 1e-4 I) (L551, L436-438), gamma_c = 0.9 + 0.1 (t_c + 1)/(t + 1)
        (L431-433), shuffled (L448-450) and cut into |C_<=t| batches of 256 (L453-455); CE on
        z / (tau mean_s ||z_{C_s}||), tau = 0.1 (L51, L459-473). The alignment uses plain GPM (L221).

Where the equations live:
    (1) Adapter.forward (branches s < t as one `backbone.low_rank` product, then B_t (A_t x)); InfLoRA.merged
    (2) Adapter.forward while `recording`, InfLoRA.input_moments   (3) project   (4) design_down, InfLoRA.begin_task
    (5) InfLoRA.grow (what trains), loss, optimizer, inflora_cosine   (6) InfLoRA.end_task, threshold, memory_update
    (7) InfLoRA.forward, merged  (8) class_statistics, InfLoRA.align_heads, mean_decay, gaussian_replay, task_normalised

Defaults (configs/cifar100_inflora.json): r = 10 on K and V of every block; Adam (0.9, 0.999), lr 5e-4, wd 0, batch
128, 20 epochs (L178-180); the epoch cosine eta_e = eta_0 cos(99 pi max(e - 1, 0) / (200 (E - 1))) for e = 0..E-1
(utils/schedulers.py L19-20, L53-54, stepped once per epoch at L238; see `inflora_cosine`); lamb 0.95, lame 1.0;
energy_power 4 (the code); memory 'auto' = DualGPM, or plain GPM with --ca. T, the task count of the threshold
schedule (the config's total_sessions, L50), is the Config field `total_tasks`; 0 (default) derives it as
ceil(num_classes / |task 0|), exact for equal tasks and for a smaller remainder task last. Other datasets: OFFICIAL.

Deviations:
- First-task 'retain' branch: the code stores U[:, :max(k, 1)], the old space, while marking it 'retain' (L336-338),
  which the check of L409-410 then rejects; this file stores the complement U[:, k:].
- Numerical hygiene: memory updates never take directions of M_hat with a numerically zero singular value (the code
  would only when eps_t >= 1); appended directions are re-orthogonalised against the stored basis; statistics and
  memory are float64 (the code: float32, numpy SVD); M_hat's numerical rank is printed (A_t's rows past it: arbitrary).
- energy_power = 2 weights the code's projected (I - P P^T) M by the paper's sigma(H)^2: the paper's criterion at
  t = 0; later, the paper's sigma((I - P P^T) H)^2 are the eigenvalues of (I - P P^T) M (I - P P^T), a little different.
- Heads are sized per task (the code's heads all have init_cls rows, models/sinet_inflora.py L72-77), which makes
  uneven splits work. The K-means task keys of the code (L84, L248-263; unused at inference) are omitted.
- The code forms the dense sum_s B_s A_s in every forward (models/vit_inflora.py L245-249); here the frozen branches
  enter as one product (`backbone.low_rank`), and train.py evaluates `merged()` (sum_s B_s^m A_s written into the
  qkv rows of a copy of the ViT, one plain backbone forward): the same function up to float rounding.
- CA: gamma_c uses the task that introduced class c; the code takes c // |last task| (L431), the same for equal
  tasks. Sigma_c is stored in float32, the Cholesky factor of Sigma_c + 1e-4 I computed in float64 (the code:
  MultivariateNormal in float32, L436); samples from torch's global generator (seeded by train.py). inflora_ca.py
  turns the logit norm off on CIFAR-100 (L53-56); inflora_ca1.py keeps tau = 0.1, as here (--ca-logit-norm 0: off).
  Heads are kept after alignment. --ca keeps InfLoRA's own training recipe: the official CIFAR CA config also changes
  it (SGD 1e-3, heads 1e-2, wd 1e-3, r = 5; MultiStepLR at epoch 18, inflora_ca1.py L195-197) and inflora_ca1.py
  replaces the pretrained final LayerNorm by a fresh one on CIFAR (L54-56); neither is reproduced.

Run: python train.py --method inflora --tasks 10          (InfLoRA+CA: add --ca; InfLoRA-b5: --blocks 5)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import Merged, attach, check_options, features, fold, low_rank

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
    """'dualgpm' (inflora.py), 'gpm' (always 'remove'; inflora_ca1.py) or 'auto' (gpm with --ca, else dualgpm)"""
    optimizer: str = "adam"
    """'adam' + the epoch cosine (configs); 'sgd': DomainNet's, momentum 0.9, x 0.1 at epoch 4 (inflora_domain.py)"""
    lr: float = 5e-4
    """learning rate (InfLoRA config)"""
    head_lr: float = 0.01
    """'sgd': the head's learning rate (domainnet_inflora.json L21)"""
    weight_decay: float = 0.0
    """weight decay (InfLoRA config)"""
    epochs: int = 20
    """epochs per task (InfLoRA CIFAR-100 config)"""
    batch_size: int = 128
    """training batch size (InfLoRA config)"""
    ca: bool = False
    """classifier alignment after every task t >= 1 (InfLoRA+CA, reported separately)"""
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


# official settings (`--preset paper --dataset NAME`), configs/{cifar100,mimg10,domainnet}_inflora.json: shuffle false
# L8, tasks L9-10, epochs L18/L23 (domainnet L18/L20), lamb L29, rank L26, lrate L22, fc_lrate L21 (mimg5/20: 5/20
# tasks); DomainNet runs methods/inflora_domain.py (SGD, MultiStepLR [4]: L170-183; GPM: L207). No ImageNet-A, CUB.
OFFICIAL = {"cifar100": dict(tasks=10, natural_order=True),
            "imagenet_r": dict(tasks=10, natural_order=True, epochs=50, lamb=0.98),
            "domainnet": dict(tasks=5, natural_order=True, epochs=5, rank=30, optimizer="sgd", lr=0.005, head_lr=0.01,
                              memory="gpm")}

CHOICES = {"memory": ("auto", "dualgpm", "gpm"), "optimizer": ("adam", "sgd")}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run (with `vit`: also the bounds its shape sets)."""
    d, depth = (None, None) if vit is None else (vit.embed_dim, len(vit.blocks))
    check_options(cfg, CHOICES, [
        ("rank", cfg.rank >= 1, ">= 1"), ("rank", vit is None or cfg.rank <= d, f"<= {d}, the width"),
        ("targets", len(cfg.targets) == len(set(cfg.targets)) >= 1 and set(cfg.targets) <= set("qkv"),
         "distinct letters of q, k, v"),
        ("blocks", cfg.blocks >= 0, ">= 0"), ("blocks", vit is None or cfg.blocks <= depth, f"<= {depth}, the depth"),
        ("lamb", 0 < cfg.lamb <= 1, "in (0, 1]"), ("lame", cfg.lamb <= cfg.lame <= 1, "in [lamb, 1]"),
        ("energy_power", cfg.energy_power in (4, 2), "one of 4, 2"), ("total_tasks", cfg.total_tasks >= 0, ">= 0"),
        ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"), ("weight_decay", cfg.weight_decay >= 0, ">= 0"),
        ("head_lr", math.isfinite(cfg.head_lr) and cfg.head_lr > 0, "> 0"),
        ("epochs", cfg.epochs >= 0, ">= 0"), ("batch_size", cfg.batch_size >= 1, ">= 1"),
        ("ca_epochs", cfg.ca_epochs >= 1, ">= 1"), ("ca_lr", cfg.ca_lr > 0, "> 0"),
        ("ca_weight_decay", cfg.ca_weight_decay >= 0, ">= 0"), ("ca_samples", cfg.ca_samples >= 1, ">= 1"),
        ("ca_shrink", cfg.ca_shrink >= 0, ">= 0"), ("ca_logit_norm", cfg.ca_logit_norm >= 0, ">= 0")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class Adapter(nn.Module):
    """Per-task branches on the slices m of one block's fused qkv: delta_m = sum_s B_s^m (A_s x). Also holds the
    layer's subspace memory (a fixed-shape d x d basis whose first `width` columns are used, and the mode
    0 = 'remove' / 1 = 'retain') and, while `recording`, accumulates sum_x x x^T of its input."""

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.d, self.rank, self.targets = d, rank, targets
        self.A = nn.ParameterList()  # down (r, d), one per task: designed in begin_task, frozen
        self.B = nn.ModuleList()  # up, one {m: (d, r)} per task: trained during its task only
        self.register_buffer("basis", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("width", torch.zeros((), dtype=torch.long))
        self.register_buffer("mode", torch.zeros((), dtype=torch.long))
        self.recording, self.moment, self.count = False, None, 0

    def grow(self) -> None:
        device = self.basis.device
        self.A.append(nn.Parameter(torch.zeros(self.rank, self.d, device=device), requires_grad=False))
        self.B.append(nn.ParameterDict({m: nn.Parameter(torch.zeros(self.d, self.rank, device=device))
                                        for m in self.targets}))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.recording:  # running sum of x x^T over every token (models/vit_inflora.py L237-238)
            xf = x.detach().reshape(-1, self.d).double()
            self.moment = self.moment + xf.T @ xf
            self.count += xf.shape[0]
        if len(self.A) == 0:
            return {}
        A, B = list(self.A), list(self.B)
        # the frozen branches s < t as one product for all targets: A_s is shared, so the targets' [B_0^m ... B_{t-1}^m]
        # are stacked by rows over A_cat = [A_0; ...; A_{t-1}]
        B_cat = [torch.cat([torch.cat([b[m] for b in B[:-1]], dim=1) for m in self.targets])] if len(B) > 1 else []
        old = low_rank(x, [torch.cat(A[:-1])] if B_cat else [], B_cat)
        h = F.linear(x, A[-1])  # the current branch t
        new = {m: F.linear(h, B[-1][m]) for m in self.targets}
        return new if old is None else {m: o + new[m] for m, o in zip(self.targets, old.split(self.d, dim=-1))}

    def stored(self) -> torch.Tensor:
        return self.basis[:, : int(self.width)]

    def delta_weight(self, m: str) -> torch.Tensor | None:
        """sum_s B_s^m A_s, what the branches add to the m rows of qkv (None for a slice they do not adapt)."""
        return sum(B[m] @ A for A, B in zip(self.A, self.B)) if m in self.targets else None


# ----------------------------------------------------------------------------------------------------
# Method


class InfLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg, vit)
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes  # for T = ceil(num_classes / |task 0|)
        self.dual = cfg.memory == "dualgpm" or (cfg.memory == "auto" and not cfg.ca)
        for p in vit.parameters():
            p.requires_grad_(False)
        d, n_blocks = vit.embed_dim, cfg.blocks or len(vit.blocks)
        attach(vit, "qkv_adapter", lambda i, attn: Adapter(d, cfg.rank, cfg.targets) if i < n_blocks else None)
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
        for ad in self.adapters:
            ad.grow()
            for s, B in enumerate(ad.B):
                B.requires_grad_(s == t)
        for s, h in enumerate(self.heads):
            h.requires_grad_(s == t)

    @torch.no_grad()
    def begin_task(self, t: int, classes: list[int], data) -> None:
        ranks = []
        for ad, M in zip(self.adapters, self.input_moments(data.train)):
            M_hat = M if t == 0 else project(M, ad.stored(), int(ad.mode))
            A, rank = design_down(M_hat, self.cfg.rank)
            ad.A[t].copy_(A)
            ranks.append(rank)
        print(f"[inflora] task {t + 1}: designed A_t; numerical rank of M_hat per block "
              f"{' '.join(map(str, ranks))} (r = {self.cfg.rank})")

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.optimizer == "sgd":  # DomainNet (inflora_domain.py L170-183): the head at its own lr
            head = {id(p) for p in self.heads[-1].parameters()}
            opt = torch.optim.SGD([{"params": [p for p in params if id(p) not in head]}, {"params": list(
                self.heads[-1].parameters()), "lr": self.cfg.head_lr}], lr=self.cfg.lr, momentum=0.9,
                weight_decay=self.cfg.weight_decay)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.1 ** (step >= 4 * steps_per_epoch))
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.heads[-1](features(self.vit, x)), y - self.offsets[-2])  # y - K_t

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        for p in self.parameters():  # task t is finished: freeze its branch and head
            p.requires_grad_(False)
            p.grad = None
        eps = threshold(t, self.T, self.cfg.lamb, self.cfg.lame)
        for ad, M in zip(self.adapters, self.input_moments(data.train)):  # M with the trained branches <= t
            P, mode = memory_update(M, ad.stored(), int(ad.mode), eps, self.cfg.energy_power,
                                    first=t == 0, dual=self.dual)
            ad.basis.zero_()
            ad.basis[:, : P.shape[1]] = P
            ad.width.fill_(P.shape[1])
            ad.mode.fill_(mode)
        widths = " ".join(f"{int(ad.width)}{'R' if int(ad.mode) else ''}" for ad in self.adapters)
        print(f"[inflora] task {t + 1}: eps_t {eps:.4f}, memory width per block {widths} (R: 'retain' complement)")
        if self.cfg.ca:
            mean, cov = class_statistics(self.vit, data.plain, classes)
            self.ca_mean[classes] = mean
            self.ca_cov[classes] = cov.float()
            if t >= 1:
                self.align_heads(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(features(self.vit, x))

    def merged(self) -> nn.Module:
        """The inference model: the heads over a copy of the ViT with sum_s B_s^m A_s in its qkv rows, no adapters."""
        ads = [blk.attn.qkv_adapter for blk in self.vit.blocks]
        return Merged(fold(self.vit, lambda i, m: None if ads[i] is None else ads[i].delta_weight(m)),
                      copy.deepcopy(self.heads))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[Adapter]:
        """The per-block adapters, registered once: under vit.blocks.{i}.attn.qkv_adapter."""
        return [blk.attn.qkv_adapter for blk in self.vit.blocks if blk.attn.qkv_adapter is not None]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    @torch.no_grad()
    def input_moments(self, loader) -> list[torch.Tensor]:
        """M = (1/n) sum x x^T (float64) of every adapted block's attention input, over one pass of loader."""
        was_training = self.vit.training
        self.vit.eval()
        device = self.vit.cls_token.device
        for ad in self.adapters:
            ad.recording, ad.moment, ad.count = True, torch.zeros(ad.d, ad.d, dtype=torch.float64, device=device), 0
        try:
            with torch.autocast(device_type=device.type, enabled=False):
                for x, _ in loader:
                    features(self.vit, x.to(device))
            return [ad.moment / max(ad.count, 1) for ad in self.adapters]
        finally:
            for ad in self.adapters:
                ad.recording, ad.moment = False, None
            self.vit.train(was_training)

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


Method = InfLoRA

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


def threshold(t: int, T: int, lamb: float, lame: float) -> float:
    """eps_t = lamb + (lame - lamb) t / T, t 0-indexed (methods/inflora.py L322)."""
    return lamb + (lame - lamb) * t / max(T, 1)


def project(M: torch.Tensor, P: torch.Tensor, mode: int) -> torch.Tensor:
    """(I - P P^T) M in 'remove' mode (0), P P^T M in 'retain' mode (1; P is then the complement Q)."""
    return M - P @ (P.T @ M) if mode == 0 else P @ (P.T @ M)


def design_down(M_hat: torch.Tensor, rank: int) -> tuple[torch.Tensor, int]:
    """A = U_hat[:, :r]^T / sqrt(3) from the SVD of M_hat, and the numerical rank of M_hat."""
    U, S, _ = torch.linalg.svd(M_hat)
    tol = S.max() * max(M_hat.shape) * torch.finfo(S.dtype).eps
    return U[:, :rank].T / math.sqrt(3), int((S > tol).sum())


def memory_update(M: torch.Tensor, P: torch.Tensor, mode: int, eps: float, power: int,
                  first: bool, dual: bool = True) -> tuple[torch.Tensor, int]:
    """One DualGPM (dual) or GPM step of a layer. M: d x d statistic of the finished task; P: stored
    orthonormal columns; mode 0 = 'remove' (P spans the old space), 1 = 'retain' (P spans its complement).
    Returns the new basis and mode. The energy of a singular value s is s^(power/2)."""
    d = M.shape[0]
    U, S, _ = torch.linalg.svd(M)
    total = (S ** (power / 2)).sum()
    tol = S.max() * d * torch.finfo(S.dtype).eps  # singular values at or below are numerically zero
    if first:  # L326-338
        k = int(((S ** (power / 2)).cumsum(0) / total < eps).sum())
        if not dual or k < d / 2:
            P, mode = U[:, : max(k, 1)], 0
        else:
            P, mode = U[:, k:], 1  # the complement of the top-k space (the code stores U[:, :k], L337)
    elif mode == 0:  # L341-368
        Uh, Sh, _ = torch.linalg.svd(project(M, P, 0))
        e = Sh ** (power / 2) / total
        a, k = 1 - e.sum(), 0  # captured fraction of the stored space
        while k < d and a < eps and Sh[k] > tol:
            a, k = a + e[k], k + 1
        if k > 0:
            new = Uh[:, :k] - P @ (P.T @ Uh[:, :k])  # re-orthogonalise against P (numerical hygiene)
            P = torch.cat([P, torch.linalg.qr(new).Q], dim=1)[:, :d]
    else:  # L369-396
        Uh, Sh, _ = torch.linalg.svd(project(M, P, 1))
        e = Sh ** (power / 2) / total
        a, k = e.sum(), 0  # residual fraction in the free space
        while k < P.shape[1] and a >= 1 - eps and Sh[k] > tol:
            a, k = a - e[k], k + 1
        if k > 0:
            Ui, _, _ = torch.linalg.svd(P - Uh[:, :k] @ (Uh[:, :k].T @ P))
            P = Ui[:, : P.shape[1] - k]
    if dual and mode == 0 and P.shape[1] > d / 2:  # switch: keep the narrower complement (L401-408)
        Ui, _, _ = torch.linalg.svd(P)
        P, mode = Ui[:, P.shape[1]:], 1
    return P, mode


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

