"""backbone.py: timm equivalence, strict loading, weights paths and sidecars, the adapter hooks, the trunk."""
import copy
import importlib.util
import io
import json
import os

import pytest
import torch
import torch.nn as nn
from conftest import TINY, tiny_vit

import backbone as bb

SHARED_WEIGHTS = os.environ.get("CIL_WEIGHTS", "")


def timm_twin(vit: bb.ViT):
    """timm's VisionTransformer of the same configuration holding `vit`'s state dict."""
    from timm.models.vision_transformer import VisionTransformer
    c = vit.cfg
    ref = VisionTransformer(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                            num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=True, num_classes=0)
    bb.load_strict(ref, {k: v for k, v in vit.state_dict().items() if "adapter" not in k})
    return ref.train(vit.training)


def perturbed_vit(cfg=TINY, seed=0):
    """A random ViT with non-trivial values everywhere (the init zeroes the biases)."""
    vit = tiny_vit(seed, cfg)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vit


@pytest.mark.parametrize("cfg", [TINY, bb.PRESETS["vit_tiny_test"], bb.ViTConfig(32, 8, 48, 3, 3, 2.0)])
def test_same_features_as_timm(cfg):
    """One state dict, both models: timm's own forward, and every trunk function on either model, agree."""
    pytest.importorskip("timm")
    ours = perturbed_vit(cfg)
    ref = timm_twin(ours)
    x = torch.rand(4, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(bb.features(ref, x), ref(x), atol=1e-6, rtol=0)  # timm's CLS pooling
        torch.testing.assert_close(bb.features(ours, x), ours(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(bb.embed(ref, x), bb.embed(ours, x), atol=1e-6, rtol=0)
        torch.testing.assert_close(bb.block_cls(ref, x), bb.block_cls(ours, x), atol=1e-5, rtol=0)


def test_timm_model_whose_feature_is_not_the_cls_token_is_refused():
    timm = pytest.importorskip("timm")
    vit = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1,
                                                           num_heads=2, num_classes=0, global_pool="avg")
    x = torch.rand(1, 3, 16, 16)
    for fn in (bb.features, bb.block_cls):
        with pytest.raises(ValueError, match="global_pool='avg'.*CLS token"):
            fn(vit, x)
    assert bb.embed(vit, x).shape == (1, 17, 32)  # the tokens do not depend on the pooling
    with pytest.raises(ValueError, match="neither backbone.ViT nor timm"):
        bb.embed(nn.Linear(2, 2), x)


def test_strict_loading_names_keys_and_shapes():
    v = tiny_vit()
    sd = v.state_dict()
    bad = dict(sd)
    bad.pop("blocks.0.norm1.weight")
    bad["extra.weight"] = torch.zeros(1)
    bad["blocks.1.attn.qkv.weight"] = torch.zeros(3, 3)
    with pytest.raises(bb.WeightsError) as e:
        bb.load_strict(tiny_vit(), bad)
    msg = str(e.value)
    assert "blocks.0.norm1.weight" in msg and "extra.weight" in msg and "blocks.1.attn.qkv.weight (3, 3)" in msg


def test_weights_paths_fail_at_once_with_what_is_wrong(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pth")
    with pytest.raises(bb.WeightsError, match="do not fit"):
        bb.create("vit_small32", str(tmp_path / "w.pth"))
    with pytest.raises(bb.WeightsError, match="does not exist"):
        bb.create("vit_small32", str(tmp_path / "missing.pth"))
    with pytest.raises(bb.WeightsError, match="does not exist"):
        bb.create("vit_small32", "sub/weights")  # a path separator makes it a path, never a hub name
    with pytest.raises(bb.WeightsError, match="is a directory"):
        bb.create("vit_small32", str(tmp_path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(bb.WeightsError, match="cannot read"):
        bb.create("vit_small32", str(tmp_path / "junk.pth"))
    with pytest.raises(bb.WeightsError, match="neither a file nor a pinned timm tag"):
        bb.create("vit_small32", "weights_v2")


def test_typo_and_offline_timm_tags_fail_at_once(monkeypatch):
    """A name timm does not know is not sent to the hub; a known tag that is not cached fails at once offline."""
    pytest.importorskip("timm")
    with pytest.raises(bb.WeightsError, match="not a file and not a pinned timm tag"):
        bb.create("vit_tiny_test", "w.pht")
    monkeypatch.setattr(bb, "_hf_cached", lambda repo, name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(bb.WeightsError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        bb.create("vit_tiny_test", "vit_base_patch16_224.augreg_in21k")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(bb, "_hub_reachable", lambda: False)
    with pytest.raises(bb.WeightsError, match="hub is not reachable: download it once"):
        bb.create("vit_tiny_test", "vit_base_patch16_224.augreg_in21k")


def test_hub_probe(monkeypatch):
    import socket
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert bb._hub_reachable()
    server.close()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # nothing listens there now
    assert not bb._hub_reachable(timeout=1.0)


@pytest.mark.parametrize("text,msg", [
    ('{"normalize": {"mean": [0.5, 0.5', "not readable JSON"),
    ('[0.5, 0.5, 0.5]', "must hold an object"),
    ('{"normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0, 0.5]}}', "std must be > 0"),
    ('{"normalize": {"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2]}}', "mean must be 3 finite numbers"),
])
def test_bad_sidecar_is_one_clear_line(tmp_path, text, msg):
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pth")
    (tmp_path / "w.json").write_text(text)
    with pytest.raises(bb.WeightsError, match=msg) as e:
        bb.create(TINY, str(tmp_path / "w.pth"))
    assert "\n" not in str(e.value)


def test_sidecar_beside_the_file_under_either_name(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pth")
    (tmp_path / "w.pth.json").write_text(json.dumps({"normalize": {"mean": [0.1, 0.2, 0.3], "std": [1, 2, 3]}}))
    _, info = bb.create(TINY, str(tmp_path / "w.pth"))
    assert info["mean"] == [0.1, 0.2, 0.3] and info["std"] == [1.0, 2.0, 3.0]
    (tmp_path / "w.json").write_text(json.dumps({"normalize": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}}))
    _, info = bb.create(TINY, str(tmp_path / "w.pth"))
    assert info["mean"] == [0.4, 0.4, 0.4]  # <stem>.json first


@pytest.mark.skipif(not os.path.isfile(SHARED_WEIGHTS), reason="CIL_WEIGHTS is not set to a weights file")
def test_shared_small_vit_loads():
    vit, info = bb.create("vit_small32", SHARED_WEIGHTS)
    assert len(info["mean"]) == 3 and min(info["std"]) > 0
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 192)


def test_create_timm_architecture(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    vit, info = bb.create("timm:vit_tiny_patch16_224")
    assert isinstance(vit, timm.models.vision_transformer.VisionTransformer) and info["source"] == "random"
    assert info["config"]["img_size"] == 224 and info["config"]["embed_dim"] == 192 and vit.num_classes == 0
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.01)
    torch.save(vit.state_dict(), tmp_path / "t.pth")
    again, info = bb.create("timm:vit_tiny_patch16_224", str(tmp_path / "t.pth"))
    assert info["source"] == str(tmp_path / "t.pth")
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), again.state_dict().values()))
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import save_file
        save_file(vit.state_dict(), str(tmp_path / "t.safetensors"))
        again, _ = bb.create("timm:vit_tiny_patch16_224", str(tmp_path / "t.safetensors"))
        assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), again.state_dict().values()))
    # a tag whose weights are in the local Hugging Face cache loads from there, without asking the network
    monkeypatch.setattr(bb, "_hf_cached", lambda repo, name: str(tmp_path / "t.pth"))
    monkeypatch.setattr(bb, "_hub_reachable", lambda: pytest.fail("the hub was probed for a cached tag"))
    cached, info = bb.create("timm:vit_tiny_patch16_224", "vit_tiny_patch16_224.augreg_in21k")
    assert info["source"] == "timm:vit_tiny_patch16_224.augreg_in21k"
    assert all(torch.equal(a, b) for a, b in zip(vit.state_dict().values(), cached.state_dict().values()))
    with pytest.raises(bb.WeightsError, match="not of the backbone's architecture 'vit_tiny_patch16_224'"):
        bb.create("timm:vit_tiny_patch16_224", "vit_base_patch16_224.augreg_in21k")
    with pytest.raises(bb.WeightsError, match="not a timm architecture"):
        bb.create("timm:vit_nonexistent")


def _ramp(d):
    return torch.linspace(0.5, 1.5, d)  # not constant across the width: a LayerNorm does not remove it


class _Const(nn.Module):
    """An adapter that adds a constant to the chosen q/k/v slices (qkv slot), or value * _ramp to proj's output."""

    def __init__(self, which, value):
        super().__init__()
        self.which, self.value = which, value
        self.w = nn.Parameter(torch.zeros(1))  # so that the state dict shows where the module is registered

    def forward(self, x):
        if self.which == "o":
            return self.value * _ramp(x.shape[-1]).expand_as(x)
        return {m: torch.full_like(x, self.value) for m in self.which}


def _model(kind, seed=0):
    vit = perturbed_vit(seed=seed)
    return vit if kind == "ours" else timm_twin(vit)


KINDS = ["ours", pytest.param("timm", marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                                                               reason="timm is not installed"))]


@pytest.mark.parametrize("kind", KINDS)
def test_adapters_equal_editing_the_slice_biases(kind):
    """A constant delta on q and v (o) is the same as adding it to rows [0:d] and [2d:3d] of the qkv bias
    (to the proj bias), on either model."""
    vit, ref, plain = _model(kind), _model(kind), _model(kind)
    d = vit.embed_dim
    bb.attach(vit, "qkv_adapter", lambda i, attn: _Const("qv", 0.3))
    bb.attach(vit, "out_adapter", lambda i, attn: _Const("o", -0.2) if i != 1 else None)
    with torch.no_grad():
        for i, blk in enumerate(ref.blocks):
            blk.attn.qkv.bias[bb.qkv_rows("q", d)] += 0.3
            blk.attn.qkv.bias[bb.qkv_rows("v", d)] += 0.3
            if i != 1:
                blk.attn.proj.bias -= 0.2 * _ramp(d)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(bb.features(vit, x), bb.features(ref, x), atol=1e-5, rtol=0)
    assert not torch.allclose(bb.features(vit, x), bb.features(plain, x), atol=1e-3)  # the deltas did something
    keys = set(vit.state_dict())
    assert "blocks.0.attn.qkv_adapter.w" in keys and "blocks.0.attn.out_adapter.w" in keys
    assert not any(k.startswith("blocks.1.attn.out_adapter") for k in keys)
    assert vit.blocks[1].attn.out_adapter is None
    for blk in vit.blocks:
        blk.attn.qkv_adapter = None
    assert not torch.allclose(bb.features(vit, x), bb.features(plain, x), atol=1e-3)  # so did the out slot alone


@pytest.mark.parametrize("kind", KINDS)
def test_hooks_installed_once_and_slots_read_at_call_time(kind):
    vit, plain = _model(kind), _model(kind)
    x = torch.rand(2, 3, 16, 16)
    bb.attach(vit, "qkv_adapter", lambda i, attn: _Const("k", 0.5))
    assert all(blk.attn.out_adapter is None for blk in vit.blocks)  # both slots exist after attach
    bb.attach(vit, "qkv_adapter", lambda i, attn: _Const("v", 0.5))
    bb.attach(vit, "out_adapter", lambda i, attn: None)
    for blk in vit.blocks:
        assert len(blk.attn.qkv._forward_hooks) == 1 and len(blk.attn.proj._forward_hooks) == 1
    with_v = bb.features(vit, x)
    for blk in vit.blocks:
        blk.attn.qkv_adapter = None
    torch.testing.assert_close(bb.features(vit, x), bb.features(plain, x), atol=0, rtol=0)
    vit.blocks[0].attn.qkv_adapter = _Const("v", 0.5)
    partial = bb.features(vit, x)
    assert not torch.allclose(partial, bb.features(plain, x)) and not torch.allclose(partial, with_v)


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_calls_the_copys_own_adapters(kind):
    vit, plain = _model(kind), _model(kind)
    x = torch.rand(2, 3, 16, 16)
    bb.attach(vit, "qkv_adapter", lambda i, attn: _Const("qv", 0.3))
    before = bb.features(vit, x)
    twin = copy.deepcopy(vit)
    torch.testing.assert_close(bb.features(twin, x), before, atol=0, rtol=0)
    for blk in twin.blocks:
        blk.attn.qkv_adapter.value = -0.7  # the copy's adapters, not the original's
    changed = bb.features(twin, x)
    assert not torch.allclose(changed, before, atol=1e-3)
    torch.testing.assert_close(bb.features(vit, x), before, atol=0, rtol=0)  # the original is untouched
    for blk in twin.blocks:
        blk.attn.qkv_adapter = None
    torch.testing.assert_close(bb.features(twin, x), bb.features(plain, x), atol=0, rtol=0)
    torch.testing.assert_close(bb.features(vit, x), before, atol=0, rtol=0)
    buf = io.BytesIO()  # a whole pickled model keeps its hooks, bound to the loaded modules
    torch.save(vit, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for blk in loaded.blocks:
        blk.attn.qkv_adapter.value = -0.7
    torch.testing.assert_close(bb.features(loaded, x), changed, atol=0, rtol=0)
    torch.testing.assert_close(bb.features(vit, x), before, atol=0, rtol=0)


def test_backbone_vit_slots_work_without_attach():
    """backbone.ViT's attention has both slots and hooks from construction: a slot is never inert."""
    vit, plain = perturbed_vit(), perturbed_vit()
    assert all(b.attn.qkv_adapter is None and b.attn.out_adapter is None for b in vit.blocks)
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(vit(x), plain(x), atol=0, rtol=0)
    vit.blocks[0].attn.qkv_adapter = _Const("v", 0.3)  # v + c: the head outputs shift by c, proj maps it on
    assert not torch.allclose(vit(x), plain(x), atol=1e-3)


def test_unknown_attention_is_a_loud_error():
    class MyAttention(nn.Module):  # looks right, but the hooks cannot know what its forward does
        def __init__(self, d):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    vit = tiny_vit()
    vit.blocks[2].attn = MyAttention(32)
    with pytest.raises(ValueError, match=r"blocks.2.attn is .*MyAttention: an unknown attention class"):
        bb.attach(vit, "qkv_adapter", lambda i, attn: _Const("q", 0.1))
    vit = tiny_vit()
    vit.blocks[0].attn.qkv = nn.Linear(32, 64)  # not a fused d -> 3d
    with pytest.raises(ValueError, match=r"blocks.0.attn is backbone.Attention: no fused qkv Linear d->3d"):
        bb.attach(vit, "out_adapter", lambda i, attn: None)
    with pytest.raises(ValueError, match="needs a ViT with `blocks`"):
        bb.attach(nn.Linear(2, 2), "qkv_adapter", lambda i, attn: None)
    with pytest.raises(ValueError, match="slot must be one of"):
        bb.attach(tiny_vit(), "mlp_adapter", lambda i, attn: None)
    with pytest.raises(TypeError, match="must be an nn.Module"):
        bb.attach(tiny_vit(), "out_adapter", lambda i, attn: (lambda o: o))


def test_block_cls_matches_running_the_trunk():
    vit = tiny_vit()
    x = torch.rand(3, 3, 16, 16)
    cls = bb.block_cls(vit, x)
    assert cls.shape == (3, TINY.depth, TINY.embed_dim)
    torch.testing.assert_close(cls[:, -1], vit(x))
    h = bb.embed(vit, x)
    for blk in vit.blocks[:2]:
        h = blk(h)
    torch.testing.assert_close(cls[:, 1], vit.norm(h)[:, 0])


# ----------------------------------------------------------------------------------------------------
# low_rank, fold, Merged, check_options: the helpers the methods share


@pytest.mark.parametrize("ranks", [[3], [4, 4, 4], [4, 4, 3, 3, 2], [10, 10, 8]])  # R < 16 low-rank, >= 16 dense
@pytest.mark.parametrize("scaled", [False, True])
def test_low_rank_is_the_sum_of_its_components(ranks, scaled):
    """low_rank(x, A, B, s) = sum_k s_k B_k (A_k x) in value and in the gradient of every scale and factor
    (float64), in the low-rank regime and the dense one (R (d_in + d_out) >= d_in d_out, here R >= 16)."""
    g = torch.Generator().manual_seed(sum(ranks) + scaled)
    d = 32
    A = [torch.randn(r, d, generator=g, dtype=torch.float64, requires_grad=True) for r in ranks]
    B = [torch.randn(d, r, generator=g, dtype=torch.float64, requires_grad=True) for r in ranks]
    s = (torch.rand(len(ranks), generator=g, dtype=torch.float64) + 0.5).requires_grad_(scaled)
    x = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    ours = bb.low_rank(x, A, B, s if scaled else None)
    loop = sum((s_k if scaled else 1) * (x @ a.T @ b.T) for a, b, s_k in zip(A, B, s))
    torch.testing.assert_close(ours, loop, atol=1e-12, rtol=1e-12)
    inputs = A + B + ([s] if scaled else [])
    for u, v in zip(torch.autograd.grad(ours.square().sum(), inputs), torch.autograd.grad(loop.square().sum(), inputs)):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)
    assert bb.low_rank(x, [], []) is None


def test_fold_writes_the_deltas_into_a_plain_copy():
    """fold adds delta(i, m) to the rows of m (q, k, v of the fused qkv, o = proj) of a copy without adapters;
    the original keeps its adapters and weights; Merged concatenates the heads on the copy's f(x)."""
    vit = perturbed_vit()
    bb.attach(vit, "qkv_adapter", lambda i, attn: nn.Identity())  # any module: fold must drop it
    before = copy.deepcopy(vit.state_dict())
    d = vit.embed_dim
    g = torch.Generator().manual_seed(3)
    deltas = {(i, m): torch.randn(d, d, generator=g) for i in range(len(vit.blocks)) for m in "qvo" if (i + len(m)) % 2}
    plain = bb.fold(vit, lambda i, m: deltas.get((i, m)))
    assert all(blk.attn.qkv_adapter is None for blk in plain.blocks)
    assert all(blk.attn.qkv_adapter is not None for blk in vit.blocks)
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())
    for i, (blk, own) in enumerate(zip(plain.blocks, vit.blocks)):
        for m in "qkvo":
            new = blk.attn.proj.weight if m == "o" else blk.attn.qkv.weight[bb.qkv_rows(m, d)]
            old = own.attn.proj.weight if m == "o" else own.attn.qkv.weight[bb.qkv_rows(m, d)]
            torch.testing.assert_close(new, old + deltas.get((i, m), 0), atol=0, rtol=0)
    heads = nn.ModuleList([nn.Linear(d, 3), nn.Linear(d, 2)])
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        f = bb.features(plain, x)
        torch.testing.assert_close(bb.Merged(plain, heads)(x), torch.cat([heads[0](f), heads[1](f)], 1))


def test_check_options_names_the_first_bad_field():
    from dataclasses import dataclass

    @dataclass
    class Cfg:
        mode: str = "a"
        rank: int = 1

    bb.check_options(Cfg(), {"mode": ("a", "b")}, [("rank", True, ">= 1")])
    with pytest.raises(ValueError, match=r"^--mode must be one of a, b \(got 'c'\)$"):
        bb.check_options(Cfg(mode="c", rank=0), {"mode": ("a", "b")}, [("rank", False, ">= 1")])
    with pytest.raises(ValueError, match=r"^--rank must be >= 1 \(got 0\)$"):
        bb.check_options(Cfg(rank=0), {"mode": ("a", "b")}, [("rank", False, ">= 1")])
