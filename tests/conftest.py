"""Shared test helpers: a tiny random ViT, synthetic class-dependent data, hypothesis profile."""
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import backbone as bb  # noqa: E402
from data import TaskLoaders  # noqa: E402

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and parallel test runs do not oversubscribe

TINY = bb.ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2)


def tiny_vit(seed: int = 0, cfg: bb.ViTConfig = TINY) -> bb.ViT:
    torch.manual_seed(seed)
    return bb.ViT(cfg).eval()


def synthetic_task(classes, n_per_class=8, img=16, seed=0, batch_size=16) -> TaskLoaders:
    """Class-dependent images (a per-class mean pattern plus noise); y are the given global labels."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in classes:
        mean = torch.rand(3, img, img, generator=torch.Generator().manual_seed(1000 + c))
        xs.append((mean + 0.1 * torch.randn(n_per_class, 3, img, img, generator=g)).clamp(0, 1))
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    ds = TensorDataset(torch.cat(xs), torch.cat(ys))
    train = DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    plain = DataLoader(ds, batch_size=batch_size, shuffle=False)
    return TaskLoaders(train=train, plain=plain)


def run_task(m, t, classes, steps=3, seed=0, end=True, n_per_class=6, batch_size=16) -> TaskLoaders:
    """grow, begin_task, `steps` optimiser steps (cycling the loader), end_task: the contract as train.py drives it."""
    data = synthetic_task(classes, n_per_class=n_per_class, seed=seed, batch_size=batch_size)
    m.grow(t, classes)
    m.begin_task(t, classes, data)
    opt, sched = m.optimizer(len(data.train))
    batches = [b for _ in range(steps) for b in data.train][:steps]
    for x, y in batches:
        step(m, opt, x, y)
        if sched is not None:
            sched.step()
    if end:
        m.end_task(t, classes, data)
    return data


def step(m, opt, x, y) -> list[float]:
    """One training batch as train.py does it: `loss` is a tensor (one optimiser step) or a generator that
    yields one loss per optimiser step (backward and step after each yield). Returns the losses."""
    out = m.loss(x, y)
    losses = [out] if isinstance(out, torch.Tensor) else out
    values = []
    for loss in losses:
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    return values


@pytest.fixture
def vit():
    return tiny_vit()
