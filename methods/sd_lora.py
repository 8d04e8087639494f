"""SD-LoRA: Scalable Decoupled LoRA, with its -RR (rank reduction) and -KD (least-squares absorption) variants.

Paper: Wu, Piao, Huang, Wang, Li, Pfister, Meng, Ma, Wei, "SD-LoRA: Scalable Decoupled Low-Rank Adaptation
for Class Incremental Learning", ICLR 2025, arXiv 2501.13198.
Official code: WuYichen-97/SD-Lora-CL @ 8bacded (`models/sdlora.py`, `backbone/lora.py`), a LAMDA-PILOT fork;
the -KD variant is not in it. Spec: ../shared/specs/sd_lora.md (section numbers below refer to it).

Implements (Up = d x r up-projection, Dn = r x d down-projection; paper: A = Up, B = Dn):
    per task t, one new component (Up_t = 0, Dn_t Kaiming-uniform a = sqrt 5) on q and v of every block
    h^m(x) = W^m x + b^m + sum_{k<t} s_k Dbar_k^m x + s_t Up_t^m Dn_t^m x          Eq. 4 (spec §5)
        Dbar_k^m = Up_k^m Dn_k^m / nu_k^m, frozen; nu = |Up|_F |Dn|_F ("prod", code) or |Up Dn|_F ("frob", paper)
        s_k = alpha_k + delta_k: alpha_k one learnable scalar per task SHARED by all 2L adapted matrices,
        delta_k a frozen KD offset (0 unless -KD absorbed something into it)
    loss: CE(z[:, K_t:C_t], y - K_t), z = plain linear head (grown per task) on f(x)   (spec §6, logit masking)
    inference: argmax over all C_t logits, no task id; `merged_vit()` folds every component into W (spec §5)
    -RR: rank of the new component r_t = 10 (t < 4), 8 (4 <= t < 8), 6 (t >= 8), code thresholds (spec §11)
    -KD, after task t >= 1 (Alg. 1 / Eq. 8, reconstructed as spec §11 recommends): fit the applied update
        U_t^m = s_t Up_t^m Dn_t^m by sum_k c_k Dbar_k^m jointly over all matrices m (normal equations G c = g,
        trace form, no d x d matrix); residual rho = sqrt(|U|^2 - 2 c.g + c.G c); if rho <= tau:
        delta_k += c_k and component t is dropped (its factors are zeroed and flagged, see Method.grow).
Defaults (official code, CIFAR-100 config; spec §7): SGD momentum 0.9, wd 0, lr 8e-3, constant lr
(the code's MultiStepLR milestones lie beyond the training length), 20 epochs, batch 128, rank 10,
alpha_init 0.8 with every alpha re-created at 0.8 each task, "prod" normalisation, tau = 9e-4 (paper).

Deviations:
- none from the official code for the plain method (the paper's Adam, alpha = 1, unit-Frobenius
  normalisation and persistent magnitudes are flags: optimizer, alpha_init, norm_mode, magnitudes).
- The code keeps 20 + 1 magnitude slots; here alpha has exactly t + 1 entries (the unused slots get no
  gradient there, so the function and the training are the same).
- -KD is a reconstruction (spec §11, [ASSUMED]): the target is the applied update s_t Up_t Dn_t and the fit
  is global over all matrices, so that the shared magnitudes stay shared and the absorption preserves the
  function up to rho. kd_target="direction" fits the normalised direction instead (paper-literal Eq. 8,
  not function-preserving). Per-matrix fits (LibContinual) are not offered: they break magnitude sharing.
- -KD "deletes" an absorbed component by zeroing its factors and clearing its `kept` flag instead of
  removing the tensors, so that grow(t, classes) alone rebuilds the checkpoint's structure on --resume;
  `stored_parameters()` counts kept components only (the zeros are a checkpoint artefact).
- The optional "continuity mode" of spec S4 (preserving the function across task boundaries) is not
  implemented: the code's discontinuous reset is reproduced as is.

Run: python train.py --method sd_lora --tasks 10        (--variant rr / --variant kd for the variants)
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
    variant: str = "base"
    """'base' (SD-LoRA), 'rr' (rank reduction: ranks from rr_ranks) or 'kd' (least-squares absorption)"""
    rank: int = 10
    """rank of every new component for 'base' and 'kd' (paper and code: 10)"""
    rr_ranks: str = "10,10,10,10,8,8,8,8,6"
    """'rr': rank of task t's component, comma-separated, the last value repeats (code: 10 if t<4, 8 if t<8, else 6)"""
    norm_mode: str = "prod"
    """direction normaliser: 'prod' = |Up|_F |Dn|_F (official code) or 'frob' = |Up Dn|_F (paper)"""
    alpha_init: float = 0.8
    """initial value of every magnitude (code: 0.8; paper: 1.0)"""
    magnitudes: str = "reset"
    """'reset': all magnitudes re-created at alpha_init every task (code); 'carry': keep the learned values (paper)"""
    kd_tau: float = 9e-4
    """'kd': absorb the new component when its least-squares residual is <= kd_tau (paper: 9e-4)"""
    kd_threshold: str = "absolute"
    """'kd': compare kd_tau with the residual rho ('absolute', paper) or with rho / |U_t| ('relative')"""
    kd_target: str = "update"
    """'kd': fit the applied update s_t Up_t Dn_t ('update', function-preserving) or the direction ('direction',
    paper-literal)"""
    optimizer: str = "sgd"
    """'sgd' with momentum 0.9 (official code) or 'adam' (paper text)"""
    lr: float = 8e-3
    """learning rate (code, CIFAR-100: 8e-3; ImageNet-R: 1e-2; paper: 8e-3)"""
    momentum: float = 0.9
    """SGD momentum (official code)"""
    weight_decay: float = 0.0
    """weight decay (official code: 0; must stay 0 for the old head rows to stay bit-identical)"""
    milestones: str = ""
    """epochs at which the lr is multiplied by lr_decay, comma-separated; '' = constant lr (code, CIFAR-100)"""
    lr_decay: float = 0.1
    """MultiStepLR factor at each milestone (code: 0.1; ImageNet-A 0.05)"""
    epochs: int = 20
    """epochs per task (official code; paper: 20, ImageNet-R 30)"""
    batch_size: int = 128
    """training batch size (paper and code)"""


# the backbone of the `paper` preset: SD-LoRA's code and logs use the IN-21K -> IN-1K fine-tuned ViT-B/16 of
# timm >= 0.9 (protocol.md §6, §12), not the IN-21K weights the other methods start from
PAPER_WEIGHTS = "vit_base_patch16_224.augreg2_in21k_ft_in1k"

CHOICES = {
    "variant": ("base", "rr", "kd"),
    "norm_mode": ("prod", "frob"),
    "magnitudes": ("reset", "carry"),
    "kd_threshold": ("absolute", "relative"),
    "kd_target": ("update", "direction"),
    "optimizer": ("sgd", "adam"),
}

# ----------------------------------------------------------------------------------------------------
# LoRA


class Component(nn.Module):
    """One task's LoRA component in one block: Up (d x r), Dn (r x d) for q and v, and its normalisers."""

    def __init__(self, d: int, rank: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.Dn = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d, **kw)) for m in "qv"})
        self.Up = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank, **kw)) for m in "qv"})
        for dn in self.Dn.values():
            nn.init.kaiming_uniform_(dn, a=math.sqrt(5))  # U(-1/sqrt d, 1/sqrt d), as Linear(d -> r)
        self.register_buffer("nu", torch.zeros(2, **kw))  # normaliser of q, v; set when frozen (grow)


class Magnitudes(nn.Module):
    """s_k = alpha_k + delta_k, one per task, shared by every adapted matrix; `kept` flags stored components."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(0))  # learnable, re-created by Method.grow
        self.register_buffer("offset", torch.zeros(0))  # delta_k: frozen KD absorptions
        self.register_buffer("kept", torch.zeros(0, dtype=torch.bool))  # False once -KD absorbed a component
        self.kept_list: list[bool] = []  # host copy of `kept`, so that a forward needs no device sync
        self.register_load_state_dict_post_hook(lambda mod, _: setattr(mod, "kept_list", mod.kept.tolist()))

    def scales(self) -> torch.Tensor:
        return self.alpha + self.offset


class QVAdapter(nn.Module):
    """The components of one block: delta^m(x) = sum_k w_k^m Up_k^m Dn_k^m x for m in {q, v} (Eq. 4)."""

    def __init__(self, mags: Magnitudes):
        super().__init__()
        self.comps = nn.ModuleList()
        self._mags = (mags,)  # a tuple: the shared magnitudes are registered once, in the Method

    def terms(self, m: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(Up_k, Dn_k, w_k) of every stored component; w_k = s_k / nu_k for frozen ones, s_t for the current."""
        mags = self._mags[0]
        s, t, i = mags.scales(), len(self.comps) - 1, "qv".index(m)
        return [(c.Up[m], c.Dn[m], s[k] if k == t else s[k] / c.nu[i])  # Eq. 4
                for k, c in enumerate(self.comps) if mags.kept_list[k]]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for m in "qv":
            terms = self.terms(m)
            if terms:  # one low-rank product over all components: (x Dn_cat^T) (Up_cat diag(w))^T
                dn = torch.cat([dn for _, dn, _ in terms])
                up = torch.cat([up * w for up, _, w in terms], dim=1)
                out[m] = F.linear(F.linear(x, dn), up)
        return out

    def delta_weight(self, m: str) -> torch.Tensor:
        """sum_k w_k Up_k Dn_k, the (d x d) update of W^m (merge form, spec §5)."""
        d = self.comps[0].Up[m].shape[0]
        delta = self.comps[0].Up[m].new_zeros(d, d)
        for up, dn, w in self.terms(m):
            delta = delta + w * (up @ dn)
        return delta


# ----------------------------------------------------------------------------------------------------
# Method


class SDLoRA(nn.Module):
    def __init__(self, vit: ViT, num_classes: int, cfg: Config):
        super().__init__()
        _validate(cfg)
        self.cfg = cfg
        self.vit = vit
        self.num_classes = num_classes
        for p in vit.parameters():
            p.requires_grad_(False)
        self.mags = Magnitudes()
        attach(vit, "qkv_adapter", lambda i, attn: QVAdapter(self.mags))
        self.head: nn.Linear | None = None  # one plain linear head, grown to C_t rows (spec §8)
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        self.last_kd: dict = {}  # rho, rho / |U_t| and the decision of the last -KD step

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        """Freeze component t-1 as a direction, add component t, re-create the magnitudes, grow the head.

        Structure depends only on (t, classes): a component that -KD later absorbs keeps its (zeroed)
        tensors and a False `kept` flag, so a checkpoint always loads into grow(0..t)'s structure.
        """
        assert t == len(self.adapters[0].comps) and classes[0] == self.offsets[-1], "tasks must grow in order"
        kw = dict(device=self.vit.cls_token.device, dtype=self.vit.cls_token.dtype)
        d, r = self.vit.embed_dim, self.rank_of(t)
        with torch.no_grad():
            for ad in self.adapters:
                if t >= 1:  # spec §4.1: the last component becomes a frozen, normalised direction
                    prev = ad.comps[t - 1]
                    prev.requires_grad_(False)
                    prev.nu.copy_(torch.stack([normaliser(prev.Up[m], prev.Dn[m], self.cfg.norm_mode) for m in "qv"]))
                ad.comps.append(Component(d, r, **kw))  # spec §4.2: Up = 0, Dn Kaiming
            # spec §4.3: every magnitude re-created at alpha_init (code) or carried over (paper)
            old = self.mags.alpha.detach()
            alpha = torch.full((t + 1,), self.cfg.alpha_init, **kw)
            if self.cfg.magnitudes == "carry":
                alpha[:t] = old
            self.mags.alpha = nn.Parameter(alpha)
            self.mags.offset = torch.cat([self.mags.offset, torch.zeros(1, **kw)])
            self.mags.kept = torch.cat([self.mags.kept, torch.ones(1, dtype=torch.bool, device=kw["device"])])
            self.mags.kept_list = self.mags.kept.tolist()
            # spec §4.4: new rows Kaiming-uniform (linear), bias 0; old rows and biases copied verbatim
            K_t, C_t = self.offsets[-1], self.offsets[-1] + len(classes)
            head = nn.Linear(d, C_t, **kw)
            nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
            nn.init.zeros_(head.bias)
            if self.head is not None:
                head.weight[:K_t] = self.head.weight
                head.bias[:K_t] = self.head.bias
            self.head = head
        self.offsets.append(C_t)

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        """Spec §7: a new optimiser per task over the current component, all magnitudes and the head."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                  weight_decay=self.cfg.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        milestones = _ints(self.cfg.milestones)
        if not milestones:
            return opt, None
        per_step = multistep(milestones, self.cfg.lr_decay, steps_per_epoch)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, per_step)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        K_t = self.offsets[-2]
        return masked_ce(self.forward(x), y, K_t)

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        if self.cfg.variant == "kd" and t >= 1:
            self.kd_absorb(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(x))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[QVAdapter]:
        """The per-block adapters (registered once, under vit.blocks.{i}.attn.qkv_adapter)."""
        return [blk.attn.qkv_adapter for blk in self.vit.blocks]

    def rank_of(self, t: int) -> int:
        """r_t: cfg.rank, or the -RR schedule (spec §11, code thresholds)."""
        if self.cfg.variant != "rr":
            return self.cfg.rank
        ranks = _ints(self.cfg.rr_ranks)
        return ranks[min(t, len(ranks) - 1)]

    @torch.no_grad()
    def kd_absorb(self, t: int) -> bool:
        """-KD (Alg. 1): absorb component t into the offsets of the earlier ones if it is (nearly) their
        linear combination; returns True when absorbed. Solved in float64."""
        mags, s = self.mags, self.mags.scales().double()
        ks = [k for k in range(t) if mags.kept_list[k]]
        parts = []  # per matrix: earlier (Up, Dn, 1/nu) and the target (Up_t, Dn_t, weight)
        for ad in self.adapters:
            for i, m in enumerate("qv"):
                cur = ad.comps[t]
                up, dn = cur.Up[m].double(), cur.Dn[m].double()
                nu_t = normaliser(up, dn, self.cfg.norm_mode)
                w = s[t] if self.cfg.kd_target == "update" else torch.where(nu_t > 0, 1 / nu_t, 0.0)
                parts.append(([(ad.comps[k].Up[m].double(), ad.comps[k].Dn[m].double(),
                                1 / ad.comps[k].nu[i].double()) for k in ks], (up, dn, w)))
        c, rho, norm_u = lstsq_components(parts)  # Eq. 8 (global fit)
        rel = float(rho / norm_u) if norm_u > 0 else 0.0
        absorbed = (rel if self.cfg.kd_threshold == "relative" else float(rho)) <= self.cfg.kd_tau
        self.last_kd = {"task": t, "rho": float(rho), "rho_rel": rel, "absorbed": absorbed}
        print(f"sd_lora-kd task {t + 1}: residual {float(rho):.3e} (relative {rel:.3e}) -> "
              f"{'absorbed into earlier magnitudes' if absorbed else 'kept'}")
        if absorbed:
            mags.offset[ks] += c.to(mags.offset)  # delta_k += c_k (Eq. 8)
            mags.kept[t] = False
            mags.kept_list = mags.kept.tolist()
            for ad in self.adapters:
                for m in "qv":
                    ad.comps[t].Up[m].zero_()
                    ad.comps[t].Dn[m].zero_()
        return absorbed

    def stored_parameters(self) -> int:
        """LoRA parameters of the stored components (absorbed ones do not count): 4 L d r_t per kept task."""
        return sum(p.numel() for ad in self.adapters for k, c in enumerate(ad.comps)
                   if self.mags.kept_list[k] for p in c.parameters())

    @torch.no_grad()
    def merged_vit(self) -> ViT:
        """A copy of the ViT with W_eff^m = W^m + sum_k w_k Up_k Dn_k written into q and v, and no adapters."""
        vit = copy.deepcopy(self.vit)
        d = vit.embed_dim
        for blk, ad in zip(vit.blocks, self.adapters):
            for m in "qv":
                blk.attn.qkv.weight[qkv_rows(m, d)] += ad.delta_weight(m)
            blk.attn.qkv_adapter = None
        return vit


Method = SDLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def masked_ce(z: torch.Tensor, y: torch.Tensor, K_t: int) -> torch.Tensor:
    """CE on the current task's logits only (spec §6): CE(z[:, K_t:], y - K_t); plain CE when K_t = 0."""
    return F.cross_entropy(z[:, K_t:], y - K_t)


def frob_inner(up1: torch.Tensor, dn1: torch.Tensor, up2: torch.Tensor, dn2: torch.Tensor) -> torch.Tensor:
    """<Up1 Dn1, Up2 Dn2>_F = tr((Up1^T Up2)(Dn2 Dn1^T)), without forming a d x d matrix (ranks may differ)."""
    return ((up1.T @ up2) * (dn1 @ dn2.T)).sum()


def normaliser(up: torch.Tensor, dn: torch.Tensor, mode: str) -> torch.Tensor:
    """nu: |Up|_F |Dn|_F ('prod', official code) or |Up Dn|_F ('frob', paper)."""
    if mode == "prod":
        return up.norm() * dn.norm()
    return frob_inner(up, dn, up, dn).clamp_min(0).sqrt()


def direction(up: torch.Tensor, dn: torch.Tensor, mode: str) -> torch.Tensor:
    """Dbar = Up Dn / nu, the frozen direction of a component (spec §5); d x d, for tests and inspection."""
    return up @ dn / normaliser(up, dn, mode)


def normal_equations(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G_jk = sum_m <D_j^m, D_k^m>_F, g_k = sum_m <D_k^m, U^m>_F and |U|^2, in trace form (spec §11).

    parts: one entry per adapted matrix m: ([(Up_k, Dn_k, w_k) for the earlier k], (Up_t, Dn_t, w_t));
    the directions are D_k^m = w_k Up_k Dn_k and the target is U^m = w_t Up_t Dn_t.
    """
    n, up0 = len(parts[0][0]), parts[0][1][0]
    G, g, uu = up0.new_zeros(n, n), up0.new_zeros(n), up0.new_zeros(())
    for earlier, (up, dn, w) in parts:
        uu += w * w * frob_inner(up, dn, up, dn)
        for j, (up_j, dn_j, w_j) in enumerate(earlier):
            g[j] += w_j * w * frob_inner(up_j, dn_j, up, dn)
            for k, (up_k, dn_k, w_k) in enumerate(earlier):
                G[j, k] += w_j * w_k * frob_inner(up_j, dn_j, up_k, dn_k)
    return G, g, uu


def lstsq_components(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """argmin_c sum_m |U^m - sum_k c_k D_k^m|_F^2 over all adapted matrices jointly (Alg. 1, global fit).

    Returns (c, rho, |U|), rho = sqrt(|U|^2 - 2 c.g + c.G c) the residual norm.
    """
    G, g, uu = normal_equations(parts)
    c = torch.linalg.pinv(G, hermitian=True) @ g  # pinv: G may be singular
    rho = (uu - 2 * c @ g + c @ G @ c).clamp_min(0).sqrt()
    return c, rho, uu.sqrt()


def multistep(milestones: list[int], gamma: float, steps_per_epoch: int):
    """MultiStepLR (stepped per epoch in the code) as a per-step multiplier."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return gamma ** sum(e >= ms for ms in milestones)
    return factor


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v]


def _validate(cfg: Config) -> None:
    for field, allowed in CHOICES.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"{field} must be one of {', '.join(allowed)}, got '{getattr(cfg, field)}'")
    if cfg.rank < 1:
        raise ValueError(f"rank must be >= 1, got {cfg.rank}")
    try:
        ranks, milestones = _ints(cfg.rr_ranks), _ints(cfg.milestones)
    except ValueError:
        raise ValueError("rr_ranks and milestones must be comma-separated integers") from None
    if not ranks or min(ranks) < 1:
        raise ValueError(f"rr_ranks must list ranks >= 1, got '{cfg.rr_ranks}'")
    if milestones and min(milestones) < 1:
        raise ValueError(f"milestones must be epochs >= 1, got '{cfg.milestones}'")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"lr must be a positive number, got {cfg.lr}")
    if not math.isfinite(cfg.alpha_init):
        raise ValueError(f"alpha_init must be finite, got {cfg.alpha_init}")
    if cfg.kd_tau < 0 or cfg.momentum < 0 or cfg.weight_decay < 0 or cfg.lr_decay <= 0:
        raise ValueError("kd_tau, momentum and weight_decay must be >= 0 and lr_decay > 0")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {cfg.epochs}, {cfg.batch_size}")
