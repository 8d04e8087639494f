"""A small Vision Transformer with timm's parameter names and shapes, presets, weight loading, and the one
adapter mechanism, which works on this ViT and on timm's `VisionTransformer` alike.

The architecture is the original ViT (Dosovitskiy et al., ICLR 2021) exactly as timm's
`VisionTransformer` lays it out (huggingface/pytorch-image-models, `timm/models/vision_transformer.py`),
so a timm state dict loads with `strict=True`:

    patch_embed.proj   Conv2d(3, d, kernel=stride=patch)
    cls_token (1,1,d), pos_embed (1, 1+N, d)
    blocks.{i}: norm1 -> attn.qkv (Linear d->3d, bias) -> attn.proj, then norm2 -> mlp.fc1 -> GELU -> mlp.fc2
    norm               final LayerNorm; every LayerNorm has eps 1e-6

The fused qkv output rows are q [0:d], k [d:2d], v [2d:3d] (timm reshapes to (B, N, 3, H, d/H)).
The feature every method uses is f(x) = the CLS token after the final norm (`features`).

Adapters (the one mechanism every method uses)
---------------------------------------------
`attach(vit, slot, make)` gives every block's `attn` two slots, registered as child modules (so their
parameters are in the state dict under `blocks.{i}.attn.qkv_adapter.*` / `.out_adapter.*`), both `None`
until a module is put there:

    attn.qkv_adapter : called as qkv_adapter(x) on the attention input x = norm1(h), (B, N, d). Returns a
                       dict with any of the keys "q", "k", "v", each a (B, N, d) delta that is added to that
                       slice of the fused qkv output; a missing key adds nothing.
    attn.out_adapter : called as out_adapter(o) on the input of attn.proj (the concatenated head outputs,
                       (B, N, d)); returns a (B, N, d) delta added to proj's output.

The attention module itself stays plain (this file's `Attention` computes what timm's `timm.layers.Attention`
computes; timm's is used unchanged). The mechanism is two forward hooks per block, installed once per module:
one on `attn.qkv` returns qkv's output with the qkv_adapter's deltas added to the q / k / v slices (out of place:
qkv's output + the deltas concatenated, zeros where a key is missing), one on `attn.proj` returns proj's
output + out_adapter(proj's input). The hooks look the adapter up when they run, so assigning another module or
`None` to a slot takes effect at once. Each hook is bound to its `attn` as an attribute (`_Hook`), so
`copy.deepcopy(model)` rebinds it to the copy's `attn` and the copy calls its own adapters. This file's
`Attention` has the slots and hooks from construction; timm's gets them from `attach` (assigning to a slot of a
timm model before `attach` would do nothing). An attention module that `attach` does not know (another class,
or no fused `qkv` Linear d->3d and `proj` Linear d->d) is a ValueError that names its class, never a silent
no-op.

To merge a delta into the weights, write into the row block of `attn.qkv.weight` that `qkv_rows` returns.

Two helpers serve every method with many components or a folded inference model: `low_rank(x, A, B, scales)`
runs the frozen components of a block as one stacked low-rank (or dense) product, so a training forward costs
the same at task 50 as at task 1; `fold(vit, delta)` copies the ViT without adapters and with their updates
written into its weights, and `Merged(vit, heads)` puts the heads on it: what a linear method's `merged()`
returns and train.py evaluates.

Trunk functions
---------------
The methods reach the trunk only through functions that take the model, so both models work:
`embed(vit, x)` (tokens entering the first block), `vit.blocks[i]`, `vit.norm`, `features(vit, x)` (f(x)),
`block_cls(vit, x)` (every block's CLS token through the final norm); `vit.embed_dim` and `vit.cls_token`
exist on both. `create("timm:<architecture>", weights)` builds a timm model (timm is imported only then).
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import os
import socket
import threading
import urllib.parse
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Presets


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    """input side in pixels"""
    patch_size: int = 16
    """patch side in pixels"""
    embed_dim: int = 768
    """width d"""
    depth: int = 12
    """number of blocks"""
    num_heads: int = 12
    """attention heads"""
    mlp_ratio: float = 4.0
    """MLP hidden width / d"""


PRESETS = {
    "vit_base_patch16_224": ViTConfig(224, 16, 768, 12, 12),  # ViT-B/16, the papers' backbone
    "vit_small32": ViTConfig(32, 4, 192, 6, 3),  # the CPU benchmark backbone
    "vit_tiny_test": ViTConfig(16, 4, 32, 2, 2),  # random, for smoke runs and tests
}

# ----------------------------------------------------------------------------------------------------
# Model


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv, computed as timm's `Attention` computes it."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        if type(self) is Attention:  # the slots (None) and hooks from the start, so a slot is never inert
            _install(self, "Attention")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        heads = (t.reshape(B, N, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, N, d/H) views
                 for t in self.qkv(x).chunk(3, dim=-1))  # rows [0:d] = q, [d:2d] = k, [2d:3d] = v
        o = F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B, N, d)
        return self.proj(o)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, d), patches in row-major order


class ViT(nn.Module):
    """ViT without a head. `forward(x)` is the feature f(x): the CLS token after the final norm."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        assert cfg.img_size % cfg.patch_size == 0, "the image side must be a multiple of the patch side"
        self.cfg = cfg
        self.embed_dim = cfg.embed_dim
        n_patches = (cfg.img_size // cfg.patch_size) ** 2
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, cfg.embed_dim) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.apply(_init_weights)
        nn.init.normal_(self.cls_token, std=1e-6)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1+N, d): CLS first, position embedding added."""
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return h + self.pos_embed

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, (B, 1+N, d)."""
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f(x): the CLS token after the final norm, (B, d)."""
        return self.forward_features(x)[:, 0]

    def block_cls(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after every block, each through the final norm: (B, depth, d)."""
        return block_cls(self, x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------------
# Adapters: forward hooks on attn.qkv and attn.proj (see the module docstring)

SLOTS = ("qkv_adapter", "out_adapter")


def qkv_rows(which: str, d: int) -> slice:
    """Rows of the fused qkv weight (3d, d) and bias (3d,) that produce q, k or v."""
    return {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}[which]


def attach(vit: nn.Module, slot: str, make) -> list[nn.Module | None]:
    """Put `make(block_index, attn)` into slot 'qkv_adapter' or 'out_adapter' of every block.

    Returns the modules. `make` may return None to leave a block without an adapter. Works on backbone.ViT
    and on timm's VisionTransformer; any other attention module is a ValueError.
    """
    if slot not in SLOTS:
        raise ValueError(f"slot must be one of {', '.join(SLOTS)} (got {slot!r})")
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(f"attach needs a ViT with `blocks` (backbone.ViT or timm's VisionTransformer), "
                         f"got {type(vit).__name__}")
    mods = []
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        _install(attn, where=f"blocks.{i}.attn")
        m = make(i, attn)
        if m is not None and not isinstance(m, nn.Module):
            raise TypeError(f"an adapter must be an nn.Module or None (make({i}, attn) returned {type(m).__name__})")
        setattr(attn, slot, m)
        mods.append(m)
    return mods


def _install(attn, where: str) -> None:
    """Check that `attn` is an attention module the hooks fit; give it both slots and both hooks, once."""
    cls = type(attn)
    known = cls is Attention or (cls.__module__.startswith("timm.") and cls.__name__ == "Attention")
    qkv, proj = getattr(attn, "qkv", None), getattr(attn, "proj", None)
    fits = (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and qkv.out_features == 3 * qkv.in_features
            and proj.in_features == proj.out_features == qkv.in_features)
    if not (known and fits):
        why = "an unknown attention class" if not known else "no fused qkv Linear d->3d and proj Linear d->d"
        raise ValueError(f"{where} is {cls.__module__}.{cls.__qualname__}: {why}; the adapters fit "
                         "backbone.Attention and timm's Attention (timm.layers.Attention) only")
    for slot in SLOTS:
        if slot not in attn._modules:
            attn.add_module(slot, None)
    for module, fn in ((qkv, _qkv_hook), (proj, _proj_hook)):
        if not any(isinstance(h, _Hook) and h.fn is fn for h in module._forward_hooks.values()):
            module.register_forward_hook(_Hook(attn, fn))


class _Hook:
    """A forward hook bound to its attention module: `fn(attn, module, args, output)`. It holds `attn` as an
    attribute, so copy.deepcopy(model) binds the copy's hook to the copy's `attn` (through deepcopy's memo), and
    a pickled model (torch.save(model)) loads with its hooks."""

    def __init__(self, attn: nn.Module, fn):
        self.attn, self.fn = attn, fn

    def __call__(self, module: nn.Module, args: tuple, out: torch.Tensor):
        return self.fn(self.attn, module, args, out)


def _qkv_hook(attn: nn.Module, qkv: nn.Module, args: tuple, out: torch.Tensor):
    """qkv's output + the qkv_adapter's deltas on the q [0:d], k [d:2d], v [2d:3d] slices."""
    adapter = attn._modules["qkv_adapter"]
    if adapter is None:
        return None
    delta = adapter(args[0])
    if not delta:
        return None
    if not set(delta) <= {"q", "k", "v"}:
        raise KeyError(f"a qkv_adapter returns deltas for 'q', 'k', 'v' only (got {sorted(delta)})")
    if len(delta) < 3:
        zero = out.new_zeros(()).expand(next(iter(delta.values())).shape)
        delta = {m: delta.get(m, zero) for m in "qkv"}
    # one add of the concatenated deltas: its backward passes qkv's gradient on without a copy
    return out + torch.cat([delta["q"], delta["k"], delta["v"]], dim=-1)


def _proj_hook(attn: nn.Module, proj: nn.Module, args: tuple, out: torch.Tensor):
    """proj's output + out_adapter(proj's input)."""
    adapter = attn._modules["out_adapter"]
    return None if adapter is None else out + adapter(args[0])


# ----------------------------------------------------------------------------------------------------
# Stacking and folding: many frozen components as one product in training, none at inference


def low_rank(x: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor],
             scales: torch.Tensor | None = None) -> torch.Tensor | None:
    """sum_k s_k B_k (A_k x) over the components k as one product; None when there are none.

    A_k (r_k, d_in) are down-projections, B_k (d_out, r_k) up-projections; `scales` (a tensor with one entry per
    component, None for all 1) multiply their components and keep their gradient. The number of operations does
    not grow with the number of components. With A_cat (R, d_in) and B_cat (d_out, R) the
    concatenations, this is x (B_cat diag(s) A_cat)^T, computed as (x A_cat^T)(B_cat diag(s))^T, or through the
    dense d_out x d_in matrix where that costs fewer multiply-adds per token (R (d_in + d_out) >= d_in d_out):
    the cost per token never exceeds one dense matrix, however many components there are.
    """
    if not A:
        return None
    a, b = torch.cat(A), torch.cat(B, dim=1)
    if scales is not None:  # every column times its component's scale: one repeat per run of equal ranks
        runs = [(r, len(list(g))) for r, g in itertools.groupby(a_k.shape[0] for a_k in A)]
        starts = itertools.accumulate([n for _, n in runs], initial=0)
        b = b * torch.cat([scales[i:i + n].repeat_interleave(r) for (r, n), i in zip(runs, starts)])
    if a.shape[0] * (a.shape[1] + b.shape[0]) >= a.shape[1] * b.shape[0]:
        return F.linear(x, b @ a)
    return F.linear(F.linear(x, a), b)


@torch.no_grad()
def fold(vit: nn.Module, delta) -> nn.Module:
    """A copy of `vit` without adapters whose weights hold their updates: `delta(i, m)` is the matrix added to
    block i's q, k or v rows of attn.qkv.weight (m = 'q', 'k', 'v'; `qkv_rows`) or to attn.proj.weight (m = 'o'),
    or None. The copy is a plain ViT: one forward costs what the backbone costs."""
    memo = {id(a): None for blk in vit.blocks for a in (blk.attn._modules.get(s) for s in SLOTS) if a is not None}
    plain = copy.deepcopy(vit, memo)  # every adapter slot of the copy is None
    for i, blk in enumerate(plain.blocks):
        for m in "qkvo":
            D = delta(i, m)
            if D is not None:
                W = blk.attn.proj.weight if m == "o" else blk.attn.qkv.weight[qkv_rows(m, plain.embed_dim)]
                W += D.to(W.dtype)
    return plain


class Merged(nn.Module):
    """A linear method's inference model, what its `merged()` returns: the concatenated logits of `heads` (one
    module per task) on f(x) of a plain ViT whose weights hold the adapters (`fold`)."""

    def __init__(self, vit: nn.Module, heads: nn.ModuleList):
        super().__init__()
        self.vit, self.heads = vit, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = features(self.vit, x)
        return torch.cat([h(f) for h in self.heads], dim=1)


# ----------------------------------------------------------------------------------------------------
# Trunk: what the methods need from the model, as functions that take it


def _is_timm_vit(vit: nn.Module) -> bool:
    return any(c.__name__ == "VisionTransformer" and c.__module__.startswith("timm.") for c in type(vit).__mro__)


def embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) -> tokens (B, 1+N, d) entering the first block.

    timm: patch_embed -> _pos_embed (class / register tokens, position embedding) -> patch_drop -> norm_pre,
    as `VisionTransformer.forward_features` does before its blocks."""
    if isinstance(vit, ViT):
        return vit.embed(x)
    if _is_timm_vit(vit):
        return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    raise ValueError(f"{type(vit).__name__} is neither backbone.ViT nor timm's VisionTransformer")


def _check_cls_feature(vit: nn.Module) -> None:
    """The methods' feature is the CLS token after the final norm: refuse a timm model whose is not."""
    if isinstance(vit, ViT) or not _is_timm_vit(vit):
        return
    pool, fc_norm = getattr(vit, "global_pool", None), getattr(vit, "fc_norm", None)
    if vit.cls_token is None or pool != "token" or not isinstance(fc_norm, nn.Identity):
        raise ValueError(f"this timm {type(vit).__name__} pools with global_pool={pool!r}, "
                         f"fc_norm={type(fc_norm).__name__}, class token {vit.cls_token is not None}: the methods "
                         "use the CLS token after the final norm; build it with class_token=True, "
                         "global_pool='token', fc_norm=False")


def features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x): the CLS token after the final norm, (B, d)."""
    _check_cls_feature(vit)
    h = embed(vit, x)
    for blk in vit.blocks:
        h = blk(h)
    return vit.norm(h)[:, 0]


def block_cls(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS token after every block, each through the final norm: (B, depth, d)."""
    _check_cls_feature(vit)
    h = embed(vit, x)
    out = []
    for blk in vit.blocks:
        h = blk(h)
        out.append(vit.norm(h[:, 0]))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------------
# Options: the one way every method checks its Config


def check_options(cfg, choices: dict, rules: list) -> None:
    """Raise ValueError for the first field of `cfg` not among its `choices` ({field: allowed values}) or failing
    its rule (field, ok, what it must be), as one line: "--field must be what (got value)"."""
    rules = [(f, getattr(cfg, f) in allowed, "one of " + ", ".join(allowed)) for f, allowed in choices.items()] + rules
    for field, ok, what in rules:
        if not ok:
            raise ValueError(f"--{field.replace('_', '-')} must be {what} (got {getattr(cfg, field)!r})")


# ----------------------------------------------------------------------------------------------------
# Weights


class WeightsError(ValueError):
    """Weights that cannot be loaded: the message says which keys or shapes do not fit."""


WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def create(preset: str | ViTConfig, weights: str | None = None) -> tuple[nn.Module, dict]:
    """Build a backbone and load weights. Returns (vit, info), info = {'source', 'mean', 'std', 'config'}.

    preset: a name in PRESETS, a ViTConfig, or 'timm:<architecture>' (timm.create_model(architecture,
    pretrained=False, num_classes=0); timm is imported only then). info['config']['img_size'] is the input side.
    weights: None or 'random' (random init); a path to a file holding a timm-layout state dict (.pth, .pt, .bin
    or .safetensors; a sidecar `<stem>.json` or `<file>.json` with {"normalize": {"mean", "std"}} gives the
    normalisation); or a pinned timm tag such as 'vit_base_patch16_224.augreg_in21k' (read from the Hugging
    Face cache, else downloaded; for 'timm:<architecture>' the tag must name that architecture).
    Anything that looks like a path (a path separator, one of those suffixes, or an existing name) is a path.
    """
    if isinstance(preset, str) and preset.startswith("timm:"):
        arch = preset.removeprefix("timm:")
        vit = _timm_model(arch)
        pe = vit.patch_embed
        config = {"timm": arch, "img_size": _side(pe.img_size), "patch_size": _side(pe.patch_size),
                  "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
                  "num_heads": getattr(getattr(vit.blocks[0], "attn", None), "num_heads", None)}
    else:
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise WeightsError(f"unknown backbone '{preset}'; choose one of {', '.join(PRESETS)} "
                                   "or timm:<architecture>")
            preset = PRESETS[preset]
        vit, arch, config = ViT(preset), None, asdict(preset)
    info = {"source": "random", "mean": [0.5] * 3, "std": [0.5] * 3, "config": config}
    if weights in (None, "", "random"):
        return vit, info
    if _looks_like_path(weights):
        state = _read_state(weights)
        mean_std = _read_sidecar(weights)
        if mean_std is not None:
            info["mean"], info["std"] = mean_std
        info["source"] = os.path.abspath(weights)
    else:
        if arch is not None and weights.split(".", 1)[0] != arch:
            raise WeightsError(f"timm tag '{weights}' is not of the backbone's architecture '{arch}' "
                               f"(use {arch}.<tag>, or --backbone timm:{weights.split('.', 1)[0]})")
        model = _timm_pretrained(weights)
        dc = _timm().data.resolve_model_data_config(model)
        info.update(source=f"timm:{weights}", mean=list(dc["mean"]), std=list(dc["std"]))
        if arch is not None:
            return model, info  # the same architecture, built by timm with its weights
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    load_strict(vit, state)
    return vit, info


def _side(v) -> int | list:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    return v[0] if v[0] == v[1] else list(v)


def _looks_like_path(w: str) -> bool:
    seps = [s for s in (os.sep, os.altsep, "/") if s]
    return any(s in w for s in seps) or w.endswith(WEIGHT_SUFFIXES) or os.path.exists(w)


def _read_state(path: str) -> dict:
    if os.path.isdir(path):
        raise WeightsError(f"weights path '{path}' is a directory; pass a weights file or a timm tag")
    if not os.path.isfile(path):
        raise WeightsError(f"weights file '{path}' does not exist; pass a weights file or a timm tag")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(f"cannot read weights file '{path}': {type(e).__name__}: {msg}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file '{path}' does not hold a state dict (a dict of tensors)")
    return state


def _read_sidecar(path: str) -> tuple[list, list] | None:
    """(mean, std) from `<stem>.json` or `<file>.json` beside the weights, or None if there is none."""
    for side in (os.path.splitext(path)[0] + ".json", path + ".json"):
        if os.path.isfile(side):
            break
    else:
        return None
    try:
        with open(side) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"weights sidecar '{side}' is not readable JSON: {e}") from None
    norm = doc.get("normalize", {}) if isinstance(doc, dict) else None
    if not isinstance(norm, dict):
        raise WeightsError(f"weights sidecar '{side}' must hold an object "
                           '{"normalize": {"mean": [3 numbers], "std": [3 numbers]}}')
    mean, std = norm.get("mean", [0.5] * 3), norm.get("std", [0.5] * 3)
    for name, v in (("mean", mean), ("std", std)):
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in v)):
            raise WeightsError(f"weights sidecar '{side}': normalize.{name} must be 3 finite numbers (got {v!r})")
    if min(std) <= 0:
        raise WeightsError(f"weights sidecar '{side}': normalize.std must be > 0 (got {std})")
    return [float(c) for c in mean], [float(c) for c in std]


def _timm():
    try:
        import timm
    except ImportError:
        raise WeightsError("a timm backbone or tag needs timm: pip install timm (or pass a weights file)") from None
    return timm


def _timm_model(arch: str) -> nn.Module:
    timm = _timm()
    if "." in arch or not timm.models.is_model(arch):
        raise WeightsError(f"'timm:{arch}' is not a timm architecture (e.g. timm:vit_base_patch16_224; "
                           "give weights with the weights argument, not in the name)")
    try:
        vit = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"timm could not build '{arch}': {type(e).__name__}: {e}") from None
    if not _is_timm_vit(vit):
        raise WeightsError(f"'timm:{arch}' builds a {type(vit).__name__}; the methods need a VisionTransformer")
    return vit


def _timm_pretrained(tag: str) -> nn.Module:
    """timm.create_model(tag, pretrained=True, num_classes=0), from the local Hugging Face cache when the
    weights are there; otherwise only when the hub is reachable, so that offline the error comes at once."""
    if "." not in tag:
        raise WeightsError(f"'{tag}' is neither a file nor a pinned timm tag (e.g. 'vit_base_patch16_224.augreg_in21k')")
    timm = _timm()
    try:
        pcfg = timm.models.get_pretrained_cfg(tag)
    except Exception:  # noqa: BLE001 - timm raises for an unknown tag of a known architecture
        pcfg = None
    if pcfg is None or not pcfg.hf_hub_id:
        raise WeightsError(f"'{tag}' is not a file and not a pinned timm tag timm knows "
                           "(see timm.list_pretrained(); a file path needs an extension such as .pth)")
    overlay = None
    cached = _hf_cached(pcfg.hf_hub_id, pcfg.hf_hub_filename)
    if cached is not None:
        overlay = {"file": cached}  # timm loads the file itself: no network call
    elif os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise WeightsError(f"timm tag '{tag}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                           "download it once with network access, or pass a weights file")
    elif not _hub_reachable():
        raise WeightsError(f"timm tag '{tag}' is not in the local Hugging Face cache and the hub is not reachable: "
                           "download it once with network access (timm.create_model(tag, pretrained=True)), "
                           "or pass a weights file")
    try:
        return timm.create_model(tag, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise WeightsError(f"timm could not load '{tag}': {type(e).__name__}: {msg} (or pass a weights file)") from None


def _hf_cached(repo_id: str, filename: str | None) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in ([filename] if filename else ["model.safetensors", "pytorch_model.bin"]):
        path = try_to_load_from_cache(repo_id, name)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub (HF_ENDPOINT) opens within `timeout` s, name lookup included (in a thread,
    since a lookup does not honour the socket timeout); True behind a proxy (not probed)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def load_strict(vit: nn.Module, state: dict) -> None:
    """load_state_dict(strict=True) with an error that names every missing, unexpected or misshapen key."""
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classification head is not ours
    own = vit.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys ({', '.join(unexpected[:4])}{', ...' if len(unexpected) > 4 else ''})")
        if shapes:
            parts.append(f"shape mismatch ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
        raise WeightsError("weights do not fit the backbone: " + "; ".join(parts))
    vit.load_state_dict(state, strict=True)
