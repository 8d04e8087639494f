"""KeepLoRA (methods/keep_lora.py): the bases, the residual gradient init, Prop. 3.1's hard protection, the merge
and the feature statistics.

Linear algebra on raw float64 tensors (tolerance 1e-10 unless said); module-level checks on the tiny random
ViT, in float32 (relative 1e-5) or, where rounding of the stored weights would blur an exact identity,
in float64.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from backbone import features
from conftest import run_task, synthetic_task, tiny_vit
from data import TaskLoaders
from data import task_classes as splits  # global labels of each task
from methods import keep_lora as K

seeds = st.integers(0, 2**32 - 1)
dims = st.integers(8, 96)
ranks = st.integers(1, 8)
energies = st.floats(0.05, 0.999)
kinds = st.sampled_from(["dense", "lowrank", "illcond"])
targets = st.sampled_from(["qkvo", "qv", "kvo", "o", "q"])


# ----------------------------------------------------------------------------------------------------
# helpers


def rand_matrix(rng, a: int, b: int, kind: str) -> torch.Tensor:
    """A random a x b float64 matrix: dense Gaussian, low-rank, or ill-conditioned (singular values to 1e-8)."""
    if kind == "dense":
        M = rng.standard_normal((a, b))
    elif kind == "lowrank":
        rho = int(rng.integers(1, min(a, b) + 1))
        M = rng.standard_normal((a, rho)) @ rng.standard_normal((rho, b))
    else:
        U, _ = np.linalg.qr(rng.standard_normal((a, min(a, b))))
        V, _ = np.linalg.qr(rng.standard_normal((b, min(a, b))))
        M = U @ np.diag(np.sort(10.0 ** -rng.uniform(0, 8, min(a, b)))[::-1]) @ V.T
    return torch.from_numpy(M)


def rand_basis(rng, d: int, k: int) -> torch.Tensor:
    if k == 0:
        return torch.zeros(d, 0, dtype=torch.float64)
    return torch.from_numpy(np.linalg.qr(rng.standard_normal((d, k)))[0])


def orth_err(Q: torch.Tensor) -> float:
    return float((Q.T @ Q - torch.eye(Q.shape[1], dtype=Q.dtype)).abs().max()) if Q.shape[1] else 0.0


def absmax(a: torch.Tensor) -> float:
    return float(a.abs().max()) if a.numel() else 0.0


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))



def task(classes, seed=0, dtype=torch.float32, n_per_class=4, batch_size=4) -> TaskLoaders:
    """synthetic_task, optionally in float64 (for the float64 ViT)."""
    x, y = synthetic_task(classes, n_per_class=n_per_class, seed=seed).plain.dataset.tensors
    ds = TensorDataset(x.to(dtype), y)
    return TaskLoaders(train=DataLoader(ds, batch_size=batch_size, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed)),
                       plain=DataLoader(ds, batch_size=batch_size, shuffle=False))


def method(cfg: K.Config, seed=0, double=False) -> K.KeepLoRA:
    m = K.KeepLoRA(tiny_vit(seed), 12, cfg)
    if double:
        m.vit.double()  # the backbone and its adapters; heads (grown later) stay float32
    return m


def effective(attn, name: str, site: K.Site) -> torch.Tensor:
    """W + s B A in float64: the weight the adapted layer applies right now."""
    W, rows = K.target(attn, name)
    return W[rows].double() + site.scale * site.B.detach().double() @ site.A.double()


def steps(m: K.KeepLoRA, data: TaskLoaders, n: int, opt=None, sched=None) -> None:
    """n optimiser steps of m.loss, as train.py does them."""
    if opt is None:
        opt, sched = m.optimizer(len(data.train))
    done = 0
    while done < n:
        for x, y in data.train:
            opt.zero_grad()
            m.loss(x, y).backward()
            opt.step()
            if sched is not None:
                sched.step()
            done += 1
            if done == n:
                return


def site_inputs(m: K.KeepLoRA, loader) -> dict[tuple[int, str], list[torch.Tensor]]:
    """The token rows (per batch) entering qkv and proj of every block, recorded with forward pre-hooks."""
    rec, hooks = {}, []
    for i, blk in enumerate(m.vit.blocks):
        for key, mod in (("qkv", blk.attn.qkv), ("o", blk.attn.proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _, inp, i=i, key=key: rec.setdefault((i, key), []).append(
                    inp[0].detach().reshape(-1, inp[0].shape[-1]).double())))
    with torch.no_grad():
        for x, _ in loader:
            features(m.vit, x)
    for h in hooks:
        h.remove()
    return rec


# ----------------------------------------------------------------------------------------------------
# linear algebra (float64)


@given(d_in=dims, d_out=dims, eps=energies, side=st.sampled_from(["input", "output"]),
       rule=st.sampled_from(["official", "paper"]), kind=kinds, seed=seeds)
def test_weight_basis_energy_rule(d_in, d_out, eps, side, rule, kind, seed):
    """The first basis: p follows the chosen rule exactly; the basis holds exactly that energy, on its side."""
    d_out = d_in if side == "output" else d_out
    W = rand_matrix(np.random.default_rng(seed), d_out, d_in, kind)
    Q = K.weight_basis(W, eps, side, rule)
    p, S = Q.shape[1], torch.linalg.svdvals(W)
    share = ((S**2).cumsum(0) / (S**2).sum()).tolist()
    assert Q.shape[0] == d_in and 1 <= p <= len(S) and orth_err(Q) <= 1e-10
    if rule == "official":  # the largest count whose energy stays below eps, at least 1
        assert p == 1 or share[p - 1] < eps
        assert p == len(S) or share[p] >= eps
    else:  # the first count whose energy reaches eps
        assert share[p - 1] >= eps or p == len(S)
        assert p == 1 or share[p - 2] < eps
    captured = (W @ Q if side == "input" else Q.T @ W).square().sum() / W.square().sum()
    assert abs(float(captured) - share[p - 1]) <= 1e-10


def test_weight_basis_empty_below_threshold():
    W = torch.randn(16, 16, dtype=torch.float64)
    assert K.weight_basis(W, 1e-9).shape == (16, 0)
    assert K.weight_basis(W, 0.0, "output", "paper").shape == (16, 0)


@given(d_in=dims, d_out=dims, r=ranks, k_frac=st.floats(0, 1), kind=kinds, seed=seeds)
def test_residual_init(d_in, d_out, r, k_frac, kind, seed):
    """A's rows orthonormal and orthogonal to Q; B_0 A is a best rank-r_used approximation of
    G_hat = G (I - Q Q^T); the rank drops only when d_in - k < r or G_hat has no more significant directions."""
    rng = np.random.default_rng(seed)
    k = int(round(k_frac * d_in))
    G, Q = rand_matrix(rng, d_out, d_in, kind), rand_basis(rng, d_in, k)  # G in the weight's layout
    A, B0, r_used = K.residual_lora_init(G, Q, r)
    assert A.shape == (r, d_in) and B0.shape == (d_out, r)
    G_hat = G - (G @ Q) @ Q.T
    sv = torch.linalg.svdvals(G_hat)
    assert float((G_hat @ Q).norm()) <= 1e-10 * float(G.norm())  # the test's own projection removes span(Q)
    assert 0 <= r_used <= min(r, d_in - k)
    assert absmax(A[r_used:]) == 0 and absmax(B0[:, r_used:]) == 0
    Ar = A[:r_used].T
    assert orth_err(Ar) <= 1e-10
    assert absmax(Q.T @ Ar) <= 1e-10  # no direction of span(Q) enters A, even when d_in - k < r
    # Eckart-Young: ||G_hat - B_0 A||^2 = sum of the squared singular values beyond r_used
    err = float((G_hat - B0 @ A).square().sum())
    assert abs(err - float(sv[r_used:].square().sum())) <= 1e-10 * float(G.square().sum())
    if r_used < min(r, d_in - k):  # the saturation guard: only negligible directions are left out
        assert r_used == 0 and float(sv.square().sum()) <= 1e-8 * float(G.square().sum()) or \
            float(sv[r_used]) <= 1e-8 * float(sv[0])


def test_residual_init_saturated_basis():
    """The saturation guard: a full basis (k = d_in) or a residual-free gradient gives no adapter at all."""
    rng = np.random.default_rng(0)
    G = rand_matrix(rng, 7, 12, "dense")  # d_out 7, d_in 12
    A, B0, r = K.residual_lora_init(G, rand_basis(rng, 12, 12), 4)
    assert r == 0 and A.abs().max() == 0 and B0.abs().max() == 0
    Q = rand_basis(rng, 12, 5)
    A, B0, r = K.residual_lora_init(rand_matrix(rng, 7, 5, "dense") @ Q.T, Q, 4)  # G's rows inside span(Q)
    assert r == 0 and A.abs().max() == 0


@given(d=dims, k_frac=st.floats(0, 1), n=st.integers(1, 120), eps=energies, kind=kinds,
       rule=st.sampled_from(["official", "paper"]), seed=seeds)
def test_grow_basis_energy_rule(d, k_frac, n, eps, kind, rule, seed):
    """Orthonormal, old columns kept, spans nested; with a basis (k > 0) m is the smallest count whose captured
    energy reaches eps, so the residual energy is <= 1 - eps; the first basis (k = 0) follows `rule`."""
    rng = np.random.default_rng(seed)
    Q0 = rand_basis(rng, d, int(round(k_frac * d)))
    R = rand_matrix(rng, d, n, kind)
    R = R / R.norm()  # E = 1, so absolute tolerances are relative
    Q1 = K.grow_basis(Q0, R @ R.T, eps, rule)
    k0, k1 = Q0.shape[1], Q1.shape[1]
    assert k0 <= k1 <= d and orth_err(Q1) <= 1e-10
    assert torch.equal(Q1[:, :k0], Q0)  # the old basis is kept as it is
    assert float((Q0 - Q1 @ (Q1.T @ Q0)).norm()) <= 1e-10  # span(Q0) in span(Q1)
    R_hat = R - Q0 @ (Q0.T @ R)
    s2 = torch.linalg.svdvals(R_hat).square()
    c0 = 1 - float(s2.sum())
    m = k1 - k0
    reach = (c0 + s2.cumsum(0)).tolist()
    significant = int((s2 > 1e-12 * s2[0]).sum()) if len(s2) else 0
    if c0 >= eps:
        assert m == 0
    elif k0 == 0 and rule == "official":  # max(1, #{cumulative energy < eps}), ties within rounding accepted
        assert m >= 1 and (m == 1 or reach[m - 1] < eps + 1e-9)
        assert m == min(len(reach), significant) or reach[m] >= eps - 1e-9
    elif k0 < d:  # the smallest m whose captured energy reaches eps (ties within rounding accepted)
        assert m >= 1 and reach[m - 1] >= eps - 1e-9
        assert m == 1 or reach[m - 2] < eps + 1e-9
    if m:  # the new columns are the leading residual directions: they capture exactly that energy
        assert abs(float((Q1[:, k0:].T @ R_hat).square().sum()) - float(s2[:m].sum())) <= 1e-9
    if k0 > 0 or rule == "paper":
        assert float((R - Q1 @ (Q1.T @ R)).square().sum()) <= (1 - eps) + 1e-9


def spectrum_matrix(energies, d=6, seed=0):
    """C = V diag(energies) V^T for a random orthonormal V (d x len(energies)), and V."""
    V = rand_basis(np.random.default_rng(seed), d, len(energies))
    return V @ torch.diag(torch.tensor(energies, dtype=torch.float64)) @ V.T, V


def test_first_feature_basis_without_weight_basis_keeps_the_energy_below_eps():
    """No W_p (eps_w <= 1e-8): the first feature basis is p = max(1, #{cumulative energy < eps_f})
    (MTIL model/prin_subspace.py L20-29), one column fewer than the growth rule's 'reach eps_f' here."""
    C, V = spectrum_matrix([0.5, 0.3, 0.15, 0.05])  # cumulative 0.5, 0.8, 0.95, 1.0
    empty = torch.zeros(6, 0, dtype=torch.float64)
    Q = K.grow_basis(empty, C, 0.9)  # the default rule is the official one
    assert Q.shape == (6, 2)  # 0.5 and 0.8 stay below 0.9; the reach rule would take 3
    assert float((V[:, :2] - Q @ (Q.T @ V[:, :2])).norm()) <= 1e-10  # the two leading directions
    assert K.grow_basis(empty, C, 0.9, "paper").shape == (6, 3)
    assert K.grow_basis(empty, C, 0.4).shape == (6, 1)  # none below 0.4: at least one column
    # with a basis, the growth adds until eps is reached, whatever the first-basis rule
    Q1 = K.grow_basis(V[:, :1], C, 0.9)
    assert Q1.shape == (6, 3) and torch.equal(K.grow_basis(V[:, :1], C, 0.9, "paper"), Q1)


def test_model_without_weight_basis_takes_the_official_first_feature_basis():
    """On the model: eps_w = 0 leaves Q empty through task 0, and end_task sizes every first basis by the
    official rule on the merged model's own features (covariance of the site's inputs)."""
    cfg = K.Config(rank=4, eps_w=0.0, eps_f=0.9, epochs=1)
    m = method(cfg)
    data = task([0, 1, 2], 0, n_per_class=5)
    m.grow(0, [0, 1, 2])
    m.begin_task(0, [0, 1, 2], data)
    assert all(int(s.k) == 0 for _, _, s in m.sites())
    steps(m, data, 2)
    m.end_task(0, [0, 1, 2], data)
    feats = site_inputs(m, data.plain)
    differ = 0
    for i, blk in enumerate(m.vit.blocks):
        for key in ("qkv", "o"):
            X = torch.cat(feats[(i, key)])
            lam = torch.linalg.eigvalsh(X.T @ X).flip(0)
            share = (lam.cumsum(0) / lam.sum()).tolist()
            official = max(1, sum(v < 0.9 for v in share))
            reach = next(j + 1 for j, v in enumerate(share) if v >= 0.9)
            differ += official != reach
            adapter = blk.attn.qkv_adapter if key == "qkv" else blk.attn.out_adapter
            assert all(int(site.k) == official for site in adapter.sites.values()), (i, key)
    assert differ > 0  # the two rules do differ here, so the check can fail


def test_grow_basis_nothing_new_when_covered():
    """m = 0 when the features already lie in span(Q) (c_0 = 1 >= eps)."""
    rng = np.random.default_rng(1)
    Q = rand_basis(rng, 20, 6)
    R = Q @ rand_matrix(rng, 6, 30, "dense")
    assert torch.equal(K.grow_basis(Q, R @ R.T, 0.999), Q)


@given(d=st.integers(2, 24), tokens=st.integers(1, 6), bsz=st.integers(1, 5), nb=st.integers(1, 5), seed=seeds)
def test_feature_stats(d, tokens, bsz, nb, seed):
    """'official_mean' equals MTIL's running average of X_b^T (short last batch dropped), which is
    mean_b X_b^T / N_b; 'covariance' equals X^T X over every token (its eigenvalues: X's squared singular values)."""
    g = torch.Generator().manual_seed(seed % 2**63)
    batches = [torch.randn(bsz, tokens, d, generator=g, dtype=torch.float64) for _ in range(nb)]
    if bsz > 1:
        batches.append(torch.randn(bsz - 1, tokens, d, generator=g, dtype=torch.float64))  # dropped
    official, cov = K.FeatureStats("official_mean"), K.FeatureStats("covariance")
    acc, count = None, 0
    for x in batches:
        official.add(x)
        cov.add(x)
        X = x.reshape(-1, d)
        if X.shape[0] != bsz * tokens:
            continue
        acc = X.T / X.shape[0] if acc is None else count / (count + X.shape[0]) * acc + X.T / (count + X.shape[0])
        count += X.shape[0]
    N = bsz * tokens
    mean_form = torch.stack([x.reshape(-1, d).T for x in batches[:nb]]).mean(0) / N
    assert torch.allclose(official.matrix(), acc, rtol=0, atol=1e-12)
    assert torch.allclose(official.matrix(), mean_form, rtol=0, atol=1e-12)
    assert torch.allclose(official.gram(), acc @ acc.T, rtol=0, atol=1e-12)
    X_all = torch.cat([x.reshape(-1, d) for x in batches])
    assert torch.allclose(cov.gram(), X_all.T @ X_all, rtol=1e-12, atol=1e-12)


def test_task_batches_fraction_and_drop_last():
    ds = TensorDataset(torch.arange(22.0), torch.arange(22))
    loader = DataLoader(ds, batch_size=4)  # 6 batches, the last of 2
    sizes = [len(y) for _, y in K.task_batches(loader, drop_last=True)]
    assert sizes == [4] * 5
    assert [len(y) for _, y in K.task_batches(loader)] == [4] * 5 + [2]
    firsts = [int(y[0]) for _, y in K.task_batches(loader, fraction=0.5)]
    assert firsts == [0, 8, 20]  # 3 evenly spaced batches of 6: 0, 2.5 -> 2, 5
    single = DataLoader(TensorDataset(torch.arange(3.0), torch.arange(3)), batch_size=4)
    assert [len(y) for _, y in K.task_batches(single, drop_last=True)] == [3]


# ----------------------------------------------------------------------------------------------------
# the tiny ViT


def cfg_strategy():
    return st.builds(K.Config, rank=st.integers(1, 8), targets=targets, eps_w=st.floats(0.05, 0.999),
                     weight_basis_side=st.sampled_from(["input", "output"]),
                     threshold_rule=st.sampled_from(["official", "paper"]),
                     b0_init=st.sampled_from(["svd", "zero"]), grad_fraction=st.sampled_from([1.0, 0.5]),
                     epochs=st.just(1))


@settings(max_examples=10)
@given(cfg=cfg_strategy(), seed=st.integers(0, 2**16))
def test_function_preserved_at_task_start(cfg, seed):
    """After begin_task (A, B_0, W <- W - s B_0 A) the backbone computes the same function (fp32)."""
    m = method(cfg, seed)
    data = task([0, 1, 2], seed)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    m.grow(0, [0, 1, 2])
    before = m.vit.forward_features(x)
    W0 = [K.target(attn, n)[0][K.target(attn, n)[1]].clone() for attn, n, _ in m.sites()]
    m.begin_task(0, [0, 1, 2], data)
    after = m.vit.forward_features(x)
    assert rel(after, before) <= 1e-5
    assert any(s.rank_used > 0 for _, _, s in m.sites())
    moved = max(float((K.target(a, n)[0][K.target(a, n)[1]] - w).abs().max()) for (a, n, _), w in zip(m.sites(), W0))
    if cfg.b0_init == "svd":  # the shift is real, and undone by the adapter
        assert moved > 0 and all(s.B.abs().sum() > 0 for _, _, s in m.sites() if s.rank_used > 0)
    else:
        assert moved == 0 and all(s.B.abs().max() == 0 for _, _, s in m.sites())


@settings(max_examples=10)
@given(cfg=cfg_strategy(), opt_name=st.sampled_from(["method", "sgd", "adam", "adamw_wd", "random"]),
       n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_protected_inputs_keep_their_outputs(cfg, opt_name, n, seed):
    """Hard protection (Prop. 3.1): unchanged outputs on protected input directions after any update of B:
    after any optimiser's steps on B, inputs X = Z Q^T in span(Q) give the same layer output as at task start."""
    m = method(cfg, seed)
    data = task([0, 1, 2], seed)
    m.grow(0, [0, 1, 2])
    m.begin_task(0, [0, 1, 2], data)
    start = [(effective(a, nm, s), s.basis().double(), s.B.detach().clone()) for a, nm, s in m.sites()]
    Bs = [s.B for _, _, s in m.sites()]
    if opt_name == "random":
        with torch.no_grad():
            for B in Bs:
                B.add_(torch.randn_like(B))
    else:
        opt = {"method": None, "sgd": lambda: torch.optim.SGD(Bs, lr=0.5, momentum=0.9),
               "adam": lambda: torch.optim.Adam(Bs, lr=0.05),
               "adamw_wd": lambda: torch.optim.AdamW(Bs, lr=0.05, weight_decay=0.5)}[opt_name]
        steps(m, data, n, *((None, None) if opt is None else (opt(), None)))
    g = torch.Generator().manual_seed(seed)
    changed = False
    for (attn, name, site), (W_start, Q, B0) in zip(m.sites(), start):
        changed |= bool((site.B.detach() - B0).abs().max() > 0)
        if Q.shape[1] == 0:
            continue
        X = torch.randn(7, Q.shape[1], generator=g, dtype=torch.float64) @ Q.T
        assert float((X @ (effective(attn, name, site) - W_start).T).norm()) <= 1e-5 * float((X @ W_start.T).norm())
        # the same through the module: x W^T + s (x A) B at the start and now
        y_now = X.float() @ K.target(attn, name)[0][K.target(attn, name)[1]].T + site(X.float())
        assert rel(y_now.double(), X @ W_start.T) <= 1e-5
    assert changed  # B did move: the property is not vacuous


@settings(max_examples=6)
@given(r=ranks, tg=targets, lr=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_prop_3_1_and_gradient_init(r, tg, lr, seed):
    """Prop. 3.1: one plain SGD step on B moves W_eff by -lr s^2 G A^T A (float64).
    Also begin_task's A, B_0 come from the full-data mean gradient projected off Q (A orthonormal, in the residual)."""
    cfg = K.Config(rank=r, targets=tg, epochs=1)
    m = method(cfg, seed, double=True)
    data = task([0, 1, 2], seed, dtype=torch.float64)
    m.grow(0, [0, 1, 2])
    # the mean over (full) batches of dL/dW, computed here independently, with the pretrained weights
    weights = [p for blk in m.vit.blocks for p in (blk.attn.qkv.weight, blk.attn.proj.weight)]
    with torch.no_grad():
        m.heads[0].weight.copy_(F.normalize(K.class_means(m.vit, data.plain, [0, 1, 2]), dim=1))
    for w in weights:
        w.requires_grad_(True)
    grads = [torch.zeros_like(w) for w in weights]
    for x, y in data.plain:
        loss = F.cross_entropy(m.heads[0](features(m.vit, x).float()), y)
        for acc, gw in zip(grads, torch.autograd.grad(loss, weights)):
            acc += gw / len(data.plain)
    for w in weights:
        w.requires_grad_(False)
    Ws = {id(w): g for w, g in zip(weights, grads)}
    bases = {}
    for attn, name, site in m.sites():
        W, rows = K.target(attn, name)
        bases[id(site)] = K.weight_basis(W[rows].double(), cfg.eps_w)
    m.begin_task(0, [0, 1, 2], data)
    for attn, name, site in m.sites():
        W, rows = K.target(attn, name)
        Q = site.basis()
        assert torch.allclose(Q, bases[id(site)], rtol=0, atol=1e-12)  # Q = W_p before task 0
        G = Ws[id(W)][rows]  # d_out x d_in
        G_hat = G - (G @ Q) @ Q.T
        sv = torch.linalg.svdvals(G_hat)
        A, B0, ru = site.A, site.B.detach(), site.rank_used
        assert ru == min(r, G.shape[1] - Q.shape[1])  # a generic gradient keeps the full rank
        assert orth_err(A[:ru].T) <= 1e-10 and absmax(A @ Q) <= 1e-10
        err = float((G_hat - B0 @ A).square().sum()) - float(sv[ru:].square().sum())
        assert abs(err) <= 1e-9 * float(G.square().sum())
    # one SGD step on B (no momentum, no decay); G at the current point from the same backward
    for w in weights:
        w.requires_grad_(True)
    x, y = next(iter(data.train))
    before = {id(site): effective(a, n, site).detach() for a, n, site in m.sites()}
    opt = torch.optim.SGD([site.B for _, _, site in m.sites()], lr=lr)
    opt.zero_grad()
    m.loss(x, y).backward()
    opt.step()
    for w in weights:
        w.requires_grad_(False)
    s = cfg.alpha / cfg.rank
    for attn, name, site in m.sites():
        W, rows = K.target(attn, name)
        G = W.grad[rows]  # dL/dW at W_eff (the adapter adds to W's output), d_out x d_in
        dW = (effective(attn, name, site) - before[id(site)])  # (d_out, d_in)
        expected = -lr * s**2 * G @ site.A.T @ site.A
        assert float((dW - expected).norm()) <= 1e-9 * float(expected.norm()) + 1e-15


@settings(max_examples=6)
@given(cfg=cfg_strategy(), n=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_merge_is_exact(cfg, n, seed):
    """Merging (W + s B A, then A, B <- 0, adapters off) leaves the function unchanged (fp32)."""
    m = method(cfg, seed)
    data = task([0, 1, 2], seed)
    m.grow(0, [0, 1, 2])
    m.begin_task(0, [0, 1, 2], data)
    steps(m, data, n)
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    on = m.vit.forward_features(x)
    expected = [effective(a, nm, s) for a, nm, s in m.sites()]
    m.merge()
    assert rel(m.vit.forward_features(x), on) <= 1e-5
    for (attn, name, site), W in zip(m.sites(), expected):
        Wt, rows = K.target(attn, name)
        assert torch.allclose(Wt[rows].double(), W, rtol=0, atol=1e-6)
        assert site.A.abs().max() == 0 and site.B.abs().max() == 0
    assert not any(a.active for a in m.adapters())
    # end_task (merge again, a no-op now, plus the basis growth) keeps the function too
    m.end_task(0, [0, 1, 2], data)
    assert rel(m.vit.forward_features(x), on) <= 1e-5


def test_only_B_and_the_new_head_train():
    """The optimiser holds every B and the current head, nothing else; the count is the same every task;
    training steps change only those tensors (W, A, Q, old heads untouched)."""
    cfg = K.Config(rank=4, epochs=1)
    m = method(cfg)
    counts = []
    for t, classes in enumerate(splits([3, 3, 3])):
        data = task(classes, t)
        m.grow(t, classes)
        m.begin_task(t, classes, data)
        opt, sched = m.optimizer(len(data.train))
        params = {id(p) for g in opt.param_groups for p in g["params"]}
        expected = {id(site.B) for _, _, site in m.sites()} | {id(m.heads[t].weight)}
        assert params == expected
        assert not any(p.requires_grad for p in m.vit.parameters() if all(p is not s.B for _, _, s in m.sites()))
        assert all(not isinstance(s.A, torch.nn.Parameter) and "A" not in dict(s.named_parameters())
                   for _, _, s in m.sites())
        counts.append(sum(p.numel() for g in opt.param_groups for p in g["params"]))
        before = {k: v.clone() for k, v in m.state_dict().items()}
        A_before = [s.A.clone() for _, _, s in m.sites()]
        steps(m, data, 2, opt, sched)
        after = m.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(k.endswith(".B") or k == f"heads.{t}.weight" for k in changed), changed
        assert all(torch.equal(a, s.A) for a, (_, _, s) in zip(A_before, m.sites()))
        m.end_task(t, classes, data)
        assert not m.heads[t].weight.requires_grad
    assert counts[0] == counts[1] == counts[2] == 4 * 4 * 4 * 32 + 3 * 32  # 4 blocks x q,k,v,o x r x d, + head


@settings(max_examples=4)
@given(mode=st.sampled_from(["covariance", "official_mean"]), eps_f=st.sampled_from([0.9, 0.97, 0.99]),
       seed=st.integers(0, 2**16))
def test_two_tasks_bases_and_forgetting_bound(mode, eps_f, seed):
    """On the float64 ViT over two tasks:
    the grown bases hold all but 1 - eps_f of the merged model's own features at every site (both modes);
    bases only grow, spans nested, at most d_in columns, orthonormal;
    at the first adapted layer, old inputs X: ||X dW^T|| <= ||X (I - Q Q^T)|| ||dW||_2 (the layer-wise bound);
    the function is preserved at the start of task 1 too."""
    cfg = K.Config(rank=4, eps_f=eps_f, feature_mode=mode, epochs=1)
    m = method(cfg, seed, double=True)
    d = m.vit.embed_dim
    x_probe = torch.rand(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    old_X, prev = None, None
    for t, classes in enumerate(splits([3, 3])):
        data = task(classes, seed + t, dtype=torch.float64, n_per_class=5)
        m.grow(t, classes)
        f0 = m.vit.forward_features(x_probe)
        m.begin_task(t, classes, data)
        assert rel(m.vit.forward_features(x_probe), f0) <= 1e-10  # float64
        attn0, name0, site0 = m.sites()[0]  # block 0, q: its input does not depend on any adapted weight
        Q_start, W_start = site0.basis().clone(), effective(attn0, name0, site0)
        steps(m, data, 3)
        bases_before = [s.basis().clone() for _, _, s in m.sites()]
        m.end_task(t, classes, data)
        if t == 1:  # the layer-wise bound for task 0's inputs and task 1's net update
            dW = effective(attn0, name0, site0) - W_start
            lhs = float((old_X @ dW.T).norm())
            rhs = float((old_X - old_X @ Q_start @ Q_start.T).norm() * torch.linalg.matrix_norm(dW, 2))
            assert lhs <= rhs * (1 + 1e-9) + 1e-12 and float(dW.norm()) > 0
        feats = site_inputs(m, data.plain)  # the merged model's inputs at every site
        if t == 0:
            old_X = torch.cat(feats[(0, "qkv")])
        for (attn, name, site), Q0 in zip(m.sites(), bases_before):
            i = next(j for j, blk in enumerate(m.vit.blocks) if blk.attn is attn)
            rows = feats[(i, "o" if name == "o" else "qkv")]
            if mode == "covariance":
                X = torch.cat(rows)
                C = X.T @ X
            else:
                full = [r for r in rows if r.shape[0] == rows[0].shape[0]]
                R = torch.stack([r.T for r in full]).mean(0) / full[0].shape[0]
                C = R @ R.T
            Q = site.basis()
            P = torch.eye(d, dtype=torch.float64) - Q @ Q.T
            assert float(torch.trace(P @ C @ P)) <= (1 - eps_f) * float(torch.trace(C)) * (1 + 1e-9)
            assert orth_err(Q) <= 1e-10 and Q0.shape[1] <= Q.shape[1] <= d
            assert float((Q0 - Q @ (Q.T @ Q0)).norm()) <= 1e-10  # nested spans
        prev = m(x_probe)
    assert prev.shape == (4, 6)


def test_merged_equals_the_adapted_forward_and_shares_nothing():
    """Two steps into task 2 (tasks 0 and 1 merged, task 2's adapters on): merged() is a copy of the ViT with
    s B A folded in and no adapters, whose logits equal forward's; it shares no parameter with the method, building
    it leaves the method's state bit-identical, and later changes to the method do not reach it."""
    torch.manual_seed(0)
    m = K.KeepLoRA(tiny_vit(0), 12, K.Config(rank=4, epochs=1))
    for t in range(3):
        data = run_task(m, t, [3 * t, 3 * t + 1, 3 * t + 2], steps=2, seed=t, end=t < 2)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        adapted = m(x)
        for a in m.adapters():
            a.active = False
        assert (m(x) - adapted).abs().max() > 1e-3  # the adapters matter, so the fold is not vacuous
        for a in m.adapters():
            a.active = True
        before = {k: v.clone() for k, v in m.state_dict().items()}
        merged = m.merged()
        assert all(b.attn.qkv_adapter is None and b.attn.out_adapter is None for b in merged.vit.blocks)
        assert not any(isinstance(mod, K.Adapter) for mod in merged.modules())
        assert not {id(p) for p in merged.parameters()} & {id(p) for p in m.parameters()}
        assert not {p.data_ptr() for p in merged.parameters()} & {p.data_ptr() for p in m.parameters()}
        after = m.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        folded = merged(x)
        assert torch.allclose(folded, adapted, rtol=0, atol=1e-5)
        assert torch.equal(m(x), adapted)  # the same in eval and train mode: forward always runs the adapters
        assert torch.equal(m.train()(x), adapted)
    m.train()
    steps(m, data, 1)  # the method moves on; the built copy does not
    with torch.no_grad():
        assert torch.equal(merged(x), folded) and (m(x) - adapted).abs().max() > 0
        assert torch.allclose(m.merged()(x), m(x), rtol=0, atol=1e-5)
    m.end_task(2, [6, 7, 8], data)  # between tasks: the adapters merged and off, the copy is the plain backbone
    m.grow(3, [9, 10, 11])
    with torch.no_grad():
        assert torch.allclose(m.merged()(x), m(x), rtol=0, atol=1e-5)
    m.begin_task(3, [9, 10, 11], task([9, 10, 11]))
    with torch.no_grad():  # at task 3's start (W shifted by -s B_0 A, the adapters on)
        assert any(a.active for a in m.adapters()) and any(s.B.abs().max() > 0 for _, _, s in m.sites())
        assert torch.allclose(m.merged()(x), m(x), rtol=0, atol=1e-5)


def test_double_after_an_evaluation():
    """.double() converts the whole method at any time, also after an evaluation: the method's own forward and
    merged() then run in float64 and agree with each other (and with the float32 logits up to rounding)."""
    torch.manual_seed(0)
    m = K.KeepLoRA(tiny_vit(0), 12, K.Config(rank=4, epochs=1))
    run_task(m, 0, [0, 1, 2], steps=2, seed=0)
    run_task(m, 1, [3, 4, 5], steps=2, seed=1, end=False)  # mid-task: the adapters on
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    m.eval()
    with torch.no_grad():
        single = m(x)
        m.merged()(x)
        m.double()
        out, folded = m(x.double()), m.merged()(x.double())
    assert out.dtype == folded.dtype == torch.float64 and out.shape == (4, 6)
    assert torch.allclose(folded, out, rtol=0, atol=1e-10)
    assert torch.allclose(out, single.double(), rtol=0, atol=1e-4)


def test_resume_rebuilds_structure():
    """grow() alone rebuilds every shape a checkpoint holds (fixed d x d bases + widths): strict load works,
    the bases and the function come back, and the frozen A (transient) is not saved."""
    cfg = K.Config(rank=4, epochs=1)
    m = method(cfg)
    for t, classes in enumerate(splits([3, 3])):
        data = task(classes, t)
        m.grow(t, classes)
        m.begin_task(t, classes, data)
        steps(m, data, 2)
        m.end_task(t, classes, data)
    state = m.state_dict()
    assert not any(k.endswith(".A") for k in state)
    assert all(state[k].shape == (32, 32) for k in state if k.endswith(".Q"))
    assert all(orth_err(s.basis().double()) <= 1e-6 for _, _, s in m.sites())  # the float32 buffers
    fresh = method(cfg, seed=5)
    for t, classes in enumerate(splits([3, 3])):
        fresh.grow(t, classes)
    fresh.load_state_dict(state, strict=True)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(fresh(x), m(x))
    assert all(torch.equal(a.basis(), b.basis()) for (_, _, a), (_, _, b) in zip(fresh.sites(), m.sites()))
    # and the resumed method carries on: task 2 starts from the saved bases
    data = task([6, 7, 8], 2)
    fresh.grow(2, [6, 7, 8])
    fresh.begin_task(2, [6, 7, 8], data)
    assert all(int(s.k) >= int(o.k) for (_, _, s), (_, _, o) in zip(fresh.sites(), m.sites()))


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "--rank must be >= 1 (got 0)"),
    (dict(targets="qx"), "--targets must be distinct letters of q, k, v, o (got 'qx')"),
    (dict(targets=""), "--targets must be distinct letters of q, k, v, o (got '')"),
    (dict(eps_f=0.0), "--eps-f must be in (0, 1] (got 0.0)"),
    (dict(eps_w=1.5), "--eps-w must be in [0, 1] (got 1.5)"),
    (dict(feature_mode="cov"), "--feature-mode must be one of covariance, official_mean (got 'cov')"),
    (dict(weight_basis_side="both"), "--weight-basis-side must be one of input, output (got 'both')"),
    (dict(threshold_rule="x"), "--threshold-rule must be one of official, paper (got 'x')"),
    (dict(b0_init="rand"), "--b0-init must be one of svd, zero (got 'rand')"),
    (dict(grad_fraction=0.0), "--grad-fraction must be in (0, 1] (got 0.0)"),
    (dict(lr=0.0), "--lr must be > 0 (got 0.0)"),
    (dict(alpha=-1.0), "--alpha must be > 0 (got -1.0)"),
    (dict(epochs=-1), "--epochs must be >= 0 (got -1)")])
def test_bad_config_is_a_value_error(bad, message):
    with pytest.raises(ValueError) as err:
        K.validate(K.Config(**bad))
    assert str(err.value) == message
    with pytest.raises(ValueError):  # the method validates first
        K.KeepLoRA(tiny_vit(), 6, K.Config(**bad))


def test_rank_above_the_width_is_a_value_error():
    with pytest.raises(ValueError) as err:
        K.KeepLoRA(tiny_vit(), 6, K.Config(rank=33))
    assert str(err.value) == "--rank must be <= 32, the width (got 33)"
