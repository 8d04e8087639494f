"""A run directory for train.py: its identity (weights hash, lock), the checkpoint, and every file it writes.

Every write goes to `name.tmp` first and replaces `name` only when complete, so a kill or a full disk at any
moment leaves the last finished task's files; a failed write removes its .tmp and raises WriteError, one line
naming the path and the OS reason ("no space left on device").
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import torch

import metrics

ADDED = ("later_lr", "optimizer", "head_lr")  # Config fields added with --protocol: their defaults reproduce old runs

class UsageError(ValueError):
    """A bad command line or a run directory that does not fit it."""


class WriteError(OSError):
    """A file of the run could not be written (the files written before it are intact)."""


def reason(e: OSError) -> str:
    """The OS's words for an error, lower case: 'no space left on device'."""
    why = e.strerror or str(e) or type(e).__name__
    return why[:1].lower() + why[1:]


def cannot_write(folder: str) -> str | None:
    """None if files can be created in `folder` or, where it does not exist yet, in its nearest existing parent
    (a probe file, removed at once), else why not. Unlike os.access this asks the filesystem itself (root passes
    os.access on a read-only or virtual filesystem)."""
    top = folder
    while not os.path.exists(top):
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        return f"{top} is a file"
    try:
        fd, probe = tempfile.mkstemp(prefix=".train-probe-", dir=top)
    except OSError as e:
        return f"cannot write in {top}: {reason(e)}"
    os.close(fd)
    os.remove(probe)
    return None


def write_bytes(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise WriteError(f"cannot write {path}: {reason(e)}") from None


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def specs(cls) -> list[tuple[str, str, str]]:
    """(name, type name, help) of every field of a method Config: the string literal under each field."""
    try:
        body = ast.parse(inspect.getsource(cls)).body[0].body
    except (OSError, TypeError):
        body = []
    docs = {a.target.id: " ".join(str(b.value.value).split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    return [(f.name, str(f.type).replace(" | None", ""), docs.get(f.name, "")) for f in dataclasses.fields(cls)]


def checked(specs, values, where: str) -> dict:
    """A saved dict of options: every one present and of its declared type."""
    names = {name for name, _, _ in specs}
    if not isinstance(values, dict) or set(values) != names:
        diff = sorted(names ^ set(values)) if isinstance(values, dict) else ["(not an object)"]
        raise UsageError(f"{where} does not match this version's options ({', '.join(diff[:4])})")
    for name, typ, _ in specs:
        v = values[name]
        if isinstance(v, bool) != (typ == "bool") or not isinstance(v, {"int": int, "float": (int, float),
                                                                        "str": str, "bool": bool}[typ]):
            raise UsageError(f"{where}: '{name}' must be {typ} (got {v!r})")
    return values


def read_config(run_dir: str, methods, presets) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"--resume {run_dir}: not a run directory (no config.json); check the path")
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--resume {run_dir}: config.json is unreadable ({e})") from None
    run = saved.get("run") if isinstance(saved, dict) else None
    if not (isinstance(run, dict) and isinstance(saved.get("identity"), dict) and run.get("method") in methods
            and run.get("preset") in presets):
        raise UsageError(f"--resume {run_dir}: config.json is not a run configuration of this train.py")
    # a run made before --protocol and the per-dataset options: the common protocol and those options' defaults,
    # which are what it ran
    run.setdefault("protocol", "common")
    if isinstance(saved.get("method_config"), dict):
        defaults = dataclasses.asdict(methods[run["method"]].Config())
        saved["method_config"] = {**{k: defaults[k] for k in ADDED if k in defaults}, **saved["method_config"]}
    return saved


def lock(run_dir: str):
    """An exclusive lock on run_dir/.lock, held while the file stays open: a second process refuses."""
    path = os.path.join(run_dir, ".lock")
    try:
        f = open(path, "a")
    except OSError as e:
        raise UsageError(f"{run_dir}: cannot write {path}: {reason(e)}; a run continues only where it can "
                         "write (copy the run directory to a writable place and --resume the copy)") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"{run_dir} is in use by another train.py process; wait until it ends") from None
    return f


def new_run(out: str, name: str, config: dict, locks: contextlib.ExitStack) -> str:
    """out/name__date-time (-1, -2, ... if taken), locked, with its config.json (`config` plus the code's git commit
    and torch version); removed again if that fails."""
    name, k = f"{name}__{datetime.datetime.now():%Y%m%d-%H%M%S}", 0
    config = {**config, "git_sha": git_sha(), "torch": torch.__version__}
    while os.path.exists(run_dir := os.path.join(out, name + (f"-{k}" if k else ""))):
        k += 1
    try:
        os.makedirs(run_dir)
    except OSError as e:
        raise WriteError(f"cannot create {run_dir}: {reason(e)}") from None
    try:
        locks.enter_context(lock(run_dir))
        write_text(os.path.join(run_dir, "config.json"), json.dumps(config, indent=1))
    except (UsageError, WriteError):
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


# ----------------------------------------------------------------------------------------------------
# The checkpoint: one file per run, rewritten atomically after every task. It holds the method's state minus
# the pristine backbone (every entry that is not a backbone tensor, and every backbone tensor that differs
# from the freshly loaded one, e.g. after a merge), the progress, and what identifies the run.


def state_hash(state: dict) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict: the backbone weights' identity."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k} {tuple(v.shape)} {v.dtype};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_key(key: str, base: dict) -> str | None:
    """The backbone entry a method's state-dict key holds (its longest suffix that is a backbone key)."""
    parts = key.split(".")
    return next((b for b in (".".join(parts[i:]) for i in range(len(parts))) if b in base), None)


def method_state(state: dict, base: dict) -> dict:
    out = {}
    for k, v in state.items():
        v, b = v.detach().cpu(), backbone_key(k, base)
        if b is None or base[b].shape != v.shape or base[b].dtype != v.dtype or not torch.equal(base[b], v):
            out[k] = v.clone()  # a compact copy: torch.save writes a view's whole storage
    return out


def load_method_state(method, stored: dict, base: dict) -> None:
    full = {k: stored[k] if k in stored else base[backbone_key(k, base)] for k in method.state_dict()}
    method.load_state_dict(full, strict=True)


def same_run(run_dir: str, given: dict, run: dict) -> None:
    """--resume: every option the command line gives that is a property of the run is the run's own."""
    for k, v in given.items():
        if v != run[k]:
            raise UsageError(f"--resume {run_dir}: the run has {k.replace('_', '-')}={run[k]!r}, not {v!r}; start a "
                             "new run instead")


def restore(run_dir: str, method, tasks, ident: dict, base: dict, saved: dict | None, ckpt: dict | None) -> dict:
    """On --resume, check that data and weights are the run's, rebuild the finished tasks and load their state;
    -> the progress (empty for a new run)."""
    for have in (saved or {}).get("identity"), (ckpt or {}).get("identity"):
        bad = [k for k in ident if have is not None and have.get(k) != ident[k]]
        if bad:
            raise UsageError(f"--resume {run_dir}: the run was made with other {', '.join(bad)} ("
                             + ("the --weights give other tensors" if "weights_sha256" in bad else "the data differ")
                             + "); pass what the run started from, or start a new run")
    progress = ckpt["progress"] if ckpt else {"acc": [], "n_test": [], "per_task": []}
    for t in range(len(progress["acc"])):
        method.grow(t, tasks[t])
    try:
        if ckpt:
            load_method_state(method, ckpt["state"], base)
    except Exception as e:  # noqa: BLE001 - a checkpoint of another structure
        raise UsageError(f"--resume {run_dir}: the checkpoint does not fit the method ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); start a new run") from None
    return progress


def write_checkpoint(run_dir: str, ckpt: dict) -> None:
    buf = io.BytesIO()  # serialised in memory, so a full disk is the OS's error, not torch's zip writer's
    torch.save(ckpt, buf)
    write_bytes(os.path.join(run_dir, "checkpoint.pt"), buf.getvalue())


def read_checkpoint(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        p = ck["progress"]
        assert isinstance(ck["state"], dict) and isinstance(ck["identity"], dict) and len(p["acc"]) == len(
            p["per_task"]) > 0 and len(p["n_test"]) == len(p["acc"][-1])
        return ck
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one clear line
        why = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0][:200] if str(e) else "bad layout"
        raise UsageError(f"--resume {run_dir}: checkpoint.pt cannot be read ({type(e).__name__}: {why}); "
                         "start a new run") from None


# ----------------------------------------------------------------------------------------------------
# Outputs


def save_outputs(run_dir: str, progress: dict, sizes: list[int]) -> None:
    acc, n = progress["acc"], progress["n_test"]
    res = {**metrics.summary(acc, n), "acc_matrix": acc, "n_test": n, "tasks_done": len(acc), "task_sizes": sizes,
           "per_task": progress["per_task"], "seen_test_samples": [int(sum(n[: t + 1])) for t in range(len(acc))]}
    write_text(os.path.join(run_dir, "results.json"), json.dumps(res, indent=1))
    rows = ["after_task," + ",".join(f"task_{j + 1}" for j in range(len(sizes)))]
    rows += [f"{t + 1}," + ",".join(f"{v:.2f}" for v in row) + "," * (len(sizes) - len(row))
             for t, row in enumerate(acc)]
    write_text(os.path.join(run_dir, "acc_matrix.csv"), "\n".join(rows) + "\n")
    if len(acc) >= 2:  # one point is no curve
        plot_curve(os.path.join(run_dir, "acc_curve.png"), res["curve"], os.path.basename(run_dir))


def plot_curve(path: str, curve: list[float], title: str) -> None:
    """a_t after every task; matplotlib is imported here only (and the plot skipped without it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(1, len(curve) + 1), curve, marker="o")
    ax.set_xticks(range(1, len(curve) + 1, max(1, len(curve) // 10)))
    ax.set(xlabel="after task", ylabel="accuracy on all seen classes (%)", title=title[:60])
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
