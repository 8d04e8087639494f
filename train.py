"""Train and evaluate one class-incremental LoRA method: the CLI, the presets, the task loop and evaluation.

    python train.py --method cl_lora --tasks 10                      # the paper setting (GPU, ViT-B/16)
    python train.py --method seq_lora --preset cpu --tasks 10 --data-root DIR   # CIFAR-100, 32 px, 2 cores
    python train.py --method simple_cil --preset smoke               # offline, seconds
    python train.py --method sd_lora --preset cpu --help             # every option, with the value it takes
    python train.py --resume runs/<run>                              # continue after the last finished task

The method contract is in methods/__init__.py; the run directory (checkpoint, lock, outputs) in runs.py; the
metrics in metrics.py; torchrun support in distributed.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import re
import shlex
import sys
import time

import numpy as np
import torch

import backbone as bb
import data as cil_data
import distributed
import runs
from metrics import accuracy_curve, summary
from runs import UsageError
from methods import METHODS


# name: (default, help). A preset fills in the ones it names (presets() below); the parser shows them all.
OPTIONS = {
    "method": ("", "the method to run"),
    "preset": ("paper", "paper (ViT-B/16, 224 px, GPU), cpu (small ViT, 32 px, 2 cores), smoke (tiny ViT, digits)"),
    "tasks": (10, "number of equal tasks (B0-Inc(N/T)); not used with --init-cls"),
    "init_cls": (0, "classes in the first task (0: from --tasks)"),
    "increment": (0, "with --init-cls: classes in every later task, the remainder last (0: as many as --init-cls)"),
    "dataset": ("", "the dataset"),
    "protocol": ("", "official: the method's task split and class order (paper preset); common: --tasks, seed 1993"),
    "data_root": ("", "dataset folder, or a cifar100 .npz file ($CIL_DATA, else ./data)"),
    "weights": ("", "'random', a file holding a timm-layout state dict, or a pinned timm tag"),
    "backbone": ("", "a backbone.py preset (" + ", ".join(bb.PRESETS) + "), or timm:<architecture>"),
    "seed": (0, "training seed (initialisation, loader order, augmentation), 0 <= seed < 2**31"),
    "order_seed": (1993, "class-order seed: RandomState(seed).permutation (PILOT / iCaRL 1993)"),
    "natural_order": (False, "use the natural class order 0..N-1 instead of a seeded permutation (InfLoRA's configs)"),
    "device": ("", "cpu, cuda, cuda:N or mps"),
    "amp": ("", "mixed precision"),
    "normalize": ("", "weights: the weights' mean/std; none_01: inputs in [0, 1], the literature convention"),
    "train_aug": ("", "rrc (RandomResizedCrop scale 0.05-1 + flip), crop (pad-4 crop + flip) or none"),
    "workers": (0, "data-loader worker processes (at most the cores available; results do not depend on it)"),
    "eval_batch_size": (256, "batch size of evaluation and of the methods' data passes"),
    "out": ("runs", "folder that receives the run directory"),
    "resume": ("", "a run directory to continue after its last finished task"),
    "stop_after": (0, "stop after this many finished tasks (0: run all); continue later with --resume"),
    "quiet": (False, "no progress output"),
}
TrainArgs = dataclasses.make_dataclass("TrainArgs", [(k, type(d), d) for k, (d, _) in OPTIONS.items()], frozen=True)
CHOICES = {"preset": ("paper", "cpu", "smoke"), "dataset": cil_data.DATASETS, "protocol": ("official", "common"),
           "amp": ("none", "bf16", "fp16"), "normalize": ("weights", "none_01"), "train_aug": ("rrc", "crop", "none"),
           "method": tuple(METHODS)}
# options that may differ on --resume: not properties of the run (the weights are checked by content hash)
RESUME_FREE = {"resume", "device", "workers", "quiet", "out", "eval_batch_size", "data_root", "stop_after", "weights"}
PROGRESS_SECONDS = 10.0  # a progress line this often where stdout is not a terminal


def presets(method: str | None, dataset: str = "", protocol: str = "") -> dict:
    """Every value a preset gives; read when the parser is built, so --help shows what a run will use. The paper
    preset applies the method's OFFICIAL settings for the dataset; --protocol common, all but split and order."""
    module = METHODS.get(method)
    official = {k: v for k, v in getattr(module, "OFFICIAL", {}).get(dataset or "cifar100", {}).items()
                if protocol != "common" or k not in ("tasks", "order_seed", "natural_order")}
    return {
        "paper": {**dict(backbone="vit_base_patch16_224", weights=getattr(module, "PAPER_WEIGHTS",
                         "vit_base_patch16_224.augreg_in21k"), dataset=dataset or "cifar100", protocol="official",
                         amp="none", normalize="none_01", train_aug="rrc", workers=8), **official},
        # fp32: bf16 autocast measured slower per step for every method on the 2-core machine (README, Presets)
        "cpu": dict(backbone="vit_small32", weights=os.environ.get("CIL_WEIGHTS") or "weights/vit_small32_tin.pth",
                    dataset="cifar100", protocol="common", amp="none", normalize="weights", train_aug="rrc",
                    workers=0, epochs=3, batch_size=64),
        "smoke": dict(backbone="vit_tiny_test", weights="random", dataset="digits", protocol="common", amp="none",
                      normalize="weights", train_aug="none", workers=0, epochs=3, batch_size=32, tasks=5),
    }


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def is_path(w: str) -> bool:
    """A weights value that names a file (everything but 'random' and a timm tag such as 'arch.tag')."""
    return w != "random" and (os.path.exists(w) or "/" in w or os.sep in w
                              or w.endswith((".pth", ".pt", ".bin", ".safetensors")))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (train.py --help lists the options)")


def add_options(parser, title: str, specs, defaults: dict, choices: dict, notes: dict) -> None:
    group = parser.add_argument_group(title)
    for name, typ, doc in specs:
        flag, v = "--" + name.replace("_", "-"), defaults[name]
        help_ = f"{doc} (default: {v if v != '' else 'none'}{notes.get(name, '')})"
        if typ == "bool":
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=v, help=help_)
        else:
            group.add_argument(flag, dest=name, type={"int": int, "float": float, "str": str}[typ], default=v,
                               choices=choices.get(name), help=help_, metavar=None if name in choices else typ.upper())


RUN_SPECS = [(k, type(d).__name__, h) for k, (d, h) in OPTIONS.items()]


def parse(argv: list[str]) -> tuple[TrainArgs, object, dict | None]:
    """(run options, method Config, the resumed run's config.json or None): defaults <- preset <- the resumed
    run's options <- the command line. On --resume an option that contradicts the run is an error."""
    first = _Parser(add_help=False)
    for flag in ("--method", "--preset", "--resume", "--dataset", "--protocol"):
        first.add_argument(flag, choices=CHOICES.get(flag[2:]))
    known, _ = first.parse_known_args(argv)
    saved = runs.read_config(os.path.abspath(known.resume), METHODS, CHOICES["preset"]) if known.resume else None
    method = saved["run"]["method"] if saved else known.method
    module = METHODS.get(method)
    preset = saved["run"].get("preset") if saved else known.preset or "paper"
    dataset, protocol = (saved["run"].get(k) if saved else getattr(known, k) for k in ("dataset", "protocol"))
    pre = presets(method, dataset or "", protocol or "")[preset]
    run = {**{k: d for k, (d, _) in OPTIONS.items()}, **{k: v for k, v in pre.items() if k in OPTIONS},
           "method": method or "", "preset": preset, "data_root": os.path.abspath(os.environ.get("CIL_DATA") or "data"),
           "device": ("cuda" if distributed.local_rank() is None else f"cuda:{distributed.local_rank()}")
           if torch.cuda.is_available() else "cpu"}
    run["workers"] = min(run["workers"], cores())
    cfg = dataclasses.asdict(module.Config()) if module else {}
    notes = {k: f"; --preset {preset} overrides the paper's {cfg[k]}" if preset != "paper" else
             f": official {pre['dataset']} setting (Config: {cfg[k]})" for k in pre if k in cfg and pre[k] != cfg[k]}
    cfg.update({k: pre[k] for k in notes})
    if saved:  # the run's own options; the free ones from this command line, else the defaults (paths kept)
        kept = runs.checked(RUN_SPECS, saved["run"], "config.json 'run'")
        run.update({k: v for k, v in kept.items() if k not in RESUME_FREE or k in ("data_root", "weights")})
        cfg = runs.checked(runs.specs(module.Config), saved.get("method_config"), "config.json 'method_config'")
    p = _Parser(prog="train.py", description="Class-incremental learning with LoRA on a ViT. Methods: "
                + ", ".join(METHODS) + ". `--method NAME --help` lists the method's options too.")
    add_options(p, "run", RUN_SPECS, run, CHOICES, {})
    if module:
        add_options(p, f"method options ({module.__name__})", runs.specs(module.Config), cfg, module.CHOICES, notes)
    ns = vars(p.parse_args(argv))
    if not module:
        raise UsageError("--method is required (one of " + ", ".join(METHODS) + "), or --resume RUN_DIR")
    given = {k: ns[k] for k in run}
    given.update({k: os.path.abspath(given[k]) if given[k] else "" for k in ("data_root", "out", "resume")})
    given["weights"] = os.path.abspath(given["weights"]) if is_path(given["weights"]) else given["weights"]
    given["workers"] = min(given["workers"], cores()) if given["workers"] >= 0 else given["workers"]
    mcfg = {k: ns[k] for k in cfg}
    for new, old in ((given, run), (mcfg, cfg)) if saved else ():
        runs.same_run(given["resume"], {k: v for k, v in new.items() if k not in RESUME_FREE}, old)
    args = TrainArgs(**given)
    validate(args)
    try:
        module.validate(module.Config(**mcfg))
    except ValueError as e:
        raise UsageError(f"{method}: {e}") from None
    return args, module.Config(**mcfg), saved


def validate(args: TrainArgs) -> None:
    """Every run option that can be checked before data and weights are read (the method's options, lr, epochs and
    batch size included, are checked by the method's own `validate`, once)."""
    dev, cuda = args.device, re.fullmatch(r"cuda(:\d+)?", args.device)
    why = None if args.resume else runs.cannot_write(args.out)  # a probe file where the run directory will go
    problems = [
        (args.tasks < 1, f"--tasks must be at least 1 (got {args.tasks})"),
        (args.protocol == "official" and args.preset != "paper", f"--protocol official is for --preset paper (the "
         f"official settings are ViT-B/16 ones); --preset {args.preset} runs the common protocol"),
        (args.init_cls < 0 or args.increment < 0, "--init-cls and --increment must be >= 0"),
        (args.increment > 0 and args.init_cls == 0, "--increment needs --init-cls (the first task's classes)"),
        (not 0 <= args.seed < 2**31, f"--seed must be in [0, 2**31) (got {args.seed})"),
        (not 0 <= args.order_seed < 2**32, f"--order-seed must be in [0, 2**32) (got {args.order_seed})"),
        (args.workers < 0, f"--workers must be >= 0 (got {args.workers})"),
        (args.stop_after < 0, f"--stop-after must be >= 0 (got {args.stop_after})"),
        (args.eval_batch_size < 1, f"--eval-batch-size must be >= 1 (got {args.eval_batch_size})"),
        (args.backbone not in bb.PRESETS and not args.backbone.startswith("timm:"),
         f"--backbone must be one of {', '.join(bb.PRESETS)} or timm:<architecture> (got '{args.backbone}')"),
        (not re.fullmatch(r"cpu|mps|cuda(:\d+)?", dev), f"--device must be cpu, cuda, cuda:N or mps (got '{dev}')"),
        (cuda and int(dev[5:] or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0),
         f"--device {dev}: there is no such CUDA device here; use --device cpu"),
        (dev == "mps" and not torch.backends.mps.is_available(), "--device mps: no MPS device here; use --device cpu"),
        (args.amp == "fp16" and not cuda, f"--amp fp16 needs a CUDA device (device is {dev}); use --amp bf16 or none"),
        (args.amp == "bf16" and cuda and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(),
         "--amp bf16: this GPU has no bfloat16; use --amp fp16 or --amp none"),
        (why is not None, f"--out {args.out}: {why}")]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def task_seed(seed: int, t: int) -> int:
    """Every task starts from its own seed, so a resumed run replays exactly what a fresh one does."""
    return seed * 1000 + t + 1


def autocast(args: TrainArgs):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device_type=args.device.split(":")[0], dtype=dtype, enabled=dtype is not None)


class NonFiniteLoss(RuntimeError):
    pass


def train_task(method, loader, args: TrainArgs, t: int, epochs: int, dist: distributed.Dist) -> dict:
    """Epochs of batches. Per batch, `method.loss` gives one loss or a generator of losses, and after each
    loss: zero_grad, backward (GradScaler), gradient averaging (torchrun), step; the scheduler steps once per
    batch. The batch's loss (progress, NaN check: every 25 batches) is the sum of its losses."""
    opt, sched = method.optimizer(len(loader))
    stats = {"trainable_params": 0, "steps": 0, "optimizer_steps": 0, "train_seconds": 0.0, "loss": None}
    if opt is None or epochs == 0:
        return stats
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    stats["trainable_params"] = sum(p.numel() for p in params)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    show, tty, shown, t0 = not args.quiet and dist.rank == 0, sys.stdout.isatty(), time.time(), time.time()
    method.train()
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        pending, total, n = [], 0.0, 0
        bar = loader
        if show and tty:
            from tqdm import tqdm
            bar = tqdm(loader, desc=f"task {t + 1} epoch {epoch + 1}/{epochs}", leave=False, file=sys.stdout)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            n_global = dist.sum_(torch.tensor([len(y)], device=args.device)).item() if dist.world > 1 else len(y)
            with autocast(args):
                out = method.loss(x, y)
            losses, batch_loss = iter([out]) if isinstance(out, torch.Tensor) else out, 0.0
            while True:
                with autocast(args):  # a generator's forward runs when it is advanced
                    loss = next(losses, None)
                if loss is None:
                    break
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_gradients(params, len(y), n_global, dist)
                scaler.step(opt)
                scaler.update()
                batch_loss, stats["optimizer_steps"] = batch_loss + loss.detach().float(), stats["optimizer_steps"] + 1
            if sched is not None:
                sched.step()
            pending.append(torch.as_tensor(batch_loss, device=args.device))
            if len(pending) == 25 or step == len(loader) - 1:  # one sync every 25 batches
                losses_ = dist.sum_(torch.stack(pending)).cpu() / dist.world
                if not torch.isfinite(losses_).all():
                    bad = step - len(pending) + 1 + int((~torch.isfinite(losses_)).nonzero()[0])
                    raise NonFiniteLoss(f"the loss became {float(losses_[~torch.isfinite(losses_)][0])} at task "
                                        f"{t + 1}, epoch {epoch + 1}, step {bad + 1}; start a new run with a lower "
                                        f"--lr{' or --amp none' if args.amp != 'none' else ''} (a resumed run keeps "
                                        "its options; the last finished task's checkpoint is kept)")
                total, n, pending = total + float(losses_.sum()), n + len(losses_), []
                if bar is not loader:
                    bar.set_postfix(loss=f"{total / n:.4f}")
            if show and not tty and time.time() - shown >= PROGRESS_SECONDS:
                print(f"  task {t + 1} epoch {epoch + 1}/{epochs} step {step + 1}/{len(loader)}"
                      + (f" loss {total / n:.4f}" if n else ""), flush=True)
                shown = time.time()
            stats["steps"] += 1
        stats["loss"] = total / max(n, 1)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    stats["train_seconds"] = time.time() - t0
    return stats


@torch.no_grad()
def evaluate(method, stream, args: TrainArgs, t: int, dist: distributed.Dist) -> tuple[list[float], list[int]]:
    """Accuracy (%) on the test images of every task j <= t, predictions over all C_t seen classes; under torchrun
    each process scores every world-th image. A linear method is scored through its `merged()` inference model
    (adapters folded into a copy of the backbone), built here once and dropped after; any other by its forward."""
    method.eval()
    model = method.merged() if hasattr(method, "merged") else method
    T_of = np.repeat(np.arange(t + 1), [len(stream.tasks[j]) for j in range(t + 1)])
    correct, count = np.zeros(t + 1), np.zeros(t + 1)
    for x, y in stream.test_loader(t, dist.rank, dist.world):
        with autocast(args):
            logits = model(x.to(args.device))
        assert logits.shape[1] == len(T_of), f"forward gave {logits.shape[1]} logits for {len(T_of)} classes"
        pred, y = logits.argmax(1).cpu().numpy(), y.numpy()
        np.add.at(correct, T_of[y], pred == y)
        np.add.at(count, T_of[y], 1)
    both = dist.sum_(torch.tensor(np.stack([correct, count]), device=args.device)).cpu().numpy()
    return [round(float(100.0 * c / max(k, 1)), 4) for c, k in zip(both[0], both[1])], both[1].astype(np.int64).tolist()


def explained(e: Exception, args: TrainArgs) -> str:
    """A data or weights error with the next step a newcomer needs."""
    msg, w = str(e), args.weights
    if "weights_only" in msg:  # torch's advice to unpickle an unknown file is not ours to pass on
        msg = (f"--weights {w} is not a weights file (a state dict saved by torch.save, or .safetensors)"
               + ("; a .json is the sidecar that sits next to the weights file" if w.endswith(".json") else ""))
    for name in bb.PRESETS if "do not fit the backbone" in msg else ():  # weights of another preset: say which
        with contextlib.suppress(bb.WeightsError):
            msg += f"; these weights fit --backbone {name}" if name != args.backbone and bb.create(name, w) else ""
    if args.preset == "cpu" and is_path(w) and not os.path.exists(w):
        msg += ("; the cpu preset reads $CIL_WEIGHTS, else weights/vit_small32_tin.pth: set CIL_WEIGHTS or pass "
                "--weights")
    if args.preset == "paper" and not torch.cuda.is_available():
        msg += "; this machine has no CUDA: try --preset cpu"
    return msg


def setup(args: TrainArgs, cfg, saved: dict | None = None):
    """Data, backbone and method, and on --resume the checks that data and weights are the run's and the finished
    tasks' state -> (stream, method, pristine backbone state, weights info, identity, progress). Writes nothing."""
    ckpt = runs.read_checkpoint(args.resume) if args.resume else None
    splits = cil_data.load_dataset(args.dataset, args.data_root)
    N = splits.num_classes
    try:
        if args.init_cls > N or (not args.init_cls and args.tasks > N):
            raise ValueError(f"--{'init-cls' if args.init_cls else 'tasks'} {args.init_cls or args.tasks} is more "
                             f"than the {N} classes of {args.dataset}")
        init, inc = (args.init_cls, args.increment or args.init_cls) if args.init_cls else cil_data.equal_split(
            N, args.tasks)
        sizes = cil_data.task_sizes(N, init, inc)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.stop_after > len(sizes):
        raise UsageError(f"--stop-after {args.stop_after} is more than the run's {len(sizes)} tasks")
    order = cil_data.class_order(N, None if args.natural_order else args.order_seed)
    seed_everything(args.seed)  # a random backbone (smoke) is part of the seeded initialisation
    vit, winfo = bb.create(args.backbone, args.weights)
    base = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    train_tf, test_tf = cil_data.transforms(winfo["config"]["img_size"], splits.native_size, winfo["mean"],
                                            winfo["std"], args.normalize, args.train_aug)
    stream = cil_data.CIL(splits, order, sizes, train_tf, test_tf, cfg.batch_size, args.eval_batch_size,
                          args.workers, args.seed)
    try:
        method = METHODS[args.method].Method(vit, N, cfg).to(args.device)
    except ValueError as e:  # the methods check their Config in __init__
        raise UsageError(f"{args.method}: {e}") from None
    ident = {"weights_sha256": runs.state_hash(base), "backbone": args.backbone, "dataset": args.dataset,
             "class_order": stream.order, "task_sizes": stream.sizes}
    progress = runs.restore(args.resume, method.to(args.device), stream.tasks, ident, base, saved, ckpt)
    return stream, method, base, winfo, ident, progress


def run_task(method, stream, args: TrainArgs, cfg, dist: distributed.Dist, t: int, base: dict, ident: dict,
             progress: dict, run_dir: str) -> None:
    """Task t: grow, begin_task, train, end_task, evaluate; rank 0 writes the checkpoint, then the outputs."""
    classes = stream.tasks[t]
    seed_everything(task_seed(args.seed, t))
    t0 = time.time()
    data = stream.task_data(t)  # the whole task, in every process, for the hooks
    method.grow(t, classes)
    method.to(args.device).begin_task(t, classes, data)
    stats = train_task(method, stream.train_loader(t, dist.rank, dist.world), args, t, cfg.epochs, dist)
    seed_everything(task_seed(args.seed, t) + 500)  # the processes agree again whatever training drew
    method.end_task(t, classes, data)
    task_seconds, t1 = time.time() - t0, time.time()
    row, n_test = evaluate(method, stream, args, t, dist)
    eval_seconds, sd, steps = time.time() - t1, method.state_dict(), max(stats["steps"], 1)
    progress["acc"].append(row)
    progress["n_test"] = n_test
    progress["per_task"].append({
        "classes": [classes[0], classes[-1] + 1], "trainable_params": stats["trainable_params"],
        "stored_params": sum(v.numel() for v in sd.values()) - sum(v.numel() for v in base.values()),
        "steps": stats["steps"], "optimizer_steps": stats["optimizer_steps"], "final_loss": stats["loss"],
        "train_seconds": round(stats["train_seconds"], 3), "seconds_per_step": round(stats["train_seconds"] / steps, 5),
        "task_seconds": round(task_seconds, 3), "eval_seconds": round(eval_seconds, 3)})
    if dist.rank == 0:  # the checkpoint first: resume rewrites the outputs from it
        runs.write_checkpoint(run_dir, {"identity": ident, "progress": progress, "state": runs.method_state(sd, base)})
        runs.save_outputs(run_dir, progress, stream.sizes)
    old = f"old {np.dot(row[:-1], n_test[:-1]) / max(sum(n_test[:-1]), 1):.2f}, " if t else ""
    loss = f"loss {stats['loss']:.4f}, " if stats["loss"] is not None else ""
    print(f"task {t + 1}/{len(stream.sizes)} classes {classes[0]}-{classes[-1]}: acc "
          f"{accuracy_curve(progress['acc'], n_test)[-1]:.2f} ({old}new {row[-1]:.2f}), {loss}trainable "
          f"{stats['trainable_params']:,}, {task_seconds:.1f} s ({stats['train_seconds'] / steps:.3f} s/step), eval "
          f"{eval_seconds:.1f} s", flush=True)


def run(args: TrainArgs, cfg, dist: distributed.Dist, saved: dict | None, locks: contextlib.ExitStack) -> str:
    """The task loop. Only rank 0 writes (and prints: main mutes the others); `locks` holds the run's lock."""
    lead = dist.rank == 0
    if args.resume and lead:  # a second process on the same run directory refuses before reading anything
        locks.enter_context(runs.lock(args.resume))
    official = (*getattr(METHODS[args.method], "OFFICIAL", {}), "digits")  # digits: the smoke tests' dataset
    if lead and args.preset == "paper" and args.dataset not in official:
        print(f"train.py: note: {args.method} has no official config for {args.dataset}: it runs with its "
              "CIFAR-100 settings", file=sys.stderr, flush=True)
    try:
        stream, method, base, winfo, ident, progress = setup(args, cfg, saved)
    except (cil_data.DataError, bb.WeightsError) as e:
        raise UsageError(explained(e, args)) from None
    T = len(stream.sizes)
    for bad, message in [(args.preset == "paper" and args.device == "cpu", "--preset paper is the GPU setting ("
                          "ViT-B/16 at 224 px, the papers' epochs); on a CPU use --preset cpu"),
                         (any(len(c) == 1 for c in stream.tasks), f"{sum(len(c) == 1 for c in stream.tasks)} of the "
                          f"{T} tasks have a single class: a local cross-entropy over one class is 0, so such a task "
                          "learns nothing from it")]:
        if bad and lead:
            print(f"train.py: warning: {message}", file=sys.stderr, flush=True)
    run_dir = args.resume if args.resume or not lead else runs.new_run(args.out, f"{args.dataset}__{args.method}__s"
        f"{args.seed}", {"run": dataclasses.asdict(args), "method_config": dataclasses.asdict(cfg), "identity": ident,
                         "weights": winfo, "processes": dist.world, "command": sys.argv}, locks)
    run_dir = dist.broadcast(run_dir)
    again = "continue with: " + shlex.join([sys.executable, os.path.abspath(__file__), "--resume", run_dir])
    print(f"{args.method} on {args.dataset}: {T} tasks {stream.sizes[:3]}{'...' if T > 3 else ''}, {args.backbone} "
          f"({winfo['source']}), device {args.device} x {dist.world}, amp {args.amp}, workers {args.workers} -> "
          f"{run_dir}" + (f"; resuming after task {len(progress['acc'])}/{T}" if args.resume else ""))
    print("to continue this run if it stops: " + again.removeprefix("continue with: "), flush=True)
    try:
        if lead and progress["acc"]:  # outputs a failed write left behind the checkpoint are written again
            runs.save_outputs(run_dir, progress, stream.sizes)
        for t in range(len(progress["acc"]), T):
            if args.stop_after and t >= args.stop_after:
                print(f"stopped after task {t}/{T} (--stop-after); {again}")
                return run_dir
            run_task(method, stream, args, cfg, dist, t, base, ident, progress, run_dir)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(again) from None
    except runs.WriteError as e:
        raise runs.WriteError(f"{e}; the finished tasks are kept; once {run_dir} can be written, {again}") from None
    res = summary(progress["acc"], progress["n_test"])
    print(f"done: last {res['last_acc']:.2f}, average incremental {res['avg_inc_acc']:.2f}, forgetting "
          f"{res['forgetting']:.2f}, BWT {res['bwt']:.2f} -> {run_dir}", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg, saved = parse(sys.argv[1:] if argv is None else argv)
        dist, finished = distributed.init(), False
        try:  # ranks > 0 print nothing (method hooks print progress); their errors still reach stderr
            with contextlib.redirect_stdout(open(os.devnull, "w") if dist.rank > 0 else sys.stdout), \
                    contextlib.ExitStack() as locks:  # released however the run ends
                run(args, cfg, dist, saved, locks)
            finished = True
        finally:
            distributed.close(dist, finished)
    except (UsageError, cil_data.DataError, bb.WeightsError, NonFiniteLoss, runs.WriteError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, runs.WriteError) else 2  # 1: a write failed mid-run, finished tasks intact
    except KeyboardInterrupt as e:
        print("train.py: interrupted; " + (f"finished tasks are kept; {e}" if str(e) else "nothing was written"),
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
