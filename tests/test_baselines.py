"""seq_lora and simple_cil: the invariants of baselines.md §7 on a tiny random ViT."""
import math

import pytest
import torch
from conftest import synthetic_task, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import backbone as bb
from methods import seq_lora, simple_cil


def _train(method, data, steps=3):
    opt, sched = method.optimizer(len(data.train))
    method.train()
    for _, (x, y) in zip(range(steps), data.train):
        loss = method.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()


def _seq(seed=0, **cfg):
    torch.manual_seed(seed)
    return seq_lora.Method(tiny_vit(seed), 6, seq_lora.Config(**cfg))


@given(st.integers(0, 1000), st.sampled_from(["qv", "kv", "qkv", "v"]))
def test_fresh_adapter_changes_nothing(seed, targets):
    m = _seq(seed, targets=targets)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(m.vit(x), tiny_vit(seed)(x), atol=0, rtol=0)


@settings(max_examples=5)
@given(st.integers(0, 1000), st.sampled_from(["local", "full"]))
def test_frozen_weights_stay_bit_identical_and_only_lora_and_head_train(seed, loss):
    m = _seq(seed, loss=loss, lr=1e-2)
    frozen = {k: v.clone() for k, v in m.vit.state_dict().items() if "qkv_adapter" not in k}
    m.grow(0, [0, 1, 2])
    _train(m, synthetic_task([0, 1, 2], seed=seed))
    m.grow(1, [3, 4, 5])
    head0 = {k: v.clone() for k, v in m.heads[0].state_dict().items()}
    lora = {k: v.clone() for k, v in m.vit.state_dict().items() if "qkv_adapter" in k}
    _train(m, synthetic_task([3, 4, 5], seed=seed))
    for k, v in m.vit.state_dict().items():
        if "qkv_adapter" not in k:
            assert torch.equal(v, frozen[k]), k
    if loss == "local":  # an old head gets no gradient from the current task's logits
        for k, v in m.heads[0].state_dict().items():
            assert torch.equal(v, head0[k]), k
    assert any(not torch.equal(v, lora[k]) for k, v in m.vit.state_dict().items() if k in lora)  # LoRA trains
    assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == sorted(
        [f"vit.blocks.{i}.attn.qkv_adapter.{f}.{s}" for i in range(4) for f in "AB" for s in "qv"]
        + ["heads.1.weight", "heads.1.bias"])


@given(st.integers(0, 1000), st.floats(-5, 5))
def test_local_loss_ignores_old_logits(seed, shift):
    m = _seq(seed)
    m.grow(0, [0, 1, 2])
    m.grow(1, [3, 4, 5])
    x, y = next(iter(synthetic_task([3, 4, 5], seed=seed).train))
    before = m.loss(x, y)
    with torch.no_grad():
        m.heads[0].bias += shift  # perturb the old-class logits
    torch.testing.assert_close(m.loss(x, y), before, atol=0, rtol=0)


@settings(max_examples=8)
@given(st.integers(0, 1000), st.sampled_from(["qv", "kv", "k"]))
def test_merge_equivalence_and_touched_rows(seed, targets):
    m = _seq(seed, targets=targets)
    m.grow(0, [0, 1, 2])
    with torch.no_grad():
        for lora in m.loras:
            for b in lora.B.values():
                b.normal_(0, 0.1)
    x = torch.rand(4, 3, 16, 16)
    unmerged = m(x)
    w0 = [blk.attn.qkv.weight.clone() for blk in m.vit.blocks]
    m.merge()
    torch.testing.assert_close(m(x), unmerged, atol=1e-5, rtol=1e-5)
    d = m.vit.embed_dim
    for blk, w in zip(m.vit.blocks, w0):
        for s in "qkv":
            changed = not torch.equal(blk.attn.qkv.weight[bb.qkv_rows(s, d)], w[bb.qkv_rows(s, d)])
            assert changed == (s in targets), s


def test_seq_lora_rejects_bad_config():
    with pytest.raises(ValueError, match="rank"):
        _seq(rank=0)
    with pytest.raises(ValueError, match="targets"):
        _seq(targets="qx")


def test_inflora_cosine_schedule():
    f = seq_lora.inflora_cosine(20, 10)
    assert f(0) == 1.0 and f(9) == 1.0  # constant within an epoch
    assert f(10) < 1.0 and f(199) == pytest.approx(math.cos(99 * math.pi / 200))
    assert all(f(s) >= f(s + 1) for s in range(200))
    assert seq_lora.inflora_cosine(1, 10)(5) == 1.0


@settings(max_examples=5)
@given(st.integers(0, 1000), st.permutations([0, 1, 2]))
def test_simple_cil_old_prototypes_and_scores_unchanged(seed, perm):
    vit = tiny_vit(seed)
    backbone_before = {k: v.clone() for k, v in vit.state_dict().items()}
    m = simple_cil.Method(vit, 6, simple_cil.Config())
    m.grow(0, [0, 1, 2])
    m.end_task(0, [0, 1, 2], synthetic_task([0, 1, 2], seed=seed))
    p0 = m.protos[:3].clone()
    x = torch.rand(5, 3, 16, 16)
    s0 = m(x)
    m.grow(1, [3, 4, 5])
    m.end_task(1, [3, 4, 5], synthetic_task([3, 4, 5], seed=seed))
    assert torch.equal(m.protos[:3], p0)
    # the same prototypes and features; only the GEMM shape differs (3 vs 6 columns), hence float rounding
    torch.testing.assert_close(m(x)[:, :3], s0, atol=1e-6, rtol=1e-6)
    assert m(x).shape == (5, 6)
    for k, v in vit.state_dict().items():
        assert torch.equal(v, backbone_before[k])
    # a prototype is the mean feature of its class, whatever order the images come in
    data = synthetic_task([0, 1, 2], seed=seed)
    feats = torch.cat([vit(x) for x, _ in data.plain])
    ys = torch.cat([y for _, y in data.plain])
    for c in perm:
        torch.testing.assert_close(m.protos[c], feats[ys == c].mean(0), atol=1e-5, rtol=1e-5)
