"""backbone.py: timm equivalence, strict loading, the adapter slots, per-block features."""
import os

import pytest
import torch
from conftest import TINY, tiny_vit

import backbone as bb

SHARED_WEIGHTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "weights", "vit_small32_cifar10.pth")


@pytest.mark.parametrize("cfg", [TINY, bb.PRESETS["vit_tiny_test"], bb.ViTConfig(32, 8, 48, 3, 3, 2.0)])
def test_same_features_as_timm(cfg):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0).eval()
    for p in ref.parameters():  # non-trivial values everywhere (timm zero-inits some biases)
        p.data.add_(0.02 * torch.randn_like(p))
    ours = bb.ViT(cfg).eval()
    bb.load_strict(ours, ref.state_dict())
    x = torch.rand(4, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=0)


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


def test_weights_file_for_another_architecture(tmp_path):
    torch.save(tiny_vit().state_dict(), tmp_path / "w.pth")
    with pytest.raises(bb.WeightsError, match="do not fit"):
        bb.create("vit_small32", str(tmp_path / "w.pth"))
    with pytest.raises(bb.WeightsError, match="does not exist"):
        bb.create("vit_small32", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(bb.WeightsError, match="cannot read"):
        bb.create("vit_small32", str(tmp_path / "junk.pth"))


@pytest.mark.skipif(not os.path.isfile(SHARED_WEIGHTS), reason="../shared/weights is absent")
def test_shared_small_vit_loads():
    vit, info = bb.create("vit_small32", SHARED_WEIGHTS)
    assert info["mean"] == [0.5, 0.5, 0.5] and info["std"] == [0.5, 0.5, 0.5]
    assert vit(torch.rand(2, 3, 32, 32)).shape == (2, 192)


class _Const(torch.nn.Module):
    """An adapter that adds a constant to the chosen slices."""

    def __init__(self, which, value):
        super().__init__()
        self.which, self.value = which, value

    def forward(self, x):
        return {m: torch.full_like(x, self.value) for m in self.which}


def test_qkv_adapter_equals_editing_the_slice_bias():
    """A constant delta on q and v is the same as adding it to rows [0:d] and [2d:3d] of the qkv bias."""
    vit, ref = tiny_vit(), tiny_vit()
    d = vit.embed_dim
    bb.attach(vit, "qkv_adapter", lambda i, attn: _Const("qv", 0.3))
    with torch.no_grad():
        for blk in ref.blocks:
            blk.attn.qkv.bias[bb.qkv_rows("q", d)] += 0.3
            blk.attn.qkv.bias[bb.qkv_rows("v", d)] += 0.3
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(vit(x), ref(x), atol=1e-6, rtol=0)
    assert not torch.allclose(vit(x), tiny_vit()(x), atol=1e-3)  # and the delta did change something


def test_out_adapter_equals_editing_the_proj_bias():
    vit, ref = tiny_vit(), tiny_vit()
    bb.attach(vit, "out_adapter", lambda i, attn: (lambda o: torch.full_like(o, -0.2)))
    with torch.no_grad():
        for blk in ref.blocks:
            blk.attn.proj.bias -= 0.2
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(vit(x), ref(x), atol=1e-6, rtol=0)


def test_block_cls_matches_running_the_trunk():
    vit = tiny_vit()
    x = torch.rand(3, 3, 16, 16)
    cls = vit.block_cls(x)
    assert cls.shape == (3, TINY.depth, TINY.embed_dim)
    torch.testing.assert_close(cls[:, -1], vit(x))
    h = vit.embed(x)
    for blk in vit.blocks[:2]:
        h = blk(h)
    torch.testing.assert_close(cls[:, 1], vit.norm(h)[:, 0])
