"""Train and evaluate one class-incremental LoRA method: the CLI and the task loop.

    python train.py --method cl_lora --tasks 10                      # the paper setting (GPU, ViT-B/16)
    python train.py --method seq_lora --preset cpu --tasks 10 \\
        --data-root ../shared/data --weights ../shared/weights/vit_small32_cifar10.pth
    python train.py --method simple_cil --preset smoke --tasks 5     # offline, seconds
    python train.py --method sd_lora --help                          # the method's own options
    python train.py --resume runs/<run>                              # continue after the last finished task

Reads top to bottom: metrics, options and presets, the CLI, seeding, the run (data -> backbone -> method ->
task loop -> evaluation -> outputs and checkpoints), main. The method contract is in methods/__init__.py.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import backbone as bb
import data as cil_data
from methods import METHODS

# ----------------------------------------------------------------------------------------------------
# Metrics: pure functions of the accuracy matrix (protocol.md §4). acc[t][j] is the accuracy (%) after
# task t on the test images of task j (j <= t), n[j] the number of those images. Tasks are 0-indexed here.


def _square(acc) -> np.ndarray:
    T = len(acc)
    a = np.full((T, T), np.nan)
    for t, row in enumerate(acc):
        a[t, : len(row)] = row[: t + 1]
    return a


def accuracy_curve(acc, n) -> list[float]:
    """a_t: per-sample accuracy over all seen classes, sum_j n_j a_tj / sum_j n_j."""
    a, n = _square(acc), np.asarray(n, dtype=np.float64)
    return [float(np.dot(a[t, : t + 1], n[: t + 1]) / n[: t + 1].sum()) for t in range(len(a))]


def last_accuracy(acc, n) -> float:
    """A_T = a_T."""
    return accuracy_curve(acc, n)[-1]


def average_incremental_accuracy(acc, n) -> float:
    """A-bar = (1/T) sum_t a_t, stage 1 included."""
    return float(np.mean(accuracy_curve(acc, n)))


def forgetting(acc) -> float:
    """Chaudhry: mean over j < T of max_{t in [j, T-1)} a_tj - a_Tj (0 for one task)."""
    a = _square(acc)
    T = len(a)
    if T < 2:
        return 0.0
    return float(np.mean([a[j : T - 1, j].max() - a[T - 1, j] for j in range(T - 1)]))


def forgetting_pilot(acc) -> float:
    """PILOT: the max also runs over the last row, so every term is >= 0."""
    a = _square(acc)
    T = len(a)
    if T < 2:
        return 0.0
    return float(np.mean([a[j:T, j].max() - a[T - 1, j] for j in range(T - 1)]))


def backward_transfer(acc) -> float:
    """BWT = mean over j < T of a_Tj - a_jj."""
    a = _square(acc)
    T = len(a)
    if T < 2:
        return 0.0
    return float(np.mean([a[T - 1, j] - a[j, j] for j in range(T - 1)]))


def summary(acc, n) -> dict:
    return {
        "curve": accuracy_curve(acc, n),
        "last_acc": last_accuracy(acc, n),
        "avg_inc_acc": average_incremental_accuracy(acc, n),
        "forgetting": forgetting(acc),
        "forgetting_pilot": forgetting_pilot(acc),
        "bwt": backward_transfer(acc),
    }


# ----------------------------------------------------------------------------------------------------
# Options and presets


@dataclass(frozen=True)
class TrainArgs:
    method: str = ""
    """the method to run (see the list in --help)"""
    preset: str = "paper"
    """paper (ViT-B/16, 224 px, GPU), cpu (small ViT, 32 px, 2 cores) or smoke (tiny random ViT, digits)"""
    tasks: int = 10
    """number of equal tasks (B0-Inc(N/T)); ignored when --init-cls is given"""
    init_cls: int = 0
    """classes in the first task (0: from --tasks)"""
    increment: int = 0
    """classes in every later task, the remainder last (0: same as --init-cls)"""
    dataset: str = ""
    """cifar100, digits, imagenet_r or cub (default: the preset's)"""
    data_root: str = ""
    """dataset folder (default: $CIL_DATA, else ./data)"""
    weights: str = ""
    """'random', a file with a timm-layout state dict, or a pinned timm tag (default: the preset's)"""
    backbone: str = ""
    """backbone preset of backbone.py (default: the preset's)"""
    seed: int = 0
    """training seed (initialisation, loader order, augmentation)"""
    order_seed: int = 1993
    """class-order seed: RandomState(seed).permutation (PILOT / iCaRL 1993)"""
    natural_order: bool = False
    """use the natural class order 0..N-1 instead of a seeded permutation (InfLoRA's configs)"""
    device: str = ""
    """cpu, cuda, cuda:1, ... (default: cuda when available)"""
    amp: str = ""
    """mixed precision: none, bf16 or fp16 (default: the preset's)"""
    normalize: str = ""
    """weights: the weights' mean/std; none_01: inputs in [0, 1], the literature convention"""
    train_aug: str = ""
    """rrc (RandomResizedCrop scale 0.05-1 + flip), crop (pad-4 crop + flip) or none"""
    workers: int = -1
    """data-loader worker processes (default: the preset's)"""
    eval_batch_size: int = 256
    """batch size of evaluation and of the methods' data passes"""
    out: str = "runs"
    """folder that receives the run directory"""
    resume: str = ""
    """a run directory to continue after its last finished task"""
    stop_after: int = 0
    """stop after this many finished tasks (0: run all); continue later with --resume"""
    quiet: bool = False
    """no progress bars"""


CHOICES = {
    "preset": ("paper", "cpu", "smoke"),
    "dataset": cil_data.DATASETS,
    "amp": ("none", "bf16", "fp16"),
    "normalize": ("weights", "none_01"),
    "train_aug": ("rrc", "crop", "none"),
    "backbone": tuple(bb.PRESETS),
}

# Values a preset gives to options left unset. Method hyperparameters (lr, epochs, batch_size) keep the
# paper's values from each method's Config unless a preset lists them here.
PRESETS = {
    "paper": dict(backbone="vit_base_patch16_224", weights="vit_base_patch16_224.augreg_in21k",
                  dataset="cifar100", amp="none", normalize="none_01", train_aug="rrc", workers=8),
    # fp32, not bf16: on the 2-core benchmark machine bf16 autocast measured 2x slower per step at this
    # width (192) and batch (bench/README.md); --amp bf16 is there for CPUs where it pays
    "cpu": dict(backbone="vit_small32", weights="$CIL_WEIGHTS|weights/vit_small32_cifar10.pth",
                dataset="cifar100", amp="none", normalize="weights", train_aug="rrc", workers=0,
                epochs=3, batch_size=64),
    "smoke": dict(backbone="vit_tiny_test", weights="random", dataset="digits", amp="none",
                  normalize="weights", train_aug="none", workers=0, epochs=3, batch_size=32),
}
METHOD_KEYS_FROM_PRESET = ("epochs", "batch_size", "lr")
# options that may differ on --resume (not properties of the run)
RESUME_FREE = {"resume", "device", "workers", "quiet", "out", "eval_batch_size", "data_root", "stop_after"}


# ----------------------------------------------------------------------------------------------------
# CLI: argparse built from the dataclasses; the docstring under each field is its help text


class UsageError(ValueError):
    """A bad command line or a run directory that does not fit it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(f"{message} (train.py --help lists the options)")


def field_docs(cls) -> dict[str, str]:
    """The string literal under each field of a dataclass (read from its source)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def add_fields(parser, cls, choices: dict, group_title: str) -> None:
    group, docs = parser.add_argument_group(group_title), field_docs(cls)
    for f in dataclasses.fields(cls):
        flag, typ = "--" + f.name.replace("_", "-"), str(f.type).replace(" | None", "")
        default = f.default
        help_ = f"{docs.get(f.name, '')} (default: {default!r})"
        if typ == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, help=help_)
        else:
            conv = {"int": int, "float": float, "str": str}[typ]
            group.add_argument(flag, dest=f.name, type=conv, choices=choices.get(f.name), help=help_,
                               metavar=None if f.name in choices else typ.upper())


def build_parser(method_module=None) -> argparse.ArgumentParser:
    p = _Parser(prog="train.py", description="Class-incremental learning with LoRA on a ViT. Methods: "
                + ", ".join(METHODS) + ". `--method NAME --help` lists the method's options.",
                argument_default=argparse.SUPPRESS)
    add_fields(p, TrainArgs, {**CHOICES, "method": tuple(METHODS)}, "run")
    if method_module is not None:
        add_fields(p, method_module.Config, method_module.CHOICES, f"method options ({method_module.__name__})")
    return p


def parse(argv: list[str]) -> tuple[dict, dict]:
    """(explicit run options, explicit method options) as given on the command line."""
    pre = _Parser(add_help=False, argument_default=argparse.SUPPRESS)
    pre.add_argument("--method")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    method = getattr(known, "method", None)
    if method is None and getattr(known, "resume", None):
        method = read_run_config(known.resume)["run"]["method"]
    if method is not None and method not in METHODS:
        raise UsageError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    module = METHODS[method] if method else None
    ns = vars(build_parser(module).parse_args(argv))
    if method is None:
        raise UsageError("--method is required (one of " + ", ".join(METHODS) + "), or --resume RUN_DIR")
    cfg_names = {f.name for f in dataclasses.fields(module.Config)}
    run = {k: v for k, v in ns.items() if k not in cfg_names}
    run["method"] = method
    return run, {k: v for k, v in ns.items() if k in cfg_names}


def resolve(run_given: dict, cfg_given: dict) -> tuple[TrainArgs, object]:
    """Defaults <- preset <- command line; then validation of everything that can be checked early."""
    preset = run_given.get("preset", TrainArgs.preset)
    values = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    values.update({k: v for k, v in PRESETS[preset].items() if k in values})
    if preset == "paper" and hasattr(METHODS[run_given["method"]], "PAPER_WEIGHTS"):
        values["weights"] = METHODS[run_given["method"]].PAPER_WEIGHTS  # a method whose paper used other weights
    values.update(run_given)
    if values["weights"].startswith("$CIL_WEIGHTS|"):
        values["weights"] = os.environ.get("CIL_WEIGHTS") or values["weights"].split("|", 1)[1]
    values["data_root"] = values["data_root"] or os.environ.get("CIL_DATA") or "data"
    local = os.environ.get("LOCAL_RANK")  # set by torchrun: one GPU per process
    values["device"] = values["device"] or (
        ("cuda" if local is None else f"cuda:{local}") if torch.cuda.is_available() else "cpu")
    args = TrainArgs(**values)
    module = METHODS[args.method]
    cfg_values = {k: v for k, v in PRESETS[preset].items() if k in METHOD_KEYS_FROM_PRESET}
    cfg_values.update(cfg_given)
    cfg = dataclasses.replace(module.Config(), **cfg_values)
    validate(args, cfg)
    return args, cfg


def validate(args: TrainArgs, cfg) -> None:
    if args.tasks < 1:
        raise UsageError(f"--tasks must be at least 1 (got {args.tasks})")
    if args.init_cls < 0 or args.increment < 0:
        raise UsageError("--init-cls and --increment must be positive")
    if getattr(cfg, "lr", 0.0) < 0 or not math.isfinite(getattr(cfg, "lr", 0.0)):
        raise UsageError(f"--lr must be a finite number >= 0 (got {cfg.lr})")
    if getattr(cfg, "epochs", 0) < 0:
        raise UsageError(f"--epochs must be >= 0 (got {cfg.epochs})")
    if getattr(cfg, "batch_size", 1) < 1 or args.eval_batch_size < 1:
        raise UsageError("--batch-size and --eval-batch-size must be >= 1")
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {dev}: no CUDA device here; use --device cpu")
    if dev not in ("cpu",) and not dev.startswith("cuda") and dev != "mps":
        raise UsageError(f"--device must be cpu, cuda, cuda:N or mps (got '{dev}')")
    if args.amp == "fp16" and not dev.startswith("cuda"):
        raise UsageError(f"--amp fp16 needs a CUDA device (device is {dev}); use --amp bf16 or --amp none")
    if args.amp == "bf16" and dev.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise UsageError("--amp bf16: this GPU has no bfloat16; use --amp fp16 or --amp none")
    if args.resume and not os.path.isfile(os.path.join(args.resume, "config.json")):
        raise UsageError(f"--resume {args.resume}: not a run directory (no config.json); check the path")


def read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {run_dir}: not a run directory (no config.json); check the path")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume {run_dir}: config.json is unreadable ({e})") from None


def merge_resume(run_given: dict, cfg_given: dict) -> tuple[dict, dict]:
    """On --resume the saved options rule; an explicit option that contradicts them is an error."""
    saved = read_run_config(run_given["resume"])
    run_saved, cfg_saved = dict(saved["run"]), dict(saved["method_config"])
    for given, have in ((run_given, run_saved), (cfg_given, cfg_saved)):
        for k, v in given.items():
            if k not in RESUME_FREE and k in have and have[k] != v:
                raise UsageError(f"--resume {run_given['resume']}: the run has {k.replace('_', '-')}="
                                 f"{have[k]!r}, not {v!r}; start a new run instead")
    for k in RESUME_FREE:  # not properties of the run: from this command line, else the defaults
        run_saved.pop(k, None)
        if k in run_given:
            run_saved[k] = run_given[k]
    return run_saved, cfg_saved


# ----------------------------------------------------------------------------------------------------
# Seeding


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def task_seed(seed: int, t: int) -> int:
    """Every task starts from its own seed, so a resumed run replays exactly what a fresh one does."""
    return seed * 1000 + t + 1


# ----------------------------------------------------------------------------------------------------
# The run


def setup(args: TrainArgs, cfg):
    """Data, backbone and method; raises a one-line error for anything wrong, writes nothing."""
    splits = cil_data.load_dataset(args.dataset, args.data_root)
    N = splits.num_classes
    if args.init_cls:
        init, inc = args.init_cls, args.increment or args.init_cls
        if init > N:
            raise UsageError(f"--init-cls {init} is more than the {N} classes of {args.dataset}")
    else:
        if args.tasks > N:
            raise UsageError(f"--tasks {args.tasks} is more than the {N} classes of {args.dataset}")
        try:
            init, inc = cil_data.equal_split(N, args.tasks)
        except ValueError as e:
            raise UsageError(str(e)) from None
    try:
        sizes = cil_data.task_sizes(N, init, inc)
    except ValueError as e:
        raise UsageError(str(e)) from None
    order = cil_data.class_order(N, None if args.natural_order else args.order_seed)
    seed_everything(args.seed)  # a random backbone (smoke) is part of the seeded initialisation
    vit, winfo = bb.create(args.backbone, args.weights)
    train_tf, test_tf = cil_data.transforms(vit.cfg.img_size, splits.native_size, winfo["mean"], winfo["std"],
                                            args.normalize, args.train_aug)
    stream = cil_data.CIL(splits, order, sizes, train_tf, test_tf, cfg.batch_size, args.eval_batch_size,
                          args.workers, args.seed)
    base_numel = numel(vit.state_dict())
    try:
        method = METHODS[args.method].Method(vit, N, cfg).to(args.device)
    except ValueError as e:  # the methods check their Config in __init__
        raise UsageError(f"{args.method}: {e}") from None
    return stream, method, winfo, base_numel


def numel(state: dict) -> int:
    """Elements stored in a state dict, each tensor counted once even if a module is registered twice."""
    seen = {(v.data_ptr(), v.numel(), v.dtype) for v in state.values()}
    return sum(n for _, n, _ in seen)


def autocast(args: TrainArgs):
    if args.amp == "none":
        return torch.autocast(device_type=args.device.split(":")[0], enabled=False)
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(device_type=args.device.split(":")[0], dtype=dtype)


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (rank 0 of 1 otherwise)."""
    rank: int = 0
    world: int = 1

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place across processes; a no-op in one process."""
        if self.world > 1:
            torch.distributed.all_reduce(x)
        return x


def init_dist() -> Dist:
    """torch.distributed from torchrun's environment: NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("CIL_DIST_BACKEND") != "gloo" else "gloo"
    torch.distributed.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Dist(torch.distributed.get_rank(), world)


def average_gradients(params: list[torch.Tensor], n_local: int, n_global: int, dist: Dist) -> None:
    """grad <- sum over processes of (n_local / n_global) * local grad: the gradient of the global batch mean."""
    grads = [p.grad for p in params if p.grad is not None]
    if dist.world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]) * (n_local / n_global)
    dist.sum_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train_task(method, loader, args: TrainArgs, t: int, epochs: int, dist: Dist) -> dict:
    """Epochs of loss -> backward -> (gradient averaging) -> step. NaN/inf is checked every 25 steps."""
    from tqdm import tqdm

    opt, sched = method.optimizer(len(loader))
    stats = {"trainable_params": 0, "steps": 0, "train_seconds": 0.0, "loss": None}
    if opt is None or epochs == 0:
        return stats
    params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    stats["trainable_params"] = sum(p.numel() for p in params)
    scaler = torch.amp.GradScaler(enabled=args.amp == "fp16")
    method.train()
    t0 = time.time()
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        pending, total, n = [], 0.0, 0
        bar = tqdm(loader, desc=f"task {t + 1} epoch {epoch + 1}/{epochs}", leave=False,
                   disable=args.quiet or dist.rank > 0 or not sys.stderr.isatty())
        for step, (x, y) in enumerate(bar):
            x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
            with autocast(args):
                loss = method.loss(x, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if dist.world > 1:
                n_global = dist.sum_(torch.tensor([len(y)], device=args.device)).item()
                average_gradients(params, len(y), n_global, dist)
            scaler.step(opt)
            scaler.update()
            if sched is not None:
                sched.step()
            pending.append(loss.detach().float())
            if len(pending) == 25 or step == len(loader) - 1:  # one sync every 25 steps
                losses = dist.sum_(torch.stack(pending)).cpu() / dist.world
                if not torch.isfinite(losses).all():
                    bad = step - len(pending) + 1 + int((~torch.isfinite(losses)).nonzero()[0])
                    raise NonFiniteLoss(f"the loss became {float(losses[~torch.isfinite(losses)][0])} at task "
                                        f"{t + 1}, epoch {epoch + 1}, step {bad + 1}; lower --lr or use "
                                        "--amp none. The checkpoint of the last finished task is kept")
                total, n, pending = total + float(losses.sum()), n + len(losses), []
                bar.set_postfix(loss=f"{total / n:.4f}")
            stats["steps"] += 1
        stats["loss"] = total / max(n, 1)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    stats["train_seconds"] = time.time() - t0
    return stats


@torch.no_grad()
def evaluate(method, stream, args: TrainArgs, t: int, dist: Dist) -> tuple[list[float], list[int]]:
    """Accuracy (%) on the test images of every task j <= t, predictions over all C_t seen classes.

    Under torchrun each process scores every world-th test image and the counts are summed.
    """
    method.eval()
    T_of = np.repeat(np.arange(t + 1), [len(stream.tasks[j]) for j in range(t + 1)])
    correct, count = np.zeros(t + 1), np.zeros(t + 1)
    for x, y in stream.test_loader(t, dist.rank, dist.world):
        with autocast(args):
            logits = method(x.to(args.device))
        assert logits.shape[1] == len(T_of), f"forward gave {logits.shape[1]} logits for {len(T_of)} classes"
        pred = logits.argmax(1).cpu().numpy()
        y = y.numpy()
        np.add.at(correct, T_of[y], pred == y)
        np.add.at(count, T_of[y], 1)
    both = dist.sum_(torch.tensor(np.stack([correct, count]), device=args.device)).cpu().numpy()
    correct, count = both[0], both[1].astype(np.int64)
    return [round(100.0 * c / max(k, 1), 4) for c, k in zip(correct, count)], count.tolist()


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj) -> None:
    def w(p):
        with open(p, "w") as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, w)


def new_run_dir(args: TrainArgs) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join(args.out, f"{args.dataset}__{args.method}__s{args.seed}__{stamp}")
    path, k = base, 1
    while os.path.exists(path):
        path, k = f"{base}-{k}", k + 1
    os.makedirs(path)
    return path


def save_outputs(run_dir: str, state: dict, stream) -> None:
    acc, n = state["acc"], state["n_test"]
    res = {**summary(acc, n), "acc_matrix": acc, "n_test": n, "tasks_done": len(acc),
           "task_sizes": stream.sizes, "per_task": state["per_task"]}
    res["seen_test_samples"] = [int(sum(n[: t + 1])) for t in range(len(acc))]
    write_json(os.path.join(run_dir, "results.json"), res)

    def w(p):
        with open(p, "w") as f:
            T = len(stream.sizes)
            f.write("after_task," + ",".join(f"task_{j + 1}" for j in range(T)) + "\n")
            for t, row in enumerate(acc):
                f.write(f"{t + 1}," + ",".join(f"{v:.2f}" for v in row) + "," * (T - len(row)) + "\n")
    atomic_write(os.path.join(run_dir, "acc_matrix.csv"), w)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(acc) + 1), res["curve"], marker="o")
    ax.set(xlabel="task", ylabel="accuracy on all seen classes (%)", title=os.path.basename(run_dir)[:60])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(os.path.join(run_dir, "acc_curve.png"), lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def run(args: TrainArgs, cfg, dist: Dist = Dist()) -> str:
    stream, method, winfo, base_numel = setup(args, cfg)
    T = len(stream.sizes)
    lead = dist.rank == 0  # only rank 0 prints and writes

    def log(msg: str) -> None:
        if lead:
            print(msg, flush=True)

    state = {"acc": [], "n_test": [], "per_task": []}
    if args.resume:
        run_dir = args.resume
        done = json.load(open(os.path.join(run_dir, "state.json"))) if os.path.isfile(
            os.path.join(run_dir, "state.json")) else state
        k = len(done["acc"])
        if k:
            for t in range(k):
                method.grow(t, stream.tasks[t])
            method.to(args.device)
            try:
                sd = torch.load(os.path.join(run_dir, f"checkpoint_task{k}.pt"), map_location=args.device,
                                weights_only=True)
                method.load_state_dict(sd, strict=True)
            except Exception as e:  # noqa: BLE001 - a corrupt or foreign checkpoint: one clear line
                raise UsageError(f"--resume {run_dir}: the checkpoint cannot be loaded ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); start a new run") from None
            state = done
        log(f"resuming {run_dir} after task {k}/{T}")
    else:
        run_dir = new_run_dir(args) if lead else ""
        if dist.world > 1:
            box = [run_dir]
            torch.distributed.broadcast_object_list(box, src=0)
            run_dir = box[0]
        if lead:
            write_json(os.path.join(run_dir, "config.json"), {
                "run": dataclasses.asdict(args), "method_config": dataclasses.asdict(cfg),
                "class_order": stream.order, "task_sizes": stream.sizes, "weights": winfo,
                "processes": dist.world, "git_sha": git_sha(), "torch": torch.__version__, "command": sys.argv})
    log(f"{args.method} on {args.dataset}: {T} tasks {stream.sizes[:3]}{'...' if T > 3 else ''}, "
        f"{args.backbone} ({winfo['source']}), device {args.device} x {dist.world}, amp {args.amp} -> {run_dir}")

    for t in range(len(state["acc"]), T):
        if args.stop_after and t >= args.stop_after:
            log(f"stopped after task {t}/{T} (--stop-after); continue with --resume {run_dir}")
            return run_dir
        classes = stream.tasks[t]
        seed_everything(task_seed(args.seed, t))
        t0 = time.time()
        data = stream.task_data(t)  # the whole task, in every process, for the hooks
        method.grow(t, classes)
        method.to(args.device)
        method.begin_task(t, classes, data)
        stats = train_task(method, stream.train_loader(t, dist.rank, dist.world), args, t, cfg.epochs, dist)
        seed_everything(task_seed(args.seed, t) + 500)  # the processes agree again whatever training drew
        method.end_task(t, classes, data)
        task_seconds = time.time() - t0
        t1 = time.time()
        row, n_test = evaluate(method, stream, args, t, dist)
        sd = method.state_dict()
        stored = numel(sd) - base_numel
        state["acc"].append(row)
        state["n_test"] = n_test
        state["per_task"].append({
            "classes": [classes[0], classes[-1] + 1], "trainable_params": stats["trainable_params"],
            "stored_params": stored, "steps": stats["steps"], "final_loss": stats["loss"],
            "train_seconds": round(stats["train_seconds"], 3),
            "seconds_per_step": round(stats["train_seconds"] / max(stats["steps"], 1), 5),
            "task_seconds": round(task_seconds, 3), "eval_seconds": round(time.time() - t1, 3)})
        if lead:
            # checkpoint first, then the state that points at it, then drop the older checkpoint: a kill at
            # any moment leaves a state.json whose checkpoint exists
            atomic_write(os.path.join(run_dir, f"checkpoint_task{t + 1}.pt"), lambda p: torch.save(sd, p))
            write_json(os.path.join(run_dir, "state.json"), state)
            if os.path.exists(os.path.join(run_dir, f"checkpoint_task{t}.pt")):
                os.remove(os.path.join(run_dir, f"checkpoint_task{t}.pt"))
            save_outputs(run_dir, state, stream)
        a = accuracy_curve(state["acc"], n_test)[-1]
        old = f"old {np.dot(row[:-1], n_test[:-1]) / max(sum(n_test[:-1]), 1):.2f}, " if t else ""
        loss = f"loss {stats['loss']:.4f}, " if stats["loss"] is not None else ""
        log(f"task {t + 1}/{T} classes {classes[0]}-{classes[-1]}: acc {a:.2f} ({old}new {row[-1]:.2f}), "
            f"{loss}trainable {stats['trainable_params']:,}, {task_seconds:.1f} s "
            f"({stats['train_seconds'] / max(stats['steps'], 1):.3f} s/step), eval {time.time() - t1:.1f} s")
    res = summary(state["acc"], state["n_test"])
    log(f"done: last {res['last_acc']:.2f}, average incremental {res['avg_inc_acc']:.2f}, "
        f"forgetting {res['forgetting']:.2f}, BWT {res['bwt']:.2f} -> {run_dir}")
    return run_dir


# ----------------------------------------------------------------------------------------------------
# Main: every expected failure is one line on stderr and exit code 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run_given, cfg_given = parse(argv)
        if "resume" in run_given:
            run_given, cfg_given = merge_resume(run_given, cfg_given)
        args, cfg = resolve(run_given, cfg_given)
        dist = init_dist()
        # ranks > 0 print nothing (method hooks print progress); their errors still reach stderr
        mute = open(os.devnull, "w") if dist.rank > 0 else None
        try:
            with contextlib.redirect_stdout(mute or sys.stdout):
                run(args, cfg, dist)
        finally:
            if mute is not None:
                mute.close()
            if dist.world > 1:
                torch.distributed.destroy_process_group()
    except (UsageError, cil_data.DataError, bb.WeightsError, NonFiniteLoss) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; finished tasks are kept, continue with --resume RUN_DIR", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
