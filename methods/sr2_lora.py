"""SR²-LoRA: task-wise LoRA on K and V with a spectral inter-layer relation loss, plus classifier alignment.

Paper: Wan, Lin, Lv, Yang, "SR²-LoRA: Self-Rectifying Inter-layer Relations in Low-Rank Adaptation for
Class-Incremental Learning", preprint (venue not confirmed), arXiv 2605.07420.
Official code: FqWan24/SR-2-LoRA @ ea5da65 (a fork of InfLoRA; the method is registered there as `dlora`:
methods/dlora.py, models/sinet_dlora.py, utils/losses.py). The paper's full text was not available, so every
detail follows the official code. Spec: ../shared/specs/sr2_lora.md; classifier alignment: protocol.md §8,
preset `sr2`.

Implements (notation of the spec: A = down (r x d), B = up (d x r); t = current task, 0-indexed):
    W_m^(t) = W_m + sum_{s<=t} B_s^m A_s^m,  m in {k, v}, every block; no alpha/r     # Eq. (base, spec §4)
        A_s Kaiming-uniform (a = sqrt 5), B_s = 0; only A_t, B_t and the head h_t train
    phi_l(x) = [LN_final(X^(l))]_CLS,  F(x) = [phi_1; ...; phi_L] in R^{L x d}      # spec §5 steps 1-4
    R(x) = sym(F(x) F(x)^T) in R^{L x L}, one per sample, raw Gram                  # spec §5 steps 5-6
    L_SR = 1/(B L) sum_b sum_i h_beta(lambda_i(R_t(x_b)) - sg[lambda_i(R_{t-1}(x_b))])   # spec §6
        lambda sorted ascending, h_beta = smooth-L1 (beta = 1); previous model = branches s <= t-1
    L = CE(h_t(f_t(x)), y - K_t) + lambda_SR L_SR   (t > 0; CE only at t = 0)       # spec §6 objective
    after task t: mu_c, Sigma_c = cov(f(x)) for the task's classes (train images, test transforms)
    if t >= 1, classifier alignment of all heads h_0..h_t on Gaussian replay N(mu_c, Sigma_c + 1e-2 I):
        loss = mean_x H(softmax(z)) + CE(z / (0.1 (||z||_2 + 1e-7)), y),  z = [h_0; ...; h_t](x~)  # spec §8
    inference: argmax over [h_0(f); ...; h_t(f)] with every branch active, no task id
Defaults: rank 10 [INFER from the rank ablation scripts], lambda_SR = 1 and beta = 1 [CODE], K and V of every
block [CODE]; optimiser Adam (0.9, 0.999), lr 5e-4, wd 0, batch 128, InfLoRA epoch cosine, 20 epochs per task
(InfLoRA CIFAR-100 config; SR²'s configs are not released) [ASSUMED]; CA: 20 epochs, SGD lr 0.005, momentum 0.9,
CosineAnnealingLR(T_max = 5), 5 x batch samples per class, shrinkage 1e-2, tau 0.1 [CODE].

Fixed (defects of the released code, spec §11, not replicated):
- `dlora` crashes on its own training path: class means/covariances live in empty Python lists written by class
  index. Here they are preallocated fixed-shape buffers (num_classes x d, num_classes x d x d), which also lets
  grow() rebuild the structure on --resume.
- The previous-model forward ran with autograd on (only its eigenvalues were detached); here it runs under
  no_grad (same gradients, half the activation memory).
- Heads and task-id decoding assumed equal task sizes (K = init_cls); here each head has its task's own size.

Deviations:
- Classifier-alignment weight decay: the code builds SGD with weight_decay=5e-4, but its single param group sets
  'weight_decay': args['weight_decay'] (the training wd, 0 in the InfLoRA config), which overrides it. The
  effective value is the training wd, so `ca_weight_decay` defaults to 0.0; protocol.md §8 / the spec's 5e-4 is
  one flag away (--ca-weight-decay 5e-4).
- The code's CA optimiser also holds the (unused) heads of future tasks; here only the heads of seen tasks.
- The relation loss runs in float32 with autocast off (eigen-solvers have no bf16 kernels). Spectra come from
  eigvalsh of the symmetrised Gram, as in the code (batched L x L solves), with the current and the previous
  model's matrices in ONE solver call: a values-only solve and a with-vectors solve round differently, and
  the loss must be exactly 0 when the two models agree (first step of a task).
- Gaussian replay draws x = mu + L eps with L = cholesky(Sigma + 1e-2 I) computed once per alignment
  (float64), instead of a MultivariateNormal per class per epoch: the same distribution, a different RNG stream.
  Means are stored in float64 (protocol.md §8), covariances in float32 (half the checkpoint size).
- One learning rate / epoch count for every task (the code's task-0 `init_*` keys come from the missing configs).
- Ablations the spec asks for are options, not separate methods: --relation batch | cosine | feature_all
  (`alora`) | feature_last (`llora`), and --sr-weight 0 (`vanilla`, which however keeps SR²'s CA loss).
- --train-logit-norm 0.1 gives the code's ImageNet-A logit-normalised CE (keyed on the dataset name there).
- --ca ce replaces the alignment loss by plain CE (the official `vanilla` base's alignment, SLCA's loss); the
  default stays SR²'s. On the `cpu` preset (a weak CIFAR-10 ViT) SR²'s entropy term collapses the heads: after
  task 7 the aligned heads classify their own Gaussian replay at 7.7 % (plain CE from the same heads: 26.3 %)
  and send 67 % of the test images to the second task's head (bench/sr2_ca_probe.py, bench/README.md).

Run: python train.py --method sr2_lora --tasks 10
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
    """LoRA rank r of every task's branch (inferred from the official rank-ablation scripts)"""
    targets: str = "kv"
    """adapted slices of the fused qkv, any of q, k, v (official code: k and v)"""
    sr_weight: float = 1.0
    """lambda_SR, weight of the spectral relation loss (official code: 1, no coefficient); 0 = `vanilla`"""
    sr_beta: float = 1.0
    """beta of the smooth-L1 on the eigenvalue differences (official code: PyTorch's default 1)"""
    sr_width_norm: str = "off"
    """'on' multiplies lambda_SR by 768 / d, so a narrower backbone gets ViT-B's relative strength (spec §17)"""
    relation: str = "spectral"
    """'spectral' (SR²), or the spec's ablations: 'batch' (spectrum of the batch-mean R), 'cosine' (rows
    l2-normalised), 'feature_all' (`alora`: feature MSE over all layers), 'feature_last' (`llora`)"""
    train_logit_norm: float = 0.0
    """tau of the logit-normalised training CE, CE(z / (tau ||z||)); 0 = plain CE (the code uses 0.1 on ImageNet-A)"""
    optim: str = "adam"
    """'adam': Adam (0.9, 0.999) + InfLoRA epoch cosine; 'sgd': SGD momentum 0.9 + cosine annealing over the epochs"""
    lr: float = 5e-4
    """learning rate (InfLoRA config; SR²'s configs are not released)"""
    weight_decay: float = 0.0
    """weight decay of the task optimiser (InfLoRA config)"""
    epochs: int = 20
    """epochs per task (InfLoRA CIFAR-100 config)"""
    batch_size: int = 128
    """training batch size (InfLoRA config)"""
    ca: str = "sr2"
    """classifier alignment after every task t >= 1: 'sr2' (entropy + logit-normalised CE, always on in the
    official code), 'ce' (plain CE: the code's `vanilla` base, SLCA's loss) or 'none'"""
    ca_epochs: int = 20
    """classifier-alignment epochs (official code: 20)"""
    ca_lr: float = 0.005
    """classifier-alignment SGD learning rate (official code: 0.005)"""
    ca_weight_decay: float = 0.0
    """classifier-alignment weight decay (code: the training wd overrides its 5e-4; see Deviations)"""
    ca_tmax: int = 5
    """T_max of the alignment's CosineAnnealingLR (official code: 5, so the lr oscillates over 20 epochs)"""
    ca_shrink: float = 1e-2
    """shrinkage delta added to every class covariance, Sigma_c + delta I (official code: 1e-2)"""
    ca_samples: int = 0
    """Gaussian samples per class per alignment epoch; 0 = 5 x batch_size (official code: 640 at batch 128)"""
    ca_tau: float = 0.1
    """temperature of the alignment's logit-normalised CE (official code: 0.1)"""


CHOICES = {"sr_width_norm": ("off", "on"), "relation": ("spectral", "batch", "cosine", "feature_all", "feature_last"),
           "optim": ("adam", "sgd"), "ca": ("sr2", "ce", "none")}

# ----------------------------------------------------------------------------------------------------
# LoRA


class QKVLoRA(nn.Module):
    """One task's branch: delta B_m A_m x on the slices m of the fused qkv (one block)."""

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.A = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d)) for m in targets})  # down
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank)) for m in targets})  # up
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {m: F.linear(F.linear(x, self.A[m]), self.B[m]) for m in self.A}

    def delta_weight(self, m: str) -> torch.Tensor:
        return self.B[m] @ self.A[m]


class TaskLoRA(nn.Module):
    """All tasks' branches of one block; the forward sums the first `active` of them (spec §4).

    The branches are summed one by one, so a branch whose B is 0 adds exact zeros: at the first step of a task
    the current and the previous model agree bit for bit.
    """

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.d, self.rank, self.targets = d, rank, targets
        self.branches = nn.ModuleList()
        self.active = 0  # how many branches the forward sums; set by the method, not saved

    def grow(self, device: torch.device) -> None:
        self.branches.append(QKVLoRA(self.d, self.rank, self.targets).to(device))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for branch in self.branches[: self.active]:  # Eq. W^(t) = W + sum_{s<=t} B_s A_s
            for m, delta in branch(x).items():
                out[m] = out[m] + delta if m in out else delta
        return out


# ----------------------------------------------------------------------------------------------------
# Method


class SR2LoRA(nn.Module):
    def __init__(self, vit: ViT, num_classes: int, cfg: Config):
        super().__init__()
        if cfg.rank < 1:
            raise ValueError(f"rank must be >= 1, got {cfg.rank}")
        if not cfg.targets or not set(cfg.targets) <= set("qkv") or len(set(cfg.targets)) != len(cfg.targets):
            raise ValueError(f"targets must be distinct letters of 'qkv', got '{cfg.targets}'")
        for name in ("sr_weight", "weight_decay", "ca_weight_decay", "ca_shrink", "ca_samples", "train_logit_norm"):
            if getattr(cfg, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
        for name in ("sr_beta", "lr", "ca_lr", "ca_tau"):
            if not getattr(cfg, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(cfg, name)}")
        for name in ("epochs", "batch_size", "ca_tmax"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.ca_epochs < 0:
            raise ValueError(f"ca_epochs must be >= 0, got {cfg.ca_epochs}")
        for field, allowed in CHOICES.items():
            if getattr(cfg, field) not in allowed:
                raise ValueError(f"{field} must be one of {', '.join(allowed)}, got '{getattr(cfg, field)}'")
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        for p in vit.parameters():
            p.requires_grad_(False)
        d = vit.embed_dim
        attach(vit, "qkv_adapter", lambda i, attn: TaskLoRA(d, cfg.rank, cfg.targets))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        self.sr_weight = cfg.sr_weight * (768 / d if cfg.sr_width_norm == "on" else 1.0)
        # Class statistics for classifier alignment, fixed shapes so that a checkpoint loads after grow() alone.
        self.register_buffer("means", torch.zeros(num_classes, d, dtype=torch.float64))
        self.register_buffer("covs", torch.zeros(num_classes, d, d))

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        device = self.vit.cls_token.device
        self.heads.append(nn.Linear(self.vit.embed_dim, len(classes)).to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for lora in self.loras:
            lora.grow(device)
        for s, (head, *branches) in enumerate(zip(self.heads, *(lora.branches for lora in self.loras))):
            for m in [head, *branches]:
                m.requires_grad_(s == t)  # only A_t, B_t and h_t train (spec §4)
                if s < t:
                    m.zero_grad(set_to_none=True)  # no stale gradients on frozen tensors
        self.set_active(t + 1)

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.optim == "sgd":
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, epoch_cosine(self.cfg.epochs, steps_per_epoch))
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = len(self.heads) - 1
        feats = self.vit.block_cls(x)  # (B, L, d), F_t(x); feats[:, -1] is f(x)
        z = self.heads[-1](feats[:, -1])
        if self.cfg.train_logit_norm > 0:
            z = z / (self.cfg.train_logit_norm * (z.norm(dim=-1, keepdim=True) + 1e-7))
        loss = F.cross_entropy(z, y - self.offsets[-2])  # Eq. CE(h_t(f_t(x)), y - K_t)
        if t > 0 and self.sr_weight > 0:
            old = self.previous_block_cls(x)  # F_{t-1}(x), no graph
            loss = loss + self.sr_weight * relation_loss(feats, old, self.cfg.relation, self.cfg.sr_beta)  # Eq. L_SR
        return loss

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        if self.cfg.ca == "none":
            return
        mu, cov = class_statistics(self.vit, data.plain, classes)
        self.means[classes] = mu
        self.covs[classes] = cov
        if t >= 1:
            self.align_classifiers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.vit(x))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def loras(self) -> list[TaskLoRA]:
        return [blk.attn.qkv_adapter for blk in self.vit.blocks]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    def set_active(self, n: int) -> None:
        """Make every block's forward sum the branches s < n."""
        for lora in self.loras:
            lora.active = n

    @torch.no_grad()
    def previous_block_cls(self, x: torch.Tensor) -> torch.Tensor:
        """F_{t-1}(x): the per-block CLS features of the previous model (branches s <= t-1), without a graph."""
        n = len(self.heads)
        self.set_active(n - 1)
        try:
            return self.vit.block_cls(x)
        finally:
            self.set_active(n)

    def align_classifiers(self) -> None:
        """Classifier alignment, preset `sr2` (spec §8): only the seen heads train, on Gaussian feature replay."""
        cfg = self.cfg
        n_seen = self.offsets[-1]
        n = cfg.ca_samples or 5 * cfg.batch_size
        device = self.heads[0].weight.device
        eye = torch.eye(self.vit.embed_dim, dtype=torch.float64, device=device)
        chol = torch.linalg.cholesky(self.covs[:n_seen].double() + cfg.ca_shrink * eye).float()  # Sigma_c + delta I
        mu = self.means[:n_seen].float()
        labels = torch.arange(n_seen, device=device).repeat_interleave(n)
        grads = [p.requires_grad for p in self.heads.parameters()]
        self.heads.requires_grad_(True)
        opt = torch.optim.SGD(self.heads.parameters(), lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ca_tmax)
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            for _ in range(cfg.ca_epochs):
                feats = gaussian_replay(mu, chol, n).flatten(0, 1)  # (n_seen * n, d), class-major
                perm = torch.randperm(len(feats)).to(device)
                for i in range(n_seen):  # |C_<=t| mini-batches of n, as in the code
                    idx = perm[i * n:(i + 1) * n]
                    z = self.logits(feats[idx])
                    loss = alignment_loss(z, labels[idx], cfg.ca_tau) if cfg.ca == "sr2" else F.cross_entropy(
                        z, labels[idx])  # Eq. CA loss (spec §8); 'ce': the `vanilla` base's plain CE
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
        for p, g in zip(self.heads.parameters(), grads):
            p.requires_grad_(g)
            p.grad = None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every branch into the qkv weights and zero its B (deployment only: the previous model is lost)."""
        d = self.vit.embed_dim
        for blk, lora in zip(self.vit.blocks, self.loras):
            for branch in lora.branches:
                for m in branch.A:
                    blk.attn.qkv.weight[qkv_rows(m, d)] += branch.delta_weight(m)
                    branch.B[m].zero_()


Method = SR2LoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def relation_matrix(feats: torch.Tensor) -> torch.Tensor:
    """R = sym(F F^T) per sample: (B, L, d) -> (B, L, L); raw Gram, no centring or normalisation (spec §5)."""
    r = feats @ feats.transpose(1, 2)
    return (r + r.transpose(1, 2)) / 2


def spectrum(feats: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of every sample's R, ascending: (B, L, d) -> (B, L). They equal the squared singular values
    of F. The backward of eigvalsh is V diag(g) V^T, with no eigengap division: finite on repeated eigenvalues."""
    return torch.linalg.eigvalsh(relation_matrix(feats))


def relation_loss(new: torch.Tensor, old: torch.Tensor, kind: str = "spectral", beta: float = 1.0) -> torch.Tensor:
    """L_SR between the current (new) and the previous (old, stop-gradient) per-block features, both (B, L, d)."""
    with torch.autocast(new.device.type, enabled=False):
        new = new.float() if new.dtype != torch.float64 else new
        old = old.detach().to(new.dtype)
        if kind == "spectral":  # Eq. L_SR: per-sample spectra, mean smooth-L1 over B x L
            lam_new, lam_old = spectrum(torch.cat([new, old])).chunk(2)  # one solver call: same rounding for both
            return F.smooth_l1_loss(lam_new, lam_old.detach(), beta=beta)
        if kind == "batch":  # ablation: spectrum of the batch-mean relation matrix (the code's unused variant)
            r = torch.stack([relation_matrix(new).mean(0), relation_matrix(old).mean(0)])
            lam_new, lam_old = torch.linalg.eigvalsh(r)
            return F.smooth_l1_loss(lam_new, lam_old.detach(), beta=beta)
        if kind == "cosine":  # ablation: rows l2-normalised (cosine relations)
            lam_new, lam_old = spectrum(F.normalize(torch.cat([new, old]), dim=-1)).chunk(2)
            return F.smooth_l1_loss(lam_new, lam_old.detach(), beta=beta)
        if kind == "feature_all":  # ablation `alora`: entry-wise feature MSE averaged over all layers
            return F.mse_loss(new, old)
        if kind == "feature_last":  # ablation `llora`: feature MSE on the last layer only
            return F.mse_loss(new[:, -1], old[:, -1])
    raise ValueError(f"unknown relation '{kind}'")


@torch.no_grad()
def class_statistics(vit: ViT, loader, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (float64) and covariance (float32) of f(x) per class, in the order of `classes` (spec §7 step 4)."""
    fs, ys = [], []
    device = vit.cls_token.device
    with torch.autocast(device.type, enabled=False):
        for x, y in loader:
            fs.append(vit(x.to(device)).double())
            ys.append(y.to(device))
    f, y = torch.cat(fs), torch.cat(ys)
    d = f.shape[1]
    mu = torch.zeros(len(classes), d, dtype=torch.float64, device=device)
    cov = torch.zeros(len(classes), d, d, dtype=torch.float64, device=device)
    for i, c in enumerate(classes):
        fc = f[y == c]
        if len(fc) == 0:
            raise ValueError(f"class {c} has no training images: cannot compute its statistics")
        mu[i] = fc.mean(0)
        if len(fc) > 1:  # one image: zero covariance, the shrinkage alone keeps it positive definite
            cov[i] = torch.cov(fc.T)
    return mu, cov.float()


def gaussian_replay(mu: torch.Tensor, chol: torch.Tensor, n: int) -> torch.Tensor:
    """n samples per class from N(mu_c, L_c L_c^T): (C, d), (C, d, d) -> (C, n, d). Uses torch's global RNG."""
    eps = torch.randn(mu.shape[0], n, mu.shape[1], device=mu.device, dtype=mu.dtype)
    return mu[:, None] + eps @ chol.transpose(1, 2)


def alignment_loss(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """SR²'s alignment loss: mean entropy of softmax(z) (minimised) + CE on the globally normalised logits."""
    entropy = -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()
    z_norm = z / (tau * (z.norm(dim=-1, keepdim=True) + 1e-7))
    return entropy + F.cross_entropy(z_norm, y)  # Eq. CA loss (spec §8)


def inflora_cosine(epochs: int, steps_per_epoch: int):
    """InfLoRA's epoch-level cosine, as a per-step multiplier: cos(99 pi e / (200 (E - 1))), e = epoch."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 1.0 if epochs <= 1 else math.cos(99 * math.pi * min(e, epochs - 1) / (200 * (epochs - 1)))
    return factor


def epoch_cosine(epochs: int, steps_per_epoch: int):
    """CosineAnnealingLR(T_max = epochs) stepped per epoch, as a per-step multiplier: (1 + cos(pi e / E)) / 2."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
    return factor
