"""Seconds per training step of every method, measured side by side in one process.

    python bench/step_time.py                       # cpu preset shapes: vit_small32, batch 64, fp32
    python bench/step_time.py --device cuda --backbone vit_base_patch16_224 --batch-size 128 --amp bf16
    python bench/step_time.py --methods cl_lora,cl_lora:kd_update=joint     # a variant: method:field=value,...
    python bench/step_time.py --methods seq_lora,seq_lora@bf16              # one entry under bf16 autocast

Each method is built on the same backbone, grown through two tasks of random 32 px images (so that methods
with a previous model, distillation or projections run their task-2 path), then timed for --steps training
batches after --warmup batches. A batch is what train.py does with one batch: loss, backward, optimizer step;
a method whose loss yields one loss per optimizer step (CL-LoRA's two-step update) takes all its steps. Methods are timed in interleaved rounds, so a change in
machine load hits all of them alike; the table reports the median over rounds and the ratio to seq_lora.
Results go to bench/results/step_time_<device>.json and are printed as a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import backbone as bb  # noqa: E402
from data import TaskLoaders  # noqa: E402
from methods import METHODS  # noqa: E402


def task_data(classes, n_per_class, img, batch, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(len(classes) * n_per_class, 3, img, img, generator=g) * 2 - 1
    y = torch.tensor(classes).repeat_interleave(n_per_class)
    ds = TensorDataset(x, y)
    return TaskLoaders(train=DataLoader(ds, batch_size=batch, shuffle=True, generator=g),
                       plain=DataLoader(ds, batch_size=256))


def variant(spec: str) -> tuple[str, dict]:
    """'cl_lora:kd_update=joint,rank=8' -> ('cl_lora', {'kd_update': 'joint', 'rank': 8}), typed by the Config."""
    name, _, rest = spec.partition(":")
    fields = {f.name: f for f in dataclasses.fields(METHODS[name].Config)}
    over = {}
    for kv in filter(None, rest.split(",")):
        k, v = kv.split("=", 1)
        typ = type(getattr(METHODS[name].Config(), k))
        over[k] = (v.lower() in ("1", "true", "yes")) if typ is bool else typ(v)
        assert k in fields, f"{name} has no option {k}"
    return name, over


def amp_of(spec: str, args) -> str:
    """'seq_lora@bf16' -> 'bf16'; without '@', the --amp of the command."""
    return spec.partition("@")[2] or args.amp


def build(spec, args):
    torch.manual_seed(0)
    vit, info = bb.create(args.backbone, args.weights)
    name, over = variant(spec.partition("@")[0])
    module = METHODS[name]
    cfg = dataclasses.replace(module.Config(), batch_size=args.batch_size, epochs=1000, **over)  # schedules never end
    m = module.Method(vit, 20, cfg).to(args.device)
    img = info["config"]["img_size"]
    for t in range(2):
        classes = list(range(10 * t, 10 * t + 10))
        data = task_data(classes, args.per_class, img, args.batch_size, t)
        m.grow(t, classes)
        m.to(args.device)
        m.begin_task(t, classes, data)
        if t == 0:
            m.end_task(t, classes, data)
    opt, sched = m.optimizer(len(data.train))
    x, y = next(iter(data.train))
    return m, opt, sched, x.to(args.device), y.to(args.device)


def step(m, opt, sched, x, y, args, amp):
    with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=amp == "bf16"):
        out = m.loss(x, y)
    for loss in [out] if isinstance(out, torch.Tensor) else out:  # a generator yields one loss per step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if sched is not None:
        sched.step()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(k for k in METHODS if k != "simple_cil"))
    p.add_argument("--backbone", default="vit_small32")
    p.add_argument("--weights", default="random")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-class", type=int, default=32, help="images per class of the random tasks")
    p.add_argument("--steps", type=int, default=5, help="timed steps per method and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="", help="results file (default: bench/results/step_time_<device>.json)")
    args = p.parse_args()
    names = args.methods.split(",")
    for n in names:
        if amp_of(n, args) not in ("none", "bf16"):
            p.error(f"{n}: the autocast after '@' must be bf16 or none")
    built = {}
    for n in names:
        built[n] = build(n, args)
        for _ in range(args.warmup):
            step(*built[n], args, amp_of(n, args))
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*built[n], args, amp_of(n, args))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[n].append((time.perf_counter() - t0) / args.steps)
    ref = statistics.median(times["seq_lora"]) if "seq_lora" in times else None
    rows = [{"method": n, "amp": amp_of(n, args), "seconds_per_step": statistics.median(times[n]),
             "ratio_to_seq_lora": statistics.median(times[n]) / ref if ref else None,
             "trainable_params": sum(q.numel() for g in built[n][1].param_groups for q in g["params"])}
            for n in names]
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"step_time_{args.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "rows": rows}, f, indent=1)
    print("| method | s/batch | ratio to seq_lora | trainable |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seconds_per_step']:.4f} | {r['ratio_to_seq_lora'] or float('nan'):.2f} | {r['trainable_params']:,} |")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
