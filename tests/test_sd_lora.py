"""Property tests of SD-LoRA (+ -RR, -KD) on a tiny random ViT: zero-init identity, frozen history, masked loss,
normalised directions (and zero components), merge, merged() for evaluation, the stacked training forward, shared
magnitudes, counts, reset semantics, -KD exactness."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_task, synthetic_task, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

from backbone import features, qkv_rows
from methods import sd_lora
from methods.sd_lora import Config, Method

D, L = TINY.embed_dim, TINY.depth
TASKS = [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and two spinning threads on a shared 2-core machine
    slow every op down many times over; restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, dtype=torch.float32, **cfg):
    vit = tiny_vit(seed).to(dtype)
    return vit, Method(vit, 8, Config(**cfg))


def randomize_current(method, gen, scale=0.3):
    """Give the current component a non-zero B (and a new A), as training would."""
    with torch.no_grad():
        for ad in method.adapters:
            c = ad.comps[-1]
            for m in "qv":
                c.B[m].copy_(scale * torch.randn(c.B[m].shape, generator=gen, dtype=c.B[m].dtype))
                c.A[m].copy_(torch.randn(c.A[m].shape, generator=gen, dtype=c.A[m].dtype) / D ** 0.5)


def build(method, T, gen):
    """grow tasks 0..T-1, each component made non-zero before the next grow freezes it."""
    for t in range(T):
        method.grow(t, TASKS[t])
        randomize_current(method, gen)


def images(n, seed, dtype=torch.float32):
    return torch.rand(n, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def base_features(vit, x):
    """Features of the plain ViT (adapters removed) on a copy."""
    plain = copy.deepcopy(vit)
    for blk in plain.blocks:
        blk.attn.qkv_adapter = None
    return plain(x)


def direction(b, a, mode):
    """Dbar = B A / nu, the frozen direction of a component (d x d), from the method's own normaliser."""
    return b @ a * sd_lora.inverse_norm(sd_lora.normaliser(b, a, mode))


def stored(method):
    """LoRA parameters of the kept components (an absorbed -KD component does not count): 4 L d r_t per task."""
    return sum(p.numel() for ad in method.adapters for k, c in enumerate(ad.comps)
               if method.mags.kept_list[k] for p in c.parameters())


def train_steps(method, data, steps):
    opt, _ = method.optimizer(len(data.train))
    method.train()
    done = 0
    while done < steps:
        for x, y in data.train:
            loss = method.loss(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    method.eval()


# ----------------------------------------------------------------------------------------------------
# zero-init identity


@settings(max_examples=10)
@given(seed=st.integers(0, 10_000), alpha=st.floats(-5, 5), rank=st.integers(1, 12),
       norm_mode=st.sampled_from(["prod", "frob"]))
def test_fresh_component_changes_nothing(seed, alpha, rank, norm_mode):
    vit, method = make(seed, rank=rank, norm_mode=norm_mode)
    x = images(3, seed)
    before = base_features(vit, x)
    method.grow(0, TASKS[0])
    with torch.no_grad():
        method.mags.alpha.fill_(alpha)
    assert torch.equal(vit(x), before)


# ----------------------------------------------------------------------------------------------------
# frozen history


@settings(max_examples=4)
@given(seed=st.integers(0, 10_000), optimizer=st.sampled_from(["sgd", "adam"]),
       variant=st.sampled_from(["base", "rr"]))
def test_history_stays_bit_identical(seed, optimizer, variant):
    vit, method = make(seed, rank=4, lr=0.05, optimizer=optimizer, variant=variant, rr_ranks="4,2")
    gen = torch.Generator().manual_seed(seed)
    build(method, 2, gen)  # task 1 is current; component 0 is stored
    old_heads = [p.detach().clone() for h in method.heads for p in h.parameters()]
    method.grow(2, TASKS[2])  # component 1 stored too; train task 2
    base = {k: v.clone() for k, v in vit.state_dict().items() if "qkv_adapter" not in k}
    stored = [{k: v.clone() for k, v in ad.comps[k_].state_dict().items()} for ad in method.adapters for k_ in (0, 1)]
    new_before = [ad.comps[2].B["q"].clone() for ad in method.adapters]
    alpha_before = method.mags.alpha.detach().clone()

    train_steps(method, synthetic_task(TASKS[2], seed=seed), steps=3)

    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in base.items())
    now = [ad.comps[k_].state_dict() for ad in method.adapters for k_ in (0, 1)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(stored, now) for k in a)  # factors and normalisers
    assert all(torch.equal(a, b) for a, b in zip(old_heads, (p for h in method.heads[:2] for p in h.parameters())))
    for ad in method.adapters:
        for k_ in (0, 1):
            assert all(p.grad is None or not p.grad.any() for p in ad.comps[k_].parameters())
    assert all(p.grad is None for h in method.heads[:2] for p in h.parameters())
    # and the trainable part did train (the test would be vacuous otherwise)
    assert any(not torch.equal(b, ad.comps[2].B["q"]) for b, ad in zip(new_before, method.adapters))
    assert not torch.equal(alpha_before, method.mags.alpha.detach())


# ----------------------------------------------------------------------------------------------------
# masked loss


@settings(max_examples=4)
@given(seed=st.integers(0, 10_000))
def test_method_loss_ignores_old_head_rows(seed):
    """Perturbing the old heads (hence the old logits only) changes neither the loss nor any gradient: CE on the
    current task's logits only (models/sdlora.py L229-232 @ 8bacded)."""
    vit, method = make(seed, rank=3)
    build(method, 2, torch.Generator().manual_seed(seed))
    x, y = images(6, seed), torch.tensor([2, 3, 2, 3, 3, 2])
    params = [p for p in method.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = method.loss(x, y)
        return loss, torch.autograd.grad(loss, params)

    l1, g1 = loss_and_grads()
    z_old = method.logits(features(vit, x))[:, :2].detach()
    with torch.no_grad():
        method.heads[0].weight += torch.randn(2, D, generator=torch.Generator().manual_seed(seed))
        method.heads[0].bias -= 3.0
    l2, g2 = loss_and_grads()
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(method.logits(features(vit, x))[:, :2], z_old)  # the old logits did change


# ----------------------------------------------------------------------------------------------------
# direction normalisation


@given(seed=st.integers(0, 10_000), d=st.integers(2, 40), r=st.integers(1, 12),
       s=st.floats(0.01, 100) | st.floats(-100, -0.01), s2=st.floats(0.01, 100) | st.floats(-100, -0.01))
def test_normalisation_identities(seed, d, r, s, s2):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(d, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, d, generator=g, dtype=torch.float64)
    frob = direction(b, a, "frob")
    prod = direction(b, a, "prod")
    assert abs(frob.norm().item() - 1) <= 1e-5
    assert 0 < prod.norm().item() <= 1 + 1e-6
    assert torch.allclose(sd_lora.normaliser(b, a, "frob"), (b @ a).norm())  # trace form = explicit
    sign = 1.0 if (s > 0) == (s2 > 0) else -1.0
    for mode, dbar in (("frob", frob), ("prod", prod)):
        assert torch.allclose(direction(s * b, s2 * a, mode), sign * dbar, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm_mode", ["prod", "frob"])
def test_zero_component_is_a_zero_direction(norm_mode):
    """A frozen component whose B never moved (nu = 0) contributes nothing, and forward and backward stay finite
    (the official code divides 0 by 0 there, backbone/lora.py L183-188 @ 8bacded)."""
    vit, method = make(0, rank=3, norm_mode=norm_mode)
    method.grow(0, TASKS[0])  # component 0 keeps B = 0
    method.grow(1, TASKS[1])
    randomize_current(method, torch.Generator().manual_seed(0))
    assert all(not ad.comps[0].nu.any() for ad in method.adapters)
    b, a = method.adapters[0].comps[0].B["q"], method.adapters[0].comps[0].A["q"]
    assert torch.equal(direction(b, a, norm_mode), torch.zeros(D, D))
    x, y = images(4, 0), torch.tensor([2, 3, 3, 2])
    with torch.no_grad():
        out = method(x)
        for ad in method.adapters:  # the zero component's term is exactly zero: the delta is component 1's alone
            for m in "qv":
                c = ad.comps[1]
                assert torch.equal(ad.delta(m), method.mags.alpha[1] * (c.B[m] @ c.A[m]))
    assert torch.isfinite(out).all()
    loss = method.loss(x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.requires_grad)
    assert method.mags.alpha.grad[0] == 0  # a zero direction: its magnitude gets no gradient


def test_one_class_tasks_train_without_nan():
    """Tasks of one class: local CE is identically 0, so B stays 0 and the next task freezes a zero component."""
    vit, method = make(0, rank=3)
    for t, c in enumerate([[0], [1], [2]]):
        data = synthetic_task(c, seed=t)
        method.grow(t, c)
        train_steps(method, data, steps=2)
        method.end_task(t, c, data)
        assert all(not ad.comps[t].B["q"].any() for ad in method.adapters)  # CE over one class has no gradient
        assert torch.isfinite(method(images(3, t))).all()
    assert all(not ad.comps[0].nu.any() for ad in method.adapters)


# ----------------------------------------------------------------------------------------------------
# merge equivalence


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 4), norm_mode=st.sampled_from(["prod", "frob"]),
       variant=st.sampled_from(["base", "rr"]))
def test_merge_equivalence(seed, T, norm_mode, variant):
    vit, method = make(seed, rank=4, norm_mode=norm_mode, variant=variant, rr_ranks="5,3,2")
    g = torch.Generator().manual_seed(seed)
    build(method, T, g)
    with torch.no_grad():
        method.mags.alpha.copy_(torch.rand(T, generator=g) * 2)
    x = images(4, seed)
    with torch.no_grad():
        merged = method.merged()(x)
        assert torch.allclose(method(x), merged, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(method(x), method.logits(base_features(vit, x)), rtol=1e-4, atol=1e-5)
        # the folded update is sum_{k<t} alpha_k Dbar_k + alpha_t B_t A_t, whatever the order of its terms
        perm = torch.randperm(T, generator=g).tolist()
        alpha = method.mags.alpha
        for ad in method.adapters:
            for m in "qv":
                terms = [alpha[k] * (direction(c.B[m], c.A[m], norm_mode) if k < T - 1 else c.B[m] @ c.A[m])
                         for k, c in enumerate(ad.comps)]
                assert torch.allclose(sum(terms[i] for i in perm), ad.delta(m), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["base", "kd"])
def test_merged_folds_the_eval_forward(variant):
    """After 3 trained tasks (-KD with a relative threshold of 2: components 1 and 2 absorbed, the last one while
    current), merged() is a copy of the ViT with sum_k w_k B_k A_k in its q and v rows and no adapters, whose logits
    are those of the eval forward through the components (atol 1e-5, fp32). It shares no tensor with the method and
    leaves its state dict bit-identical; after an evaluation .double() converts the method, merged() included."""
    torch.manual_seed(0)
    kd = dict(variant="kd", kd_threshold="relative", kd_tau=2.0) if variant == "kd" else {}
    vit, method = make(0, rank=3, lr=0.05, **kd)
    for t in range(3):
        run_task(method, t, TASKS[t], steps=2, seed=t)
    assert method.mags.kept_list == ([True, False, False] if kd else [True] * 3)
    x = images(5, 1)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.eval()
    with torch.no_grad():
        model = method.merged()
        folded, unmerged = model(x), method(x)
    assert not any(isinstance(mod, sd_lora.Adapter) for mod in model.modules())
    assert all(blk.attn.qkv_adapter is None for blk in model.vit.blocks)
    assert all(not torch.equal(a.attn.qkv.weight, b.attn.qkv.weight) for a, b in zip(model.vit.blocks, vit.blocks))
    ptrs = lambda mod: {t.data_ptr() for t in (*mod.parameters(), *mod.buffers())}  # noqa: E731
    assert ptrs(model).isdisjoint(ptrs(method))
    torch.testing.assert_close(folded, unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(unmerged, method.logits(features(vit, x)), atol=0, rtol=0)  # eval = train forward
    after = method.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    method.double()
    with torch.no_grad():
        out = method(x.double())
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, unmerged.double(), atol=1e-5, rtol=0)
        torch.testing.assert_close(method.merged()(x.double()), out, atol=1e-10, rtol=0)


def component_loop(ad, method):
    """The reference forward of an adapter: every kept component on its own, delta_m = sum_k w_k B_k^m (A_k^m x),
    w_k = s_k / nu_k^m for the frozen ones (0 where nu = 0) and s_t for the current one (paper Eq. 4)."""
    def forward(x):
        s, t, out = method.mags.scales(), len(ad.comps) - 1, {}
        for k, c in enumerate(ad.comps):
            if method.mags.kept_list[k]:
                for i, m in enumerate("qv"):
                    w = s[k] if k == t else s[k] * sd_lora.inverse_norm(c.nu[i])
                    y = w * F.linear(F.linear(x, c.A[m]), c.B[m])
                    out[m] = out[m] + y if m in out else y
        return out
    return forward


@pytest.mark.parametrize("variant, T, dense", [("base", 2, False), ("base", 3, True), ("rr", 4, False)])
def test_stacked_training_forward_equals_the_component_loop(variant, T, dense):
    """The frozen directions enter as one product (R = 8, or 8 + 4 + 2 under -RR: 2 R < d = 32) or as one dense
    delta formed in the forward (R = 16: 2 R >= d); logits, loss and the gradient of every trainable tensor (the
    magnitudes of the frozen directions included) equal those of the loop over components (float64, atol 1e-5)."""
    vit, method = make(0, dtype=torch.float64, rank=8, variant=variant, rr_ranks="8,4,2")
    g = torch.Generator().manual_seed(0)
    build(method, T, g)
    with torch.no_grad():
        method.mags.alpha.copy_(torch.rand(T, generator=g, dtype=torch.float64) + 0.5)
    n_frozen = sum(method.rank_of(k) for k in range(T - 1))
    assert (2 * n_frozen >= D) == dense  # backbone.low_rank goes dense where R (d + d) >= d d
    for ad in method.adapters:
        for m in "qv":
            A, B, s = ad.frozen(m)
            assert len(A) == len(B) == len(s) == T - 1 and sum(a.shape[0] for a in A) == n_frozen
    x, y = images(4, 0, torch.float64), torch.tensor(TASKS[T - 1] * 2)
    params = [p for p in method.parameters() if p.requires_grad]

    def run():
        loss = method.loss(x, y)
        return method(x), loss, torch.autograd.grad(loss, params)

    stacked = run()
    for ad in method.adapters:
        ad.forward = component_loop(ad, method)
    try:
        loop = run()
    finally:
        for ad in method.adapters:
            del ad.forward
    grad_alpha = loop[2][[i for i, p in enumerate(params) if p is method.mags.alpha][0]]
    assert (grad_alpha[: T - 1] != 0).all()  # the frozen directions' magnitudes get their gradient
    for a, b in zip(stacked[:2] + tuple(stacked[2]), loop[:2] + tuple(loop[2])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# affinity in alpha, shared magnitudes


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), T=st.integers(1, 4), delta=st.floats(-3, 3).filter(lambda v: abs(v) > 1e-3),
       norm_mode=st.sampled_from(["prod", "frob"]), data=st.data())
def test_one_magnitude_scales_its_component_in_every_matrix(seed, T, delta, norm_mode, data):
    vit, method = make(seed, dtype=torch.float64, rank=3, norm_mode=norm_mode)
    build(method, T, torch.Generator().manual_seed(seed))
    k = data.draw(st.integers(0, T - 1))
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    with torch.no_grad():
        h0 = [ad(x) for ad in method.adapters]
        method.mags.alpha[k] += delta
        h1 = [ad(x) for ad in method.adapters]
    for ad, a, b in zip(method.adapters, h0, h1):
        c = ad.comps[k]
        for i, m in enumerate("qv"):
            dbar = c.B[m] @ c.A[m] if k == T - 1 else c.B[m] @ c.A[m] / c.nu[i]  # current: unnormalised
            if k < T - 1:
                assert torch.allclose(dbar, direction(c.B[m], c.A[m], norm_mode))
            expected = delta * x @ dbar.T
            assert expected.abs().max() > 0  # every matrix moves at once
            assert torch.allclose(b[m] - a[m], expected, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# parameter counts, RR schedule


@settings(max_examples=6)
@given(rank=st.integers(1, 12), variant=st.sampled_from(["base", "rr", "kd"]))
def test_parameter_counts(rank, variant):
    vit, method = make(0, rank=rank, variant=variant, rr_ranks=f"{rank},{max(rank - 2, 1)},1")
    stored_before = 0
    for t in range(4):
        method.grow(t, TASKS[t])
        r_t = method.rank_of(t)
        assert r_t == (rank if variant != "rr" else [rank, max(rank - 2, 1), 1, 1][t])
        assert stored(method) - stored_before == 4 * L * D * r_t
        stored_before = stored(method)
        trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
        assert trainable == 4 * L * D * r_t + (t + 1) + len(TASKS[t]) * (D + 1)  # component, alphas, head h_t
    ptrs = [v.data_ptr() for v in method.state_dict().values()]
    assert len(ptrs) == len(set(ptrs))  # every tensor under one key: the shared magnitudes are registered once


def test_rr_schedule_and_totals():
    _, method = make(0, variant="rr")
    ranks = [method.rank_of(t) for t in range(20)]
    assert ranks == [10 if t < 4 else 8 if t < 8 else 6 for t in range(20)]
    assert sum(36_864 * r for r in ranks) == 5_308_416  # 4 L d r_t summed: ViT-B (L 12, d 768), 20 tasks
    assert sum(4 * 6 * 192 * r for r in ranks[:10]) == 387_072  # the small ViT (L 6, d 192), 10 tasks
    _, plain = make(0)
    assert [plain.rank_of(t) for t in range(20)] == [10] * 20


# ----------------------------------------------------------------------------------------------------
# reset semantics


@settings(max_examples=4)
@given(seed=st.integers(0, 10_000), alpha_init=st.floats(0.1, 2), norm_mode=st.sampled_from(["prod", "frob"]),
       magnitudes=st.sampled_from(["reset", "carry"]))
def test_magnitudes_reset_at_each_task(seed, alpha_init, norm_mode, magnitudes):
    vit, method = make(seed, dtype=torch.float64, rank=3, alpha_init=alpha_init, norm_mode=norm_mode,
                       magnitudes=magnitudes)
    g = torch.Generator().manual_seed(seed)
    build(method, 2, g)
    with torch.no_grad():
        method.mags.alpha.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
    learned = method.mags.alpha.detach().clone()
    method.grow(2, TASKS[2])
    alpha = method.mags.alpha.detach()
    if magnitudes == "reset":
        assert torch.equal(alpha, torch.full((3,), alpha_init, dtype=torch.float64))
    else:
        assert torch.equal(alpha[:2], learned) and alpha[2] == alpha_init
    # the output is the ViT with W + sum_k alpha_k Dbar_k (B_2 = 0), built here from the factors
    ref = copy.deepcopy(vit)
    with torch.no_grad():
        for blk, ad in zip(ref.blocks, method.adapters):
            blk.attn.qkv_adapter = None
            for m in "qv":
                for k in range(2):
                    dbar = direction(ad.comps[k].B[m], ad.comps[k].A[m], norm_mode)
                    blk.attn.qkv.weight[qkv_rows(m, D)] += alpha[k] * dbar
    x = images(3, seed, torch.float64)
    with torch.no_grad():
        assert torch.allclose(vit(x), ref(x), rtol=1e-5, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# KD exactness (float64)


def _kd_method(seed, rank, **cfg):
    """-KD model with components 0 and 1 of effective rank rank/2 (their columns beyond rank/2 are zero)."""
    vit, method = make(seed, dtype=torch.float64, rank=rank, variant="kd", **cfg)
    g = torch.Generator().manual_seed(seed)
    for t in range(2):
        method.grow(t, TASKS[t])
        randomize_current(method, g)
        with torch.no_grad():
            for ad in method.adapters:
                for m in "qv":
                    ad.comps[t].B[m][:, rank // 2:] = 0
    method.grow(2, TASKS[2])
    with torch.no_grad():
        method.mags.alpha.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    return vit, method, g


@settings(max_examples=5)
@given(seed=st.integers(0, 10_000), half=st.integers(1, 3),
       c=st.lists(st.floats(-2, 2).filter(lambda v: abs(v) > 0.05), min_size=2, max_size=2))
def test_kd_absorbs_an_exact_combination(seed, half, c):
    rank = 2 * half
    vit, method, _ = _kd_method(seed, rank)
    s = method.mags.scales().detach()
    with torch.no_grad():  # U_2^m = s_2 B_2 A_2 = c_0 Dbar_0^m + c_1 Dbar_1^m in every matrix
        for ad in method.adapters:
            c0, c1, cur = ad.comps
            for i, m in enumerate("qv"):
                cur.B[m].copy_(torch.cat([c[0] / c0.nu[i] * c0.B[m][:, :half],
                                           c[1] / c1.nu[i] * c1.B[m][:, :half]], 1) / s[2])
                cur.A[m].copy_(torch.cat([c0.A[m][:half], c1.A[m][:half]]))
    x = images(3, seed, torch.float64)
    n_stored = stored(method)
    with torch.no_grad():
        before = method(x)
        kd = method.kd_absorb(2)
        after = method(x)
    assert kd["absorbed"] and kd["rho"] <= 9e-4 and kd["rho_rel"] < 1e-6
    assert torch.allclose(method.mags.offset, torch.tensor([c[0], c[1], 0.0], dtype=torch.float64), rtol=1e-8)
    assert torch.allclose(before, after, rtol=1e-8, atol=1e-10)
    assert method.mags.kept_list == [True, True, False]
    assert stored(method) == n_stored - 4 * L * D * rank == 2 * 4 * L * D * rank  # no growth
    # resume: grow(0..2) alone rebuilds the structure and the checkpoint restores the same function
    _, fresh = make(seed + 1, dtype=torch.float64, rank=rank, variant="kd")
    for t in range(3):
        fresh.grow(t, TASKS[t])
    fresh.load_state_dict(method.state_dict(), strict=True)
    assert fresh.mags.kept_list == [True, True, False]
    with torch.no_grad():
        assert torch.equal(fresh(x), after)
        method.grow(3, TASKS[3])  # the absorbed component stays out of later tasks: frozen are 0 and 1
        assert all(len(ad.frozen(m)[0]) == 2 for ad in method.adapters for m in "qv")


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), half=st.integers(1, 3), kd_target=st.sampled_from(["update", "direction"]),
       norm_mode=st.sampled_from(["prod", "frob"]))
def test_kd_keeps_an_orthogonal_component(seed, half, kd_target, norm_mode):
    rank = 2 * half
    vit, method, g = _kd_method(seed, rank, kd_target=kd_target, norm_mode=norm_mode)
    with torch.no_grad():  # earlier A rows live in the first D/2 coordinates, the new ones in the rest
        for ad in method.adapters:
            for m in "qv":
                for k in range(2):
                    ad.comps[k].A[m][:, D // 2:] = 0
                ad.comps[2].B[m].copy_(torch.randn(D, rank, generator=g, dtype=torch.float64))
                ad.comps[2].A[m].copy_(torch.randn(rank, D, generator=g, dtype=torch.float64))
                ad.comps[2].A[m][:, : D // 2] = 0
    s2 = method.mags.scales()[2].item()  # the target: the applied update, or the unit direction (paper-literal)
    targets = [s2 * c.B[m] @ c.A[m] if kd_target == "update" else direction(c.B[m], c.A[m], norm_mode)
               for c in (ad.comps[2] for ad in method.adapters) for m in "qv"]
    norm_u = sum(u.norm() ** 2 for u in targets) ** 0.5
    x = images(3, seed, torch.float64)
    n_stored = stored(method)
    with torch.no_grad():
        before = method(x)
        kd = method.kd_absorb(2)
        assert torch.equal(method(x), before)
    assert not kd["absorbed"] and method.mags.kept_list == [True, True, True]
    assert abs(kd["rho"] - norm_u.item()) <= 1e-9 * norm_u.item()
    assert not method.mags.offset.any() and stored(method) == n_stored


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), M=st.integers(1, 4), d=st.integers(3, 12), data=st.data())
def test_kd_trace_form_equals_explicit_least_squares(seed, n, M, d, data):
    g = torch.Generator().manual_seed(seed)
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=n + 1, max_size=n + 1))  # mixed ranks

    def factors(r):
        f64 = dict(generator=g, dtype=torch.float64)
        return torch.randn(d, r, **f64), torch.randn(r, d, **f64), torch.rand((), **f64) + 0.1

    parts = [([factors(r) for r in ranks[:n]], factors(ranks[n])) for _ in range(M)]
    A = torch.stack([torch.cat([(w * b_ @ a_).flatten() for b_, a_, w in (p[0][k] for p in parts)])
                     for k in range(n)], 1)
    b = torch.cat([(w * b_ @ a_).flatten() for b_, a_, w in (p[1] for p in parts)])
    G, gvec, uu = sd_lora.normal_equations(parts)
    assert torch.allclose(G, A.T @ A) and torch.allclose(gvec, A.T @ b) and torch.allclose(uu, b @ b)
    c, rho, norm_u = sd_lora.lstsq_components(parts)
    c_ref = torch.linalg.pinv(A) @ b
    assert torch.allclose(A @ c, A @ c_ref, rtol=1e-7, atol=1e-8)  # same fitted update (c unique if A has full rank)
    assert torch.allclose(rho, (A @ c_ref - b).norm(), rtol=1e-6, atol=1e-6 * float(norm_u))
    assert torch.allclose(norm_u, b.norm())


# ----------------------------------------------------------------------------------------------------
# Optimiser (models/sdlora.py L114-121 @ 8bacded), config checks, -KD through the contract hooks


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_covers_exactly_the_trainable_tensors(optimizer):
    _, method = make(0, rank=3, optimizer=optimizer, milestones="2,4", lr_decay=0.05)
    build(method, 2, torch.Generator().manual_seed(0))
    opt, sched = method.optimizer(steps_per_epoch=3)
    params = [p for g in opt.param_groups for p in g["params"]]
    expected = ([ad.comps[1].B[m] for ad in method.adapters for m in "qv"] +
                [ad.comps[1].A[m] for ad in method.adapters for m in "qv"] +
                [method.mags.alpha, method.heads[1].weight, method.heads[1].bias])
    assert {id(p) for p in params} == {id(p) for p in expected} and len(params) == len(expected)
    assert opt.param_groups[0]["weight_decay"] == 0.0
    assert isinstance(opt, torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)
    if optimizer == "sgd":
        assert opt.param_groups[0]["momentum"] == 0.9
    lrs = []
    for _ in range(18):  # 6 epochs of 3 steps: MultiStepLR per epoch, x0.05 at epochs 2 and 4
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr = Config().lr
    assert lrs == pytest.approx([lr] * 6 + [lr * 0.05] * 6 + [lr * 0.05 ** 2] * 6, rel=1e-12)
    assert make(0)[1].optimizer(3)[1] is None  # default: constant lr, as the code's CIFAR config


@pytest.mark.parametrize("bad", [dict(rank=0), dict(variant="xx"), dict(norm_mode="l2"), dict(rr_ranks="10,a"),
                                 dict(rr_ranks="4,0"), dict(rr_ranks=""), dict(lr=-1.0), dict(lr=0.0),
                                 dict(lr=float("nan")), dict(milestones="0"), dict(milestones="2,x"),
                                 dict(kd_tau=-1.0), dict(alpha_init=float("inf")), dict(momentum=-0.1),
                                 dict(weight_decay=-1.0), dict(lr_decay=0.0), dict(epochs=-1), dict(batch_size=0)])
def test_bad_config_is_a_value_error(bad):
    flag = "--" + next(iter(bad)).replace("_", "-")  # the message names the option
    with pytest.raises(ValueError, match=rf"^{flag} must be .* \(got .+\)$"):
        Method(tiny_vit(), 4, Config(**bad))


def test_kd_absorbs_through_the_contract_hooks_and_resumes():
    """-KD with a relative threshold of 2 always absorbs (rho <= |U_t|): end_task of tasks 1 and 2 absorbs their
    components; grow(0..2) alone rebuilds the structure and the checkpoint gives the same function."""
    cfg = dict(rank=3, variant="kd", kd_threshold="relative", kd_tau=2.0, lr=0.05)
    vit, method = make(0, **cfg)
    for t in range(3):
        run_task(method, t, TASKS[t], steps=2, seed=t)
        if t == 0:
            assert method.mags.kept_list == [True]
    assert method.mags.kept_list == [True, False, False]
    assert all(not ad.comps[k].A["q"].any() and not ad.comps[k].B["q"].any() for ad in method.adapters for k in (1, 2))
    assert stored(method) == 4 * L * D * 3  # only component 0 is stored
    _, fresh = make(1, **cfg)
    for t in range(3):
        fresh.grow(t, TASKS[t])
    fresh.load_state_dict(method.state_dict(), strict=True)
    assert fresh.mags.kept_list == [True, False, False]
    x = images(3, 0)
    with torch.no_grad():
        assert torch.equal(fresh(x), method(x))
