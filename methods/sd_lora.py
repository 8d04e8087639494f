"""SD-LoRA: Scalable Decoupled LoRA, with its -RR (rank reduction) and -KD (least-squares absorption) variants.

Paper: Wu, Piao, Huang, Wang, Li, Pfister, Meng, Ma, Wei, "SD-LoRA: Scalable Decoupled Low-Rank Adaptation
for Class Incremental Learning", ICLR 2025, arXiv 2501.13198.
Official code: WuYichen-97/SD-Lora-CL @ 8bacded, a LAMDA-PILOT fork; line numbers below are at that commit
(`backbone/lora.py` and `models/sdlora.py`); the -KD variant is not in it.

Implements (A = down-projection r x d, B = up-projection d x r; the paper writes the product as A_k B_k with
its A the up-projection):
    per task t, one new component (B_t = 0, A_t Kaiming-uniform a = sqrt 5; lora.py L378-384) on q and v of
    every block (lora.py L331-345)
    h^m(x) = W^m x + b^m + sum_{k<t} s_k Dbar_k^m x + s_t B_t^m A_t^m x          (paper Eq. 4; lora.py L182-191)
        Dbar_k^m = B_k^m A_k^m / nu_k^m, frozen; nu = |B|_F |A|_F ("prod", lora.py L183) or |B A|_F ("frob", paper)
        s_k = alpha_k + delta_k: alpha_k one learnable scalar per task SHARED by all 2L adapted matrices
        (lora.py L326-328), delta_k a frozen KD offset (0 unless -KD absorbed something into it)
    loss: CE(h_t(f(x)), y - K_t) on the current task's logits only (models/sdlora.py L229-232)
    inference: argmax over [h_0(f); ...; h_t(f)], no task id; `merged_vit()` folds every component into W
    -RR: rank of the new component r_t = 10 (t < 4), 8 (4 <= t < 8), 6 (t >= 8) (models/sdlora.py L76-85, left
        commented out there; L86 sets 10 for every task)
    -KD, after task t >= 1 (paper Alg. 1 / Eq. 8, reconstructed): fit the applied update U_t^m = s_t B_t^m A_t^m
        by sum_k c_k Dbar_k^m jointly over all matrices m (normal equations G c = g, trace form, no d x d
        matrix); residual rho = sqrt(|U|^2 - 2 c.g + c.G c); if rho <= tau: delta_k += c_k and component t is
        dropped (its factors are zeroed and flagged, see Method.grow).
Defaults (exps/sdlora_c100.json; models/sdlora.py L114-121): SGD momentum 0.9, no weight decay, lr 8e-3;
constant lr (MultiStepLR milestones [40, 70] lie beyond the 20 epochs; task 0's [60, 120, 170], L101-103,
too), 20 epochs, batch 128, rank 10; alpha_init 0.8 with every alpha re-created at 0.8 each task (the
network is rebuilt every task, L109, with fresh magnitudes, lora.py L326-328); "prod" normalisation;
tau = 9e-4 (paper).

Deviations:
- A component whose B is still zero (a task on which the loss never moved it, e.g. a one-class task, whose
  local CE is identically 0) is a zero direction: 1/nu is taken as 0 where nu = 0. The code divides 0 by 0
  there (lora.py L183-188) and its output is NaN.
- The code keeps 20 + 1 magnitude slots (lora.py L328); here alpha has exactly t + 1 entries (the unused
  slots get no gradient there, so the function and the training are the same).
- One Linear head per task, concatenated, each initialised like the code's SimpleLinear (Kaiming-uniform,
  bias 0; backbone/linears.py L27-29); the code grows one head and copies the old rows (utils/inc_net.py
  L276-283), whose old rows get no gradient under the masked loss and, with weight decay 0, stay unchanged
  as the old heads here do. With --weight-decay > 0 the code would also decay the old rows.
- The paper's Adam, alpha = 1, unit-Frobenius normalisation and persistent magnitudes are flags
  (optimizer, alpha_init, norm_mode, magnitudes).
- -KD is a reconstruction: the target is the applied update s_t B_t A_t and the fit is global over all
  matrices, so that the shared magnitudes stay shared and the absorption preserves the function up to rho.
  kd_target="direction" fits the normalised direction instead (paper-literal Eq. 8, not
  function-preserving). Per-matrix fits are not offered: they break magnitude sharing.
- -KD "deletes" an absorbed component by zeroing its factors and clearing its `kept` flag instead of
  removing the tensors, so that grow(t, classes) alone rebuilds the checkpoint's structure on --resume.
- The function changes at a task boundary (every magnitude is reset to alpha_init): the code's behaviour,
  reproduced as is.
- Cost that does not grow with the tasks, the same function up to float rounding. The code runs every
  earlier component as its own pair of small products, one by one, in every forward: training
  (lora.py L161-191) and inference (`_LoRA_qkv_timm_eval`, lora.py L231-250). Here evaluation runs a folded
  copy: `merged_vit()` writes sum_k w_k B_k^m A_k^m into the q and v rows of a copy of the ViT, built once
  per evaluation (`_eval_vit`): one plain backbone forward. In training, the frozen directions k < t enter
  as one product (x A_cat^T)(B_cat diag(s_cols))^T, A_cat the R x d concatenation of their A_k, B_cat of
  their B_k / nu_k, s_cols every column's learnable s_k (so alpha keeps its gradient), or, where that costs
  fewer multiply-adds per token (2 R >= d), as one dense delta (B_cat diag(s_cols)) A_cat formed in the
  forward; the stack is rebuilt by `stack_frozen` at grow and load_state_dict. The current component runs
  as s_t B_t (A_t x).

Run: python train.py --method sd_lora --tasks 10        (--variant rr / --variant kd for the variants)
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
    """'kd': fit the applied update s_t B_t A_t ('update', function-preserving) or the direction ('direction',
    paper-literal)"""
    optimizer: str = "sgd"
    """'sgd' with momentum 0.9 (official code) or 'adam' (paper text)"""
    lr: float = 8e-3
    """learning rate (code, CIFAR-100: 8e-3; ImageNet-R: 1e-2; paper: 8e-3)"""
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


# the backbone of the `paper` preset: SD-LoRA's code creates timm's "vit_base_patch16_224" (models/sdlora.py
# L70), whose default pretrained tag in timm >= 0.9 is the IN-21K -> IN-1K fine-tuned one, not the IN-21K
# weights the other methods start from
PAPER_WEIGHTS = "vit_base_patch16_224.augreg2_in21k_ft_in1k"

CHOICES = {
    "variant": ("base", "rr", "kd"),
    "norm_mode": ("prod", "frob"),
    "magnitudes": ("reset", "carry"),
    "kd_threshold": ("absolute", "relative"),
    "kd_target": ("update", "direction"),
    "optimizer": ("sgd", "adam"),
}


def validate(cfg: Config) -> None:
    """Raise ValueError for a Config that cannot run."""
    for field, allowed in CHOICES.items():
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"--{field.replace('_', '-')} must be one of {', '.join(allowed)} "
                             f"(got {getattr(cfg, field)!r})")
    if cfg.rank < 1:
        raise ValueError(f"--rank must be >= 1 (got {cfg.rank})")
    try:
        ranks = ints(cfg.rr_ranks)
    except ValueError:
        raise ValueError(f"--rr-ranks must be comma-separated integers (got {cfg.rr_ranks!r})") from None
    try:
        milestones = ints(cfg.milestones)
    except ValueError:
        raise ValueError(f"--milestones must be comma-separated integers (got {cfg.milestones!r})") from None
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--rr-ranks must be ranks >= 1, comma-separated (got {cfg.rr_ranks!r})")
    if milestones and min(milestones) < 1:
        raise ValueError(f"--milestones must be epochs >= 1 (got {cfg.milestones!r})")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be > 0 (got {cfg.lr})")
    if not math.isfinite(cfg.alpha_init):
        raise ValueError(f"--alpha-init must be finite (got {cfg.alpha_init})")
    if cfg.kd_tau < 0:
        raise ValueError(f"--kd-tau must be >= 0 (got {cfg.kd_tau})")
    if cfg.momentum < 0:
        raise ValueError(f"--momentum must be >= 0 (got {cfg.momentum})")
    if cfg.weight_decay < 0:
        raise ValueError(f"--weight-decay must be >= 0 (got {cfg.weight_decay})")
    if not cfg.lr_decay > 0:
        raise ValueError(f"--lr-decay must be > 0 (got {cfg.lr_decay})")


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
    """The components of one block: delta_m = sum_k w_k^m B_k^m (A_k^m x) for m in {q, v} (paper Eq. 4)."""

    def __init__(self, mags: Magnitudes):
        super().__init__()
        self.targets = "qv"
        self.comps = nn.ModuleList()
        self._mags = (mags,)  # a tuple: the shared magnitudes are registered once, in the Method
        # the kept frozen components among 0..frozen-1, rebuilt by stack_frozen, never stored: per target
        # A_cat (2, R, d) and B_cat of the directions B_k / nu_k (2, d, R); the component of every column (R,)
        self.register_buffer("stack_A", None, persistent=False)
        self.register_buffer("stack_B", None, persistent=False)
        self.register_buffer("stack_task", None, persistent=False)
        self.frozen = 0

    def terms(self, m: str, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(B_k, A_k, w_k) of every stored component k >= start; w_k = s_k / nu_k for frozen ones, s_t for the
        current."""
        mags = self._mags[0]
        s, t, i, cs = mags.scales(), len(self.comps) - 1, "qv".index(m), self.comps
        return [(cs[k].B[m], cs[k].A[m], s[k] if k == t else s[k] * inverse_norm(cs[k].nu[i]))
                for k in range(start, t + 1) if mags.kept_list[k]]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for i, m in enumerate(self.targets):
            parts = []
            if self.stack_B is not None:  # the frozen directions: one product, column block k scaled by s_k
                a = self.stack_A[i]
                b = self.stack_B[i] * self._mags[0].scales()[self.stack_task]
                dense = 2 * a.shape[0] >= a.shape[1]  # R (d_in + d_out) >= d_in d_out
                parts.append(F.linear(x, b @ a) if dense else F.linear(F.linear(x, a), b))
            terms = self.terms(m, self.frozen)
            if terms:  # the current component (all of them if none is stacked): (x A_cat^T) (B_cat diag(w))^T
                a = torch.cat([a for _, a, _ in terms])
                b = torch.cat([b * w for b, _, w in terms], dim=1)
                parts.append(F.linear(F.linear(x, a), b))
            if parts:
                out[m] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        return out

    @torch.no_grad()
    def stack_frozen(self, n: int) -> None:
        """Concatenate the kept components k < n (frozen directions B_k A_k / nu_k) into stack_A, stack_B; a
        component with nu = 0 is a zero direction (inverse_norm)."""
        self.frozen = n
        kept = [k for k in range(n) if self._mags[0].kept_list[k]]
        if not kept:
            self.stack_A = self.stack_B = self.stack_task = None
            return
        comps = [self.comps[k] for k in kept]
        self.stack_A = torch.stack([torch.cat([c.A[m] for c in comps]) for m in self.targets])
        self.stack_B = torch.stack([torch.cat([c.B[m] * inverse_norm(c.nu[i]) for c in comps], dim=1)
                                    for i, m in enumerate(self.targets)])
        ranks = torch.tensor([c.A["q"].shape[0] for c in comps])
        self.stack_task = torch.tensor(kept).repeat_interleave(ranks).to(self.stack_A.device)

    def delta_weight(self, m: str) -> torch.Tensor:
        """sum_k w_k B_k A_k, the (d x d) update of W^m."""
        b0 = self.comps[0].B[m]
        delta = b0.new_zeros(b0.shape[0], b0.shape[0])
        for b, a, w in self.terms(m):
            delta = delta + w * (b @ a)
        return delta


# ----------------------------------------------------------------------------------------------------
# Method


class SDLoRA(nn.Module):
    def __init__(self, vit: nn.Module, num_classes: int, cfg: Config):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.vit = vit
        for p in vit.parameters():
            p.requires_grad_(False)
        self.mags = Magnitudes()
        attach(vit, "qkv_adapter", lambda i, attn: Adapter(self.mags))
        self.heads = nn.ModuleList()
        self.offsets: list[int] = [0]  # K_t for every grown task, then C_t
        self.register_load_state_dict_post_hook(lambda mod, keys: mod.stack_frozen())

    # -- contract --------------------------------------------------------------------------------
    def grow(self, t: int, classes: list[int]) -> None:
        """Freeze component t-1 as a direction, add component t, re-create the magnitudes, add head h_t.

        Structure depends only on (t, classes): a component that -KD later absorbs keeps its (zeroed)
        tensors and a False `kept` flag, so a checkpoint always loads into grow(0..t)'s structure.
        """
        self._drop_eval_vit()
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
        self.stack_frozen()  # components k < t are frozen

    def begin_task(self, t: int, classes: list[int], data) -> None:
        self._drop_eval_vit()

    def optimizer(self, steps_per_epoch: int):
        params = [p for p in self.parameters() if p.requires_grad]
        if self.cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                  weight_decay=self.cfg.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        milestones = ints(self.cfg.milestones)
        if not milestones:
            return opt, None
        sched = torch.optim.lr_scheduler.LambdaLR(opt, multistep(milestones, self.cfg.lr_decay, steps_per_epoch))
        return opt, sched

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = features(self.vit, x)
        K_t = self.offsets[-2]
        return F.cross_entropy(self.heads[-1](f), y - K_t)

    @torch.no_grad()
    def end_task(self, t: int, classes: list[int], data) -> None:
        self._drop_eval_vit()
        if self.cfg.variant == "kd" and t >= 1:
            self.kd_absorb(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit if self.training else self._eval_vit()  # evaluation: one forward of the folded copy
        return self.logits(features(vit, x))

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[Adapter]:
        """The per-block adapters, registered once: under vit.blocks.{i}.attn.qkv_adapter."""
        return [blk.attn.qkv_adapter for blk in self.vit.blocks if blk.attn.qkv_adapter is not None]

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(f) for h in self.heads], dim=1)

    def train(self, mode: bool = True):
        self._drop_eval_vit()  # train() and eval(): the next evaluation folds the adapters as they are then
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self._drop_eval_vit()  # .to(), .double(), ...: the folded copy would keep the old device and dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def merged_vit(self) -> nn.Module:
        """A copy of the ViT with every adapter's delta folded into its qkv rows, and no adapters."""
        vit = copy.deepcopy(self.vit, {id(ad): None for ad in self.adapters})  # copied without the adapters
        d = vit.embed_dim
        for blk, ad in zip(vit.blocks, self.adapters):
            for m in ad.targets:
                blk.attn.qkv.weight[qkv_rows(m, d)] += ad.delta_weight(m)
        return vit

    def _eval_vit(self) -> nn.Module:
        """merged_vit(), built by the first evaluation forward and kept until the adapters can change (train(),
        grow, begin_task, end_task, load_state_dict, merge); held outside the module tree, so it is in no
        state_dict() and no parameters()."""
        vit = self.__dict__.get("_eval_cache")
        if vit is None:
            vit = self.__dict__["_eval_cache"] = self.merged_vit()
        return vit

    def _drop_eval_vit(self) -> None:
        self.__dict__.pop("_eval_cache", None)

    def stack_frozen(self) -> None:
        """Rebuild every adapter's stack of the frozen components (all but the current task's); drop the folded
        copy."""
        self._drop_eval_vit()
        for ad in self.adapters:
            ad.stack_frozen(max(len(self.heads) - 1, 0))

    def rank_of(self, t: int) -> int:
        """r_t: cfg.rank, or the -RR schedule (models/sdlora.py L76-85)."""
        if self.cfg.variant != "rr":
            return self.cfg.rank
        ranks = ints(self.cfg.rr_ranks)
        return ranks[min(t, len(ranks) - 1)]

    @torch.no_grad()
    def kd_absorb(self, t: int) -> dict:
        """-KD (paper Alg. 1): absorb component t into the offsets of the earlier ones if it is (nearly) their
        linear combination. Solved in float64. Returns {'rho', 'rho_rel', 'absorbed'}."""
        self._drop_eval_vit()
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
            for ad in self.adapters:
                for m in "qv":
                    ad.comps[t].B[m].zero_()
                    ad.comps[t].A[m].zero_()
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
    if mode == "prod":
        return b.norm() * a.norm()
    return frob_inner(b, a, b, a).clamp_min(0).sqrt()


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


def ints(text: str) -> list[int]:
    """'10, 8,6' -> [10, 8, 6]."""
    return [int(v) for v in text.replace(" ", "").split(",") if v]
