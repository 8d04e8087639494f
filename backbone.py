"""A small Vision Transformer with timm's parameter names and shapes, presets, and weight loading.

The architecture is the original ViT (Dosovitskiy et al., ICLR 2021) exactly as timm's
`VisionTransformer` lays it out (huggingface/pytorch-image-models, `timm/models/vision_transformer.py`),
so a timm state dict loads with `strict=True`:

    patch_embed.proj   Conv2d(3, d, kernel=stride=patch)
    cls_token (1,1,d), pos_embed (1, 1+N, d)
    blocks.{i}: norm1 -> attn.qkv (Linear d->3d, bias) -> attn.proj, then norm2 -> mlp.fc1 -> GELU -> mlp.fc2
    norm               final LayerNorm; every LayerNorm has eps 1e-6

The fused qkv output rows are q [0:d], k [d:2d], v [2d:3d] (timm reshapes to (B, N, 3, H, d/H)).
The feature every method uses is f(x) = the CLS token after the final norm (`ViT.forward`).

Adapters (the one mechanism every method uses)
---------------------------------------------
Each `Attention` has two empty slots, both `None` by default:

    attn.qkv_adapter : module, called as qkv_adapter(x) on the attention input x = norm1(h), (B, N, d).
                       Returns a dict with any of the keys "q", "k", "v", each a (B, N, d) delta that
                       is added to that slice of the fused qkv output.
    attn.out_adapter : module, called as out_adapter(o) on the input of attn.proj (the concatenated head
                       outputs, (B, N, d)); returns a (B, N, d) delta added to proj's output.

A method assigns its own modules to these slots (`attach`), so their parameters appear in the model's
state dict under `blocks.{i}.attn.qkv_adapter.*`. To merge a delta into the weights, write into the row
block of `attn.qkv.weight` that `qkv_rows` returns.

Run parts of the trunk with `embed`, `blocks[i]` and `norm`; `block_cls` returns every block's CLS token
through the final norm.
"""
from __future__ import annotations

import json
import os
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
    "vit_small32": ViTConfig(32, 4, 192, 6, 3),  # the CPU benchmark backbone (../shared/weights)
    "vit_tiny_test": ViTConfig(16, 4, 32, 2, 2),  # random, for smoke runs and tests
}

# ----------------------------------------------------------------------------------------------------
# Model


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} is not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.qkv_adapter: nn.Module | None = None
        self.out_adapter: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # rows [0:d] = q, [d:2d] = k, [2d:3d] = v
        if self.qkv_adapter is not None:
            delta = self.qkv_adapter(x)
            q = q + delta["q"] if "q" in delta else q
            k = k + delta["k"] if "k" in delta else k
            v = v + delta["v"] if "v" in delta else v
        q, k, v = (t.reshape(B, N, self.num_heads, d // self.num_heads).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, d)
        out = self.proj(o)
        if self.out_adapter is not None:
            out = out + self.out_adapter(o)
        return out


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
        h = self.embed(x)
        out = []
        for blk in self.blocks:
            h = blk(h)
            out.append(self.norm(h[:, 0]))
        return torch.stack(out, dim=1)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


def qkv_rows(which: str, d: int) -> slice:
    """Rows of the fused qkv weight (3d, d) and bias (3d,) that produce q, k or v."""
    return {"q": slice(0, d), "k": slice(d, 2 * d), "v": slice(2 * d, 3 * d)}[which]


def attach(vit: ViT, slot: str, make) -> list[nn.Module]:
    """Put `make(block_index, attn)` into slot 'qkv_adapter' or 'out_adapter' of every block.

    Returns the modules. `make` may return None to leave a block without an adapter.
    """
    assert slot in ("qkv_adapter", "out_adapter"), slot
    mods = []
    for i, blk in enumerate(vit.blocks):
        m = make(i, blk.attn)
        setattr(blk.attn, slot, m)
        mods.append(m)
    return mods


# ----------------------------------------------------------------------------------------------------
# Trunk: what the methods need from the model, as functions that take it


def embed(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) -> tokens (B, 1+N, d) entering the first block."""
    return vit.embed(x)


def features(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f(x): the CLS token after the final norm, (B, d)."""
    h = embed(vit, x)
    for blk in vit.blocks:
        h = blk(h)
    return vit.norm(h)[:, 0]


def block_cls(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CLS token after every block, each through the final norm: (B, depth, d)."""
    h = embed(vit, x)
    out = []
    for blk in vit.blocks:
        h = blk(h)
        out.append(vit.norm(h[:, 0]))
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------------------------------
# Weights


class WeightsError(ValueError):
    """Weights that cannot be loaded: the message says which keys or shapes do not fit."""


def create(preset: str | ViTConfig, weights: str | None = None) -> tuple[ViT, dict]:
    """Build a ViT and load weights. Returns (vit, info), info = {'source', 'mean', 'std', 'config'}.

    weights: None or 'random' (random init), a path to a file holding a timm-layout state dict
    (a sidecar `<name>.json` with {"normalize": {"mean", "std"}} gives the normalisation),
    or a timm tag such as 'vit_base_patch16_224.augreg_in21k' (needs timm and internet or its cache).
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise WeightsError(f"unknown backbone '{preset}'; choose one of {', '.join(PRESETS)}")
        cfg = PRESETS[preset]
    else:
        cfg = preset
    vit = ViT(cfg)
    info = {"source": "random", "mean": [0.5] * 3, "std": [0.5] * 3, "config": asdict(cfg)}
    if weights in (None, "", "random"):
        return vit, info
    if os.path.exists(weights) or weights.endswith((".pth", ".pt", ".bin")):
        if not os.path.isfile(weights):
            raise WeightsError(f"weights file '{weights}' does not exist; pass --weights FILE or a timm tag")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
            raise WeightsError(f"cannot read weights file '{weights}': {type(e).__name__}: {e}") from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise WeightsError(f"weights file '{weights}' does not hold a state dict")
        sidecar = os.path.splitext(weights)[0] + ".json"
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                norm = json.load(f).get("normalize", {})
            info["mean"], info["std"] = norm.get("mean", info["mean"]), norm.get("std", info["std"])
        info["source"] = os.path.abspath(weights)
    else:
        state, mean, std = _timm_state(weights, cfg)
        info.update(source=f"timm:{weights}", mean=mean, std=std)
    load_strict(vit, state)
    return vit, info


def _timm_state(tag: str, cfg: ViTConfig) -> tuple[dict, list, list]:
    """Fetch a pretrained state dict through timm (imported only here); the head is dropped."""
    if "." not in tag:
        raise WeightsError(f"'{tag}' is neither a file nor a pinned timm tag (e.g. 'vit_base_patch16_224.augreg_in21k')")
    try:
        import timm
    except ImportError:
        raise WeightsError("loading a timm tag needs timm: pip install timm (or pass a weights file)") from None
    try:
        model = timm.create_model(tag, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"timm could not load '{tag}': {type(e).__name__}: {str(e).splitlines()[0]}"
                           " (offline? pass a weights file with --weights)") from None
    dc = timm.data.resolve_model_data_config(model)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    return state, list(dc["mean"]), list(dc["std"])


def load_strict(vit: ViT, state: dict) -> None:
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
