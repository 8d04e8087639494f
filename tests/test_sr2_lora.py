"""SR²-LoRA (methods/sr2_lora.py): the spectral relation loss on random features (float64), the method on a
tiny random ViT, the classifier alignment and the learning-rate schedule (the smoke run, resume and options:
tests/test_contract.py)."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from backbone import block_cls, embed, features
from conftest import run_task, synthetic_task, tiny_vit
from methods import sr2_lora as M

D64 = torch.float64

# ----------------------------------------------------------------------------------------------------
# Random features: F, G of shape (B, L, D), float64, times a log-uniform scale in [1e-2, 1e2]


@st.composite
def feature_pairs(draw, max_l=12, max_d=64):
    b, l, d = draw(st.integers(1, 4)), draw(st.integers(1, max_l)), draw(st.integers(1, max_d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = 10.0 ** draw(st.floats(-2, 2))
    f = torch.randn(b, l, d, generator=g, dtype=D64) * scale
    noise = draw(st.sampled_from([1e-4, 1e-2, 1.0, None]))  # None: independent G
    other = torch.randn(b, l, d, generator=g, dtype=D64) * scale
    return f, other if noise is None else f + noise * other


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """A random orthogonal matrix: QR of a Gaussian draw, signs fixed so the draw is unique."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=D64))
    return q * torch.sign(torch.diagonal(r))


def lam_max(*fs) -> float:
    """An upper bound on every eigenvalue of every R: the largest squared Frobenius norm of a sample's F."""
    return max(float(f.pow(2).sum((1, 2)).max()) for f in fs)


def tol(*fs) -> float:
    return 1e-8 * (1.0 + lam_max(*fs))  # 1e-8 relative to the largest eigenvalue, float64


def loss(f, g, **kw):
    return float(M.relation_loss(f, g, **kw))


# ----------------------------------------------------------------------------------------------------
# Spectral relation loss


@given(feature_pairs())
def test_identity_gives_zero_loss_and_zero_gradient(fg):
    f, _ = fg
    f = f.clone().requires_grad_(True)
    value = M.relation_loss(f, f.detach().clone())
    value.backward()
    assert float(value.detach()) == 0.0
    assert torch.count_nonzero(f.grad) == 0


@given(feature_pairs())
def test_loss_is_non_negative_and_symmetric_in_value(fg):
    f, g = fg
    assert loss(f, g) >= 0.0
    assert abs(loss(f, g) - loss(g, f)) <= tol(f, g)


@given(feature_pairs(), st.integers(0, 1000))
def test_invariant_to_independent_feature_rotations(fg, seed):
    f, g = fg
    d = f.shape[2]
    q1, q2 = orthogonal(d, seed), orthogonal(d, seed + 1)
    assert abs(loss(f @ q1, g @ q2) - loss(f, g)) <= tol(f, g)


@given(feature_pairs(), st.integers(0, 1000))
def test_invariant_to_layer_rotations_and_permutations(fg, seed):
    f, g = fg
    n_layers = f.shape[1]
    u = orthogonal(n_layers, seed)
    perm = torch.randperm(n_layers, generator=torch.Generator().manual_seed(seed))
    assert abs(loss(u @ f, g) - loss(f, g)) <= tol(f, g)
    assert abs(loss(f[:, perm], g) - loss(f, g)) <= tol(f, g)
    assert abs(loss(f, g[:, perm]) - loss(f, g)) <= tol(f, g)


@given(feature_pairs(), st.integers(0, 1000))
def test_zero_loss_does_not_mean_equal_features(fg, seed):
    f, _ = fg
    n_layers, d = f.shape[1:]
    g = orthogonal(n_layers, seed) @ f @ orthogonal(d, seed + 1)
    assert loss(f, g) <= tol(f, g)
    if d > 1:  # a rotation of the features moves them, unless d = 1 where O(1) = {+-1}
        assert float((g - f).norm()) > 1e-6 * float(f.norm())


@given(feature_pairs())
def test_eigenvalues_are_squared_singular_values(fg):
    f, _ = fg
    n_layers = f.shape[1]
    s2 = torch.linalg.svdvals(f).pow(2).flip(-1)  # ascending, min(L, D) values
    expected = F.pad(s2, (n_layers - s2.shape[1], 0))  # R is L x L: the other L - D eigenvalues are 0
    assert torch.allclose(M.spectrum(f), expected, rtol=0, atol=tol(f))


@given(feature_pairs())
def test_spectrum_is_psd_sorted_and_of_rank_at_most_min_l_d(fg):
    f, _ = fg
    n_layers, d = f.shape[1:]
    r = M.relation_matrix(f)
    assert r.shape == (f.shape[0], n_layers, n_layers)
    assert torch.equal(r, r.transpose(1, 2))
    lam = M.spectrum(f)
    assert (lam >= -tol(f)).all()
    assert (lam.diff(dim=1) >= 0).all()
    if d < n_layers:
        assert (lam[:, : n_layers - d].abs() <= tol(f)).all()


@given(feature_pairs(), st.floats(1.5, 4.0))
def test_spectrum_scales_with_c_squared_and_the_loss_is_not_scale_invariant(fg, c):
    f, g = fg
    big = tol(c * f, c * g)
    assert torch.allclose(M.spectrum(c * f), c**2 * M.spectrum(f), rtol=0, atol=big)
    # h(c^2 u) >= c^2 h(u) for c >= 1 (both regimes of smooth-L1), so the loss grows at least like c^2
    base = loss(f, g)
    assert loss(c * f, c * g) >= c**2 * base - big
    if base > big:
        assert loss(c * f, c * g) > base


@given(feature_pairs())
def test_hoffman_wielandt_and_weyl_bounds(fg):
    f, g = fg
    lf, lg = M.spectrum(f), M.spectrum(g)
    diff = M.relation_matrix(f) - M.relation_matrix(g)
    fro2 = diff.pow(2).sum((1, 2))
    t2 = 1e-8 * (1.0 + lam_max(f, g)) ** 2
    assert ((lf - lg).pow(2).sum(1) <= fro2 + t2).all()  # Hoffman-Wielandt, per sample
    assert ((lf - lg).abs().amax(1) <= torch.linalg.matrix_norm(diff, ord=2) + tol(f, g)).all()  # Weyl
    b, n_layers = lf.shape
    assert loss(f, g) <= float(fro2.sum()) / (2 * b * n_layers) + t2  # mean-reduced smooth-L1 form


@given(feature_pairs(), st.data())
def test_loss_is_per_sample(fg, data):
    f, g = fg
    b = f.shape[0]
    k = data.draw(st.integers(0, b))
    perm = torch.randperm(b, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
    parts = [(f[:k], g[:k]), (f[k:], g[k:])]
    weighted = sum(len(a) * loss(a, c) for a, c in parts if len(a)) / b
    assert abs(loss(f, g) - weighted) <= tol(f, g)
    assert abs(loss(f[perm], g[perm]) - loss(f, g)) <= tol(f, g)


def test_per_sample_loss_differs_from_the_batch_mean_relation_variant():
    gen = torch.Generator().manual_seed(0)
    f, g = torch.randn(2, 2, 3, 8, generator=gen, dtype=D64)
    per_sample, batch = loss(f, g), loss(f, g, kind="batch")
    assert abs(per_sample - batch) > 1e-3 * per_sample
    # and the batch variant is what its name says: the spectra of the batch-mean R
    lam = torch.linalg.eigvalsh(torch.stack([M.relation_matrix(f).mean(0), M.relation_matrix(g).mean(0)]))
    assert batch == pytest.approx(float(F.smooth_l1_loss(lam[0], lam[1])), rel=1e-12)


@given(feature_pairs())
def test_no_gradient_reaches_the_old_features(fg):
    f, g = fg
    f, g = f.clone().requires_grad_(True), g.clone().requires_grad_(True)
    M.relation_loss(f, g).backward()
    assert g.grad is None
    assert torch.isfinite(f.grad).all()


@given(st.integers(1, 12), st.integers(0, 16), st.integers(0, 1000), st.floats(-2, 2))
def test_degenerate_spectra_give_finite_loss_and_gradient(n_layers, extra, seed, log_scale):
    d = n_layers + extra
    c = 10.0**log_scale
    rows = c * orthogonal(d, seed)[:n_layers]  # orthogonal rows of equal norm: one L-fold eigenvalue c^2
    gen = torch.Generator().manual_seed(seed)
    low_rank = c * torch.randn(n_layers, 1, generator=gen, dtype=D64) @ torch.randn(1, d, generator=gen, dtype=D64)
    f = torch.stack([rows, low_rank, torch.zeros(n_layers, d, dtype=D64)]).requires_grad_(True)
    g = c * torch.randn(3, n_layers, d, generator=gen, dtype=D64)
    value = M.relation_loss(f, g)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(f.grad).all()
    for kind in ("cosine", "batch"):  # the ablations share the solver
        f.grad = None
        M.relation_loss(f, g, kind=kind).backward()
        assert torch.isfinite(f.grad).all()


def test_relation_loss_is_computed_in_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(0)
    f, g = (torch.randn(4, 6, 32, generator=gen) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = M.relation_loss(f, g)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(loss(f.double(), g.double()), rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# The method on a tiny random ViT

TASKS = [[0, 1, 2], [3, 4, 5]]
SMALL = dict(batch_size=8, ca_epochs=2, ca_samples=16)


def method_at_task1(seed=0, train_steps=2, **kw):
    """A method that finished task 0 (a few steps, then end_task) and has grown task 1."""
    torch.manual_seed(seed)
    m = M.Method(tiny_vit(seed), 6, M.Config(**{**SMALL, "lr": 1e-2, **kw}))
    data = synthetic_task(TASKS[0], n_per_class=4, batch_size=8, seed=seed)
    m.grow(0, TASKS[0])
    opt, _ = m.optimizer(len(data.train))
    for _, (x, y) in zip(range(train_steps), data.train):
        opt.zero_grad()
        m.loss(x, y).backward()
        opt.step()
    m.end_task(0, TASKS[0], data)
    m.grow(1, TASKS[1])
    return m, synthetic_task(TASKS[1], n_per_class=4, batch_size=8, seed=seed + 1)


@pytest.fixture(scope="module")
def built():
    return method_at_task1()


@pytest.fixture
def task1(built):
    """A fresh copy of the method after task 0, grown for task 1 (building it once keeps the file fast)."""
    m, data = built
    return copy.deepcopy(m), data


def with_cfg(m, **kw):
    m.cfg = dataclasses.replace(m.cfg, **kw)
    return m


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_block_features_are_final_norm_cls_per_block(vit):
    x = torch.rand(3, 3, 16, 16)
    feats = block_cls(vit, x)
    h, rows = embed(vit, x), []
    for blk in vit.blocks:
        h = blk(h)
        rows.append(vit.norm(h)[:, 0])  # the shared final LayerNorm, CLS token
    assert feats.shape == (3, len(vit.blocks), vit.embed_dim)
    assert torch.allclose(feats, torch.stack(rows, 1), atol=1e-6)
    assert torch.allclose(feats[:, -1], features(vit, x), atol=1e-6)


def test_only_the_current_branch_and_head_train(task1):
    m, _ = task1
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {f"vit.blocks.{i}.attn.qkv_adapter.branches.1.{ab}.{s}"
                for i in range(len(m.vit.blocks)) for ab in "AB" for s in "kv"} | {"heads.1.weight", "heads.1.bias"}
    assert trainable == expected
    d, r, n_blocks = m.vit.embed_dim, m.cfg.rank, len(m.vit.blocks)
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == n_blocks * 2 * (d * r + r * d) + d * 3 + 3  # per task: A_t, B_t on k and v, and h_t


def test_step_leaves_old_branches_heads_and_backbone_bit_identical(task1):
    m, data = task1
    before = snapshot(m)
    opt, sched = m.optimizer(len(data.train))
    for x, y in data.train:
        opt.zero_grad()
        m.loss(x, y).backward()
        opt.step()
        sched.step()
    after = snapshot(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".branches.1." in k or k.startswith("heads.1.") for k in changed)
    assert any(".branches.1.B." in k for k in changed)  # the new branch did move away from B = 0
    for n, p in m.named_parameters():
        if ".branches.0." in n or n.startswith(("heads.0.", "vit.patch_embed", "vit.blocks.0.attn.qkv.")):
            assert p.grad is None, n


def test_previous_model_runs_without_graph_and_restores_the_active_branches(task1):
    m, data = task1
    x, _ = next(iter(data.train))
    old = m.previous_block_cls(x)
    assert not old.requires_grad and old.grad_fn is None
    assert all(lora.current for lora in m.adapters)
    assert block_cls(m.vit, x).requires_grad  # the current model does build a graph (branch 1 trains)
    with pytest.raises(RuntimeError, match="inside"):
        with m.previous_model():
            assert not any(lora.current for lora in m.adapters)
            raise RuntimeError("inside")
    assert all(lora.current for lora in m.adapters)  # an exception does not leave the previous model on


def test_relation_loss_is_zero_at_the_first_step_of_a_task(task1):
    m, data = task1
    x, y = next(iter(data.train))
    new = block_cls(m.vit, x)
    assert torch.equal(new, m.previous_block_cls(x))  # B_1 = 0: the two models agree bit for bit
    assert float(M.relation_loss(new, m.previous_block_cls(x)).detach()) == 0.0
    total = m.loss(x, y)  # the full objective equals the CE alone
    ce = F.cross_entropy(m.heads[1](new[:, -1]), y - 3)
    assert torch.equal(total, ce)


def test_after_training_the_relation_term_is_live_bounded_and_weighted(task1):
    m, data = task1
    with_cfg(m, lr=5e-2)
    opt, _ = m.optimizer(len(data.train))
    for _ in range(2):
        for x, y in data.train:
            opt.zero_grad()
            m.loss(x, y).backward()
            opt.step()
    x, y = next(iter(data.plain))
    with torch.no_grad():
        new, old = block_cls(m.vit, x).double(), m.previous_block_cls(x).double()
    value = loss(new, old)
    fro2 = (M.relation_matrix(new) - M.relation_matrix(old)).pow(2).sum()
    assert value > 0  # the previous model really is the previous one: the new branch moved the features
    assert loss(new, old, kind="feature_all") > 0
    assert value <= float(fro2) / (2 * new.shape[0] * new.shape[1]) + tol(new, old)
    # the objective is CE + lambda_SR * L_SR, and L_SR's gradient reaches the current branch
    with torch.no_grad():
        ce = float(F.cross_entropy(m.heads[1](new[:, -1].float()), y - 3))
        sr = float(M.relation_loss(new.float(), old.float()))
        for weight in (0.0, 2.5):
            m.sr_weight = weight
            assert float(m.loss(x, y)) == pytest.approx(ce + weight * sr, rel=1e-5)
    m.zero_grad(set_to_none=True)
    M.relation_loss(block_cls(m.vit, x), m.previous_block_cls(x)).backward()
    grads = [p.grad for n, p in m.named_parameters() if ".branches.1." in n]
    assert all(g is not None for g in grads) and any(torch.count_nonzero(g) > 0 for g in grads)


# ----------------------------------------------------------------------------------------------------
# merged(): the inference model; the frozen branches as one product


def three_tasks(rank=10, steps=2, end=True, **kw):
    """The method after tasks 0, 1 and 2 (conftest run_task; task 2 without end_task if not `end`)."""
    torch.manual_seed(0)
    m = M.Method(tiny_vit(0), 12, M.Config(**{**SMALL, "lr": 1e-2, "rank": rank, **kw}))
    for t in range(3):
        run_task(m, t, [3 * t, 3 * t + 1, 3 * t + 2], steps=steps, seed=t, end=end or t < 2)
    return m


def loop_forward(self, x):
    """The reference TaskLoRA forward: every branch on its own, in order (the last one only while `current`)."""
    out = {}
    for branch in self.branches if self.current else self.branches[:-1]:
        for m in branch.A:
            delta = F.linear(F.linear(x, branch.A[m]), branch.B[m])
            out[m] = out[m] + delta if m in out else delta
    return out


def randomise_b(m, std=0.1):
    """Every branch's B drawn at random, so that every branch matters (B = 0 would hide a missing one)."""
    with torch.no_grad():
        for lo in m.adapters:
            for branch in lo.branches:
                for b in branch.B.values():
                    b.normal_(std=std)


def test_merged_is_a_plain_vit_with_the_forwards_logits():
    m = three_tasks()
    randomise_b(m)
    m.eval()
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before, params = snapshot(m), {id(p) for p in m.parameters()} | {id(b) for b in m.buffers()}
    merged = m.merged()
    assert snapshot(m).keys() == before.keys() and all(torch.equal(v, snapshot(m)[k]) for k, v in before.items())
    assert not any(id(t) in params for t in [*merged.parameters(), *merged.buffers()])  # nothing shared
    assert not any(isinstance(mod, M.TaskLoRA) for mod in merged.modules())
    assert all(blk.attn.qkv_adapter is None for blk in merged.vit.blocks)
    with torch.no_grad():
        z = m(x)
        assert torch.allclose(merged(x), z, rtol=0, atol=1e-5)
        bare = copy.deepcopy(m.vit)
        for blk in bare.blocks:
            blk.attn.qkv_adapter = None
        assert (m.logits(features(bare, x)) - z).abs().max() > 1e-3  # every branch matters
        for drop in range(3):  # and each one: zeroing branch `drop` moves the folded logits
            lesser = copy.deepcopy(m)
            for lo in lesser.adapters:
                for b in lo.branches[drop].B.values():
                    b.zero_()
            assert (lesser.merged()(x) - z).abs().max() > 1e-4


def test_double_after_an_evaluation():
    m = three_tasks()
    randomise_b(m)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        z = m(x)
        m.merged()(x)
        m.double()
        z64 = m(x.double())
        assert z64.dtype == torch.float64 and torch.allclose(z64, z.double(), rtol=0, atol=1e-5)
        assert torch.allclose(m.merged()(x.double()), z64, rtol=0, atol=1e-10)


def test_load_state_dict_changes_the_frozen_branches_the_forward_uses(monkeypatch):
    m = three_tasks()  # at task 2: branches 0 and 1 frozen
    randomise_b(m)
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    old = m.previous_block_cls(x)
    state = m.state_dict()
    key = "vit.blocks.0.attn.qkv_adapter.branches.0.B.k"
    state[key] = 2 * state[key]
    m.load_state_dict(state)
    assert torch.equal(m.adapters[0].branches[0].B["k"], state[key])
    new = m.previous_block_cls(x)
    assert (new - old).abs().max() > 1e-4  # the previous model sees the loaded branch
    monkeypatch.setattr(M.TaskLoRA, "forward", loop_forward)
    assert torch.allclose(new, m.previous_block_cls(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [4, 10])  # frozen R = 8 < d / 2: low-rank product; R = 20: dense (low_rank)
def test_stacked_frozen_branches_equal_the_per_branch_loop(rank, monkeypatch):
    """At task 2 the training forward (frozen branches 0, 1 as one product, branch 2 on its own) gives the loop's
    loss and gradients, and the previous model (branches 0, 1) the loop's features (float64)."""
    m = three_tasks(rank, steps=1, end=False, ca="none")
    m.double()
    randomise_b(m)
    x = torch.rand(6, 3, 16, 16, dtype=D64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([6, 7, 8, 6, 7, 8])
    trainable = [p for p in m.parameters() if p.requires_grad]

    def run():
        m.zero_grad(set_to_none=True)
        loss = m.loss(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable], m.previous_block_cls(x)

    loss, grads, old = run()
    monkeypatch.setattr(M.TaskLoRA, "forward", loop_forward)
    ref_loss, ref_grads, ref_old = run()
    with torch.no_grad():
        assert float(loss - F.cross_entropy(m.heads[2](block_cls(m.vit, x)[:, -1]), y - 6)) > 0  # L_SR is live
    assert torch.allclose(loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert len(grads) == len(trainable) == 4 * 2 * 2 + 2
    assert all(torch.allclose(g, r, rtol=1e-8, atol=1e-10) for g, r in zip(grads, ref_grads))
    assert any(torch.count_nonzero(g) for g in grads[:-2])
    assert torch.allclose(old, ref_old, rtol=1e-10, atol=1e-12)


def test_resume_rebuilds_structure_from_grow_alone(task1):  # contract: fixed-shape buffers
    m, data = task1
    m.end_task(1, TASKS[1], data)
    state = m.state_dict()
    assert state["ca_mean"].shape == (6, 32) and state["ca_cov"].shape == (6, 32, 32)
    fresh = M.Method(tiny_vit(1), 6, m.cfg)
    fresh.grow(0, TASKS[0])
    fresh.grow(1, TASKS[1])
    fresh.load_state_dict(state, strict=True)
    x, y = next(iter(data.plain))
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
        assert torch.equal(fresh.previous_block_cls(x), m.previous_block_cls(x))


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "--rank must be >= 1 (got 0)"),
    (dict(targets="kx"), "--targets must be distinct letters of q, k, v (got 'kx')"),
    (dict(targets=""), "--targets must be distinct letters of q, k, v (got '')"),
    (dict(relation="entrywise"), "--relation must be one of spectral, batch, cosine, feature_all, feature_last "
                                 "(got 'entrywise')"),
    (dict(sr_weight=-1.0), "--sr-weight must be >= 0 (got -1.0)"),
    (dict(ca="slca"), "--ca must be one of sr2, ce, none (got 'slca')"),
    (dict(ca_shrink=-1e-3), "--ca-shrink must be >= 0 (got -0.001)"),
    (dict(lr=0.0), "--lr must be > 0 (got 0.0)"),
    (dict(ca_tmax=0), "--ca-tmax must be >= 1 (got 0)")])
def test_config_validation(bad, message):
    with pytest.raises(ValueError) as err:
        M.validate(M.Config(**bad))
    assert str(err.value) == message
    with pytest.raises(ValueError):  # the method validates first, before touching the backbone
        M.Method(tiny_vit(), 6, M.Config(**bad))


def test_width_normalised_relation_weight():
    assert M.Method(tiny_vit(), 6, M.Config(sr_width_norm="on")).sr_weight == pytest.approx(768 / 32)
    assert M.Method(tiny_vit(), 6, M.Config()).sr_weight == 1.0


@pytest.mark.parametrize("epochs, last", [(20, 0.09740005606), (3, 0.71263851893)])
def test_inflora_epoch_cosine_starts_one_epoch_late(epochs, last):
    """The official CosineSchedule steps once in its constructor and resets last_epoch (utils/schedulers.py
    L19-20 @ ea5da65), and dlora steps it once per epoch (methods/dlora.py L329): epochs 0 and 1 train at the base
    rate, epoch e >= 1 at cos(99 pi (e - 1) / (200 (E - 1))); the multiplier is constant within an epoch."""
    f = M.inflora_cosine(epochs, 7)
    assert f(0) == f(6) == 1.0  # epoch 0
    assert f(7) == f(13) == 1.0  # epoch 1: the base rate again
    e = epochs - 1
    assert f(7 * e) == f(7 * e + 6) == pytest.approx(last, abs=1e-10)
    assert f(7 * e) == pytest.approx(math.cos(99 * math.pi * (e - 1) / (200 * (epochs - 1))), rel=1e-15)
    assert f(7 * epochs + 3) == f(7 * e)  # past the end it stays at the last epoch's rate
    assert M.inflora_cosine(1, 7)(5) == 1.0


def test_inflora_epoch_cosine_matches_the_official_scheduler_state_machine():
    """The official scheduler's states, restated: its constructor calls step(last_epoch + 1 = 0), which sets
    lr = base cos(0), then sets last_epoch = -1 again; each per-epoch step() sets last_epoch += 1 and
    lr = base cos(99 pi last_epoch / (200 (K - 1))) (utils/schedulers.py L19-20, L40-45, L53-54 @ ea5da65)."""
    K, base, steps = 5, 0.5, 3
    rule = lambda e: base * math.cos(99 * math.pi * e / (200 * (K - 1)))  # noqa: E731
    lr, last_epoch = rule(0), -1  # the constructor
    official = []
    for _ in range(K):
        official.append(lr)  # the rate this epoch trains at
        last_epoch += 1  # scheduler.step() after the epoch (methods/dlora.py L329)
        lr = rule(last_epoch)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, M.inflora_cosine(K, steps))
    ours = []
    for _ in range(K):
        ours.append(opt.param_groups[0]["lr"])
        for _ in range(steps):
            opt.step()
            sched.step()
    assert ours == pytest.approx(official, rel=1e-12)
    assert official[0] == official[1] == base and official[2] < base  # not the one-epoch-early schedule


# ----------------------------------------------------------------------------------------------------
# Class statistics and classifier alignment


def test_class_statistics_are_per_class_mean_and_covariance(task1):
    m, data = task1
    feats, ys = [], []
    with torch.no_grad():
        # task 0's statistics were taken with branch 0 only
        with m.previous_model():  # branch 0 is the only frozen one at task 1
            data0 = synthetic_task(TASKS[0], n_per_class=4, batch_size=8, seed=0)
            for x, y in data0.plain:
                feats.append(features(m.vit, x).double())
                ys.append(y)
    f, y = torch.cat(feats), torch.cat(ys)
    for c in TASKS[0]:
        assert torch.allclose(m.ca_mean[c], f[y == c].mean(0), atol=1e-6)
        assert torch.allclose(m.ca_cov[c].double(), torch.cov(f[y == c].T), atol=1e-6)
    assert torch.count_nonzero(m.ca_mean[3:]) == 0 and torch.count_nonzero(m.ca_cov[3:]) == 0
    chol = torch.linalg.cholesky_ex(m.ca_cov[:3].double() + m.cfg.ca_shrink * torch.eye(32, dtype=D64))
    assert (chol.info == 0).all()  # Sigma_c + delta I is positive definite


@settings(max_examples=10)
@given(st.integers(0, 1000), st.integers(2, 16), st.floats(-3, 1))
def test_gaussian_replay_has_the_stored_mean_and_covariance(seed, d, log_var):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(3, d, generator=gen, dtype=D64) * 3
    a = torch.randn(3, d, d, generator=gen, dtype=D64) * 10 ** (log_var / 2)
    cov = a @ a.transpose(1, 2) / d + 1e-2 * torch.eye(d, dtype=D64)
    torch.manual_seed(seed)
    n = 4000
    x, labels = M.gaussian_replay(mu, torch.linalg.cholesky(cov), n)
    assert x.shape == (3 * n, d) and torch.equal(labels, torch.arange(3).repeat_interleave(n))
    x = x.reshape(3, n, d)  # class-major
    sd = torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    assert ((x.mean(1) - mu).abs() <= 5 * sd / n**0.5).all()  # 5 sigma of the sample mean
    emp = torch.stack([torch.cov(xc.T) for xc in x])
    assert ((emp - cov).abs() <= 6 * (sd[:, :, None] * sd[:, None, :]) / n**0.5).all()


def test_end_task_0_does_not_align_and_ca_none_skips_everything(built):
    torch.manual_seed(0)
    m = M.Method(tiny_vit(), 6, M.Config(**SMALL))
    data = synthetic_task(TASKS[0], n_per_class=4, batch_size=8)
    m.grow(0, TASKS[0])
    heads = snapshot(m.heads)
    m.end_task(0, TASKS[0], data)
    assert all(torch.equal(v, snapshot(m.heads)[k]) for k, v in heads.items())
    assert torch.count_nonzero(m.ca_mean[:3]) > 0
    m, data = copy.deepcopy(built[0]), built[1]
    with_cfg(m, ca="none")
    before = snapshot(m)
    m.end_task(1, TASKS[1], data)
    assert all(torch.equal(v, snapshot(m)[k]) for k, v in before.items())


def test_alignment_changes_only_the_heads_and_leaves_them_frozen(task1):
    m, data = task1
    before = snapshot(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad and not n.startswith("heads.")}
    m.end_task(1, TASKS[1], data)
    after = snapshot(m)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = {"ca_mean", "ca_cov"}
    assert changed - stats and all(k.startswith("heads.") for k in changed - stats)
    assert any(k.startswith("heads.0.") for k in changed)  # the old head is aligned too
    assert {k for k in changed & stats} == stats  # task 1's statistics were written
    assert torch.equal(before["ca_mean"][:3], after["ca_mean"][:3])  # old statistics never change
    assert not any(p.requires_grad for p in m.heads.parameters())  # grow() of the next task unfreezes h_{t+1}
    assert {n for n, p in m.named_parameters() if p.requires_grad} == trainable
    assert all(p.grad is None for p in m.heads.parameters())


@given(st.integers(0, 1000), st.integers(2, 8), st.floats(1.5, 4.0))
def test_alignment_loss_minimises_entropy_and_normalises_the_ce(seed, n_cls, c):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(16, n_cls, generator=gen, dtype=D64) * 3
    y = torch.randint(0, n_cls, (16,), generator=gen)
    value = M.alignment_loss(z, y, 0.1)
    entropy = -(z.softmax(1) * z.log_softmax(1)).sum(1).mean()
    assert 0 <= float(entropy) <= float(value)  # both terms are non-negative
    # CE on z / (tau ||z||) does not change when z is scaled, the entropy of softmax(z) falls: the loss falls
    scaled = M.alignment_loss(c * z, y, 0.1)
    scaled_entropy = -((c * z).softmax(1) * (c * z).log_softmax(1)).sum(1).mean()
    assert float(scaled - scaled_entropy) == pytest.approx(float(value - entropy), rel=1e-6)
    assert float(scaled) < float(value)
    # per-sample: every row of z is normalised by its own norm, over all classes at once (utils/losses.py L61-62)
    rows = torch.stack([M.alignment_loss(z[i:i + 1], y[i:i + 1], 0.1) for i in range(len(z))])
    assert float(value) == pytest.approx(float(rows.mean()), rel=1e-9)


def test_alignment_uses_the_global_generator(built):
    heads = []
    for seed in (7, 7, 8):
        m, data = copy.deepcopy(built[0]), built[1]
        torch.manual_seed(seed)
        m.end_task(1, TASKS[1], data)
        heads.append(snapshot(m.heads))
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    assert any(not torch.equal(heads[0][k], heads[2][k]) for k in heads[0])


def test_ce_alignment_uses_plain_ce_not_the_sr2_loss(built, monkeypatch):
    calls = []
    monkeypatch.setattr(M, "alignment_loss", lambda *a: calls.append(1) or M.F.cross_entropy(*a[:2]))
    for ca, expect_calls in (("ce", False), ("sr2", True)):
        m, data = copy.deepcopy(built[0]), built[1]
        with_cfg(m, ca=ca, ca_epochs=1)
        heads = snapshot(m.heads)
        calls.clear()
        m.end_task(1, TASKS[1], data)
        assert bool(calls) == expect_calls
        assert any(not torch.equal(v, snapshot(m.heads)[k]) for k, v in heads.items())


@pytest.mark.parametrize("ca", ["sr2", "ce"])
def test_alignment_separates_well_separated_classes(ca):
    torch.manual_seed(0)
    m = M.Method(tiny_vit(), 6, M.Config(batch_size=8, ca_epochs=5, ca=ca))
    m.grow(0, TASKS[0])
    m.grow(1, TASKS[1])
    with torch.no_grad():
        m.ca_mean.copy_(torch.randn(6, 32, dtype=D64))
        m.ca_cov.copy_(1e-3 * torch.eye(32).expand(6, 32, 32))
    assert not torch.equal(m.logits(m.ca_mean.float()).argmax(1), torch.arange(6))  # random heads do not
    m.align_heads(1)
    assert torch.equal(m.logits(m.ca_mean.float()).argmax(1), torch.arange(6))


def test_inference_logits_are_raw_and_normalisation_keeps_the_argmax(task1):
    m, data = task1
    x, _ = next(iter(data.plain))
    with torch.no_grad():
        z = m(x)
        assert torch.equal(z, torch.cat([h(features(m.vit, x)) for h in m.heads], 1))
        z_norm = z / (0.1 * (z.norm(dim=-1, keepdim=True) + 1e-7))
    assert torch.equal(z.argmax(1), z_norm.argmax(1))
