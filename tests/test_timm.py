"""Every method on timm's VisionTransformer: one state dict in backbone.ViT and in timm's model gives the same
logits and the same trainable gradients over two tasks (end_task included), and merging is exact on both; the
README's "Use a method in your own timm project" example runs as written."""
import copy
import dataclasses
import os
import re

import pytest
import torch
from conftest import run_task, synthetic_task
from test_backbone import perturbed_vit, timm_twin

import backbone as bb
from methods import METHODS

timm = pytest.importorskip("timm")

CONFIGS = {  # two tiny configurations (img 16: the conftest tasks' image size); patch, width, depth, heads vary
    "p4_d32_L4": bb.ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2),
    "p8_d48_L3": bb.ViTConfig(img_size=16, patch_size=8, embed_dim=48, depth=3, num_heads=3, mlp_ratio=2.0),
}
SMALL = dict(rank=2, epochs=1, batch_size=16, ca_epochs=1, ca_samples=16)  # the fields a Config has are used
TASKS = [[0, 1, 2], [3, 4, 5]]


def small_config(module):
    names = {f.name for f in dataclasses.fields(module.Config)}
    return dataclasses.replace(module.Config(), **{k: v for k, v in SMALL.items() if k in names})


def trainable_grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}


def assert_same(a, b, what):
    assert a.keys() == b.keys(), f"{what}: different keys {sorted(set(a) ^ set(b))[:4]}"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=lambda s: f"{what} {k}: {s}")


def logits(m, x):
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("name", METHODS)
def test_same_state_dict_same_logits_and_gradients_on_timm(name, cfg):
    module = METHODS[name]
    ours = perturbed_vit(cfg)
    ref = timm_twin(ours)
    torch.manual_seed(1)
    m_ours = module.Method(ours, 6, small_config(module))
    torch.manual_seed(1)
    m_timm = module.Method(ref, 6, small_config(module))
    m_timm.load_state_dict(m_ours.state_dict())  # one state dict for both
    trains = module.Config().epochs > 0  # simple_cil has nothing to train
    x = synthetic_task(range(6), n_per_class=2, seed=9).train.dataset.tensors[0]
    adapters_trained = False
    for t, classes in enumerate(TASKS):
        datas = []
        for m in (m_ours, m_timm):
            torch.manual_seed(10 + t)
            datas.append(run_task(m, t, classes, steps=2 if trains else 0, seed=t, end=False))
        grads = trainable_grads(m_timm)
        assert_same(trainable_grads(m_ours), grads, f"{name} task {t} gradients")
        adapters_trained |= any("adapter" in n and g.abs().sum() > 0 for n, g in grads.items())
        for m, data in zip((m_ours, m_timm), datas):
            torch.manual_seed(20 + t)
            m.end_task(t, classes, data)
        assert_same(m_ours.state_dict(), m_timm.state_dict(), f"{name} task {t} state after end_task")
        torch.testing.assert_close(logits(m_timm, x), logits(m_ours, x), atol=1e-5, rtol=0)
    assert adapters_trained == trains, f"{name}: the adapters on timm's model got no gradient"

    if hasattr(module.Method, "merge"):
        for m in (m_ours, m_timm):
            before = logits(m, x)
            m.merge()
            torch.testing.assert_close(logits(m, x), before, atol=1e-5, rtol=0, msg=lambda s: f"{name} merge: {s}")
        torch.testing.assert_close(logits(m_timm, x), logits(m_ours, x), atol=1e-5, rtol=0)
    if hasattr(module.Method, "merged"):
        folded = []
        for m in (m_ours, m_timm):
            merged = m.merged()
            assert type(merged.vit) is type(m.vit)
            with torch.no_grad():
                z = merged(x)
                torch.testing.assert_close(z, logits(m, x), atol=1e-5, rtol=0, msg=lambda s: f"{name} merged: {s}")
            folded.append(z)
        torch.testing.assert_close(folded[1], folded[0], atol=1e-5, rtol=0)


def readme_example() -> str:
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Use a method in your own timm project", 1)
    assert len(section) == 2, "README.md has no section 'Use a method in your own timm project'"
    blocks = re.findall(r"```python\n(.*?)```", section[1].split("\n## ", 1)[0], flags=re.S)
    assert len(blocks) == 1, "the section must hold exactly one python block"
    return blocks[0]


def test_readme_timm_example_runs_as_written():
    """The example exactly as written in README.md; it builds a small random timm ViT and its own data."""
    code = readme_example()
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md: Use a method in your own timm project", "exec"), namespace)
    method, vit = namespace["method"], namespace["vit"]
    assert isinstance(vit, timm.models.vision_transformer.VisionTransformer)
    lora = [p for n, p in method.named_parameters() if "qkv_adapter" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)  # LoRA trained on timm
    assert namespace["logits"].shape[1] == namespace["num_classes"]
