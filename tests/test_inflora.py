"""InfLoRA (methods/inflora.py): the design of A_t, the DualGPM / GPM memory, interference-free updates,
freezing, merging, the inference model merged(), the stacked training forward, the schedule, the adapters'
registration and the classifier alignment.

Linear algebra on random matrices in float64; module-level checks on the tiny random ViT in float32.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import backbone as bb
from conftest import run_task, synthetic_task, tiny_vit
from methods import inflora
from methods.inflora import (design_down, gaussian_replay, mean_decay, memory_update, project,
                             task_normalised, threshold)

seeds = st.integers(0, 2**16)
powers = st.sampled_from([2, 4])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is many times faster than two on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_moment(d: int, k: int, g: torch.Generator, scale: float = 1.0, decay: float = 2.0) -> torch.Tensor:
    """A d x d second-moment matrix (1/n) H H^T of rank k; column scales fall by 10^-decay (float64)."""
    H = torch.randn(d, k, generator=g, dtype=torch.float64) * torch.logspace(0, -decay, k, dtype=torch.float64)
    return scale * H @ H.T / k


def random_basis(d: int, w: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q[:, :w]


def energy(M: torch.Tensor, power: int) -> torch.Tensor:
    return (torch.linalg.svdvals(M) ** (power / 2)).sum()


def method(**kw) -> inflora.InfLoRA:
    kw = {"epochs": 1, "lr": 1e-2, **kw}
    return inflora.Method(tiny_vit(), 12, inflora.Config(**kw))




# ---------------------------------------------------------------------------------------------------
# Design of A_t: scaled orthonormal rows in the free space, Ky Fan optimal, scale invariant


@given(d=st.integers(6, 40), seed=seeds, mode=st.sampled_from([0, 1]), r=st.integers(1, 10))
def test_design_is_scaled_orthonormal_and_orthogonal_to_the_old_space(d, seed, mode, r):
    g = torch.Generator().manual_seed(seed)
    w = int(torch.randint(1, d // 2 + 1, (1,), generator=g))
    P = random_basis(d, w, g)
    M_hat = project(random_moment(d, d, g), P, mode)
    A, rank = design_down(M_hat, r)
    assume(r <= rank)  # beyond the numerical rank of M_hat the rows are arbitrary directions
    assert torch.allclose(A @ A.T, torch.eye(r, dtype=torch.float64) / 3, atol=1e-8)  # A A^T = I / 3
    if mode == 0:
        assert (A @ P).abs().max() <= 1e-8  # 'remove': rows orthogonal to the old space
    else:
        assert torch.allclose(A, A @ P @ P.T, atol=1e-8)  # 'retain': rows in span(Q)


@given(d=st.integers(6, 32), seed=seeds, mode=st.sampled_from([0, 1]), r=st.integers(1, 6))
def test_design_is_ky_fan_optimal(d, seed, mode, r):
    """No other admissible C (orthonormal rows / sqrt 3, in the free space) captures more of M_hat."""
    g = torch.Generator().manual_seed(seed)
    w = int(torch.randint(1, d // 2 + 1, (1,), generator=g))
    P = random_basis(d, w, g)
    M_hat = project(random_moment(d, d, g), P, mode)
    A, rank = design_down(M_hat, r)
    assume(r <= rank)
    for _ in range(5):
        C = project(torch.randn(d, r, generator=g, dtype=torch.float64), P, mode)
        C = torch.linalg.qr(C).Q.T / math.sqrt(3)
        assert (A @ M_hat).norm() >= (C @ M_hat).norm() * (1 - 1e-12)


@given(d=st.integers(6, 24), seed=seeds, c=st.floats(1e-3, 1e3), power=powers, r=st.integers(1, 5))
def test_design_and_memory_are_scale_invariant(d, seed, c, power, r):
    """M -> cM leaves the selected bases (compared as projectors) and A_t's projector unchanged."""
    g = torch.Generator().manual_seed(seed)
    M0, M1 = random_moment(d, d, g), random_moment(d, d, g)
    e = torch.linalg.svdvals(M0) ** (power / 2)
    margins = (e.cumsum(0) / e.sum() - 0.9).abs()
    assume(margins.min() > 1e-9)  # no singular value exactly at the threshold
    P, mode = memory_update(M0, None, 0, 0.9, power, first=True)
    Pc, mode_c = memory_update(c * M0, None, 0, 0.9, power, first=True)
    assert mode == mode_c and P.shape == Pc.shape
    assert torch.allclose(P @ P.T, Pc @ Pc.T, atol=1e-8)
    S = torch.linalg.svdvals(project(M1, P, mode))
    assume(r < d - 1 and S[r - 1] - S[r] > 1e-6 * S[0])  # a unique top-r subspace
    A, _ = design_down(project(M1, P, mode), r)
    Ac, _ = design_down(project(c * M1, Pc, mode_c), r)
    assert torch.allclose(A.T @ A, Ac.T @ Ac, atol=1e-8)


# ---------------------------------------------------------------------------------------------------
# DualGPM memory and the threshold schedule


@settings(max_examples=30)
@given(d=st.integers(8, 24), seed=seeds, power=powers, dual=st.booleans(), T=st.integers(2, 6),
       lamb=st.floats(0.5, 0.99), decay=st.sampled_from([0.0, 1.0, 2.0]))
def test_memory_rules(d, seed, power, dual, T, lamb, decay):
    g = torch.Generator().manual_seed(seed)
    P, mode = None, 0
    for t in range(T):
        k = int(torch.randint(1, d + 1, (1,), generator=g)) if t else d
        M = random_moment(d, k, g, scale=float(torch.rand(1, generator=g)) * 10 + 0.1, decay=decay)
        eps = threshold(t, T, lamb, 1.0)
        e = torch.linalg.svdvals(M) ** (power / 2)
        if t > 0:  # the same step without the switch: the basis before a switch
            P_pre, _ = memory_update(M, P, mode, eps, power, first=False, dual=False)
        P_new, mode_new = memory_update(M, P, mode, eps, power, first=t == 0, dual=dual)
        w = P_new.shape[1]
        assert torch.allclose(P_new.T @ P_new, torch.eye(w, dtype=torch.float64), atol=1e-8)  # orthonormal
        assert w <= (d / 2 if dual else d)
        if not dual:
            assert mode_new == 0  # plain GPM never retains
        if t == 0:
            cum = e.cumsum(0) / e.sum()
            if mode_new == 0:  # the code's rule: k = #{i : cumulative energy_i < eps}, at least 1
                kk = w
                assert kk == 1 or cum[kk - 1] < eps
                assert cum[kk] >= eps - 1e-12 or kk == 1
            else:  # first-task 'retain': the complement of the top-k space (the official code stores U[:, :k])
                P_g, _ = memory_update(M, None, 0, eps, power, first=True, dual=False)
                eye = P_g @ P_g.T + P_new @ P_new.T
                assert torch.allclose(eye, torch.eye(d, dtype=torch.float64), atol=1e-8)
        elif mode == 0:
            w_pre = P_pre.shape[1]
            assert w_pre >= P.shape[1]  # 'remove' widths never shrink
            captured = 1 - energy(project(M, P_pre, 0), power) / e.sum()
            assert captured >= eps - 1e-9 or w_pre == d  # captured fraction >= eps_t
            if mode_new == 1:  # a switch: the stored complement and the old space add up to I
                assert dual and w_pre > d / 2
                eye = P_pre @ P_pre.T + P_new @ P_new.T
                assert torch.allclose(eye, torch.eye(d, dtype=torch.float64), atol=1e-8)
            else:
                assert torch.allclose(P_new, P_pre)
        else:
            assert mode_new == 1 and w <= P.shape[1]  # 'retain' widths never grow
            residual = energy(project(M, P_new, 1), power) / e.sum()
            assert residual < 1 - eps + 1e-9 or w == 0
            assert torch.allclose(P @ P.T @ P_new, P_new, atol=1e-8)  # the new complement lies in the old
        P, mode = P_new, mode_new


@given(d=st.integers(4, 30), seed=seeds, power=powers)
def test_first_task_retain_stores_the_complement(d, seed, power):
    """A flat spectrum (k >= d/2) gives 'retain' with the complement of the top-k directions."""
    g = torch.Generator().manual_seed(seed)
    values = 1 + 0.1 * torch.rand(d, generator=g, dtype=torch.float64)
    R = random_basis(d, d, g)
    M = R @ torch.diag(values) @ R.T
    e = values.sort(descending=True).values ** (power / 2)
    k = int((e.cumsum(0) / e.sum() < 0.95).sum())
    assert k >= d / 2  # the premise: every energy is within 10-21 % of the others
    Q, mode = memory_update(M, None, 0, 0.95, power, first=True)
    assert mode == 1 and Q.shape[1] == d - k
    low = R[:, values.argsort()[: d - k]]  # the d - k least energetic directions
    assert torch.allclose(Q @ Q.T, low @ low.T, atol=1e-8)


@given(T=st.integers(1, 50), lamb=st.floats(0.01, 1.0), frac=st.floats(0, 1))
def test_threshold_schedule(T, lamb, frac):
    lame = lamb + (1 - lamb) * frac
    eps = [threshold(t, T, lamb, lame) for t in range(T)]
    assert eps[0] == lamb
    assert all(a <= b for a, b in zip(eps, eps[1:]))
    assert all(e <= lame for e in eps)


def test_threshold_count_from_config_or_derived():
    m = method()
    m.grow(0, [0, 1, 2, 3, 4])  # 12 classes, 5 in the first task: ceil(12 / 5) = 3
    assert m.T == 3
    m2 = method(total_tasks=7)
    m2.grow(0, [0, 1, 2, 3, 4])
    assert m2.T == 7


# ---------------------------------------------------------------------------------------------------
# Interference-free updates, freezing, start-of-task identity and merge equivalence


@given(d=st.integers(6, 24), seed=seeds, r=st.integers(1, 4), mode=st.sampled_from([0, 1]))
def test_interference_free_layer_output_float64(d, seed, r, mode):
    """For x in the old space, B_t A_t x = 0 for any B_t, so the layer output is unchanged."""
    g = torch.Generator().manual_seed(seed)
    ad = inflora.Adapter(d, r, "kv")
    ad.grow(), ad.grow()
    ad.double()
    w = int(torch.randint(1, d // 2 + 1, (1,), generator=g))
    U = random_basis(d, d, g)
    old, Q = U[:, :w], U[:, w:]  # the old space and its complement
    stored = old if mode == 0 else Q
    A, rank = design_down(project(random_moment(d, d, g), stored, mode), r)
    assume(r <= rank)
    with torch.no_grad():
        ad.A[0].copy_(torch.randn(r, d, generator=g, dtype=torch.float64))
        ad.B[0]["k"].copy_(torch.randn(d, r, generator=g, dtype=torch.float64))
        ad.A[1].copy_(A)
        x = (torch.randn(3, 5, w, generator=g, dtype=torch.float64) @ old.T)  # tokens in span(old)
        x_new = x + torch.randn(3, 5, d - w, generator=g, dtype=torch.float64) @ Q.T  # not in span(old)
        before, before_new = ad(x), ad(x_new)
        for b in ad.B[1].values():
            b.copy_(torch.randn(d, r, generator=g, dtype=torch.float64) * 10)
        after, after_new = ad(x), ad(x_new)
    for m in "kv":
        assert torch.allclose(before[m], after[m], atol=1e-9 * (1 + x.abs().max()))
        assert not torch.allclose(before_new[m], after_new[m], atol=1e-6)  # A_1's rows lie in span(Q)


def test_interference_free_on_the_vit():
    """Interference-free on the module (float32): after task 0, a random B_1 leaves qkv outputs on stored-space
    tokens unchanged."""
    torch.manual_seed(0)
    m = method(rank=4)
    run_task(m, 0, [0, 1, 2, 3])
    data = synthetic_task([4, 5, 6, 7], n_per_class=6, seed=1)
    m.grow(1, [4, 5, 6, 7])
    m.begin_task(1, [4, 5, 6, 7], data)
    for blk, ad in zip(m.vit.blocks, m.adapters):
        assert int(ad.mode) == 0
        P = ad.stored().float()
        x = torch.randn(2, 7, P.shape[1]) @ P.T

        def kv(x):  # the k and v rows of W x + b plus the branches' deltas
            with torch.no_grad():
                delta = ad(x)
                base = F.linear(x, blk.attn.qkv.weight, blk.attn.qkv.bias)[..., 32:]
                return base + torch.cat([delta["k"], delta["v"]], -1)

        out0 = kv(x)
        with torch.no_grad():
            for b in ad.B[1].values():
                b.copy_(torch.randn_like(b))
        out1 = kv(x)
        assert torch.allclose(out0, out1, rtol=1e-5, atol=1e-5 * float(out0.abs().max()))


def test_freezing_start_of_task_and_training():
    """Only B_t and h_t get gradients; A_t and every s < t parameter stay bit-identical;
    the forward after growing and designing task t equals the one before (exactly)."""
    torch.manual_seed(0)
    m = method(rank=4)
    run_task(m, 0, [0, 1, 2], steps=4)
    x = torch.rand(5, 3, 16, 16)
    f_before = m.vit(x)
    data = synthetic_task([3, 4, 5], n_per_class=6, seed=1)
    m.grow(1, [3, 4, 5])
    m.begin_task(1, [3, 4, 5], data)
    assert torch.equal(m.vit(x), f_before)  # B_t = 0: the new branch changes nothing
    assert all(ad.A[1].abs().sum() > 0 for ad in m.adapters)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    opt, _ = m.optimizer(len(data.train))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(m.adapters) + 2
    assert all(n.endswith((".B.1.k", ".B.1.v")) or n.startswith("heads.1.") for n in trainable)
    for x_, y_ in data.train:
        loss = m.loss(x_, y_)
        m.zero_grad(set_to_none=True)
        loss.backward()
        assert {n for n, p in m.named_parameters() if p.grad is not None} <= trainable
        opt.step()
    after = m.state_dict()
    changed = {k for k in snap if not torch.equal(snap[k], after[k])}
    assert all(".B.1." in k or k.startswith("heads.1.") for k in changed)  # A_1, task 0, backbone, memory: identical
    assert any(".B.1." in k for k in changed) and "heads.1.weight" in changed


@pytest.mark.parametrize("blocks", [0, 2])
def test_merged_equals_the_forward_and_shares_nothing(blocks):
    """After 3 tasks, merged() is a copy of the ViT without adapters, sum_s B_s A_s added to the k and v rows of the
    adapted blocks (q rows and unadapted blocks untouched), with copies of the heads: its logits equal the forward
    through the branches in eval mode (atol 1e-5, fp32), which is the same function as in train mode. Building it
    leaves the method's state dict bit-identical, and it shares no parameter with the method."""
    torch.manual_seed(0)
    m = method(rank=3, blocks=blocks)
    for t in range(3):
        run_task(m, t, [3 * t, 3 * t + 1, 3 * t + 2], seed=t)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        trained = m.train()(x)
        branches = m.eval()(x)
        merged = m.merged()
        folded = merged(x)
    assert torch.equal(trained, branches)
    assert all(blk.attn.qkv_adapter is None for blk in merged.vit.blocks)
    assert not any("adapter" in k for k in merged.state_dict())
    d, n = m.vit.embed_dim, blocks or len(m.vit.blocks)
    for i, (a, b) in enumerate(zip(merged.vit.blocks, m.vit.blocks)):
        assert torch.equal(a.attn.qkv.weight[:d], b.attn.qkv.weight[:d])
        assert torch.equal(a.attn.qkv.weight[d:], b.attn.qkv.weight[d:]) == (i >= n)
    assert {id(p) for p in merged.parameters()}.isdisjoint({id(p) for p in m.parameters()})
    torch.testing.assert_close(folded, branches, atol=1e-5, rtol=0)
    after = m.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_double_after_an_evaluation():
    """Nothing a forward needs lives outside parameters and buffers: after an evaluation (forward and merged), .double()
    converts the method; its forward and a new merged() run in float64 and agree (atol 1e-10) and with float32."""
    torch.manual_seed(0)
    m = method(rank=3, ca=True, ca_epochs=1, ca_samples=8)
    run_task(m, 0, [0, 1, 2])
    run_task(m, 1, [3, 4, 5], seed=1)
    x = torch.rand(3, 3, 16, 16)
    m.eval()
    with torch.no_grad():
        f32, _ = m(x), m.merged()(x)
        m.double()
        f64, merged64 = m(x.double()), m.merged()(x.double())
    assert f64.dtype == merged64.dtype == torch.float64
    torch.testing.assert_close(merged64, f64, atol=1e-10, rtol=0)
    torch.testing.assert_close(f64.float(), f32, atol=1e-5, rtol=0)


def branch_loop(ad):
    """The reference forward of an adapter: every branch on its own, delta_m = sum_s B_s^m (A_s x)."""
    def forward(x):
        delta = {}
        for A, B in zip(ad.A, ad.B):
            for m in ad.targets:
                y = F.linear(F.linear(x, A), B[m])
                delta[m] = delta[m] + y if m in delta else y
        return delta
    return forward


@pytest.mark.parametrize("rank, dense", [(4, False), (12, True)])
def test_stacked_training_forward_equals_the_branch_loop(rank, dense, monkeypatch):
    """In task 3, the frozen branches 0 and 1 enter as one backbone.low_rank call per block, their shared A_s once
    for k and v (the concatenated B^k and B^v stacked by rows: 2d x 2r); low_rank runs it as a low-rank product (R = 8: 8 (32 + 64) <
    32 * 64) or as a dense delta (R = 24). Logits, loss and the gradient of every trainable tensor equal those of the
    loop over branches (float64, atol 1e-5), and nothing stacked is in the state dict."""
    torch.manual_seed(0)
    m = method(rank=rank)
    run_task(m, 0, [0, 1, 2, 3])
    run_task(m, 1, [4, 5, 6, 7], seed=1)
    n_state = len(m.state_dict())
    data = run_task(m, 2, [8, 9, 10, 11], seed=2, end=False)  # B_2 trained, task 2 current
    assert len(m.state_dict()) == n_state + 3 * len(m.adapters) + 2  # A_2, B_2^k, B_2^v, heads.2.*: no stack
    m.double()
    d = m.vit.embed_dim
    assert (2 * rank * (d + 2 * d) >= d * 2 * d) == dense  # low_rank's rule for R = 2 r, d_in = d, d_out = 2 d
    calls = []
    monkeypatch.setattr(inflora, "low_rank", lambda x, A, B: calls.append((A, B)) or bb.low_rank(x, A, B))
    x, y = next(iter(data.train))
    x = x.double()
    params = [p for p in m.parameters() if p.requires_grad]

    def run():
        loss = m.loss(x, y)
        return m(x), loss, torch.autograd.grad(loss, params)

    stacked = run()
    assert len(calls) == 2 * len(m.adapters)  # one call per block and forward
    for (A, B), ad in zip(calls, m.adapters):  # one block of R = 2 r columns: [A_0; A_1] and [B^k_cat; B^v_cat]
        assert len(A) == len(B) == 1 and torch.equal(A[0], torch.cat([ad.A[0], ad.A[1]]))
        assert torch.equal(B[0], torch.cat([torch.cat([ad.B[0][m], ad.B[1][m]], dim=1) for m in "kv"]))
    for ad in m.adapters:
        ad.forward = branch_loop(ad)
    try:
        loop = run()
    finally:
        for ad in m.adapters:
            del ad.forward
    assert any(g.abs().sum() > 0 for g in loop[2][:2])  # B_2 gets a gradient
    for a, b in zip(stacked[:2] + tuple(stacked[2]), loop[:2] + tuple(loop[2])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_resume_rebuilds_the_structure_with_grow():
    """Data-dependent memory lives in fixed-shape buffers: grow() + load_state_dict(strict=True) restores it."""
    torch.manual_seed(0)
    m = method(rank=3, ca=True, ca_epochs=1, ca_samples=8)
    run_task(m, 0, [0, 1, 2])
    run_task(m, 1, [3, 4, 5], seed=1)
    fresh = inflora.Method(tiny_vit(seed=5), 12, m.cfg)
    fresh.grow(0, [0, 1, 2])
    fresh.grow(1, [3, 4, 5])
    fresh.load_state_dict(m.state_dict(), strict=True)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(fresh(x), m(x))
    for a, b in zip(fresh.adapters, m.adapters):
        assert torch.equal(a.stored(), b.stored()) and int(a.mode) == int(b.mode)


def test_trainable_count_of_the_small_setting():
    """Per task B^k, B^v on 6 blocks = 6 * 2 * 192 * 10 = 23,040 plus 193 per head class."""
    m = inflora.Method(bb.ViT(bb.PRESETS["vit_small32"]), 100, inflora.Config())
    m.grow(0, list(range(10)))
    opt, _ = m.optimizer(1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 23_040 + 193 * 10
    assert sum(ad.A[0].numel() for ad in m.adapters) == 11_520


@pytest.mark.parametrize("E", [20, 3])
def test_epoch_cosine_is_the_official_schedule(E):
    """utils/schedulers.py L19-20 @ e08b00e: the scheduler steps once in its constructor and then resets last_epoch,
    and methods/inflora.py L238 steps it once per epoch, so epochs 0 and 1 both train at the base rate:
    eta_e = eta_0 cos(99 pi max(e - 1, 0) / (200 (E - 1)))."""
    m = method(epochs=E, lr=5e-4)
    m.grow(0, [0, 1, 2])
    opt, sched = m.optimizer(steps_per_epoch=3)
    lrs = []
    for _ in range(3 * E):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    per_epoch = lrs[::3]
    assert lrs[1::3] == per_epoch and lrs[2::3] == per_epoch  # constant within an epoch
    last = {20: 0.0974000560613835, 3: 0.7126385189252054}[E]  # cos(99 pi (E - 2) / (200 (E - 1)))
    assert per_epoch[0] == per_epoch[1] == 5e-4
    assert per_epoch[E - 1] == pytest.approx(5e-4 * last, rel=1e-12)
    assert all(a > b for a, b in zip(per_epoch[1:], per_epoch[2:]))  # strictly falling from epoch 1 on


@pytest.mark.parametrize("blocks, ca", [(0, False), (2, True)])
def test_adapters_are_registered_once(blocks, ca):
    """Every state-dict tensor has one key (the adapters live only under vit.blocks.{i}.attn.qkv_adapter), and the
    count is the formula: per adapted block and task A_s (r x d), B_s^k, B_s^v (d x r); per block the d x d basis,
    width and mode; heads (d + 1) per class; with --ca the class means and covariances."""
    r, d, C = 3, 32, 12
    m = method(rank=r, blocks=blocks, ca=ca)
    m.grow(0, [0, 1, 2])
    m.grow(1, [3, 4])
    state = m.state_dict()
    ptrs = [v.data_ptr() for v in state.values()]
    assert len(ptrs) == len(set(ptrs))
    assert len(state) == len(m.vit.state_dict()) + 4 + (2 if ca else 0)  # + heads.{0,1}.{weight,bias}, ca buffers
    n = blocks or len(m.vit.blocks)
    assert len([k for k in state if ".qkv_adapter." in k]) == n * (2 * 3 + 3)
    added = sum(v.numel() for k, v in state.items() if not k.startswith("vit.") or ".qkv_adapter." in k)
    assert added == n * (2 * 3 * r * d + d * d + 2) + 5 * (d + 1) + (C * d + C * d * d if ca else 0)


# ---------------------------------------------------------------------------------------------------
# Classifier alignment (methods/inflora_ca1.py L405-487 @ e08b00e)


def test_alignment_changes_only_the_heads_and_uses_the_global_generator():
    torch.manual_seed(0)
    m = method(rank=3, ca=True, ca_epochs=2, ca_samples=16)
    assert not m.dual  # 'auto' memory: plain GPM with CA, as inflora_ca1.py L221
    run_task(m, 0, [0, 1, 2])
    run_task(m, 1, [3, 4, 5], seed=1)  # end_task(1) aligned once already
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(1)
    m.align_heads(1)
    after = m.state_dict()
    changed = {k for k in snap if not torch.equal(snap[k], after[k])}
    assert changed == {"heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias"}
    assert not any(p.requires_grad for p in m.parameters())
    aligned = {k: v.clone() for k, v in after.items()}
    m.load_state_dict(snap)
    torch.manual_seed(1)
    m.align_heads(1)
    assert all(torch.equal(aligned[k], v) for k, v in m.state_dict().items())  # same seed, same heads


def test_class_statistics_and_positive_definite_covariance():
    torch.manual_seed(0)
    m = method(rank=3, ca=True, ca_epochs=1, ca_samples=8)
    data = run_task(m, 0, [0, 1, 2])  # 6 images per class < d = 32: singular covariances
    feats = torch.cat([m.vit(x) for x, _ in data.plain]).double()
    ys = torch.cat([y for _, y in data.plain])
    for c in (0, 1, 2):
        f = feats[ys == c]
        assert torch.allclose(m.ca_mean[c], f.mean(0), atol=1e-6)
        assert torch.allclose(m.ca_cov[c].double(), torch.cov(f.T), atol=1e-5)
        torch.linalg.cholesky(m.ca_cov[c].double() + m.cfg.ca_shrink * torch.eye(32, dtype=torch.float64))
    assert not m.ca_mean[3:].any()  # later classes untouched


@settings(max_examples=10)
@given(d=st.integers(2, 8), seed=seeds)
def test_gaussian_replay_mean(d, seed):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(2, d, generator=g)
    L = torch.linalg.cholesky(random_moment(d, d, g).float() + 0.1 * torch.eye(d))
    torch.manual_seed(seed)
    n = 4000
    x, y = gaussian_replay(mu, torch.stack([L, L]), n)
    assert x.shape == (2 * n, d) and (y.bincount() == n).all()
    sd = (L @ L.T).diagonal().sqrt()
    for c in range(2):
        assert ((x[y == c].mean(0) - mu[c]).abs() <= 5 * sd / math.sqrt(n) + 1e-6).all()


@given(T=st.integers(1, 10), seed=seeds)
def test_mean_decay(T, seed):
    task_of = torch.arange(T)
    gamma = mean_decay(task_of, T - 1)
    assert gamma[-1] == 1.0 and (gamma >= 0.9).all() and (gamma <= 1).all()
    assert (gamma[1:] > gamma[:-1]).all()


@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=seeds, tau=st.floats(0.01, 10))
def test_logit_normalisation_keeps_predictions(sizes, seed, tau):
    """Dividing each row by a positive scalar (tau times its mean per-task block norm) keeps the argmax."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, sum(sizes), generator=g, dtype=torch.float64)
    zn = task_normalised(z, sizes, tau)
    assert torch.equal(zn.argmax(1), z.argmax(1))
    norms = torch.stack([b.norm(dim=1) + 1e-7 for b in z.split(sizes, dim=1)], 1).mean(1, keepdim=True)
    assert torch.allclose(zn * norms * tau, z)


# ---------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=33), dict(targets="kx"), dict(blocks=5),
                                 dict(lamb=0.0), dict(lamb=0.99, lame=0.9), dict(energy_power=3),
                                 dict(total_tasks=-1), dict(memory="gpm2"), dict(ca=True, ca_epochs=0),
                                 dict(lr=0.0), dict(lr=math.nan), dict(weight_decay=-1.0), dict(epochs=-1),
                                 dict(batch_size=0)])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"^--[a-z-]+ must be .* \(got .+\)$"):
        method(**bad)


def test_bounds_set_by_the_vit_are_checked_only_with_it():
    cfg = inflora.Config(rank=33, blocks=5)
    inflora.validate(cfg)  # no ViT: width and depth unknown
    with pytest.raises(ValueError, match=r"^--rank must be <= 32, the width \(got 33\)$"):
        inflora.validate(cfg, tiny_vit())


def test_blocks_option_adapts_only_the_first_blocks():
    m = method(blocks=1)
    assert len(m.adapters) == 1 and m.vit.blocks[1].attn.qkv_adapter is None
