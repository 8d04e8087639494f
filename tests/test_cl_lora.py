"""CL-LoRA (methods/cl_lora.py) on a tiny random ViT (d = 32, 4 blocks, split l = 2)."""
import copy
import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import backbone as bb
from conftest import TINY, step, synthetic_task, tiny_vit
from methods import cl_lora as M

TASKS = ([0, 1, 2], [3, 4, 5], [6, 7])  # uneven on purpose
ranks = st.sampled_from([1, 2, 4])
seeds = st.integers(0, 2**16)


def make(rank=2, seed=0, **kw) -> M.CLLoRA:
    m = M.Method(tiny_vit(seed), 8, M.Config(rank=rank, **kw))
    torch.manual_seed(seed)
    return m


def data_of(t, seed=0):
    return synthetic_task(TASKS[t], n_per_class=4, seed=seed, batch_size=6)


def train_steps(m, t, steps, seed=0, double=False, grow=True):
    """(grow +) begin_task + a few optimizer steps of task t; returns the data (end_task not called)."""
    data = data_of(t, seed)
    if grow:
        m.grow(t, TASKS[t])
    if double:
        m.double()
    m.begin_task(t, TASKS[t], data)
    opt, sched = m.optimizer(len(data.train))
    for i, (x, y) in enumerate(data.train):
        if i == steps:
            break
        step(m, opt, x.double() if double else x, y)
        sched.step()
    return data


@torch.no_grad()
def randomize(m, seed, scale=0.3):
    """Non-zero shared/specific B, teacher, block weights and prototypes (rows of different norms)."""
    g = torch.Generator().manual_seed(seed)
    for name, v in m.named_parameters():
        if ".B." in name or ".mu." in name:
            v.copy_(scale * torch.randn(v.shape, generator=g, dtype=torch.float64))
    for name, v in m.named_buffers():
        if "teacher" in name or name.startswith("protos"):
            v.copy_(scale * torch.randn(v.shape, generator=g, dtype=torch.float64))


def shared_bs(m):
    return [a.lora.B[p] for a in m.shared for p in M.TARGETS]


def branch(m, s, i):
    """f_i(x) of branch i alone on the trunk output s (training calls it so for i = t)."""
    return m.stacked_branches(s, range(i, i + 1))[0]


# ----------------------------------------------------------------------------------------------------
# Orthogonality


@given(r=ranks, d=st.sampled_from([8, 32, 192]), mode=st.sampled_from(M.CHOICES["orth_init"]), seed=seeds)
def test_orthonormal_rows_and_their_construction(r, d, mode, seed):
    torch.manual_seed(seed)
    A = M.orthonormal_rows(r, d, mode)
    assert A.shape == (r, d) and A.dtype == torch.float32
    torch.testing.assert_close(A @ A.T, torch.eye(r), atol=1e-5, rtol=0)
    torch.manual_seed(seed)  # the same draw, checked against an independent construction
    if mode == "qr_uniform":
        Mx = torch.rand(d, r, dtype=torch.float64)
        R = A.double() @ Mx  # A = Q^T, so A M = R is upper triangular and M = A^T R
        torch.testing.assert_close(R.tril(-1), torch.zeros(r, r, dtype=torch.float64), atol=1e-5, rtol=0)
        torch.testing.assert_close(A.double().T @ R, Mx, atol=1e-5, rtol=0)
    else:
        Mx = torch.randn(r, d, dtype=torch.float64)
        evals, evecs = torch.linalg.eigh(Mx @ Mx.T)  # polar(M) = (M M^T)^(-1/2) M
        polar = evecs @ torch.diag(evals.rsqrt()) @ evecs.T @ Mx
        torch.testing.assert_close(A.double(), polar, atol=1e-5, rtol=0)


@settings(max_examples=2)
@given(r=ranks, mode=st.sampled_from(M.CHOICES["orth_init"]), seed=seeds)
def test_shared_a_fixed_forever_and_new_a_orthonormal(r, mode, seed):
    m = make(r, seed, orth_init=mode)
    a0 = [a.lora.A[p].clone() for a in m.shared for p in M.TARGETS]
    for D in a0:
        torch.testing.assert_close(D @ D.T, torch.eye(r), atol=1e-5, rtol=0)
    for t in range(2):
        m.grow(t, TASKS[t])
        for a in m.specific:  # every new task-specific A is orthonormal at creation
            for p in M.TARGETS:
                D = a.branches[t].A[p]
                torch.testing.assert_close(D @ D.T, torch.eye(r), atol=1e-5, rtol=0)
        data = train_steps(m, t, steps=1, seed=seed, grow=False)
        m.end_task(t, TASKS[t], data)
        assert all(not a.lora.A[p].requires_grad for a in m.shared for p in M.TARGETS)
        assert all(torch.equal(D, a.lora.A[p]) for D, (a, p) in zip(a0, [(a, p) for a in m.shared for p in "qv"]))
    assert any(a.lora.B[p].abs().sum() > 0 for a in m.shared for p in M.TARGETS)  # the trunk did train


# ----------------------------------------------------------------------------------------------------
# Zero-init identity


@settings(max_examples=5)
@given(r=ranks, seed=seeds, sigma=st.floats(0.1, 10))
def test_zero_init_branches_equal_the_plain_vit(r, seed, sigma):
    plain = tiny_vit(seed)
    m = make(r, seed)
    for t in range(3):
        m.grow(t, TASKS[t])
    with torch.no_grad():
        for a in m.specific:
            for mu in a.mu:
                mu.uniform_(-3, 3)  # any block weights
        m.head.tau.fill_(sigma)
    x = torch.rand(5, 3, 16, 16)
    f = bb.features(plain, x)
    s = m.trunk(x)
    for i in range(3):
        assert torch.equal(branch(m, s, i), f)
    assert torch.equal(m.early_exit(s), plain.norm(plain.blocks[1](plain.blocks[0](bb.embed(plain, x))))[:, 0])


def test_local_classifier_is_pilot_cosine_linear():
    """h^t as backbone/linears.py L265-298 @ df4e74e: w ~ U(+-1/sqrt d), a learned sigma = 1, sigma cos(z, w_c)."""
    m = make(2, 0)
    m.grow(0, TASKS[0])
    d, h = TINY.embed_dim, m.head
    assert h.weight.shape == (3, d) and h.weight.abs().max() <= 1 / d**0.5 and h.weight.std() > 0.3 / d**0.5
    assert isinstance(h.tau, torch.nn.Parameter) and h.tau.requires_grad and torch.equal(h.tau, torch.ones(1))
    assert {n for n, _ in h.named_parameters()} == {"tau", "weight"}
    with torch.no_grad():
        h.tau.fill_(2.5)
    z = torch.randn(4, d)
    want = 2.5 * (z / z.norm(dim=1, keepdim=True)) @ (h.weight / h.weight.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(h(z), want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Reassignment weights and the reassigned gradient


@given(d=st.sampled_from([4, 32, 192]), r=ranks, seed=seeds, c=st.floats(1e-3, 1e3))
def test_reassign_weights(d, r, seed, c):
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(d, r, generator=g, dtype=torch.float64) * torch.rand(d, 1, generator=g, dtype=torch.float64)
    w = M.reassign_weights(P)
    assert w.shape == (d,) and (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(float(d), dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(M.reassign_weights(c * P), w, rtol=1e-9, atol=0)
    equal = F.normalize(torch.randn(d, r, generator=g, dtype=torch.float64), dim=1) * c  # rows of equal norm
    torch.testing.assert_close(M.reassign_weights(equal), torch.ones(d, dtype=torch.float64), rtol=1e-9, atol=0)
    assert torch.equal(M.reassign_weights(torch.zeros(d, r)), torch.ones(d))  # degenerate: no reassignment


@given(d=st.sampled_from([4, 32]), r=ranks, seed=seeds)
def test_reassign_grad_function_scales_rows(d, r, seed):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(d, r, generator=g, dtype=torch.float64, requires_grad=True)
    w = M.reassign_weights(torch.randn(d, r, generator=g, dtype=torch.float64))
    G = torch.randn(d, r, generator=g, dtype=torch.float64)
    out = M.ReassignGrad.apply(up, w)
    assert torch.equal(out, up)
    (grad,) = torch.autograd.grad(out, up, G)
    torch.testing.assert_close(grad, w[:, None] * G, rtol=1e-12, atol=0)
    ratio = grad / G  # constant along each row
    torch.testing.assert_close(ratio, ratio[:, :1].expand(d, r), rtol=1e-9, atol=0)
    if torch.allclose(w, torch.ones_like(w)):
        torch.testing.assert_close(grad, G)


def task1_state(r, seed, detach=False, kd_update="two_step"):
    """A float64 method in task 1 with a random teacher whose rows differ in norm, and a student != teacher."""
    m = make(r, seed, detach_teacher=detach, kd_update=kd_update)
    data = data_of(0, seed)
    m.grow(0, TASKS[0])
    randomize(m, seed)
    m.end_task(0, TASKS[0], data)  # teacher := the (random, non-zero) shared B
    m.grow(1, TASKS[1])
    m.double()
    randomize(m, seed + 1)  # student != teacher, so the KD gradient is not zero
    with torch.no_grad():
        for a in m.shared:  # rows of very different norms, so w is far from 1
            for p in M.TARGETS:
                a.teacher(p).mul_(torch.logspace(-1, 1, a.teacher(p).shape[0], dtype=torch.float64)[:, None])
    x, y = next(iter(data_of(1, seed).train))
    return m, x.double(), y


def no_reassignment():
    """reassign_weights -> 1: the KD gradient as plain autograd gives it."""
    return mock.patch.object(M, "reassign_weights", lambda P: torch.ones(P.shape[0], dtype=P.dtype))


@settings(max_examples=3)
@given(r=ranks, seed=seeds, detach=st.booleans(), kd_update=st.sampled_from(M.CHOICES["kd_update"]))
def test_loss_reassigns_only_the_kd_gradient_of_the_shared_b(r, seed, detach, kd_update):
    """joint: one gradient = CE/orth + diag(w) KD on the shared B, CE/orth + KD elsewhere. two_step: the first
    loss has the reassigned KD gradient only, the second the plain CE/orth gradient."""
    m, x, y = task1_state(r, seed, detach, kd_update)
    bs = shared_bs(m)
    rest = [p for n, p in m.named_parameters() if p.requires_grad and ".lora.B." not in n]
    params = bs + rest

    def grads(loss):
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]

    g_ce = grads(m.ce_loss(x, y) + m.orth_term())
    with no_reassignment():
        g_kd = grads(m.kd_loss(x))
    out = m.loss(x, y)
    if kd_update == "joint":
        assert isinstance(out, torch.Tensor)
        g_all = grads(out)
    else:  # the weights do not move between the two losses here, so their gradients add up to joint's
        first, second = (grads(loss) for loss in out)
        for g2, gc in zip(second, g_ce):
            torch.testing.assert_close(g2, gc, rtol=1e-9, atol=1e-14)  # no reassignment in the CE step
        specific = [p for p in rest if not any(p is h for h in m.head.parameters())]
        assert all(not g.any() for p, g in zip(rest, first[len(bs):]) if any(p is q for q in specific))
        g_all = [a + b for a, b in zip(first, second)]
    ws = [M.reassign_weights(a.teacher(p)) for a in m.shared for p in M.TARGETS]
    assert all(w.std() > 0.1 for w in ws)
    assert all(g.abs().max() > 1e-8 for g in g_kd[: len(bs)])
    for w, ga, gc, gk in zip(ws, g_all, g_ce, g_kd):
        torch.testing.assert_close(ga, gc + w[:, None] * gk, rtol=1e-9, atol=1e-14)
        assert not torch.allclose(ga, gc + gk, rtol=1e-6, atol=0)  # the check would see a missing reassignment
    for ga, gc, gk in zip(g_all[len(bs):], g_ce[len(bs):], g_kd[len(bs):]):
        torch.testing.assert_close(ga, gc + gk, rtol=1e-9, atol=1e-14)  # classifier, specific, U: untouched


def counted(opt):
    """Count the optimiser's steps (a list that grows by one per step)."""
    calls, inner = [], opt.step

    def counting_step(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)
    opt.step = counting_step
    return calls


def official_update(ref, x, y, detach, stale):
    """models/cllora.py L351-385 @ df4e74e written out from the pieces: L_ce (stale: built here, before step 1,
    with identity saved-tensor hooks, which skip autograd's version check as torch 2.0.1's optimiser step escaped
    it: the backward reads the parameters' values after the step, the activations' from before), a step on
    lambda1 KD with rows of the shared B's gradient times w, then a step on L_ce + lambda2 L_orth."""
    cfg, opt, tau = ref.cfg, ref.optimizer(1)[0], ref.cfg.temperature
    calls = counted(opt)

    def ce():
        return F.cross_entropy(ref.head(bb.features(ref.vit, x)), y - ref.offsets[1])
    if stale:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            ce_before = ce()
    opt.zero_grad()  # step 1: lambda1 KD, plain autograd, then rows of the shared B's gradient times w
    with torch.no_grad():
        e_t = ref.vit.norm(ref.trunk(x, "teacher"))[:, 0]
    z_t = ref.head(e_t).detach() if detach else ref.head(e_t)
    z_s = ref.head(ref.vit.norm(ref.trunk(x, "student"))[:, 0])
    kd = -(F.softmax(z_t / tau, 1) * F.log_softmax(z_s / tau, 1)).sum(1).mean()
    (cfg.lambda_kd * kd).backward()
    for a in ref.shared:
        for p in M.TARGETS:
            n = a.teacher(p).norm(dim=1)
            a.lora.B[p].grad *= (len(n) * n / n.sum())[:, None]
    opt.step()
    opt.zero_grad()  # step 2: L_ce (two_step: a fresh forward at the new weights) + lambda2 L_orth
    ((ce_before if stale else ce()) + cfg.lambda_orth * M.orth_loss(ref.block_weights(1), [ref.block_weights(0)])
     ).backward()
    opt.step()
    assert len(calls) == 2


@settings(max_examples=4)
@given(r=ranks, seed=seeds, detach=st.booleans(), stale=st.booleans())
def test_two_steps_equal_the_official_steps_by_hand(r, seed, detach, stale):
    """two_step / two_step_stale = `official_update` (fresh / stale L_ce); joint takes one step; the three
    updates differ, in the head and in the shared B."""
    kd_update = "two_step_stale" if stale else "two_step"
    m, x, y = task1_state(r, seed, detach, kd_update)
    ref = copy.deepcopy(m)
    others = {k: copy.deepcopy(m) for k in M.CHOICES["kd_update"] if k != kd_update}
    opt = m.optimizer(1)[0]
    calls = counted(opt)
    assert len(step(m, opt, x, y)) == 2 and len(calls) == 2
    for k, o in others.items():
        o.cfg = dataclasses.replace(m.cfg, kd_update=k)
        assert len(step(o, o.optimizer(1)[0], x, y)) == (1 if k == "joint" else 2)
    official_update(ref, x, y, detach, stale)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=name)
    for k, o in others.items():
        moved = [n for (n, p), q in zip(m.named_parameters(), o.parameters()) if not torch.allclose(p, q, 1e-6, 0)]
        assert "head.weight" in moved and any(".lora.B." in n for n in moved), (k, moved)


@settings(max_examples=3)
@given(r=ranks, seed=seeds, detach=st.booleans())
def test_two_step_stale_head_gradient_by_hand(r, seed, detach):
    """two_step_stale's second gradient of h^t in closed form: features f_0, w_0 and sigma_0 from before step 1 in
    the activations, the stepped w_1 and sigma_1 where the graph saved the parameters (F.normalize's w, the
    product's sigma). c = cos(f_0, w_0), g = (softmax(sigma_0 c) - onehot) / B, G = sigma_1 g^T norm(f_0):
    grad sigma = sum g c, grad w = G / |w_0| - w_1 <G, w_1> / |w_0|^3 (per row)."""
    m, x, y = task1_state(r, seed, detach, "two_step_stale")
    pre = copy.deepcopy(m)
    opt = m.optimizer(1)[0]
    losses = m.loss(x, y)
    opt.zero_grad()
    next(losses).backward()
    opt.step()  # step 1 moves the head (its KD gradient)
    w0, s0, w1, s1 = pre.head.weight.detach(), pre.head.tau.detach(), m.head.weight.detach(), m.head.tau.detach()
    assert not torch.allclose(w0, w1, rtol=1e-6, atol=0) and not torch.allclose(s0, s1, rtol=1e-6, atol=0)
    opt.zero_grad()
    next(losses).backward()
    with torch.no_grad():
        fn = F.normalize(bb.features(pre.vit, x), dim=1)
        c = fn @ F.normalize(w0, dim=1).T
        g = (F.softmax(s0 * c, 1) - F.one_hot(y - pre.offsets[1], c.shape[1])) / len(y)
        n0 = w0.norm(dim=1, keepdim=True)
        G, G0 = s1 * g.T @ fn, s0 * g.T @ fn
        want = G / n0 - w1 * (G * w1).sum(1, keepdim=True) / n0**3
        at_one_point = G0 / n0 - w0 * (G0 * w0).sum(1, keepdim=True) / n0**3  # every value from before the step
    torch.testing.assert_close(m.head.weight.grad, want, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(m.head.tau.grad, (g * c).sum().reshape(1), rtol=1e-9, atol=1e-15)
    assert not torch.allclose(want, at_one_point, rtol=1e-4, atol=0)  # the check sees the stepped w and sigma


def test_modes_and_aliases_are_put_back_after_an_exception():
    """An exception inside a pass leaves no mode flag set and no parameter replaced by its alias."""
    m, x, y = task1_state(2, 0, kd_update="two_step_stale")
    params = dict(m.named_parameters())

    def boom(mod, args):
        raise RuntimeError("boom")
    for blk, run in ((m.vit.blocks[0], lambda: m.trunk(x, "teacher")), (m.vit.blocks[0], lambda: m.kd_loss(x)),
                     (m.vit.blocks[-1], lambda: m.stacked_branches(m.trunk(x), range(2))),
                     (m.vit.blocks[-1], lambda: next(m.loss(x, y)))):
        hook = blk.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            run()
        hook.remove()
        assert all(a.source == "student" for a in m.shared) and all(a.active == range(1, 2) for a in m.specific)
        assert all(p is params[n] for n, p in m.named_parameters()) and len(dict(m.named_parameters())) == len(params)
    opt = m.optimizer(1)[0]
    assert len(step(m, opt, x, y)) == 2  # and the method still trains
    assert all(p is params[n] for n, p in m.named_parameters())


def test_double_after_an_evaluation():
    """.double() at any time (nothing a forward needs lives outside parameters and buffers)."""
    m = three_tasks(2, 0)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        logits = m(x)
        m.double()
        logits64 = m(x.double())
    assert logits64.dtype == torch.float64
    torch.testing.assert_close(logits64, logits.double(), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# KD when teacher = student; Gibbs


def kd_parts(m, x):
    with torch.no_grad():
        zt = m.head(m.early_exit(m.trunk(x, "teacher"))) / m.cfg.temperature
    pt = F.softmax(zt, dim=1)
    return m.cfg.lambda_kd * -(pt * F.log_softmax(zt, dim=1)).sum(1).mean()


@settings(max_examples=2)
@given(r=ranks, seed=seeds)
def test_kd_at_teacher_equals_student_and_gibbs(r, seed):
    m = make(r, seed)
    data = train_steps(m, 0, steps=2, seed=seed)
    m.end_task(0, TASKS[0], data)
    m.grow(1, TASKS[1])
    with torch.no_grad():
        m.head.tau.fill_(5.0)  # sharper targets than sigma = 1
    x, y = next(iter(data_of(1, seed).train))
    kd = m.kd_loss(x)
    grads = torch.autograd.grad(kd, shared_bs(m))
    assert all(g.abs().max() <= 1e-6 for g in grads)
    entropy = kd_parts(m, x)
    torch.testing.assert_close(kd, entropy, rtol=1e-5, atol=1e-6)
    assert entropy >= 0
    randomize(m, seed)  # student (and teacher) moved: L_kd >= lambda1 H(p^T)
    assert m.kd_loss(x) >= kd_parts(m, x) - 1e-6


# ----------------------------------------------------------------------------------------------------
# Freezing


@settings(max_examples=3)
@given(r=ranks, seed=seeds)
def test_only_shared_b_current_branch_and_head_change(r, seed):
    m = make(r, seed)
    data = train_steps(m, 0, steps=2, seed=seed)
    m.end_task(0, TASKS[0], data)
    m.grow(1, TASKS[1])
    opt, _ = m.optimizer(1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    expected = {n for n, _ in m.named_parameters()
                if ".lora.B." in n or ".branches.1." in n or n.endswith(".mu.1") or n.startswith("head.")}
    assert trainable == expected
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in m.named_parameters() if n in expected}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train_steps(m, 1, steps=2, seed=seed, grow=False)
    after = m.state_dict()
    may_change = ("lora.B.", ".branches.1.", ".mu.1", "head.")
    for k, v in before.items():
        if not any(s in k for s in may_change):
            assert torch.equal(v, after[k]), k  # ViT, shared A, teacher, branch 0, U_0, prototypes
    for k in ("vit.blocks.0.attn.qkv_adapter.lora.B.q", "vit.blocks.3.attn.qkv_adapter.branches.1.B.v",
              "head.weight"):
        assert not torch.equal(before[k], after[k]), k


# ----------------------------------------------------------------------------------------------------
# Branch locality, trunk sharing, cosine logits


def three_tasks(r, seed):
    m = make(r, seed)
    for t in range(3):
        m.grow(t, TASKS[t])
    randomize(m, seed)
    return m.eval()


@settings(max_examples=4)
@given(r=ranks, seed=seeds, j=st.integers(0, 2))
def test_branch_locality(r, seed, j):
    m = three_tasks(r, seed)
    x = torch.rand(4, 3, 16, 16)
    before = m(x)
    with torch.no_grad():
        for a in m.specific:
            for p in a.branches[j].parameters():
                p.add_(0.5 * torch.randn_like(p))
            a.mu[j].mul_(-2)
    after = m(x)
    lo, hi = m.offsets[j], m.offsets[j + 1]
    outside = torch.ones(before.shape[1], dtype=torch.bool)
    outside[lo:hi] = False
    assert torch.equal(before[:, outside], after[:, outside])
    assert not torch.equal(before[:, lo:hi], after[:, lo:hi])


@settings(max_examples=4)
@given(r=ranks, seed=seeds)
def test_trunk_once_equals_every_branch_from_scratch(r, seed):
    m = three_tasks(r, seed)
    x = torch.rand(4, 3, 16, 16)
    logits = m(x)
    assert logits.shape == (4, m.offsets[-1])
    scratch = []
    for i in range(3):  # the whole ViT again per branch, through its own forward
        with M.swapped([(vars(a), "active", range(i, i + 1)) for a in m.specific]):
            f = m.vit(x)
        p = getattr(m, f"protos_{i}")
        scratch.append(F.normalize(f, dim=1) @ F.normalize(p, dim=1).T)
    torch.testing.assert_close(logits, torch.cat(scratch, dim=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_branches_equal_the_per_branch_loop(seed):
    """After 3 trained tasks, the evaluation forward (blocks l..L-1 once on the trunk output repeated for the
    branches, each slice through its own LoRA and U) equals one branch pass per task, in groups of any size."""
    m = make(2, seed)
    for t in range(3):
        m.end_task(t, TASKS[t], train_steps(m, t, steps=1, seed=seed))
    randomize(m, seed)
    m.eval()
    x = torch.rand(5, 3, 16, 16)
    calls = []
    hook = m.vit.blocks[-1].register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        s = m.trunk(x)
        loop = torch.cat([m.proto_logits(branch(m, s, i), i) for i in range(3)], dim=1)
        calls.clear()
        for images, passes in ((0, [15]), (1, [5, 5, 5]), (5, [5, 5, 5]), (14, [10, 5]), (15, [15]), (1024, [15])):
            m.cfg = dataclasses.replace(m.cfg, eval_images=images)  # groups of max(1, images // 5) branches
            torch.testing.assert_close(m(x), loop, rtol=0, atol=1e-5)
            assert calls == passes, (images, calls)  # the last block runs once per group, on (group x B) rows
            calls.clear()
    hook.remove()
    assert all(a.active == range(2, 3) for a in m.specific)  # back to the current branch for training
    assert not torch.allclose(loop[:, :3], m.proto_logits(branch(m, s, 1), 0), atol=1e-3)  # branches differ


@settings(max_examples=3)
@given(r=ranks, seed=seeds, c=st.floats(1e-2, 1e2))
def test_cosine_logits(r, seed, c):
    m = three_tasks(r, seed)
    x = torch.rand(4, 3, 16, 16)
    logits = m(x)
    assert logits.abs().max() <= 1 + 1e-6
    s = m.trunk(x)
    for i in range(3):
        f = branch(m, s, i)
        torch.testing.assert_close(m.proto_logits(c * f, i), m.proto_logits(f, i), rtol=1e-5, atol=1e-6)
    reversed_blocks = {i: m.proto_logits(branch(m, m.trunk(x), i), i) for i in (2, 1, 0)}  # another order
    torch.testing.assert_close(torch.cat([reversed_blocks[i] for i in range(3)], dim=1), logits, rtol=1e-5,
                               atol=1e-6)  # the forward batches the branches: equal up to float rounding
    with torch.no_grad():
        for i in range(3):
            getattr(m, f"protos_{i}").mul_(c)
    torch.testing.assert_close(m(x), logits, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Orthogonality loss and the unused k row


@given(n=st.integers(1, 4), cols=st.integers(1, 6), seed=seeds, c=st.floats(1e-2, 1e2))
def test_orth_loss(n, cols, seed, c):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(3, cols, generator=g, dtype=torch.float64)
    olds = [torch.randn(3, cols, generator=g, dtype=torch.float64) for _ in range(n)]
    L = M.orth_loss(U, olds)
    assert 0 <= L <= 1 + 1e-12
    assert M.orth_loss(U, []) == 0
    exact = M.orth_loss(U, olds, eps=0.0)  # without the code's eps the scale invariance is exact
    torch.testing.assert_close(M.orth_loss(c * U, [c * o for o in olds], eps=0.0), exact, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(M.orth_loss(U, [c * o for o in olds[:1]] + olds[1:], eps=0.0), exact,
                               rtol=1e-9, atol=1e-15)
    # x / (|x| + eps) = x^ (1 - eps / (|x| + eps)): the eps moves L_orth by at most eps/|U| + max_i eps/|U_i|
    bound = 1e-8 * (1 / U.norm() + max(1 / o.norm() for o in olds))
    assert abs(L - exact) <= bound * (1 + 1e-6)
    u = U.flatten() / U.norm()
    perp = [o - (o.flatten() @ u) * u.view_as(o) for o in olds]  # each orthogonal to vec U
    assert M.orth_loss(U, perp) <= 1e-12
    torch.testing.assert_close(M.orth_loss(U, [U]), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(M.orth_loss(U, [-U]), torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=0)


@settings(max_examples=2)
@given(r=ranks, seed=seeds)
def test_orth_term_zero_at_task0_and_k_row_unused(r, seed):
    m = make(r, seed)
    m.grow(0, TASKS[0])
    randomize(m, seed)
    x, y = next(iter(data_of(0, seed).train))
    loss = m.loss(x, y)  # t = 0: L_ce alone, one step
    assert isinstance(loss, torch.Tensor) and torch.equal(loss, m.ce_loss(x, y))
    f = branch(m, m.trunk(x), 0)
    with torch.no_grad():
        for a in m.specific:
            a.mu[0][M.ROW["k"]] += 10.0
    assert torch.equal(branch(m, m.trunk(x), 0), f)
    with torch.no_grad():
        for a in m.specific:
            a.mu[0][M.ROW["v"]] += 1.0
    assert not torch.equal(branch(m, m.trunk(x), 0), f)
    m.grow(1, TASKS[1])
    expected = M.orth_loss(m.block_weights(1), [m.block_weights(0)]) * m.cfg.lambda_orth
    assert m.block_weights(1).shape == (3, TINY.depth - m.l)
    torch.testing.assert_close(m.orth_term(), expected)


# ----------------------------------------------------------------------------------------------------
# Counting


def stored(m, base_numel):
    """What train.py reports (state dict minus the backbone), without the current local classifier."""
    return sum(v.numel() for v in m.state_dict().values()) - base_numel - sum(p.numel() for p in m.head.parameters())


@settings(max_examples=3)
@given(r=ranks, seed=seeds)
def test_parameter_counts_and_growth(r, seed):
    m = make(r, seed)
    base = sum(v.numel() for v in tiny_vit(seed).state_dict().values())
    d, L, l = TINY.embed_dim, TINY.depth, m.l
    assert l == L // 2
    prev = None
    for t in range(3):
        m.grow(t, TASKS[t])
        n = len(TASKS[t])
        opt, _ = m.optimizer(1)
        trainable = sum(p.numel() for g in opt.param_groups for p in g["params"] if p.requires_grad)
        assert trainable == l * 2 * d * r + (L - l) * 2 * 2 * d * r + 3 * (L - l) + d * n + 1
        now = stored(m, base)
        if prev is not None:
            assert now - prev == (L - l) * 2 * 2 * d * r + 3 * (L - l) + d * n
        prev = now
        assert m(torch.rand(2, 3, 16, 16)).shape == (2, m.offsets[-1])  # one logit per seen class


@pytest.mark.parametrize("preset, rank, expected", [("vit_base_patch16_224", 10, 276_498),
                                                    ("vit_small32", 10, 34_569), ("vit_small32", 8, 27_657)])
def test_paper_and_small_counts(preset, rank, expected):
    with torch.device("meta"):  # shapes only: no memory, no compute
        m = M.Method(bb.ViT(bb.PRESETS[preset]), 100, M.Config(rank=rank))
        m.grow(0, list(range(10)))
    d = m.vit.embed_dim
    assert m.l == len(m.vit.blocks) // 2
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected + d * 10 + 1


# ----------------------------------------------------------------------------------------------------
# Prototypes


@settings(max_examples=3)
@given(r=ranks, seed=seeds, bs=st.integers(1, 7))
def test_prototypes_are_class_means_independent_of_order_and_batch(r, seed, bs):
    m = make(r, seed)
    data = train_steps(m, 0, steps=2, seed=seed)
    m.end_task(0, TASKS[0], data)
    P = m.protos_0.clone()
    xs, ys = map(torch.cat, zip(*data.plain))
    with torch.no_grad():
        f = branch(m, m.trunk(xs), 0).double()
    for k, c in enumerate(TASKS[0]):
        torch.testing.assert_close(P[k].double(), f[ys == c].mean(0), rtol=1e-5, atol=1e-6)
    other = torch.utils.data.DataLoader(data.plain.dataset, batch_size=bs, shuffle=True,
                                        generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(M.class_means(m.vit, other, TASKS[0]), P, rtol=1e-5, atol=1e-6)
    data1 = train_steps(m, 1, steps=2, seed=seed)
    m.end_task(1, TASKS[1], data1)
    assert torch.equal(m.protos_0, P)  # never recomputed


# ----------------------------------------------------------------------------------------------------
# Config checks, autocast


@pytest.mark.parametrize("kw", [dict(rank=0), dict(rank=33), dict(split=4), dict(split=-1), dict(orth_init="x"),
                                dict(kd_update="x"), dict(lr=0.0), dict(temperature=0.0), dict(lambda_kd=-1.0),
                                dict(momentum=1.0), dict(eval_images=-1)])
def test_bad_config_is_a_value_error(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=f"^--{name.replace('_', '-')} must be .*\\(got "):
        M.Method(tiny_vit(), 8, M.Config(**kw))


@pytest.mark.parametrize("kd_update", M.CHOICES["kd_update"])
def test_bf16_autocast_step_and_forward(kd_update):
    """`--amp bf16` runs loss and forward under bf16 autocast: gradients stay float32 and finite."""
    m = make(2, 0, kd_update=kd_update)
    data = train_steps(m, 0, steps=1)
    m.end_task(0, TASKS[0], data)
    m.grow(1, TASKS[1])
    x, y = next(iter(data_of(1).train))
    opt, _ = m.optimizer(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.loss(x, y)
        for loss in [out] if isinstance(out, torch.Tensor) else out:
            opt.zero_grad()
            loss.backward()
            bs = shared_bs(m)
            assert all(b.grad is not None and b.grad.dtype == torch.float32 and torch.isfinite(b.grad).all()
                       for b in bs)
            opt.step()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = m(x)
    assert logits.dtype == torch.float32 and logits.shape == (len(x), m.offsets[-1])
