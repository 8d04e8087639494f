"""InfLoRA (methods/inflora.py): the invariants of ../shared/specs/baselines.md §7 (InfLoRA 1-11), the
classifier-alignment invariants of protocol.md §8, and end-to-end smoke runs.

Linear algebra on random matrices in float64; module-level checks on the tiny random ViT in float32.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import backbone as bb
from conftest import run_task, synthetic_task, tiny_vit
from methods import METHODS, inflora
from methods.inflora import (design_down, gaussian_replay, mean_decay, memory_update, project,
                             task_normalised, threshold)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
# Design of A_t (invariants 1, 2, 4, 5, 6)


@given(d=st.integers(6, 40), seed=seeds, mode=st.sampled_from([0, 1]), r=st.integers(1, 10))
def test_design_is_scaled_orthonormal_and_orthogonal_to_the_old_space(d, seed, mode, r):
    g = torch.Generator().manual_seed(seed)
    w = int(torch.randint(1, d // 2 + 1, (1,), generator=g))
    P = random_basis(d, w, g)
    M_hat = project(random_moment(d, d, g), P, mode)
    A, rank = design_down(M_hat, r)
    assume(r <= rank)  # pitfall I6: beyond the rank the rows are arbitrary directions
    assert torch.allclose(A @ A.T, torch.eye(r, dtype=torch.float64) / 3, atol=1e-8)  # invariant 1
    if mode == 0:
        assert (A @ P).abs().max() <= 1e-8  # invariant 2, 'remove'
    else:
        assert torch.allclose(A, A @ P @ P.T, atol=1e-8)  # invariant 2, 'retain': rows in span(Q)


@given(d=st.integers(6, 32), seed=seeds, mode=st.sampled_from([0, 1]), r=st.integers(1, 6))
def test_design_is_ky_fan_optimal(d, seed, mode, r):
    """Invariant 4: no other admissible C (orthonormal rows / sqrt 3, in the free space) captures more of M_hat."""
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
    """Invariants 5-6: M -> cM leaves the selected bases (compared as projectors) and A_t's projector unchanged."""
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
# DualGPM memory (invariant 7) and the threshold schedule (invariant 8)


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
            else:  # first-task 'retain' (I3): the complement of the stored top-k space
                P_g, _ = memory_update(M, None, 0, eps, power, first=True, dual=False)
                eye = P_g @ P_g.T + P_new @ P_new.T
                assert torch.allclose(eye, torch.eye(d, dtype=torch.float64), atol=1e-8)
        elif mode == 0:
            w_pre = P_pre.shape[1]
            assert w_pre >= P.shape[1]  # 'remove' widths never shrink
            captured = 1 - energy(project(M, P_pre, 0), power) / e.sum()
            assert captured >= eps - 1e-9 or w_pre == d  # invariant 7: captured fraction >= eps_t
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
    """Pitfall I3: a flat spectrum (k >= d/2) gives 'retain' with the complement of the top-k directions."""
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
# Interference-free updates, freezing, start-of-task and merge equivalence (invariants 3, 9, 10, 11)


@given(d=st.integers(6, 24), seed=seeds, r=st.integers(1, 4), mode=st.sampled_from([0, 1]))
def test_interference_free_layer_output_float64(d, seed, r, mode):
    """Invariant 3: for x in the old space, B_t A_t x = 0 for any B_t, so the layer output is unchanged."""
    g = torch.Generator().manual_seed(seed)
    lora = inflora.QKVLoRA(d, r, "kv")
    lora.grow(), lora.grow()
    lora.double()
    w = int(torch.randint(1, d // 2 + 1, (1,), generator=g))
    U = random_basis(d, d, g)
    old, Q = U[:, :w], U[:, w:]  # the old space and its complement
    stored = old if mode == 0 else Q
    A, rank = design_down(project(random_moment(d, d, g), stored, mode), r)
    assume(r <= rank)
    with torch.no_grad():
        lora.A[0].copy_(torch.randn(r, d, generator=g, dtype=torch.float64))
        lora.B[0]["k"].copy_(torch.randn(d, r, generator=g, dtype=torch.float64))
        lora.A[1].copy_(A)
        x = (torch.randn(3, 5, w, generator=g, dtype=torch.float64) @ old.T)  # tokens in span(old)
        x_new = x + torch.randn(3, 5, d - w, generator=g, dtype=torch.float64) @ Q.T  # not in span(old)
        before, before_new = lora(x), lora(x_new)
        for b in lora.B[1].values():
            b.copy_(torch.randn(d, r, generator=g, dtype=torch.float64) * 10)
        after, after_new = lora(x), lora(x_new)
    for m in "kv":
        assert torch.allclose(before[m], after[m], atol=1e-9 * (1 + x.abs().max()))
        assert not torch.allclose(before_new[m], after_new[m], atol=1e-6)  # A_1's rows lie in span(Q)


def test_interference_free_on_the_vit():
    """Invariant 3 on the module (float32): after task 0, a random B_1 leaves qkv outputs on stored-space
    tokens unchanged."""
    torch.manual_seed(0)
    m = method(rank=4)
    run_task(m, 0, [0, 1, 2, 3])
    data = synthetic_task([4, 5, 6, 7], n_per_class=6, seed=1)
    m.grow(1, [4, 5, 6, 7])
    m.begin_task(1, [4, 5, 6, 7], data)
    for blk, lora in zip(m.vit.blocks, m.loras):
        assert int(lora.mode) == 0
        P = lora.stored().float()
        x = torch.randn(2, 7, P.shape[1]) @ P.T
        out0 = blk.attn.qkv(x)[..., 32:] + torch.cat([lora(x)["k"], lora(x)["v"]], -1)
        with torch.no_grad():
            for b in lora.B[1].values():
                b.copy_(torch.randn_like(b))
        out1 = blk.attn.qkv(x)[..., 32:] + torch.cat([lora(x)["k"], lora(x)["v"]], -1)
        assert torch.allclose(out0, out1, rtol=1e-5, atol=1e-5 * float(out0.abs().max()))


def test_freezing_start_of_task_and_training():
    """Invariants 9 and 10: only B_t and h_t get gradients; A_t and every s < t parameter stay bit-identical;
    the forward after growing and designing task t equals the one before (exactly)."""
    torch.manual_seed(0)
    m = method(rank=4)
    run_task(m, 0, [0, 1, 2], steps=4)
    x = torch.rand(5, 3, 16, 16)
    f_before = m.vit(x)
    data = synthetic_task([3, 4, 5], n_per_class=6, seed=1)
    m.grow(1, [3, 4, 5])
    m.begin_task(1, [3, 4, 5], data)
    assert torch.equal(m.vit(x), f_before)  # invariant 10
    assert all(lora.A[1].abs().sum() > 0 for lora in m.loras)
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    opt, _ = m.optimizer(len(data.train))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * len(m.loras) + 2
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


def test_merge_equivalence():
    """Invariant 11: folding sum_s B_s A_s into W gives the same outputs (rtol 1e-5)."""
    torch.manual_seed(0)
    m = method(rank=3)
    run_task(m, 0, [0, 1, 2], end=True)
    run_task(m, 1, [3, 4], end=False)
    with torch.no_grad():
        for lora in m.loras:
            for B in lora.B:
                for b in B.values():
                    b.copy_(torch.randn_like(b) * 0.1)
    x = torch.rand(4, 3, 16, 16)
    before = m(x)
    m.merge()
    assert all(not b.any() for lora in m.loras for B in lora.B for b in B.values())
    assert torch.allclose(m(x), before, rtol=1e-5, atol=1e-5 * float(before.abs().max()))


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
    for a, b in zip(fresh.loras, m.loras):
        assert torch.equal(a.stored(), b.stored()) and int(a.mode) == int(b.mode)


def test_trainable_count_of_the_small_setting():
    """baselines.md §8: per task B^k, B^v on 6 blocks = 6 * 2 * 192 * 10 = 23,040 plus 193 per head class."""
    m = inflora.Method(bb.ViT(bb.PRESETS["vit_small32"]), 100, inflora.Config())
    m.grow(0, list(range(10)))
    opt, _ = m.optimizer(1)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == 23_040 + 193 * 10
    assert sum(lora.A[0].numel() for lora in m.loras) == 11_520


# ---------------------------------------------------------------------------------------------------
# Classifier alignment (protocol.md §8)


def test_alignment_changes_only_the_heads_and_uses_the_global_generator():
    torch.manual_seed(0)
    m = method(rank=3, ca=True, ca_epochs=2, ca_samples=16)
    assert not m.dual  # 'auto' memory: plain GPM with CA (pitfall I7)
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
# Configuration, registry and smoke runs


@pytest.mark.parametrize("bad", [dict(rank=0), dict(rank=33), dict(targets="kx"), dict(blocks=5),
                                 dict(lamb=0.0), dict(lamb=0.99, lame=0.9), dict(energy_power=3),
                                 dict(total_tasks=-1), dict(memory="gpm2"), dict(ca=True, ca_epochs=0)])
def test_bad_config_is_a_value_error(bad):
    with pytest.raises(ValueError):
        method(**bad)


def test_blocks_option_adapts_only_the_first_blocks():
    m = method(blocks=1)
    assert len(m.loras) == 1 and m.vit.blocks[1].attn.qkv_adapter is None


def test_registered_and_documented():
    assert METHODS["inflora"] is inflora
    src = open(inflora.__file__).read()
    for field in inflora.Config.__dataclass_fields__:
        assert f'    {field}:' in src and '"""' in src.split(f'    {field}:')[1].splitlines()[1]


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, "train.py")), reason="train.py not written yet")
@pytest.mark.parametrize("extra", [[], ["--ca", "--ca-epochs", "1", "--ca-samples", "16"]], ids=["plain", "ca"])
def test_smoke_run_end_to_end(tmp_path, extra):
    subprocess.run([sys.executable, "train.py", "--method", "inflora", "--preset", "smoke", "--tasks", "2",
                    "--batch-size", "256", "--quiet", "--out", str(tmp_path)] + extra,
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (res,) = list(tmp_path.rglob("results.json"))
    acc = json.loads(res.read_text())["acc_matrix"]
    assert len(acc) == 2 and len(acc[-1]) == 2  # a[t][j] for j <= t (rows may be padded to 2)
    assert all(0 <= a <= 100 for i, row in enumerate(acc) for a in row[: i + 1])
