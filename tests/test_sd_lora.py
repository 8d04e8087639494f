"""Property tests of SD-LoRA (+ -RR, -KD) on a tiny random ViT: the invariants of specs/sd_lora.md §13."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY, synthetic_task, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

from backbone import qkv_rows
from methods import sd_lora
from methods.sd_lora import Config, Method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    """Give the current component a non-zero Up (and a new Dn), as training would."""
    with torch.no_grad():
        for ad in method.adapters:
            c = ad.comps[-1]
            for m in "qv":
                c.Up[m].copy_(scale * torch.randn(c.Up[m].shape, generator=gen, dtype=c.Up[m].dtype))
                c.Dn[m].copy_(torch.randn(c.Dn[m].shape, generator=gen, dtype=c.Dn[m].dtype) / D ** 0.5)


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
# §13.1 zero-init identity


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
# §13.2 frozen history


@settings(max_examples=4)
@given(seed=st.integers(0, 10_000), optimizer=st.sampled_from(["sgd", "adam"]),
       variant=st.sampled_from(["base", "rr"]))
def test_history_stays_bit_identical(seed, optimizer, variant):
    vit, method = make(seed, rank=4, lr=0.05, optimizer=optimizer, variant=variant, rr_ranks="4,2")
    gen = torch.Generator().manual_seed(seed)
    build(method, 2, gen)  # task 1 is current; component 0 is stored
    old_head = (method.head.weight.detach().clone(), method.head.bias.detach().clone())
    method.grow(2, TASKS[2])  # component 1 stored too; train task 2
    assert torch.equal(method.head.weight[:4], old_head[0]) and torch.equal(method.head.bias[:4], old_head[1])
    base = {k: v.clone() for k, v in vit.state_dict().items() if "qkv_adapter" not in k}
    stored = [{k: v.clone() for k, v in ad.comps[k_].state_dict().items()} for ad in method.adapters for k_ in (0, 1)]
    K = method.offsets[-2]
    head_w, head_b = method.head.weight[:K].clone(), method.head.bias[:K].clone()
    new_before = [ad.comps[2].Up["q"].clone() for ad in method.adapters]
    alpha_before = method.mags.alpha.detach().clone()

    train_steps(method, synthetic_task(TASKS[2], seed=seed), steps=3)

    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in base.items())
    now = [ad.comps[k_].state_dict() for ad in method.adapters for k_ in (0, 1)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(stored, now) for k in a)  # factors and normalisers
    assert torch.equal(method.head.weight[:K], head_w) and torch.equal(method.head.bias[:K], head_b)
    for ad in method.adapters:
        for k_ in (0, 1):
            assert all(p.grad is None or not p.grad.any() for p in ad.comps[k_].parameters())
    assert not method.head.weight.grad[:K].any() and not method.head.bias.grad[:K].any()
    # and the trainable part did train (the test would be vacuous otherwise)
    assert any(not torch.equal(b, ad.comps[2].Up["q"]) for b, ad in zip(new_before, method.adapters))
    assert not torch.equal(alpha_before, method.mags.alpha.detach())


# ----------------------------------------------------------------------------------------------------
# §13.3 masked loss


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), K=st.integers(1, 6), n_new=st.integers(1, 5), scale=st.floats(0.1, 100))
def test_masked_ce_ignores_old_logits(seed, K, n_new, scale):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(5, K + n_new, generator=g)
    y = K + torch.randint(0, n_new, (5,), generator=g)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone()
    z2[:, :K] += scale * torch.randn(5, K, generator=g)
    z2.requires_grad_(True)
    l1, l2 = sd_lora.masked_ce(z1, y, K), sd_lora.masked_ce(z2, y, K)
    l1.backward()
    l2.backward()
    assert torch.equal(l1, l2) and torch.equal(z1.grad, z2.grad) and not z1.grad[:, :K].any()


@settings(max_examples=4)
@given(seed=st.integers(0, 10_000))
def test_method_loss_ignores_old_head_rows(seed):
    """Perturbing the old head rows (hence the old logits only) changes neither the loss nor any gradient."""
    vit, method = make(seed, rank=3)
    build(method, 2, torch.Generator().manual_seed(seed))
    x, y = images(6, seed), torch.tensor([2, 3, 2, 3, 3, 2])
    params = [p for p in method.parameters() if p.requires_grad]

    def loss_and_grads():
        loss = method.loss(x, y)
        return loss, torch.autograd.grad(loss, params)

    l1, g1 = loss_and_grads()
    with torch.no_grad():
        method.head.weight[:2] += torch.randn(2, D, generator=torch.Generator().manual_seed(seed))
        method.head.bias[:2] -= 3.0
    l2, g2 = loss_and_grads()
    assert torch.equal(l1, l2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


# ----------------------------------------------------------------------------------------------------
# §13.4 direction normalisation


@given(seed=st.integers(0, 10_000), d=st.integers(2, 40), r=st.integers(1, 12),
       s=st.floats(0.01, 100) | st.floats(-100, -0.01), s2=st.floats(0.01, 100) | st.floats(-100, -0.01))
def test_normalisation_identities(seed, d, r, s, s2):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(d, r, generator=g, dtype=torch.float64)
    dn = torch.randn(r, d, generator=g, dtype=torch.float64)
    frob = sd_lora.direction(up, dn, "frob")
    prod = sd_lora.direction(up, dn, "prod")
    assert abs(frob.norm().item() - 1) <= 1e-5
    assert 0 < prod.norm().item() <= 1 + 1e-6
    assert torch.allclose(sd_lora.normaliser(up, dn, "frob"), (up @ dn).norm())  # trace form = explicit
    sign = 1.0 if (s > 0) == (s2 > 0) else -1.0
    for mode, dbar in (("frob", frob), ("prod", prod)):
        assert torch.allclose(sd_lora.direction(s * up, s2 * dn, mode), sign * dbar, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# §13.5 merge equivalence


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
        merged = method.head(method.merged_vit()(x))
        assert torch.allclose(method(x), merged, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(method(x), method.head(base_features(vit, x)), rtol=1e-4, atol=1e-5)
        # the sum over components does not depend on their order
        perm = torch.randperm(T, generator=g).tolist()
        for ad in method.adapters:
            for m in "qv":
                terms = ad.terms(m)
                shuffled = sum(terms[i][2] * terms[i][0] @ terms[i][1] for i in perm)
                assert torch.allclose(shuffled, ad.delta_weight(m), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------------
# §13.6 affinity in alpha, shared magnitudes


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
            dbar = c.Up[m] @ c.Dn[m] if k == T - 1 else c.Up[m] @ c.Dn[m] / c.nu[i]  # current: unnormalised
            if k < T - 1:
                assert torch.allclose(dbar, sd_lora.direction(c.Up[m], c.Dn[m], norm_mode))
            expected = delta * x @ dbar.T
            assert expected.abs().max() > 0  # every matrix moves at once
            assert torch.allclose(b[m] - a[m], expected, rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------------------------------
# §13.7 parameter counts, RR schedule


@settings(max_examples=6)
@given(rank=st.integers(1, 12), variant=st.sampled_from(["base", "rr", "kd"]))
def test_parameter_counts(rank, variant):
    vit, method = make(0, rank=rank, variant=variant, rr_ranks=f"{rank},{max(rank - 2, 1)},1")
    stored_before = 0
    for t in range(4):
        method.grow(t, TASKS[t])
        r_t = method.rank_of(t)
        assert r_t == (rank if variant != "rr" else [rank, max(rank - 2, 1), 1, 1][t])
        assert method.stored_parameters() - stored_before == 4 * L * D * r_t
        stored_before = method.stored_parameters()
        trainable = sum(p.numel() for p in method.parameters() if p.requires_grad)
        C_t = 2 * (t + 1)
        assert trainable == 4 * L * D * r_t + (t + 1) + C_t * (D + 1)


def test_rr_schedule_and_totals():
    _, method = make(0, variant="rr")
    ranks = [method.rank_of(t) for t in range(20)]
    assert ranks == [10 if t < 4 else 8 if t < 8 else 6 for t in range(20)]
    assert sum(36_864 * r for r in ranks) == 5_308_416  # spec §4, ViT-B, 20 tasks
    assert sum(4 * 6 * 192 * r for r in ranks[:10]) == 387_072  # spec §18, small ViT, 10 tasks
    _, plain = make(0)
    assert [plain.rank_of(t) for t in range(20)] == [10] * 20


# ----------------------------------------------------------------------------------------------------
# §13.8 reset semantics


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
    # the output is the ViT with W + sum_k alpha_k Dbar_k (Up_2 = 0), built here from the factors
    ref = copy.deepcopy(vit)
    with torch.no_grad():
        for blk, ad in zip(ref.blocks, method.adapters):
            blk.attn.qkv_adapter = None
            for m in "qv":
                for k in range(2):
                    dbar = sd_lora.direction(ad.comps[k].Up[m], ad.comps[k].Dn[m], norm_mode)
                    blk.attn.qkv.weight[qkv_rows(m, D)] += alpha[k] * dbar
    x = images(3, seed, torch.float64)
    with torch.no_grad():
        assert torch.allclose(vit(x), ref(x), rtol=1e-5, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# §13.9 KD exactness (float64)


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
                    ad.comps[t].Up[m][:, rank // 2:] = 0
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
    with torch.no_grad():  # U_2^m = s_2 Up_2 Dn_2 = c_0 Dbar_0^m + c_1 Dbar_1^m in every matrix
        for ad in method.adapters:
            c0, c1, cur = ad.comps
            for i, m in enumerate("qv"):
                cur.Up[m].copy_(torch.cat([c[0] / c0.nu[i] * c0.Up[m][:, :half],
                                           c[1] / c1.nu[i] * c1.Up[m][:, :half]], 1) / s[2])
                cur.Dn[m].copy_(torch.cat([c0.Dn[m][:half], c1.Dn[m][:half]]))
    x = images(3, seed, torch.float64)
    stored = method.stored_parameters()
    with torch.no_grad():
        before = method(x)
        method.end_task(2, TASKS[2], None)
        after = method(x)
    assert method.last_kd["absorbed"] and method.last_kd["rho"] <= 9e-4 and method.last_kd["rho_rel"] < 1e-6
    assert torch.allclose(method.mags.offset, torch.tensor([c[0], c[1], 0.0], dtype=torch.float64), rtol=1e-8)
    assert torch.allclose(before, after, rtol=1e-8, atol=1e-10)
    assert method.mags.kept_list == [True, True, False]
    assert method.stored_parameters() == stored - 4 * L * D * rank == 2 * 4 * L * D * rank  # no growth
    # resume: grow(0..2) alone rebuilds the structure and the checkpoint restores the same function
    _, fresh = make(seed + 1, dtype=torch.float64, rank=rank, variant="kd")
    for t in range(3):
        fresh.grow(t, TASKS[t])
    fresh.load_state_dict(method.state_dict(), strict=True)
    assert fresh.mags.kept_list == [True, True, False]
    with torch.no_grad():
        assert torch.equal(fresh(x), after)
        method.grow(3, TASKS[3])  # the absorbed component stays out of later tasks
        assert len(method.adapters[0].terms("q")) == 3


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), half=st.integers(1, 3), kd_target=st.sampled_from(["update", "direction"]),
       norm_mode=st.sampled_from(["prod", "frob"]))
def test_kd_keeps_an_orthogonal_component(seed, half, kd_target, norm_mode):
    rank = 2 * half
    vit, method, g = _kd_method(seed, rank, kd_target=kd_target, norm_mode=norm_mode)
    with torch.no_grad():  # earlier Dn rows live in the first D/2 coordinates, the new ones in the rest
        for ad in method.adapters:
            for m in "qv":
                for k in range(2):
                    ad.comps[k].Dn[m][:, D // 2:] = 0
                ad.comps[2].Up[m].copy_(torch.randn(D, rank, generator=g, dtype=torch.float64))
                ad.comps[2].Dn[m].copy_(torch.randn(rank, D, generator=g, dtype=torch.float64))
                ad.comps[2].Dn[m][:, : D // 2] = 0
    s2 = method.mags.scales()[2].item()  # the target: the applied update, or the unit direction (paper-literal)
    targets = [s2 * c.Up[m] @ c.Dn[m] if kd_target == "update" else sd_lora.direction(c.Up[m], c.Dn[m], norm_mode)
               for c in (ad.comps[2] for ad in method.adapters) for m in "qv"]
    norm_u = sum(u.norm() ** 2 for u in targets) ** 0.5
    x = images(3, seed, torch.float64)
    stored = method.stored_parameters()
    with torch.no_grad():
        before = method(x)
        method.end_task(2, TASKS[2], None)
        assert torch.equal(method(x), before)
    assert not method.last_kd["absorbed"] and method.mags.kept_list == [True, True, True]
    assert abs(method.last_kd["rho"] - norm_u.item()) <= 1e-9 * norm_u.item()
    assert not method.mags.offset.any() and method.stored_parameters() == stored


@settings(max_examples=8)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), M=st.integers(1, 4), d=st.integers(3, 12), data=st.data())
def test_kd_trace_form_equals_explicit_least_squares(seed, n, M, d, data):
    g = torch.Generator().manual_seed(seed)
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=n + 1, max_size=n + 1))  # mixed ranks

    def factors(r):
        f64 = dict(generator=g, dtype=torch.float64)
        return torch.randn(d, r, **f64), torch.randn(r, d, **f64), torch.rand((), **f64) + 0.1

    parts = [([factors(r) for r in ranks[:n]], factors(ranks[n])) for _ in range(M)]
    A = torch.stack([torch.cat([(w * up @ dn).flatten() for up, dn, w in (p[0][k] for p in parts)])
                     for k in range(n)], 1)
    b = torch.cat([(w * up @ dn).flatten() for up, dn, w in (p[1] for p in parts)])
    G, gvec, uu = sd_lora.normal_equations(parts)
    assert torch.allclose(G, A.T @ A) and torch.allclose(gvec, A.T @ b) and torch.allclose(uu, b @ b)
    c, rho, norm_u = sd_lora.lstsq_components(parts)
    c_ref = torch.linalg.pinv(A) @ b
    assert torch.allclose(A @ c, A @ c_ref, rtol=1e-7, atol=1e-8)  # same fitted update (c unique if A has full rank)
    assert torch.allclose(rho, (A @ c_ref - b).norm(), rtol=1e-6, atol=1e-6 * float(norm_u))
    assert torch.allclose(norm_u, b.norm())


# ----------------------------------------------------------------------------------------------------
# Optimiser (spec §7), config checks and end-to-end smoke runs


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_covers_exactly_the_trainable_tensors(optimizer):
    _, method = make(0, rank=3, optimizer=optimizer, milestones="2,4", lr_decay=0.05)
    build(method, 2, torch.Generator().manual_seed(0))
    opt, sched = method.optimizer(steps_per_epoch=3)
    params = [p for g in opt.param_groups for p in g["params"]]
    expected = ([ad.comps[1].Up[m] for ad in method.adapters for m in "qv"] +
                [ad.comps[1].Dn[m] for ad in method.adapters for m in "qv"] +
                [method.mags.alpha, method.head.weight, method.head.bias])
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
                                 dict(rr_ranks="4,0"), dict(lr=-1.0), dict(milestones="0"), dict(kd_tau=-1.0)])
def test_bad_config_is_a_value_error(bad):
    field = next(iter(bad)).split("_")[-1]  # the message names the field
    with pytest.raises(ValueError, match=field):
        Method(tiny_vit(), 4, Config(**bad))


def _cli(*args):
    p = subprocess.run([sys.executable, "train.py", "--method", "sd_lora", "--preset", "smoke", "--epochs", "1",
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _results(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    res = json.loads((run / "results.json").read_text())
    for row in res["per_task"]:
        for k in ("train_seconds", "seconds_per_step", "task_seconds", "eval_seconds"):
            row.pop(k)
    return run, res


@pytest.mark.parametrize("variant", ["base", "rr"])
def test_smoke_run(tmp_path, variant):
    _cli("--tasks", "2", "--out", str(tmp_path), "--variant", variant, "--rr-ranks", "6,3")
    _, res = _results(tmp_path)
    assert [len(row) for row in res["acc_matrix"]] == [1, 2]
    d, depth = 32, 2  # smoke preset backbone: vit_tiny_test
    r1 = 3 if variant == "rr" else 10
    assert res["per_task"][1]["trainable_params"] == 4 * depth * d * r1 + 2 + 10 * (d + 1)


def test_smoke_run_kd_absorbs_and_resumes(tmp_path):
    """-KD with a relative threshold of 2 always absorbs (rho <= |U_t|): tasks 2 and 3 are absorbed. A run stopped
    after task 2 and resumed rebuilds the structure with grow() alone and ends exactly like an uninterrupted run."""
    kd = ["--init-cls", "4", "--increment", "3", "--variant", "kd", "--kd-threshold", "relative", "--kd-tau", "2",
          "--quiet"]
    out = _cli(*kd, "--out", str(tmp_path / "a"))
    assert out.count("absorbed into earlier magnitudes") == 2
    _, a = _results(tmp_path / "a")
    assert [len(row) for row in a["acc_matrix"]] == [1, 2, 3]
    _cli(*kd, "--out", str(tmp_path / "c"), "--stop-after", "2")
    run_c, _ = _results(tmp_path / "c")
    subprocess.run([sys.executable, "train.py", "--resume", str(run_c), "--quiet"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert _results(tmp_path / "c")[1] == a
