"""SD-LoRA: Scalable Decoupled LoRA, with its -RR (rank reduction) and -KD (least-squares absorption) variants.

Paper: Wu, Piao, Huang, Wang, Li, Pfister, Meng, Ma, Wei, "SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class
Incremental Learning", ICLR 2025, arXiv 2501.13198.
Official code: WuYichen-97/SD-Lora-CL @ 8bacded, a LAMDA-PILOT fork; line numbers below are at that commit
(`backbone/lora.py` and `models/sdlora.py`); the -KD variant is not in it.

Implements (A = down-projection r x d, B = up-projection d x r; the paper writes the product as A_k B_k with its A the
up-projection):
    per task t, one new component (B_t = 0, A_t Kaiming-uniform a = sqrt 5; lora.py L378-384) on q and v of every
    block (lora.py L331-345)
    h^m(x) = W^m x + b^m + sum_{k<t} s_k Dbar_k^m x + s_t B_t^m A_t^m x          (paper Eq. 4; lora.py L182-191)
        Dbar_k^m = B_k^m A_k^m / nu_k^m, frozen; nu = |B|_F |A|_F ("prod", lora.py L183) or |B A|_F ("frob", paper)
        s_k = alpha_k + delta_k: alpha_k one learnable scalar per task SHARED by all 2L adapted matrices
        (lora.py L326-328), delta_k a frozen KD offset (0 unless -KD absorbed something into it)
    loss: CE(h_t(f(x)), y - K_t) on the current task's logits only (models/sdlora.py L229-232)
    inference: argmax over [h_0(f); ...; h_t(f)], no task id
    -RR: rank of the new component r_t = 10 (t < 4), 8 (4 <= t < 8), 6 (t >= 8) (models/sdlora.py L76-85, left
        commented out there; L86 sets 10 for every task)
    -KD, after task t >= 1 (paper Alg. 1 / Eq. 8, reconstructed): fit the applied update U_t^m = s_t B_t^m A_t^m by
        sum_k c_k Dbar_k^m jointly over all matrices m (normal equations G c = g, trace form, no d x d matrix);
        residual rho = sqrt(|U|^2 - 2 c.g + c.G c); if rho <= tau: delta_k += c_k and component t is dropped (its
        factors are zeroed and flagged, see Method.grow).
Defaults (exps/sdlora_c100.json; models/sdlora.py L114-121): SGD momentum 0.9, no weight decay, lr 8e-3; constant lr
(MultiStepLR milestones [40, 70] lie beyond the 20 epochs; task 0's [60, 120, 170], L101-103, too), 20 epochs,
batch 128, rank 10; alpha_init 0.8 with every alpha re-created at 0.8 each task (the network is rebuilt every task,
L109, with fresh magnitudes, lora.py L326-328); "prod" normalisation; tau = 9e-4 (paper). Other datasets: OFFICIAL.

Where the equations live: Eq. 4 in Adapter.forward (its frozen terms, with w_k = s_k / nu_k: Adapter.frozen; folded
into W for inference: Adapter.delta, Method.merged); nu and 1/nu: normaliser, inverse_norm (frozen in Method.grow);
s_k: Magnitudes.scales (reset in Method.grow); the loss: Method.loss; -RR: Method.rank_of; -KD (Alg. 1, Eq. 8):
Method.kd_absorb, lstsq_components, normal_equations.

Deviations:
- A component whose B is still zero (a task on which the loss never moved it, e.g. a one-class task, whose local CE
  is identically 0) is a zero direction: 1/nu is taken as 0 where nu = 0. The code divides 0 by 0 there
  (lora.py L183-188) and its output is NaN.
- The code keeps 20 + 1 magnitude slots (lora.py L328); here alpha has exactly t + 1 entries (the unused slots get
  no gradient there, so the function and the training are the same).
- One Linear head per task, concatenated, each initialised like the code's SimpleLinear (Kaiming-uniform, bias 0;
  backbone/linears.py L27-29); the code grows one head and copies the old rows (utils/inc_net.py L276-283), whose
  old rows get no gradient under the masked loss and, with weight decay 0, stay unchanged as the old heads here do.
  With --weight-decay > 0 the code would also decay the old rows.
- The paper's values are flags: optimizer adam, alpha_init 1, norm_mode frob (unit Frobenius), magnitudes carry.
- -KD is a reconstruction: the target is the applied update s_t B_t A_t and the fit is global over all matrices, so
  that the shared magnitudes stay shared and the absorption preserves the function up to rho.
  kd_target="direction" fits the normalised direction instead (paper-literal Eq. 8, not function-preserving).
  Per-matrix fits are not offered: they break magnitude sharing.
- -KD "deletes" an absorbed component by zeroing its factors and clearing its `kept` flag instead of removing the
  tensors, so that grow(t, classes) alone rebuilds the checkpoint's structure on --resume.
- The function changes at a task boundary (every magnitude is reset to alpha_init): the code's behaviour, as is.
- Cost that does not grow with the tasks. The code runs every earlier component as its own pair of small products
  in every forward (lora.py L161-191; inference `_LoRA_qkv_timm_eval`, L231-250). Here the frozen components enter
  as one stacked product (`backbone.low_rank`), and train.py evaluates `merged()`: sum_k w_k B_k^m A_k^m written
  into the q and v rows of a copy of the ViT, one plain backbone forward; the logits of `forward` up to rounding.

Run: python train.py --method sd_lora --tasks 10        (--variant rr / --variant kd for the variants)
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
    variant: str = "base"
    """'base' (SD-LoRA), 'rr' (rank reduction: ranks from rr_ranks) or 'kd' (least-squares absorption)"""
    rank: int = 10
    """rank of every new component for 'base' and 'kd' (paper and code: 10)"""
    rr_ranks: str = "10,10,10,10,8,8,8,8,6"
    """'rr': rank of task t's component, comma-separated, the last value repeats (code: 10 if t<4, 8 if t<8, else 6)"""
    norm_mode: str = "prod"
    """direction normaliser: 'prod' = |B|_F |A|_F (official code) or 'frob' = |B A|_F (paper)"""
    alpha_init: float = 0.8
    """initial value of every magnitude (code: 0.8; paper: 1.0)"""
    magnitudes: str = "reset"
    """'reset': all magnitudes re-created at alpha_init every task (code); 'carry': keep the learned values (paper)"""
    kd_tau: float = 9e-4
    """'kd': absorb the new component when its least-squares residual is <= kd_tau (paper: 9e-4)"""
    kd_threshold: str = "absolute"
    """'kd': compare kd_tau with the residual rho ('absolute', paper) or with rho / |U_t| ('relative')"""
    kd_target: str = "update"
    """'kd': fit the applied update s_t B_t A_t ('update', function-preserving) or the direction (paper-literal)"""
    optimizer: str = "sgd"
    """'sgd' with momentum 0.9 (official code) or 'adam' (paper text)"""
    lr: float = 8e-3
    """learning rate (code, CIFAR-100: 8e-3; ImageNet-R: 1e-2; paper: 8e-3)"""
    later_lr: float = 0.0
    """lr of the tasks t >= 1 ('lrate', models/sdlora.py L114-118; 0: lr, as in every config but ImageNet-A's)"""
    momentum: float = 0.9
    """SGD momentum (official code)"""
    weight_decay: float = 0.0
    """weight decay (official code: none, models/sdlora.py L95-100, L114-118)"""
    milestones: str = ""
    """epochs at which the lr is multiplied by lr_decay, comma-separated; '' = constant lr (code, CIFAR-100)"""
    lr_decay: float = 0.1
    """MultiStepLR factor at each milestone (code: 0.1; ImageNet-A 0.05)"""
    epochs: int = 20
    """epochs per task (official code; paper: 20, ImageNet-R 30)"""
    batch_size: int = 128
    """training batch size (paper and code)"""


# the `paper` preset's backbone: the code creates timm's "vit_base_patch16_224" (models/sdlora.py L70), whose default
# tag in timm >= 0.9 is IN-21K -> IN-1K fine-tuned, not the IN-21K weights the other methods start from
PAPER_WEIGHTS = "vit_base_patch16_224.augreg2_in21k_ft_in1k"

# official settings per dataset (`train.py --preset paper --dataset NAME`), exps/sdlora_{c100,inr,ina,dom}.json: tasks
# L8-9, seed L13 or L17, epochs L18/L23, init_lr L19, lrate L24, milestones L20/L25 (dom's 10000 never comes), decay
# L21/L26. No CUB config; dom's never ran at 8bacded (no DomainNet loader: utils/data_manager.py L242).
OFFICIAL = {"cifar100": dict(tasks=10, order_seed=1993), "imagenet_r": dict(tasks=10, order_seed=1995, lr=1e-2),
            "imagenet_a": dict(tasks=10, order_seed=1993, lr=1e-2, later_lr=5e-3, milestones="10,15", lr_decay=0.05),
            "domainnet": dict(tasks=5, order_seed=1993, epochs=10, lr=0.02, milestones="4,6,8", lr_decay=0.005)}

CHOICES = {"variant": ("base", "rr", "kd"), "norm_mode": ("prod", "frob"), "magnitudes": ("reset", "carry"),
           "kd_threshold": ("absolute", "relative"), "kd_target": ("update", "direction"), "optimizer": ("sgd", "adam")}


def validate(cfg: Config, vit: nn.Module | None = None) -> None:
    """Raise ValueError for the first option of `cfg` that cannot run."""
    ranks, milestones = ints(cfg.rr_ranks), ints(cfg.milestones)
    check_options(cfg, CHOICES, [
        ("rank", cfg.rank >= 1, ">= 1"), ("later_lr", math.isfinite(cfg.later_lr) and cfg.later_lr >= 0, ">= 0"),
        ("rr_ranks", bool(ranks) and min(ranks) >= 1, "ranks >= 1, comma-separated"),
        ("milestones", milestones is not None and all(e >= 1 for e in milestones), "epochs >= 1, comma-separated"),
        ("lr", math.isfinite(cfg.lr) and cfg.lr > 0, "> 0"), ("alpha_init", math.isfinite(cfg.alpha_init), "finite"),
        ("kd_tau", cfg.kd_tau >= 0, ">= 0"), ("momentum", cfg.momentum >= 0, ">= 0"),
        ("weight_decay", cfg.weight_decay >= 0, ">= 0"), ("lr_decay", cfg.lr_decay > 0, "> 0"),
        ("epochs", cfg.epochs >= 0, ">= 0"), ("batch_size", cfg.batch_size >= 1, ">= 1")])


# ----------------------------------------------------------------------------------------------------
# Adapters


class Component(nn.Module):
    """One task's LoRA in one block: A (r x d, down) and B (d x r, up) for q and v, and their normalisers."""

    def __init__(self, d: int, rank: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.A = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d, **kw)) for m in "qv"})  # down
        self.B = nn.ParameterDict({m: nn.Parameter(torch.zeros(d, rank, **kw)) for m in "qv"})  # up
        for a in self.A.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # U(-1/sqrt d, 1/sqrt d), as Linear(d -> r)
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


class Adapter(nn.Module):
    """The components of one block: delta_m = sum_{k<t} w_k^m B_k^m (A_k^m x) + s_t B_t^m (A_t^m x) (paper Eq. 4)."""

    def __init__(self, mags: Magnitudes):
        super().__init__()
        self.targets = "qv"
        self.comps = nn.ModuleList()
        self._mags = (mags,)  # a tuple: the shared magnitudes are registered once, in the Method

    def frozen(self, m: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """A_k, B_k and w_k = s_k / nu_k^m (0 where nu_k = 0) of the kept frozen components k < t."""
        mags, cs = self._mags[0], self.comps
        ks = [k for k in range(len(cs) - 1) if mags.kept_list[k]]
        s = mags.scales().unbind()
        w = torch.stack([s[k] for k in ks]) * inverse_norm(torch.stack([cs[k].nu["qv".index(m)] for k in ks])) \
            if ks else None
        return [cs[k].A[m] for k in ks], [cs[k].B[m] for k in ks], w

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out, c = {}, self.comps[-1]  # an absorbed current component (-KD, zeroed factors) adds exactly 0
        for m in self.targets:
            current = F.linear(F.linear(x, c.A[m]), c.B[m] * self._mags[0].scales()[-1])  # s_t B_t (A_t x)
            frozen = low_rank(x, *self.frozen(m))  # sum_{k<t} w_k B_k (A_k x), one product
            out[m] = current if frozen is None else frozen + current
        return out

    def delta(self, m: str) -> torch.Tensor:
        """The (d x d) update of W^m that forward applies: sum_{k<t} w_k B_k A_k + s_t B_t A_t."""
        c, (A, B, w) = self.comps[-1], self.frozen(m)
        return sum((w_k * (b @ a) for a, b, w_k in zip(A, B, [] if w is None else w.unbind())),
                   self._mags[0].scales()[-1] * (c.B[m] @ c.A[m]))


# ----------------------------------------------------------------------------------------------------
# Method


class SDLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg, vit)
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        self.mags = Magnitudes()
        attach(vit, "qkv_adapter", lambda i, attn: Adapter(self.mags))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        """Freeze component t-1 as a direction, add component t, re-create the magnitudes, add head h_t.

        Structure depends only on (t, classes): a component that -KD later absorbs keeps its (zeroed)
        tensors and a False `kept` flag, so a checkpoint always loads into grow(0..t)'s structure.
        """
        assert t == len(self.heads) and classes[0] == self.offsets[-1], "tasks must grow in order"
        kw = dict(device=self.vit.cls_token.device, dtype=self.vit.cls_token.dtype)
        self.heads.append(linear_head(self.vit.embed_dim, len(classes), **kw))
        self.offsets.append(self.offsets[-1] + len(classes))
        for s, h in enumerate(self.heads):
            h.requires_grad_(s == t)
        d, r = self.vit.embed_dim, self.rank_of(t)
        with torch.no_grad():
            for ad in self.adapters:
                if t >= 1:  # the last component becomes a frozen, normalised direction
                    prev = ad.comps[t - 1]
                    prev.requires_grad_(False)
                    prev.nu.copy_(torch.stack([normaliser(prev.B[m], prev.A[m], self.cfg.norm_mode) for m in "qv"]))
                ad.comps.append(Component(d, r, **kw))
            # every magnitude re-created at alpha_init (code) or carried over (paper)
            old = self.mags.alpha.detach()
            alpha = torch.full((t + 1,), self.cfg.alpha_init, **kw)
            if self.cfg.magnitudes == "carry":
                alpha[:t] = old
            self.mags.alpha = nn.Parameter(alpha)
            self.mags.offset = torch.cat([self.mags.offset, torch.zeros(1, **kw)])
            self.mags.kept = torch.cat([self.mags.kept, torch.ones(1, dtype=torch.bool, device=kw["device"])])
            self.mags.kept_list = self.mags.kept.tolist()

    def begin_task(self, t: int, classes: list[int], data) -> None:
        pass

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        lr = self.cfg.later_lr if len(self.offsets) > 2 and self.cfg.later_lr else self.cfg.lr  # init_lr / lrate
        opt = (torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)
               if self.cfg.optimizer == "sgd" else torch.optim.Adam(params, lr=lr, weight_decay=self.cfg.weight_decay))
        milestones = ints(self.cfg.milestones)  # none: a constant lr, no scheduler
        factor = multistep(milestones, self.cfg.lr_decay, steps_per_epoch)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor) if milestones else None

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.heads[-1](features(self.vit, x)), y - self.offsets[-2])  # y - K_t

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        if self.cfg.variant == "kd" and t >= 1:
            self.kd_absorb(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(features(self.vit, x))

    def merged(self) -> nn.Module:
        """The inference model: the heads over a copy of the ViT with each Adapter.delta in its q, v rows."""
        ads = self.adapters
        return Merged(fold(self.vit, lambda i, m: ads[i].delta(m) if m in ads[i].targets else None),
                      copy.deepcopy(self.heads))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[Adapter]:
        """The per-block adapters, registered once: under vit.blocks.{i}.attn.qkv_adapter."""
        return [blk.attn.qkv_adapter for blk in self.vit.blocks]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    def rank_of(self, t: int) -> int:
        """r_t: cfg.rank, or the -RR schedule (models/sdlora.py L76-85)."""
        ranks = ints(self.cfg.rr_ranks) if self.cfg.variant == "rr" else [self.cfg.rank]
        return ranks[min(t, len(ranks) - 1)]

    @torch.no_grad()
    def kd_absorb(self, t: int) -> dict:
        """-KD (paper Alg. 1): absorb component t into the offsets of the earlier ones if it is (nearly) their
        linear combination. Solved in float64. Returns {'rho', 'rho_rel', 'absorbed'}."""
        mags, s = self.mags, self.mags.scales().double()
        ks = [k for k in range(t) if mags.kept_list[k]]
        parts = []  # per matrix: earlier (B, A, 1/nu) and the target (B_t, A_t, weight)
        for ad in self.adapters:
            for i, m in enumerate("qv"):
                cur = ad.comps[t]
                b, a = cur.B[m].double(), cur.A[m].double()
                w = s[t] if self.cfg.kd_target == "update" else inverse_norm(normaliser(b, a, self.cfg.norm_mode))
                parts.append(([(ad.comps[k].B[m].double(), ad.comps[k].A[m].double(),
                                inverse_norm(ad.comps[k].nu[i].double())) for k in ks], (b, a, w)))
        c, rho, norm_u = lstsq_components(parts)  # paper Eq. 8, one fit over every matrix
        rel = float(rho / norm_u) if norm_u > 0 else 0.0
        absorbed = (rel if self.cfg.kd_threshold == "relative" else float(rho)) <= self.cfg.kd_tau
        print(f"[sd_lora] task {t + 1}: -KD residual {float(rho):.3e} (relative {rel:.3e}) -> "
              f"{'absorbed into earlier magnitudes' if absorbed else 'kept'}")
        if absorbed:
            mags.offset[ks] += c.to(mags.offset)  # delta_k += c_k
            mags.kept[t] = False
            mags.kept_list = mags.kept.tolist()
            for p in (p for ad in self.adapters for p in ad.comps[t].parameters()):
                p.zero_()
        return {"rho": float(rho), "rho_rel": rel, "absorbed": absorbed}


Method = SDLoRA

# ----------------------------------------------------------------------------------------------------
# Utilities


def linear_head(d: int, n: int, **kw) -> nn.Linear:
    """A head for n classes initialised as the code's SimpleLinear: Kaiming-uniform (linear), bias 0
    (backbone/linears.py L27-29)."""
    head = nn.Linear(d, n, **kw)
    nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
    nn.init.zeros_(head.bias)
    return head


def frob_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)), without forming a d x d matrix (ranks may differ)."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def normaliser(b: torch.Tensor, a: torch.Tensor, mode: str) -> torch.Tensor:
    """nu: |B|_F |A|_F ('prod', official code) or |B A|_F ('frob', paper)."""
    return b.norm() * a.norm() if mode == "prod" else frob_inner(b, a, b, a).clamp_min(0).sqrt()


def inverse_norm(nu: torch.Tensor) -> torch.Tensor:
    """1 / nu where nu > 0, else 0: a component with B = 0 is a zero direction (finite values and gradients)."""
    positive = nu > 0
    return torch.where(positive, 1 / torch.where(positive, nu, torch.ones_like(nu)), torch.zeros_like(nu))


def normal_equations(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G_jk = sum_m <D_j^m, D_k^m>_F, g_k = sum_m <D_k^m, U^m>_F and |U|^2, in trace form.

    parts: one entry per adapted matrix m: ([(B_k, A_k, w_k) for the earlier k], (B_t, A_t, w_t));
    the directions are D_k^m = w_k B_k A_k and the target is U^m = w_t B_t A_t.
    """
    n, b0 = len(parts[0][0]), parts[0][1][0]
    G, g, uu = b0.new_zeros(n, n), b0.new_zeros(n), b0.new_zeros(())
    for earlier, (b, a, w) in parts:
        uu += w * w * frob_inner(b, a, b, a)
        for j, (b_j, a_j, w_j) in enumerate(earlier):
            g[j] += w_j * w * frob_inner(b_j, a_j, b, a)
            for k, (b_k, a_k, w_k) in enumerate(earlier):
                G[j, k] += w_j * w_k * frob_inner(b_j, a_j, b_k, a_k)
    return G, g, uu


def lstsq_components(parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """argmin_c sum_m |U^m - sum_k c_k D_k^m|_F^2 over all adapted matrices jointly (paper Alg. 1, one fit).

    Returns (c, rho, |U|), rho = sqrt(|U|^2 - 2 c.g + c.G c) the residual norm.
    """
    G, g, uu = normal_equations(parts)
    c = torch.linalg.pinv(G, hermitian=True) @ g  # pinv: G may be singular
    rho = (uu - 2 * c @ g + c @ G @ c).clamp_min(0).sqrt()
    return c, rho, uu.sqrt()


def multistep(milestones: list[int], gamma: float, steps_per_epoch: int):
    """MultiStepLR (models/sdlora.py L119-121, stepped once per epoch at L247) as a per-step multiplier."""
    def factor(step: int) -> float:
        e = step // max(steps_per_epoch, 1)
        return gamma ** sum(e >= ms for ms in milestones)
    return factor


def ints(text: str) -> list[int] | None:
    """'10, 8,6' -> [10, 8, 6]; None if a value is not an integer."""
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        return None
