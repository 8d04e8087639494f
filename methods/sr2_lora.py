"""SR²-LoRA: task-wise LoRA on K and V with a spectral inter-layer relation loss, plus classifier alignment.

Paper: Wan, Lin, Lv, Yang, "SR²-LoRA: Self-Rectifying Inter-layer Relations in Low-Rank Adaptation for
Class-Incremental Learning", preprint (venue not confirmed), arXiv 2605.07420.
Official code: FqWan24/SR-2-LoRA @ ea5da65, a fork of InfLoRA (liangyanshuo/InfLoRA @ e08b00e); the method is
registered there as `dlora`. The paper's full text was not available when this file was written, so every detail
follows the official code, cited as file and line at ea5da65 (dlora = methods/dlora.py, sinet =
models/sinet_dlora.py, vit = models/vit_dlora.py).
Where this file departs from the official code (there is no paper text to depart from): "Deviations" below.

Implements (A = down (r x d), B = up (d x r); t = current task, 0-indexed):
    W_m^(t) = W_m + sum_{s<=t} B_s^m A_s^m,  m in {k, v}, every block; no alpha/r          vit L257-291
        A_s Kaiming-uniform (a = sqrt 5), B_s = 0; only A_t, B_t and h_t train      vit L235-243, dlora L227-250
    phi_l(x) = [LN_final(X^(l))]_CLS,  F(x) = [phi_1; ...; phi_L] in R^{L x d}             sinet L30-36
    R(x) = sym(F(x) F(x)^T) in R^{L x L}, one per sample, raw Gram                   dlora L311-315, L492-495
    L_SR = 1/(B L) sum_b sum_i h_beta(lambda_i(R_t(x_b)) - sg[lambda_i(R_{t-1}(x_b))])     dlora L496-498
        lambda ascending (eigvalsh), h_beta = smooth-L1 (beta = 1);
        the previous model is the same network with the branches s <= t-1              sinet L123-126
    L = CE(h_t(f_t(x)), y - K_t) + lambda_SR L_SR   (t > 0; CE only at t = 0)               dlora L300-318
    after task t: mu_c, Sigma_c = cov(f(x)) per class of the task (train images, test transforms)  dlora L380-408
    if t >= 1, classifier alignment of all heads h_0..h_t on Gaussian replay N(mu_c, Sigma_c + 1e-2 I):
        loss = mean_x H(softmax(z)) + CE(z / (0.1 (||z||_2 + 1e-7)), y),  z = [h_0; ...; h_t](x~)
                                                      dlora L218-221, L410-488; utils/losses.py L55-63
    inference: argmax over [h_0(f); ...; h_t(f)] with every branch active, no task id      sinet L140-150
        (train.py: `merged()`, every branch folded into the weights of one copy of the ViT)
Defaults: rank 10 (scripts/train_cifar100.sh L11-14 run the rank ablations 1, 5, 20, 64 beside the default
configs; InfLoRA's configs/cifar100_inflora.json L28 uses 10), lambda_SR = 1 and beta = 1 (dlora L316-318: no
coefficient, PyTorch's smooth-L1 default), K and V of every block (vit L187); optimiser Adam (0.9, 0.999) with
InfLoRA's epoch cosine (dlora L276-278, L329), lr 5e-4, wd 0, batch 128, 20 epochs per task (InfLoRA's
configs/cifar100_inflora.json L18-27 @ e08b00e; SR²'s configs are not released); CA: 20 epochs, SGD lr 0.005,
momentum 0.9, CosineAnnealingLR(T_max = 5), 5 x batch samples per class, shrinkage 1e-2, tau 0.1
(dlora L407-408, L416-430; utils/losses.py L56).

Where the equations live (the paper's text was not available: the steps of Implements, in order):
    W_m^(t) x              TaskLoRA.forward (one task's branch: QKVLoRA)
    phi_l, F(x)            backbone.block_cls, called in SR2LoRA.loss
    R(x), lambda_i         relation_matrix, spectrum
    L_SR                   relation_loss; the previous model: SR2LoRA.previous_block_cls (previous_model)
    L                      SR2LoRA.loss
    mu_c, Sigma_c          class_statistics, called in SR2LoRA.end_task
    alignment              SR2LoRA.align_heads (gaussian_replay, alignment_loss)
    inference              SR2LoRA.forward; train.py evaluates SR2LoRA.merged
    schedules              inflora_cosine (Adam), epoch_cosine (--optim sgd)

Fixed (defects of the released code, not replicated):
- `dlora` crashes on its own training path: the class means and covariances live in empty Python lists
  (dlora L40-41) written by class index (dlora L404, L407). Here they are preallocated fixed-shape buffers
  (num_classes x d, num_classes x d x d), which also lets grow() rebuild the structure on --resume.
- The previous-model forward runs with autograd on (sinet L124; only its eigenvalues are detached, dlora L497);
  here it runs under no_grad (same gradients, half the activation memory).
- Heads and task-id decoding assume equal task sizes (sinet L81-86: every head has init_cls outputs;
  dlora L356-371); here each head has its task's own size.

Deviations:
- Classifier-alignment weight decay: the code builds SGD with weight_decay=5e-4, but its single param group sets
  'weight_decay': args['weight_decay'] (the training wd, 0 in the InfLoRA config), which overrides it
  (dlora L418-420). The effective value is the training wd, so `ca_weight_decay` defaults to 0.0; SLCA's 5e-4 is
  one flag away (--ca-weight-decay 5e-4).
- train.py evaluates `merged()`: every branch's B_s^m A_s^m written into the qkv rows of a copy of the ViT, one
  plain backbone forward (the code forms the dense sum_{s<=t} B_s^m A_s^m in every forward, vit L257-267,
  L276-291; sinet L119, L124, L141); the logits of `forward` up to float rounding. In training the frozen
  branches s < t enter as one product per target (`backbone.low_rank`: low-rank, or dense where that costs
  fewer multiply-adds) and the current branch as B_t (A_t x); the previous model is the frozen product alone.
- The code's CA optimiser also holds the (unused) heads of future tasks (dlora L419, sinet L83-86); here only
  the heads of seen tasks.
- The relation loss runs in float32 with autocast off (eigen-solvers have no bf16 kernels). Spectra come from
  eigvalsh of the symmetrised Gram, as in the code (batched L x L solves), with the current and the previous
  model's matrices in ONE solver call: a values-only solve and a with-vectors solve round differently, and
  the loss must be exactly 0 when the two models agree (first step of a task).
- Gaussian replay draws x = mu + L eps with L = cholesky(Sigma + 1e-2 I) computed once per alignment
  (float64), instead of a MultivariateNormal per class per epoch (dlora L432-439): the same distribution, a
  different RNG stream. Means are stored in float64, covariances in float32 (half the checkpoint size).
- One learning rate / epoch count for every task (the code's task-0 `init_*` keys, dlora L261-271, come from
  the missing configs).
- The official repository's ablations are options, not separate methods: --relation batch (dlora L500-511,
  unused there) | cosine | feature_all (`alora`, methods/alora.py L201-215) | feature_last (`llora`,
  methods/llora.py L201-205), and --sr-weight 0 (`vanilla`, which however keeps SR²'s CA loss).
- --train-logit-norm 0.1 gives the code's ImageNet-A logit-normalised CE (dlora L305-306, keyed on the dataset
  name there).
- --ca ce replaces the alignment loss by plain CE (the `vanilla` base's alignment, methods/vanilla.py L336;
  SLCA's loss); the default stays SR²'s. On the `cpu` preset (a small 32 px ViT, far weaker than ViT-B/16)
  SR²'s loss collapses the heads, its entropy term most: after task 10 the aligned heads classify their own
  Gaussian replay at 12.8 % (plain CE re-run from the same heads: 36.6 %) and send 66 % of the test images to
  the first task's head (seed 0; seed 1 alike; bench/probes/sr2_ca_probe.py, bench/probes/README.md).

Run: python train.py --method sr2_lora --tasks 10
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import Merged, attach, block_cls, check_options, features, fold, low_rank

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
    """'on' multiplies lambda_SR by 768 / d, so a narrower backbone gets ViT-B's relative strength (not official)"""
    relation: str = "spectral"
    """'spectral' (SR²), or an ablation: 'batch' (spectrum of the batch-mean R), 'cosine' (rows l2-normalised),
    'feature_all' (`alora`: feature MSE over all layers), 'feature_last' (`llora`: the last layer only)"""
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
    ca_logit_norm: float = 0.1
    """temperature tau of the alignment's logit normalisation z / (tau ||z||) (official code: 0.1)"""


CHOICES = {"sr_width_norm": ("off", "on"), "relation": ("spectral", "batch", "cosine", "feature_all", "feature_last"),
           "optim": ("adam", "sgd"), "ca": ("sr2", "ce", "none")}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run."""
    check_options(cfg, CHOICES, [
        ("rank", cfg.rank >= 1, ">= 1"),
        ("targets", len(cfg.targets) == len(set(cfg.targets)) >= 1 and set(cfg.targets) <= set("qkv"),
         "distinct letters of q, k, v"),
        ("sr_weight", cfg.sr_weight >= 0, ">= 0"), ("sr_beta", cfg.sr_beta > 0, "> 0"),
        ("train_logit_norm", cfg.train_logit_norm >= 0, ">= 0"), ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"), ("epochs", cfg.epochs >= 1, ">= 1"),
        ("batch_size", cfg.batch_size >= 1, ">= 1"), ("ca_epochs", cfg.ca_epochs >= 0, ">= 0"),
        ("ca_lr", cfg.ca_lr > 0, "> 0"), ("ca_weight_decay", cfg.ca_weight_decay >= 0, ">= 0"),
        ("ca_tmax", cfg.ca_tmax >= 1, ">= 1"), ("ca_shrink", cfg.ca_shrink >= 0, ">= 0"),
        ("ca_samples", cfg.ca_samples >= 0, ">= 0"), ("ca_logit_norm", cfg.ca_logit_norm > 0, "> 0")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class QKVLoRA(nn.Module):
    """One task's branch: B_m A_m on the slices m of the fused qkv (one block)."""

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.A = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d)) for m in targets})  # down
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank)) for m in targets})  # up
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # vit L235-243


class TaskLoRA(nn.Module):
    """All tasks' branches of one block (the qkv_adapter): the frozen branches s < t as one product per target,
    then, while `current` is set, the current branch t. The previous model is the same forward with `current`
    off (SR2LoRA.previous_model): at the first step of a task B_t = 0 adds exact zeros, so the two agree bit for
    bit."""

    def __init__(self, d: int, rank: int, targets: str):
        super().__init__()
        self.d, self.rank, self.targets = d, rank, targets
        self.branches = nn.ModuleList()
        self.current = True  # whether the forward adds branch t; a mode, not state

    def grow(self, device: torch.device) -> None:
        self.branches.append(QKVLoRA(self.d, self.rank, self.targets).to(device))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # W^(t) x = W x + sum_{s<t} B_s A_s x + B_t A_t x (vit L257-267)
        if not self.branches:
            return {}
        *frozen, now = self.branches
        delta = {m: low_rank(x, [b.A[m] for b in frozen], [b.B[m] for b in frozen]) for m in self.targets}  # s < t
        if self.current:
            for m in self.targets:
                d_t = F.linear(F.linear(x, now.A[m]), now.B[m])
                delta[m] = d_t if delta[m] is None else delta[m] + d_t
        return {m: d_m for m, d_m in delta.items() if d_m is not None}  # nothing at t = 0 without `current`


# ----------------------------------------------------------------------------------------------------
# Method


class SR2LoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        validate(cfg, vit)
        super().__init__()
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        d = vit.embed_dim
        attach(vit, "qkv_adapter", lambda i, attn: TaskLoRA(d, cfg.rank, cfg.targets))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        self.sr_weight = cfg.sr_weight * (768 / d if cfg.sr_width_norm == "on" else 1.0)
        # Class statistics for classifier alignment, fixed shapes so that a checkpoint loads after grow() alone.
        self.register_buffer("ca_mean", torch.zeros(num_classes, d, dtype=torch.float64))
        self.register_buffer("ca_cov", torch.zeros(num_classes, d, d))

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        device = self.vit.cls_token.device
        self.heads.append(nn.Linear(self.vit.embed_dim, len(classes)).to(device))
        self.offsets.append(self.offsets[-1] + len(classes))
        for ad in self.adapters:
            ad.grow(device)
        for s, (head, *branches) in enumerate(zip(self.heads, *(ad.branches for ad in self.adapters))):
            for m in [head, *branches]:
                m.requires_grad_(s == t)  # only A_t, B_t and h_t train (dlora L227-250)
                if s < t:
                    m.zero_grad(set_to_none=True)  # no stale gradients on frozen tensors

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.optim == "sgd":  # dlora L273-275
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, epoch_cosine(self.cfg.epochs, steps_per_epoch))
        opt = torch.optim.Adam(params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=self.cfg.weight_decay)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, inflora_cosine(self.cfg.epochs, steps_per_epoch))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = len(self.heads) - 1
        feats = block_cls(self.vit, x)  # (B, L, d), F_t(x); feats[:, -1] is f(x)
        z = self.heads[-1](feats[:, -1])
        if self.cfg.train_logit_norm > 0:  # dlora L305-306
            z = z / (self.cfg.train_logit_norm * (z.norm(dim=-1, keepdim=True) + 1e-7))
        loss = F.cross_entropy(z, y - self.offsets[-2])  # CE(h_t(f_t(x)), y - K_t), dlora L300-308
        if t > 0 and self.sr_weight > 0:  # + lambda_SR L_SR (dlora L311-318)
            old = self.previous_block_cls(x)  # F_{t-1}(x), no graph
            loss = loss + self.sr_weight * relation_loss(feats, old, self.cfg.relation, self.cfg.sr_beta)
        return loss

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        if self.cfg.ca != "none":  # dlora L218-221
            mean, cov = class_statistics(self.vit, data.plain, classes)
            self.ca_mean[classes] = mean
            self.ca_cov[classes] = cov.float()
            if t >= 1:
                self.align_heads(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(features(self.vit, x))

    def merged(self) -> nn.Module:
        """The inference model: the heads over a copy of the ViT with every branch's B_s A_s in its qkv rows."""
        ads = self.adapters
        return Merged(fold(self.vit, lambda i, m: sum(b.B[m] @ b.A[m] for b in ads[i].branches)
                           if m in ads[i].targets and ads[i].branches else None), copy.deepcopy(self.heads))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[TaskLoRA]:
        """The per-block adapters, registered once: under vit.blocks.{i}.attn.qkv_adapter."""
        return [blk.attn.qkv_adapter for blk in self.vit.blocks]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    @contextlib.contextmanager
    def previous_model(self):
        """Within the block, every adapter adds the frozen branches s <= t-1 alone: the network is the previous
        model (sinet L123-126). Left on any exit, an exception included."""
        for ad in self.adapters:
            ad.current = False
        try:
            yield
        finally:
            for ad in self.adapters:
                ad.current = True

    @torch.no_grad()
    def previous_block_cls(self, x: torch.Tensor) -> torch.Tensor:
        """F_{t-1}(x): the per-block CLS features of the previous model, without a graph."""
        with self.previous_model():
            return block_cls(self.vit, x)

    @torch.enable_grad()
    def align_heads(self, t: int) -> None:
        """SR²'s classifier alignment after task t (dlora L410-488): only the heads h_0..h_t change."""
        cfg, C, device = self.cfg, self.offsets[-1], self.ca_mean.device
        means = self.ca_mean[:C].float()
        eye = torch.eye(self.ca_cov.shape[-1], dtype=torch.float64, device=device)
        trils = torch.linalg.cholesky(self.ca_cov[:C].double() + cfg.ca_shrink * eye).float()
        params = [p for h in self.heads for p in h.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=cfg.ca_lr, momentum=0.9, weight_decay=cfg.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.ca_tmax)
        n = cfg.ca_samples or 5 * cfg.batch_size
        with torch.autocast(device_type=device.type, enabled=False):
            for _ in range(cfg.ca_epochs):
                feats, labels = gaussian_replay(means, trils, n)
                perm = torch.randperm(len(labels)).to(device)
                feats, labels = feats[perm], labels[perm]
                for i in range(C):  # |C_<=t| batches of n samples per epoch
                    z = self.logits(feats[i * n:(i + 1) * n])
                    if cfg.ca == "sr2":
                        loss = alignment_loss(z, labels[i * n:(i + 1) * n], cfg.ca_logit_norm)
                    else:
                        loss = F.cross_entropy(z, labels[i * n:(i + 1) * n])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sched.step()
        for p in params:
            p.requires_grad_(False)
            p.grad = None


Method = SR2LoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def relation_matrix(feats: torch.Tensor) -> torch.Tensor:
    """R = sym(F F^T) per sample: (B, L, d) -> (B, L, L); raw Gram, no centring or normalisation (dlora L314, L494)."""
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
        if kind == "spectral":  # per-sample spectra, mean smooth-L1 over B x L (dlora L492-498)
            lam_new, lam_old = spectrum(torch.cat([new, old])).chunk(2)  # one solver call: same rounding for both
            return F.smooth_l1_loss(lam_new, lam_old.detach(), beta=beta)
        if kind == "batch":  # ablation: spectrum of the batch-mean relation matrix (dlora L500-511, unused)
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
def class_statistics(vit: nn.Module, loader, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (float64) of f(x) for every class of `classes`, in that order
    (dlora L380-408; the 1e-2 I it adds there is added at sampling time here)."""
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


def gaussian_replay(means: torch.Tensor, trils: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples per class c from N(means[c], trils[c] trils[c]^T) with torch's global generator, and their
    labels c: (C * n, d), (C * n,), class by class (dlora L432-443)."""
    C, d = means.shape
    z = torch.randn(C, n, d, device=means.device, dtype=means.dtype)
    x = means[:, None, :] + z @ trils.transpose(1, 2)
    return x.reshape(C * n, d), torch.arange(C, device=means.device).repeat_interleave(n)


def alignment_loss(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """SR²'s alignment loss: mean entropy of softmax(z) (minimised) + CE on the per-sample normalised logits
    z / (tau (||z||_2 + 1e-7)) (dlora L462-466; utils/losses.py L55-63)."""
    entropy = -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()
    z_norm = z / (tau * (z.norm(dim=-1, keepdim=True) + 1e-7))
    return entropy + F.cross_entropy(z_norm, y)


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


def epoch_cosine(epochs: int, steps_per_epoch: int):
    """CosineAnnealingLR(T_max = epochs) stepped per epoch, as a per-step multiplier: (1 + cos(pi e / E)) / 2."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return 0.5 * (1 + math.cos(math.pi * min(e, epochs) / max(epochs, 1)))
    return factor
