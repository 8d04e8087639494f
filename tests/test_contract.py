"""What every method in methods.METHODS must do, for each method and each of its main variants.

The variants come from the Config: every field named in VARIANT_FIELDS that a method's Config has gives one
case per value other than its default (the other choices in CHOICES, or the other boolean). Per case:
- a smoke run through train.py (digits, the first 2 of 9 tasks: 2 classes, then 1) writes its outputs with
  finite metrics and no NaN, and a run stopped after task 1 and resumed ends with the same results and
  checkpoint;
- through the contract hooks on the tiny ViT (tasks of 3, 1 and 1 classes): finite losses and logits over
  every seen class, and the backbone's own weights bit-identical afterwards (a method that merges into the
  backbone may change only the weights its header names as merged, and those must change).
Per method: every Config field is a documented train.py option, and CHOICES names Config fields.
"""
import ast
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import textwrap

import pytest
import torch

import backbone as bb
import train
from conftest import step, synthetic_task, tiny_vit
from methods import METHODS

VARIANT_FIELDS = ("variant", "ca", "kd_update")  # Config fields that select a method's main variants

# Methods whose header says they fold their adapters into the backbone during training: the backbone
# weights that may (and must) change. keep_lora shifts W at the start of a task and merges the trained
# adapter into W at its end, for the q, k, v rows of the fused qkv and for attn.proj in every block (its
# header); nothing else of the backbone changes.
MERGED = {"keep_lora": r"blocks\.\d+\.attn\.(qkv|proj)\.weight"}


def variants(module) -> list[tuple]:
    """() for the defaults, then (field, value) for every non-default value of a variant field."""
    cfg, out = module.Config(), [()]
    for f in dataclasses.fields(cfg):
        if f.name in VARIANT_FIELDS:
            default = getattr(cfg, f.name)
            others = [not default] if isinstance(default, bool) else [
                v for v in module.CHOICES.get(f.name, ()) if v != default]
            out += [(f.name, v) for v in others]
    return out


CASES = [pytest.param(name, v, id=name + ("" if not v else f"-{v[0]}={v[1]}"))
         for name, module in METHODS.items() for v in variants(module)]


def flags(variant: tuple) -> list[str]:
    if not variant:
        return []
    field, value = variant
    flag = "--" + field.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + field.replace("_", "-")]
    return [flag, str(value)]


# ----------------------------------------------------------------------------------------------------
# Through train.py

# digits in tasks of 2, 1, 1, ... classes; the first two tasks, one short epoch each (a few seconds per run)
RUN = ["--preset", "smoke", "--init-cls", "2", "--increment", "1", "--epochs", "1", "--batch-size", "64",
       "--quiet"]


def run_dir(out) -> str:
    (d,) = [os.path.join(out, x) for x in os.listdir(out)]
    return d


def without_times(obj):
    """The object with every timing entry (a number under a key naming seconds or time) removed, recursively."""
    if isinstance(obj, dict):
        return {k: without_times(v) for k, v in obj.items()
                if not (isinstance(v, (int, float)) and ("second" in k or "time" in k))}
    if isinstance(obj, list):
        return [without_times(v) for v in obj]
    return obj


def results(d) -> dict:
    with open(os.path.join(d, "results.json")) as f:
        return json.load(f)


def checkpoints(d) -> dict:
    return {f: torch.load(os.path.join(d, f), map_location="cpu", weights_only=True)
            for f in sorted(os.listdir(d)) if f.endswith(".pt")}


def assert_same(a, b, where="checkpoint"):
    """Equal structure and values; tensors bit-identical (timing entries ignored)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        a, b = without_times(a), without_times(b)
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {sorted(set(a) ^ set(b))[:5]}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.parametrize("name, variant", CASES)
def test_smoke_run_and_resume_equal_the_uninterrupted_run(tmp_path, monkeypatch, name, variant):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no plot (seconds per run); test_train covers it
    argv = ["--method", name, *RUN, *flags(variant)]
    assert train.main([*argv, "--stop-after", "2", "--out", str(tmp_path / "a")]) == 0  # NaN: exit 2
    a = run_dir(tmp_path / "a")
    assert {"config.json", "results.json", "acc_matrix.csv"} <= set(os.listdir(a))
    with open(os.path.join(a, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["run"]["method"] == name
    if variant:
        assert cfg["method_config"][variant[0]] == variant[1]
    r = results(a)
    assert r["tasks_done"] == 2 and r["task_sizes"] == [2] + [1] * 8
    assert [len(row) for row in r["acc_matrix"]] == [1, 2]
    assert all(finite(v) and 0 <= v <= 100 for row in r["acc_matrix"] for v in row)
    for k in ("last_acc", "avg_inc_acc", "forgetting", "forgetting_pilot", "bwt"):
        assert finite(r[k]), (k, r[k])
    assert len(r["curve"]) == 2 and all(finite(v) for v in r["curve"])
    for task in r["per_task"]:
        assert task["final_loss"] is None or finite(task["final_loss"]), task
        assert task["final_loss"] is not None or task["trainable_params"] == 0, task

    assert train.main([*argv, "--stop-after", "1", "--out", str(tmp_path / "b")]) == 0
    b = run_dir(tmp_path / "b")
    assert results(b)["tasks_done"] == 1
    assert train.main(["--resume", b, "--quiet", "--stop-after", "2"]) == 0
    assert without_times(results(b)) == without_times(r)
    ca, cb = checkpoints(a), checkpoints(b)
    assert ca and ca.keys() == cb.keys()
    assert_same(ca, cb)


# ----------------------------------------------------------------------------------------------------
# Through the contract hooks


def config(module, variant: tuple):
    return dataclasses.replace(module.Config(), **dict([variant])) if variant else module.Config()


def train_one_task(m, t, classes, steps=3) -> list[float]:
    """grow, begin_task, `steps` optimiser steps, end_task, as train.py drives them; the losses."""
    data = synthetic_task(classes, n_per_class=6, seed=t)
    m.grow(t, classes)
    m.begin_task(t, classes, data)
    opt, sched = m.optimizer(len(data.train))
    losses = []
    if opt is not None:
        m.train()
        for x, y in [b for _ in range(steps) for b in data.train][:steps]:
            losses += step(m, opt, x, y)
            if sched is not None:
                sched.step()
    m.end_task(t, classes, data)
    m.eval()
    return losses


@pytest.mark.parametrize("name, variant", CASES)
def test_frozen_backbone_and_one_class_tasks(name, variant):
    module = METHODS[name]
    vit = tiny_vit()
    before = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    m = module.Method(vit, 5, config(module, variant))
    seen = []
    for t, classes in enumerate([[0, 1, 2], [3], [4]]):  # tasks 2 and 3 have a single class
        losses = train_one_task(m, t, classes)
        assert all(math.isfinite(v) for v in losses), f"task {t + 1}: losses {losses}"
        seen += classes
        x = torch.cat([x for x, _ in synthetic_task(seen, n_per_class=2, seed=9).plain])
        with torch.no_grad():
            logits = m(x)
        assert logits.shape == (len(x), len(seen)) and torch.isfinite(logits).all(), f"task {t + 1}"
    vits = [mod for mod in m.modules() if isinstance(mod, bb.ViT)]
    assert vits, "the method holds no backbone"
    merged = re.compile(MERGED.get(name, r"(?!)"))
    for v in vits:
        after = v.state_dict()
        for k, w in before.items():
            if not merged.fullmatch(k):
                assert torch.equal(after[k], w), f"backbone weight {k} changed"
    if name in MERGED:  # what the method documents as merged did change (the first model: the trained one)
        after = vits[0].state_dict()
        assert any(not torch.equal(after[k], w) for k, w in before.items() if merged.fullmatch(k))


@pytest.mark.parametrize("name, variant", CASES)
def test_merged_model_and_dtype_conversion_after_evaluation(name, variant):
    """A linear method's merged() (what train.py evaluates) gives forward's logits with no adapter, no parameter
    shared with the method and the method's state untouched; every method converts with .double() after an
    evaluation and gives the same logits in float64 (nothing its forward needs lives outside its parameters and
    buffers)."""
    module = METHODS[name]
    torch.manual_seed(0)
    m = module.Method(tiny_vit(), 5, config(module, variant))
    for t, classes in enumerate([[0, 1, 2], [3, 4]]):
        train_one_task(m, t, classes)
    x = torch.cat([x for x, _ in synthetic_task(range(5), n_per_class=2, seed=9).plain])
    with torch.no_grad():
        logits = m(x)
        if hasattr(m, "merged"):
            state = {k: v.clone() for k, v in m.state_dict().items()}
            merged = m.merged()
            torch.testing.assert_close(merged(x), logits, atol=1e-4, rtol=1e-4)
            assert not [k for k in merged.state_dict() if "adapter" in k], "merged() kept adapters"
            assert {id(p) for p in merged.parameters()}.isdisjoint({id(p) for p in m.parameters()})
            after = m.state_dict()
            assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
        m.double()
        torch.testing.assert_close(m(x.double()), logits.double(), atol=1e-4, rtol=1e-4)
        if hasattr(m, "merged"):
            torch.testing.assert_close(m.merged()(x.double()), logits.double(), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# Options


def docstrings(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass, whitespace collapsed (train.py's help texts)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)}


@pytest.mark.parametrize("name", METHODS)
def test_every_config_field_is_a_documented_option(name, capsys):
    module = METHODS[name]
    with pytest.raises(SystemExit) as e:
        train.main(["--method", name, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    squeezed = "".join(text.split())  # argparse rewraps the help text
    docs = docstrings(module.Config)
    for f in dataclasses.fields(module.Config):
        flag = "--" + f.name.replace("_", "-")
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} is not a train.py option"
        assert docs.get(f.name, "").strip(), f"{name}.Config.{f.name} has no docstring (its --help text)"
        assert "".join(docs[f.name].split()) in squeezed, f"{flag}: its docstring is not its help text"


@pytest.mark.parametrize("name", METHODS)
def test_choices_name_config_fields_and_hold_the_default(name):
    module = METHODS[name]
    cfg = module.Config()
    fields = {f.name for f in dataclasses.fields(cfg)}
    for k, values in module.CHOICES.items():
        assert k in fields, f"{name}.CHOICES['{k}'] names no Config field"
        assert values and all(isinstance(v, str) for v in values), (k, values)
        assert getattr(cfg, k) in values, f"{name}: the default {k}={getattr(cfg, k)!r} is not among {values}"
