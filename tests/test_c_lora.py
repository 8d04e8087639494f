"""C-LoRA (methods/c_lora.py): the algebra of the paper's Eqs. 4-5, 11-12, 26 and Theorem 3.1, and the method.

Linear algebra on single sites in float64; module-level checks on the tiny random ViT in float32.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import backbone as bb
from conftest import TINY, run_task, synthetic_task, tiny_vit
from data import task_classes as splits  # global labels of each task
from methods import c_lora

dims = st.integers(8, 96)
ranks = st.integers(1, 8)
seeds = st.integers(0, 2**16)
scales = st.sampled_from([0.5, 1.0, 2.0])
targets = st.sampled_from(["qkvo", "qv", "kvo", "o", "q"])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run about 10x faster on one thread than on two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-300)).detach())


def site64(d_in, d_out, r, s, seed, stopgrad=True, r_delta=True) -> c_lora.LoRASite:
    """A float64 site with random A, B, R_old and (unless r_delta=False) R_delta."""
    torch.manual_seed(seed)
    site = c_lora.LoRASite(d_in, d_out, r, s, stopgrad).double()
    with torch.no_grad():
        site.R_old.normal_()
        if r_delta:
            site.R_delta.normal_()
    return site


def method(cfg=None, seed=0, **kw) -> c_lora.CLoRA:
    return c_lora.CLoRA(tiny_vit(seed), 12, cfg or c_lora.Config(rank=4, **kw))



def train_task(m, t, classes, steps=2, seed=0, end=True):
    return run_task(m, t, classes, steps=steps, seed=seed, end=end, n_per_class=4, batch_size=8)


def randomise_routes(m, seed, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in m.sites():
            site.R_old.copy_(std * torch.randn(site.R_old.shape, generator=g))
            site.R_delta.copy_(std * torch.randn(site.R_delta.shape, generator=g))


def images(n=4, seed=0):
    return torch.rand(n, 3, TINY.img_size, TINY.img_size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------- shapes


@settings(max_examples=6)
@given(r=ranks, tg=targets, seed=seeds)
def test_shapes_buffers_and_optimiser(r, tg, seed):
    m = c_lora.CLoRA(tiny_vit(seed), 12, c_lora.Config(rank=r, targets=tg))
    d = TINY.embed_dim
    sites = m.sites()
    assert len(sites) == TINY.depth * len(tg)
    m.grow(0, [0, 1, 2])
    opt, _ = m.optimizer(5)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(g["weight_decay"] == 0 for g in opt.param_groups)  # wd 0 on A, B, R_delta
    for site in sites:
        assert site.B.shape == (d, r) and site.A.shape == (r, d)
        assert site.R_old.shape == site.R_delta.shape == (r, r)
        assert dict(site.named_buffers())["R_old"] is site.R_old and not site.R_old.requires_grad
        assert all(p is not site.R_old for p in m.parameters())
        assert id(site.R_old) not in in_opt
        assert {id(site.B), id(site.A), id(site.R_delta)} <= in_opt
        assert site.B.abs().min() > 0 and site.A.abs().min() > 0  # both non-zero, or nothing learns
        assert not site.R_old.any() and not site.R_delta.any()  # R_old = 0 and R_delta = 0 at init
    assert {id(p) for p in m.heads[0].parameters()} <= in_opt
    assert not any(id(p) in in_opt for p in m.vit.parameters() if not p.requires_grad)
    assert not any(p.requires_grad for n, p in m.vit.named_parameters() if "adapter" not in n)  # W0 frozen
    x = images(seed=seed)
    assert torch.equal(m.vit(x), tiny_vit(seed)(x))  # dW = 0 at init: the pre-trained function exactly


# ---------------------------------------------------------------------------------------------------- forward


@given(d_in=dims, d_out=dims, r=ranks, s=scales, seed=seeds, stopgrad=st.booleans())
def test_forward_value(d_in, d_out, r, s, seed, stopgrad):
    site = site64(d_in, d_out, r, s, seed, stopgrad)
    x = torch.randn(2, 5, d_in, dtype=torch.float64)
    want = s * x @ site.A.T @ (site.R_old + site.R_delta).T @ site.B.T
    assert rel(site(x), want) < 1e-6
    assert rel(site.delta_weight(), s * site.B @ (site.R_old + site.R_delta) @ site.A) < 1e-12


# ---------------------------------------------------------------------------------------------------- Eqs. 11-12


@given(d_in=dims, d_out=dims, r=ranks, s=scales, seed=seeds)
def test_stopgrad_gradients_closed_forms(d_in, d_out, r, s, seed):
    x = torch.randn(7, d_in, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(7, d_out, dtype=torch.float64)  # dL/dy
    G = gy.T @ x.detach()  # dL/d(dW), (d_out, d_in)
    grads = {}
    for stopgrad in (True, False):
        site = site64(d_in, d_out, r, s, seed, stopgrad)
        x.grad = None
        (site(x) * gy).sum().backward()
        grads[stopgrad] = (site.B.grad, site.A.grad, site.R_delta.grad, x.grad.clone())
        assert site.R_old.grad is None
    B, A, Ro, Rd = site.B.detach(), site.A.detach(), site.R_old, site.R_delta.detach()
    gB, gA, gR, gx = grads[True]
    assert rel(gB, s * G @ A.T @ Rd.T) < 1e-6
    assert rel(gA, s * Rd.T @ B.T @ G) < 1e-6
    assert rel(gR, s * B.T @ G @ A.T) < 1e-6
    # the stop-gradient acts on A and B only: the input still gets the gradient of both routes
    assert rel(gx, s * gy @ B @ (Ro + Rd) @ A) < 1e-6
    fB, fA, fR, fx = grads[False]  # naive freeze of R_old: the full forms
    assert rel(fB, s * G @ A.T @ (Ro + Rd).T) < 1e-6
    assert rel(fA, s * (Ro + Rd).T @ B.T @ G) < 1e-6
    assert rel(fR, gR) < 1e-12 and rel(fx, gx) < 1e-12
    # ... which differ from C-LoRA's by exactly the old route's gradient
    assert rel(fB - gB, s * G @ A.T @ Ro.T) < 1e-6 and (fB - gB).norm() > 1e-6 * fB.norm()
    assert rel(fA - gA, s * Ro.T @ B.T @ G) < 1e-6 and (fA - gA).norm() > 1e-6 * fA.norm()


# ---------------------------------------------------------------------------------------------------- R_delta = 0


@given(d_in=dims, d_out=dims, r=ranks, s=scales, seed=seeds)
def test_zero_fresh_route_gives_zero_factor_gradients(d_in, d_out, r, s, seed):
    site = site64(d_in, d_out, r, s, seed, r_delta=False)
    x = torch.randn(6, d_in, dtype=torch.float64)
    (site(x) * torch.randn(6, d_out, dtype=torch.float64)).sum().backward()
    assert not site.B.grad.any() and not site.A.grad.any()
    assert site.R_delta.grad.norm() > 0


@settings(max_examples=4)
@given(seed=seeds)
def test_zero_fresh_route_on_the_vit(seed):
    m = method(seed=seed, lambda_orth=0.1)
    train_task(m, 0, [0, 1, 2], steps=2, seed=seed)
    randomise_routes(m, seed)  # a non-zero old route everywhere
    data = synthetic_task([3, 4, 5], n_per_class=4, seed=seed)
    m.grow(1, [3, 4, 5])
    m.begin_task(1, [3, 4, 5], data)  # R_delta <- 0
    x, y = next(iter(data.train))
    m.zero_grad(set_to_none=True)
    m.loss(x, y).backward()
    for site in m.sites():
        assert not site.B.grad.any() and not site.A.grad.any()
    assert sum(float(site.R_delta.grad.norm()) for site in m.sites()) > 0


# ---------------------------------------------------------------------------------------------------- boundary


@given(d_in=dims, d_out=dims, r=ranks, s=scales, seed=seeds)
def test_boundary_is_function_preserving(d_in, d_out, r, s, seed):
    site = site64(d_in, d_out, r, s, seed)
    x = torch.randn(5, d_in, dtype=torch.float64)
    before, R_old, R_delta = site(x).detach(), site.R_old.clone(), site.R_delta.detach().clone()
    site.consolidate()
    assert torch.equal(site.R_old, R_old + R_delta) and not site.R_delta.any()
    assert rel(site(x), before) < 1e-6


@settings(max_examples=4)
@given(seed=seeds, tg=targets)
def test_end_task_is_function_preserving_on_the_vit(seed, tg):
    m = method(seed=seed, targets=tg, lr=1e-2, schedule="constant")
    train_task(m, 0, [0, 1, 2], steps=2, seed=seed, end=False)
    randomise_routes(m, seed)
    x = images(seed=seed)
    before = m(x).detach()
    factors = [(s.B.detach().clone(), s.A.detach().clone()) for s in m.sites()]
    m.end_task(0, [0, 1, 2], None)
    assert rel(m(x), before) < 1e-5
    for site, (B, A) in zip(m.sites(), factors):  # A and B kept: neither re-initialised nor frozen
        assert torch.equal(site.B, B) and torch.equal(site.A, A) and site.B.requires_grad and site.A.requires_grad
    assert not any(p.requires_grad for p in m.heads[0].parameters())


# ---------------------------------------------------------------------------------------------------- size


def adapter_numel(m):
    trainable = sum(p.numel() for s in m.sites() for p in (s.B, s.A, s.R_delta))
    stored = sum(b.numel() for s in m.sites() for n, b in s.named_buffers() if n in s.state_dict())
    return trainable, stored


@settings(max_examples=5)
@given(sizes=st.lists(st.integers(1, 4), min_size=3, max_size=3), head=st.sampled_from(["cosine_proto", "linear"]),
       r=ranks)
def test_constant_adapter_size_and_state_dict_keys(sizes, head, r):
    m = c_lora.CLoRA(tiny_vit(), 12, c_lora.Config(rank=r, head=head))
    d = TINY.embed_dim
    n_sites = TINY.depth * 4
    counts, keys, head_numel = [], [], [0]
    for t, classes in enumerate(splits(sizes)):
        train_task(m, t, classes, steps=1)
        counts.append(adapter_numel(m))
        keys.append({k: v.shape for k, v in m.state_dict().items() if not k.startswith("heads.")})
        head_numel.append(sum(p.numel() for p in m.heads.parameters()))
        assert head_numel[-1] - head_numel[-2] == len(classes) * (d + (head == "linear"))  # only the head grows
        trainable_now = sum(p.numel() for p in m.parameters() if p.requires_grad)
        assert trainable_now == n_sites * (2 * r * d + r * r)  # after end_task: the adapter only
    assert all(c == (n_sites * (2 * r * d + r * r), n_sites * r * r) for c in counts)
    assert keys[0] == keys[1] == keys[2]
    assert not any("Q_old" in k for k in keys[0])  # nothing per task, nothing derived is stored


def test_parameter_budget_of_the_small_setting():
    """r = 16 on q, k, v, o of the 6-block, 192-wide ViT: 24 (2 r d + r^2) = 153,600 trainable and 24 r^2 = 6,144
    frozen values; r = 8: 75,264."""
    for r, want in ((16, 153_600), (8, 75_264)):
        torch.manual_seed(0)
        m = c_lora.CLoRA(bb.ViT(bb.PRESETS["vit_small32"]), 100, c_lora.Config(rank=r))
        assert adapter_numel(m) == (want, 24 * r * r)
        assert sum(p.numel() for p in m.parameters() if p.requires_grad) == want


# ---------------------------------------------------------------------------------------------------- Eq. 26


@given(r=ranks, seed=seeds)
def test_penalty_value_and_gradient(r, seed):
    site = site64(8, 8, r, 1.0, seed)
    site.set_old_basis("r_old", 0.95)
    pen = site.penalty(normalise=False)
    Ro, Rd = site.R_old, site.R_delta
    value, want = float(pen.detach()), float((Ro.T @ Rd.detach()).square().sum())
    assert value >= 0 and abs(value - want) <= 1e-10 * value
    pen.backward()
    assert rel(site.R_delta.grad, 2 * Ro @ Ro.T @ Rd.detach()) < 1e-6
    assert site.B.grad is None and site.A.grad is None  # the penalty touches R_delta only


@given(r=st.integers(2, 8), k=st.integers(1, 7), seed=seeds)
def test_penalty_zero_iff_orthogonal(r, k, seed):
    assume(k < r)
    torch.manual_seed(seed)
    U = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64))[0]
    site = c_lora.LoRASite(8, 8, r, 1.0).double()
    with torch.no_grad():
        site.R_old.copy_(U[:, :k] @ torch.randn(k, r, dtype=torch.float64))  # col(R_old) = span U[:, :k]
        site.R_delta.copy_(U[:, k:] @ torch.randn(r - k, r, dtype=torch.float64))  # col(R_delta) orthogonal
    site.set_old_basis("r_old", 0.95)
    assert site.penalty(False) < 1e-20 * site.R_old.norm() ** 2 * site.R_delta.norm() ** 2
    with torch.no_grad():
        site.R_delta += 1e-3 * U[:, :1] @ torch.randn(1, r, dtype=torch.float64)  # a component in col(R_old)
    assert site.penalty(False) > 0


def test_penalty_fixtures():
    site = c_lora.LoRASite(4, 4, 2, 1.0).double()
    with torch.no_grad():
        site.R_old.copy_(torch.diag(torch.tensor([1.0, 0.0])))
        site.R_delta.copy_(torch.diag(torch.tensor([0.0, 1.0])))
        site.set_old_basis("r_old", 0.95)
        assert site.penalty(False) == 0
        site.R_delta.copy_(site.R_old)
        assert site.penalty(False) == 1


@given(r=ranks, seed=seeds, c=st.floats(0.1, 10.0))
def test_penalty_scaling_and_normalisation(r, seed, c):
    site = site64(8, 8, r, 1.0, seed)
    pens = {}
    with torch.no_grad():
        for scale in (1.0, c):
            site.R_old.mul_(scale)
            for mode in ("r_old", "svd_topk"):
                site.set_old_basis(mode, 0.95)
                pens[scale, mode] = (float(site.penalty(False)), float(site.penalty(True)))
            site.R_old.div_(scale)
    assert pens[c, "r_old"][0] == pytest.approx(c**2 * pens[1.0, "r_old"][0], rel=1e-9)  # drifts with ||R_old||
    norm2 = float(site.R_old.square().sum()) * min(1.0, c**2)
    assert pens[1.0, "r_old"][1] == pytest.approx(pens[1.0, "r_old"][0] / (norm2 / min(1.0, c**2) + 1e-8), rel=1e-9)
    # normalised: it does not drift, up to the 1e-8 in the divisor
    assert pens[c, "r_old"][1] == pytest.approx(pens[1.0, "r_old"][1], rel=1e-9 + 2e-8 / norm2)
    assert pens[c, "svd_topk"][0] == pytest.approx(pens[1.0, "svd_topk"][0], rel=1e-9)  # orthonormal basis


@given(r=ranks, seed=seeds, energy=st.floats(0.05, 0.99))
def test_svd_topk_basis(r, seed, energy):
    site = site64(8, 8, r, 1.0, seed)
    site.set_old_basis("svd_topk", energy)
    Q = site.Q_old
    k = int((Q.norm(dim=0) > 0).sum())
    assert torch.count_nonzero(Q[:, k:]) == 0 and 1 <= k <= r
    assert torch.allclose(Q[:, :k].T @ Q[:, :k], torch.eye(k, dtype=Q.dtype), atol=1e-10)
    S = torch.linalg.svdvals(site.R_old)
    share = (S**2).cumsum(0) / (S**2).sum()
    assert share[k - 1] >= energy and (k == 1 or share[k - 2] < energy)  # the fewest that hold the energy
    P = Q @ Q.T
    assert rel(P @ site.R_old, site.R_old) <= float(torch.sqrt(1 - share[k - 1])) + 1e-9  # Q spans R_old's top part
    with torch.no_grad():
        pen = site.penalty(False)
        assert abs(float(pen) - float((P @ site.R_delta).square().sum())) <= 1e-9 * max(1.0, float(pen))
        assert pen <= site.R_delta.square().sum() * (1 + 1e-12)
    with torch.no_grad():
        site.R_old.zero_()
    site.set_old_basis("svd_topk", energy)
    assert not site.Q_old.any()  # first task: no basis, no penalty


@settings(max_examples=4)
@given(seed=seeds, lam=st.sampled_from([1e-3, 1e-2, 1e-1]), normalise=st.booleans())
def test_loss_adds_the_penalty_which_is_zero_in_the_first_task(seed, lam, normalise):
    m = method(seed=seed, lambda_orth=lam, orth_normalise=normalise, lr=1e-2, schedule="constant")
    train_task(m, 0, [0, 1, 2], steps=3, seed=seed, end=False)
    assert all(s.R_delta.any() for s in m.sites()) and m.orth_penalty() == 0  # R_old = 0 in task 0
    m.end_task(0, [0, 1, 2], None)
    data = synthetic_task([3, 4], n_per_class=4, seed=seed)
    m.grow(1, [3, 4])
    m.begin_task(1, [3, 4], data)
    randomise_routes(m, seed)
    for site in m.sites():
        site.set_old_basis("r_old", 0.95)
    x, y = next(iter(data.train))
    with torch.no_grad():
        want = sum((s.R_old.T @ s.R_delta).square().sum() / ((s.R_old.square().sum() + 1e-8) if normalise else 1)
                   for s in m.sites())
        assert float(m.orth_penalty()) == pytest.approx(float(want), rel=1e-5) and want > 0
        ce = F.cross_entropy(m.heads[1](bb.features(m.vit, x)), y - 3)
        assert float(m.loss(x, y)) == pytest.approx(float(ce + lam * want), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- Eqs. 4-5


@given(blocks=st.lists(st.integers(1, 3), min_size=1, max_size=4), d_in=dims, d_out=dims, seed=seeds)
def test_block_diagonal_routing_is_a_mixture_of_loras(blocks, d_in, d_out, seed):
    r = sum(blocks)
    site = site64(d_in, d_out, r, 1.0, seed, r_delta=False)
    w = torch.randn(len(blocks), dtype=torch.float64)
    with torch.no_grad():
        site.R_old.copy_(torch.block_diag(*[wi * torch.eye(ri, dtype=torch.float64) for wi, ri in zip(w, blocks)]))
    mix, k = torch.zeros(d_out, d_in, dtype=torch.float64), 0
    for wi, ri in zip(w, blocks):  # Eqs. 4-5: sum_t w_t A_t B_t
        mix += wi * site.B[:, k:k + ri] @ site.A[k:k + ri]
        k += ri
    assert (site.delta_weight() - mix).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------------------- Theorem 3.1


@given(d_in=dims, d_out=dims, r=ranks, seed=seeds)
def test_theorem_3_1(d_in, d_out, r, seed):
    g = torch.Generator().manual_seed(seed)
    G, B, A, R_old, R_delta = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in
                               ((d_out, d_in), (d_out, r), (r, d_in), (r, r), (r, r)))
    for g_old, g_delta in ((G @ A.T @ R_old.T, G @ A.T @ R_delta.T),  # for B
                           (R_old.T @ B.T @ G, R_delta.T @ B.T @ G)):  # for A
        if (g_old * g_delta).sum() >= 0 and g_old.norm() > 1e-8:
            assert g_delta.norm() < (g_old + g_delta).norm()
    # under exact orthogonality the squared-norm gap is ||g_old||^2: make <g_old, g_delta> = 0 through R_delta
    M = G @ A.T
    P = R_old @ M.T @ M  # <M R_old^T, M R_delta^T>_F = <P, R_delta>_F
    assume(P.norm() > 1e-8)
    R_perp = R_delta - (P * R_delta).sum() / P.square().sum() * P
    g_old, g_delta = M @ R_old.T, M @ R_perp.T
    gap = (g_old + g_delta).square().sum() - g_delta.square().sum()
    assert abs(float(gap - g_old.square().sum())) <= 1e-8 * max(1.0, float(g_old.square().sum()))


@settings(max_examples=10)
@given(d=dims, r=ranks, seed=seeds)
def test_theorem_3_1_with_the_module_gradients(d, r, seed):
    """The stop-gradient step of B is g_delta and the naive one g_old + g_delta; where aligned it is smaller."""
    x, gy = torch.randn(9, d, dtype=torch.float64), torch.randn(9, d, dtype=torch.float64)
    grads = []
    for stopgrad in (True, False):
        site = site64(d, d, r, 1.0, seed, stopgrad)
        (site(x) * gy).sum().backward()
        grads.append(site.B.grad)
    g_delta, g_old = grads[0], grads[1] - grads[0]
    assume(float((g_old * g_delta).sum()) >= 0 and g_old.norm() > 1e-8)
    assert grads[0].norm() < grads[1].norm()


# ---------------------------------------------------------------------------------------------------- merge


@settings(max_examples=5)
@given(seed=seeds, tg=targets, s=scales)
def test_merged_weights_equal_the_adapter(seed, tg, s):
    m = method(seed=seed, targets=tg, scale=s)
    randomise_routes(m, seed)
    x = images(seed=seed)
    merged = m.merged().vit
    assert all(b.attn.qkv_adapter is None and b.attn.out_adapter is None for b in merged.blocks)
    f = m.vit(x)
    assert rel(merged(x), f) < 1e-5 and rel(f, tiny_vit(seed)(x)) > 1e-3  # the adapter does something
    bare = tiny_vit(seed).state_dict()
    assert all(torch.equal(v, bare[k]) for k, v in m.vit.state_dict().items() if k in bare)  # W0 untouched
    h = torch.randn(3, 5, TINY.embed_dim)
    for site in m.sites():
        assert rel(F.linear(h, site.delta_weight()), site(h)) < 1e-5


@pytest.mark.parametrize("head", ["cosine_proto", "linear"])
def test_merged_is_the_eval_forward_without_adapters(head):
    """After 3 tasks (R_delta != 0 too, so the fold covers both routes): merged()'s logits are the eval forward's
    (adapters in the forward, the same in train mode); it holds no adapter, shares no tensor with the method,
    building it changes no state, and it is a snapshot that later changes of the method do not reach."""
    m = method(lr=1e-2, schedule="constant", head=head)
    for t, classes in enumerate(([0, 1, 2], [3, 4, 5], [6, 7])):
        train_task(m, t, classes, steps=2, seed=t)
    randomise_routes(m, 1)
    x = images(8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    with torch.no_grad():
        z, plain = m(x), m.logits(bb.features(tiny_vit(0), x))
        merged = m.merged()
        zm = merged(x)
    assert z.shape == (8, 8) and rel(z, plain) > 1e-3  # the adapters change the logits
    torch.testing.assert_close(zm, z, rtol=0, atol=1e-5)
    assert not any(isinstance(mod, (c_lora.LoRASite, c_lora.QKVAdapter)) for mod in merged.modules())
    assert all(b.attn.qkv_adapter is None and b.attn.out_adapter is None for b in merged.vit.blocks)
    ours = {t.data_ptr() for t in (*m.parameters(), *m.buffers())}
    assert not any(t.data_ptr() in ours for t in (*merged.parameters(), *merged.buffers()))
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    m.train()
    with torch.no_grad():
        assert torch.equal(m(x), z)  # forward is one function, in train and eval mode
    randomise_routes(m, 2)
    with torch.no_grad():
        assert torch.equal(merged(x), zm) and rel(m.merged()(x), zm) > 1e-3


def test_double_after_an_evaluation():
    m = method(lr=1e-2, schedule="constant")
    train_task(m, 0, [0, 1, 2], steps=1)
    randomise_routes(m, 0)
    x = images()
    m.eval()
    with torch.no_grad():
        z = m(x)
        m.double()
        z64, zm64 = m(x.double()), m.merged()(x.double())
    assert z64.dtype == zm64.dtype == torch.float64
    torch.testing.assert_close(z64, z.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(zm64, z64, rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------------- the rest


@settings(max_examples=3)
@given(seed=seeds)
def test_training_moves_only_adapters_and_the_current_head(seed):
    m = method(seed=seed, lr=1e-2, schedule="constant")
    train_task(m, 0, [0, 1, 2], steps=3, seed=seed)
    trained = (".B", ".A", ".R_delta")
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.endswith(trained)}
    adapters = {k: v.clone() for k, v in m.state_dict().items() if k.endswith(trained)}
    assert not any(v.any() for k, v in adapters.items() if k.endswith("R_delta"))  # zeroed by end_task
    data = train_task(m, 1, [3, 4, 5], steps=3, seed=seed, end=False)
    now = m.state_dict()
    assert all(torch.equal(now[k], v) for k, v in frozen.items())  # W0, R_old and the old head
    assert all(not torch.equal(now[k], v) for k, v in adapters.items())  # A, B and R_delta all train
    m.end_task(1, [3, 4, 5], data)
    logits = m(next(iter(data.plain))[0])
    assert logits.shape[1] == 6 and torch.isfinite(logits).all()


def test_prototype_head_init():
    m = method(lr=1e-2, schedule="constant")
    data = train_task(m, 0, [0, 1, 2], steps=0, end=False)
    xs, ys = map(torch.cat, zip(*data.plain))
    with torch.no_grad():
        f = bb.features(m.vit, xs)
    means = torch.stack([f[ys == c].mean(0) for c in (0, 1, 2)])
    assert rel(m.heads[0].weight, F.normalize(means, dim=1)) < 1e-5  # prototype init before training
    torch.testing.assert_close(c_lora.class_means(m.vit, data.plain, [0, 1, 2]), means, rtol=1e-5, atol=1e-6)


def test_autocast_keeps_penalty_and_heads_in_float32():
    m = method(lambda_orth=0.1)
    train_task(m, 0, [0, 1, 2], steps=0)
    randomise_routes(m, 0)
    data = train_task(m, 1, [3, 4], steps=0, end=False)
    for site in m.sites():
        site.set_old_basis("r_old", 0.95)
    x, y = next(iter(data.train))
    plain = m.orth_penalty()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pen, logits, loss = m.orth_penalty(), m(x), m.loss(x, y)
    assert pen.dtype == logits.dtype == loss.dtype == torch.float32 and torch.equal(pen, plain)


@pytest.mark.parametrize("bad", [dict(rank=0), dict(targets="qx"), dict(targets=""), dict(targets="qq"),
                                 dict(orth_mode="full"), dict(head="mlp"), dict(lambda_orth=-1.0), dict(lr=0.0),
                                 dict(orth_energy=0.0), dict(epochs=0), dict(schedule="step"), dict(lr=float("nan")),
                                 dict(batch_size=0), dict(scale=0.0)])
def test_bad_config_is_a_value_error(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^--{name.replace('_', '-')} must be .*\\(got "):
        c_lora.CLoRA(tiny_vit(), 10, c_lora.Config(**bad))


def test_schedules():
    f = c_lora.one_cycle(100)
    assert f(0) == pytest.approx(1 / 25) and f(30) == pytest.approx(1.0) and f(100) == pytest.approx(1 / 25e4)
    assert f(1000) == f(100) and max(f(i) for i in range(101)) == pytest.approx(1.0)
    g = c_lora.cosine(10)
    assert g(0) == 1.0 and g(10) == pytest.approx(0.0) and g(20) == g(10)
