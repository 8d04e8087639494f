"""seq_lora and simple_cil on a tiny random ViT: zero-init identity, frozen backbone, local loss, merge, folded
evaluation, schedule, prototypes."""

import pytest
import torch
from conftest import run_task, synthetic_task, tiny_vit
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
def test_merged_equivalence_and_touched_rows(seed, targets):
    """merged() writes B_m A_m into the rows of m only; its logits are forward's (atol 1e-5, fp32)."""
    m = _seq(seed, targets=targets)
    m.grow(0, [0, 1, 2])
    with torch.no_grad():
        for blk in m.vit.blocks:
            for b in blk.attn.qkv_adapter.B.values():
                b.normal_(0, 0.1)
    x = torch.rand(4, 3, 16, 16)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m.merged()(x), m(x), atol=1e-5, rtol=1e-5)
    d = m.vit.embed_dim
    for blk, own in zip(m.merged().vit.blocks, m.vit.blocks):
        for s in "qkv":
            changed = not torch.equal(blk.attn.qkv.weight[bb.qkv_rows(s, d)], own.attn.qkv.weight[bb.qkv_rows(s, d)])
            assert changed == (s in targets), s


def test_seq_lora_rejects_bad_config():
    for bad in (dict(rank=0), dict(targets="qx"), dict(targets="qq"), dict(loss="x")):
        flag = "--" + next(iter(bad))
        with pytest.raises(ValueError, match=rf"^{flag} must be .* \(got .+\)$"):
            _seq(**bad)


@pytest.mark.parametrize("E", [20, 3])
def test_epoch_cosine_is_the_official_schedule(E):
    """InfLoRA utils/schedulers.py L19-20 @ e08b00e steps once in its constructor and then resets last_epoch, so
    epochs 0 and 1 both train at the base rate: eta_e = eta_0 cos(99 pi max(e - 1, 0) / (200 (E - 1)))."""
    m = _seq(epochs=E)
    m.grow(0, [0, 1, 2])
    opt, sched = m.optimizer(steps_per_epoch=2)
    lrs = []
    for _ in range(2 * E):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch = lrs[::2]
    assert lrs[1::2] == per_epoch  # constant within an epoch
    last = {20: 0.0974000560613835, 3: 0.7126385189252054}[E]  # cos(99 pi (E - 2) / (200 (E - 1)))
    assert per_epoch[0] == per_epoch[1] == m.cfg.lr
    assert per_epoch[E - 1] == pytest.approx(m.cfg.lr * last, rel=1e-12)
    assert all(a > b for a, b in zip(per_epoch[1:], per_epoch[2:]))
    assert seq_lora.inflora_cosine(1, 10)(5) == 1.0  # one epoch: the base rate


def test_state_dict_keys_are_unique_tensors():
    """The LoRA is registered once, under vit.blocks.{i}.attn.qkv_adapter: A_m, B_m for m in q, v."""
    m = _seq()
    m.grow(0, [0, 1, 2])
    state = m.state_dict()
    assert len({v.data_ptr() for v in state.values()}) == len(state) == len(m.vit.state_dict()) + 2
    assert len([k for k in state if ".qkv_adapter." in k]) == 4 * 2 * 2


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


def test_seq_lora_merged_is_a_plain_copy_with_the_same_logits():
    """After 3 tasks, merged() is the heads over a copy of the ViT with B A folded into its qkv rows and no
    adapters: the logits of the forward through the adapters (atol 1e-5, fp32). Building it leaves the method's
    state dict bit-identical and shares no parameter; the method converts with .double() after an evaluation."""
    torch.manual_seed(0)
    m = _seq(0, lr=1e-2)
    for t in range(3):
        run_task(m, t, [2 * t, 2 * t + 1], seed=t)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    with torch.no_grad():
        unmerged = m(x)  # the adapters run
        merged = m.merged()
        folded = merged(x)
    assert all(blk.attn.qkv_adapter is None for blk in merged.vit.blocks)
    assert not any("adapter" in k for k in merged.state_dict())
    assert all(not torch.equal(a.attn.qkv.weight, b.attn.qkv.weight) for a, b in zip(merged.vit.blocks, m.vit.blocks))
    assert {id(p) for p in merged.parameters()}.isdisjoint({id(p) for p in m.parameters()})
    torch.testing.assert_close(folded, unmerged, atol=1e-5, rtol=0)
    after = m.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    m.double()
    with torch.no_grad():
        torch.testing.assert_close(m(x.double()), unmerged.double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(m.merged()(x.double()), unmerged.double(), atol=1e-5, rtol=0)
