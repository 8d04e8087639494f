#!/usr/bin/env bash
# The first-GPU check: everything that has never run on a GPU, in one script of <= 8 minutes on one GPU.
#
#   bench/device_check.sh                      # on the GPU machine; writes bench/results/gpu/*.json
#   bench/device_check.sh --dry-run            # print the commands, run nothing (any machine)
#   bench/device_check.sh --device cpu --quick --methods seq_lora --out /tmp/dc   # the CPU path, seconds
#
# 1. train.py: every method, --preset cpu, 2 tasks (--tasks 10 --stop-after 2) on CUDA in fp32, bf16 and fp16
#    (fp16 trains through train.py's GradScaler), --epochs 1 (not the preset's 3) to fit the budget;
#    --jobs runs at once (their s/step share the GPU: this is a check that they run, not a timing).
# 2. bench/step_time.py on the GPU: ViT-B/16, batch 128, bf16, every method side by side (the timing).
# 3. bench/paper_shapes.py --device cuda --batch 128 --steps 20: every variant at ViT-B/16 (random weights),
#    2 tasks of 20 steps, peak GPU memory per variant (torch.cuda.max_memory_allocated, per process).
# 4. torchrun: train.py under `torchrun --nproc_per_node 1 ... --device cuda`, and a one-process NCCL
#    all_reduce probe (train.py only initialises torch.distributed when WORLD_SIZE > 1).
# They run in the order 1, 4, 3, 2 (the timing last), each within what is left of --budget.
# Then one summary table; bench/results/gpu/{train_runs,paper_shapes_cuda,step_time_cuda,torchrun,summary}.json
# and summary.md. Runs, logs and checkpoints go to --work (default bench/runs/device_check/, not committed).
#
# Data and weights: the GPU machine gets a copy of the working tree; ../shared is not guaranteed there.
# CIFAR-100 comes from --data DIR, else $CIL_DATA (DIR/cifar100.npz or DIR/cifar-100-python/); the cpu preset's
# weights from --weights FILE, else $CIL_WEIGHTS, else weights/vit_small32_tin.pth. Without CIFAR-100 the train
# runs use --dataset digits --tasks 5; without weights --weights random; the script says so.
#
# Options: --dry-run, --device cuda|cpu, --quick (cpu only: smoke preset, tiny paper shapes), --methods a,b,
# --epochs N (1), --jobs N (train runs at once: 6 on cuda), --ps-jobs N (paper-shape variants at once: 3),
# --budget S (seconds for all commands, each cut to what is left: 460 on cuda), --skip train,torchrun,...,
# --data DIR, --weights FILE, --out DIR (bench/results/gpu; on cpu WORK/results), --work DIR (bench/runs/device_check).
# Python is $PYTHON (default: python from PATH); torchrun is "$PYTHON -m torch.distributed.run".
# Exit code 1 when a check failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda QUICK=0 DRY=0 EPOCHS=1 JOBS="" PS_JOBS=3 METHODS="" OUT="" WORK="" SKIP="" BUDGET=""
DATA="${CIL_DATA:-}" WEIGHTS="${CIL_WEIGHTS:-}"
PY="${PYTHON:-python}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --quick) QUICK=1 ;;
    --device) DEVICE="$2"; shift ;;
    --methods) METHODS="$2"; shift ;;
    --epochs) EPOCHS="$2"; shift ;;
    --jobs) JOBS="$2"; shift ;;
    --ps-jobs) PS_JOBS="$2"; shift ;;
    --data) DATA="$2"; shift ;;
    --weights) WEIGHTS="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    --skip) SKIP="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "device_check.sh: error: unknown option '$1' (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done
case "$DEVICE" in cuda|cuda:*|cpu) ;; *) echo "device_check.sh: error: --device must be cuda or cpu (got '$DEVICE')" >&2; exit 2 ;; esac
if [ "$QUICK" = 1 ] && [ "$DEVICE" != cpu ]; then
  echo "device_check.sh: error: --quick is the CPU path (tiny shapes); use it with --device cpu" >&2; exit 2
fi
WORK="${WORK:-bench/runs/device_check}"
OUT="${OUT:-$([ "$DEVICE" = cpu ] && echo "$WORK/results" || echo bench/results/gpu)}"  # CPU: not committed
DEV="${DEVICE%%:*}"
JOBS="${JOBS:-$([ "$DEV" = cuda ] && echo 6 || echo 1)}"  # CPU: one at a time (the cores are few)
BUDGET="${BUDGET:-$([ "$DEV" = cuda ] && echo 460 || echo 0)}"  # seconds for all commands (0: no limit)
if [ "$DEV" = cpu ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi  # tiny shapes: one thread each
for s in ${SKIP//,/ }; do
  case "$s" in train|step_time|paper_shapes|torchrun) ;; *)
    echo "device_check.sh: error: --skip takes train, step_time, paper_shapes, torchrun (got '$s')" >&2; exit 2 ;;
  esac
done
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

note() { echo "device_check: $*"; }

# every method of the registry, read from methods/__init__.py without importing torch
ALL_METHODS="$("$PY" - <<'EOF'
import ast
tree = ast.parse(open("methods/__init__.py").read())
for node in ast.walk(tree):
    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "METHODS" for t in node.targets):
        print(",".join(k.value for k in node.value.keys))
EOF
)"
METHODS="${METHODS:-$ALL_METHODS}"
IFS=, read -r -a METHOD_LIST <<< "$METHODS"

# ---- data and weights of the train runs
if [ "$QUICK" = 1 ]; then
  TRAIN_DATA=(--preset smoke --tasks 5)
  note "--quick: train runs on --preset smoke (tiny random ViT, digits)"
else
  TRAIN_DATA=(--preset cpu)
  if [ -n "$DATA" ] && { [ -f "$DATA/cifar100.npz" ] || [ -d "$DATA/cifar-100-python" ]; }; then
    TRAIN_DATA+=(--data-root "$DATA" --tasks 10)
    note "data: CIFAR-100 from $DATA"
  else
    TRAIN_DATA+=(--dataset digits --tasks 5)
    note "NOTE: no CIFAR-100 under --data / \$CIL_DATA ('${DATA}'): the train runs use --dataset digits --tasks 5" \
         "(scikit-learn's bundled digits) instead of CIFAR-100 --tasks 10"
  fi
  if [ -z "$WEIGHTS" ] && [ -f weights/vit_small32_tin.pth ]; then WEIGHTS=weights/vit_small32_tin.pth; fi  # the preset's
  if [ -n "$WEIGHTS" ] && [ -f "$WEIGHTS" ]; then
    TRAIN_DATA+=(--weights "$WEIGHTS")
    note "weights: $WEIGHTS"
  else
    TRAIN_DATA+=(--weights random)
    note "NOTE: no weights file under --weights / \$CIL_WEIGHTS / weights/ ('${WEIGHTS}'): the train runs use" \
         "--weights random (accuracy is meaningless; the check is that they run)"
  fi
fi
if [ "$DEV" = cuda ]; then AMPS=(none bf16 fp16); else AMPS=(none); fi  # fp16 needs CUDA; bf16 is slow on CPUs

# ---- the runner: print the command; unless --dry-run, run it with a time limit, log, exit code and seconds
[ "$DRY" = 1 ] || { rm -rf "$WORK/logs"; mkdir -p "$WORK/logs" "$WORK/runs" "$OUT"; }
show() {  # the command as one shell line
  local a line="+"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then line+=" $a"; else line+=" $(printf '%q' "$a")"; fi
  done
  echo "$line"
}
run() {  # run NAME LIMIT_S CMD...; the limit is cut to what is left of --budget
  local name="$1" limit="$2"; shift 2
  [ "$DRY" = 1 ] && return 0
  local t0 rc left; t0=$(date +%s%N)
  if [ "$BUDGET" -gt 0 ]; then
    left=$(( T_START + BUDGET - $(date +%s) ))
    if [ "$left" -lt 5 ]; then
      echo "device_check: --budget $BUDGET s spent before this command; not run" > "$WORK/logs/$name.log"
      echo "124 0" > "$WORK/logs/$name.rc"; return 124
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  timeout --kill-after 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1; rc=$?
  echo "$rc $(( ($(date +%s%N) - t0) / 1000000 ))" > "$WORK/logs/$name.rc"  # exit code, milliseconds
  return $rc
}
throttle() { while [ "$(jobs -rp | wc -l)" -ge "$1" ]; do wait -n; done; }
T_START=$(date +%s)
stage() { note "[$(( $(date +%s) - T_START )) s] $*"; }

# ---- 1. train.py, every method x precision, 2 tasks
if skipped train; then stage "1/4 train.py: skipped"; else
stage "1/4 train.py: ${#METHOD_LIST[@]} methods x ${AMPS[*]}, 2 tasks, --epochs $EPOCHS, $JOBS at once"
[ "$DRY" = 1 ] || rm -rf "$WORK/runs/train"
for m in "${METHOD_LIST[@]}"; do
  for amp in "${AMPS[@]}"; do
    cmd=("$PY" train.py --method "$m" "${TRAIN_DATA[@]}" --stop-after 2 --epochs "$EPOCHS" --device "$DEVICE"
         --amp "$amp" --quiet --out "$WORK/runs/train/${m}__${amp}")
    show "${cmd[@]}"
    if [ "$DRY" = 0 ]; then throttle "$JOBS"; run "train__${m}__${amp}" 240 "${cmd[@]}" & fi
  done
done
wait
fi

# ---- 2. torchrun: train.py in one process, and an NCCL (gloo on CPU) all_reduce probe
if [ "$DEV" = cpu ]; then export CIL_DIST_BACKEND=gloo; BACKEND=gloo; else BACKEND=nccl; fi
if skipped torchrun; then stage "2/4 torchrun: skipped"; else
stage "2/4 torchrun"
TORCHRUN=("$PY" -m torch.distributed.run)  # torchrun of the interpreter that runs the checks, not of PATH
TR_METHOD="${METHOD_LIST[0]}"
[ "$DRY" = 1 ] || rm -rf "$WORK/runs/torchrun"
cmd=("${TORCHRUN[@]}" --standalone --nproc_per_node 1 train.py --method "$TR_METHOD" "${TRAIN_DATA[@]}" --stop-after 2
     --epochs "$EPOCHS" --device "$DEVICE" --quiet --out "$WORK/runs/torchrun")
show "${cmd[@]}"
run torchrun_train 240 "${cmd[@]}"
PROBE="$WORK/dist_probe.py"
if [ "$DRY" = 0 ]; then
  cat > "$PROBE" <<'EOF'
"""One all_reduce through torch.distributed under torchrun; prints a JSON line and exits 0 when it is right."""
import json
import os
import sys

import torch
import torch.distributed as dist

backend = sys.argv[1]
dist.init_process_group(backend)
local = int(os.environ.get("LOCAL_RANK", "0"))
device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
if backend == "nccl":
    torch.cuda.set_device(device)
x = torch.full((1024,), float(dist.get_rank() + 1), device=device)
dist.all_reduce(x)
world = dist.get_world_size()
ok = bool((x == world * (world + 1) / 2).all())
version = torch.cuda.nccl.version() if backend == "nccl" else None
version = ".".join(map(str, version)) if isinstance(version, tuple) else version
print(json.dumps({"backend": backend, "world": world, "ok": ok, "value": float(x[0]), "nccl": version,
                  "torch": torch.__version__}))
dist.destroy_process_group()
sys.exit(0 if ok else 1)
EOF
fi
cmd=("${TORCHRUN[@]}" --standalone --nproc_per_node 1 "$PROBE" "$BACKEND")
show "${cmd[@]}"
run torchrun_probe 120 "${cmd[@]}"
fi

# ---- 3. paper shapes: ViT-B/16, batch 128, 2 tasks x 20 steps, peak GPU memory per variant
if skipped paper_shapes; then stage "3/4 bench/paper_shapes.py: skipped"; else
stage "3/4 bench/paper_shapes.py"
PS_METHODS=""
if [ "$METHODS" != "$ALL_METHODS" ]; then PS_METHODS="$METHODS"; fi  # '': every method and its variants
if [ "$QUICK" = 1 ]; then
  cmd=("$PY" bench/paper_shapes.py --quick --device cpu --out "$OUT/paper_shapes_${DEV}.json")
else
  cmd=("$PY" bench/paper_shapes.py --device "$DEVICE" --batch 128 --steps 20 --jobs "$PS_JOBS" --timeout 200
       --out "$OUT/paper_shapes_${DEV}.json")
fi
[ -n "$PS_METHODS" ] && cmd+=(--methods "$PS_METHODS")
show "${cmd[@]}"
[ "$DRY" = 1 ] || rm -f "$OUT/paper_shapes_${DEV}.json"
run paper_shapes 330 "${cmd[@]}"
fi

# ---- 4. bench/step_time.py on the device
if skipped step_time; then stage "4/4 bench/step_time.py: skipped"; else
stage "4/4 bench/step_time.py"
if [ "$QUICK" = 1 ]; then
  ST=(--backbone vit_tiny_test --batch-size 8 --per-class 2 --steps 1 --rounds 1 --warmup 0 --device cpu)
else
  ST=(--backbone vit_base_patch16_224 --batch-size 128 --amp bf16 --device "$DEVICE")
fi
ST_METHODS="$(printf '%s\n' "${METHOD_LIST[@]}" | grep -vx simple_cil | paste -sd, -)"  # simple_cil does not train
ST_OUT="$OUT/step_time_${DEV}.json"
cmd=("$PY" bench/step_time.py --methods "$ST_METHODS" "${ST[@]}" --out "$ST_OUT")
show "${cmd[@]}"
[ "$DRY" = 1 ] || rm -f "$ST_OUT"
run step_time 240 "${cmd[@]}"
fi

[ "$DRY" = 1 ] && { note "dry run: nothing was run"; exit 0; }

# ---- summary: one table from the logs and results files (no torch import)
stage "summary"
"$PY" - "$WORK" "$OUT" "$DEV" "$BACKEND" "$(( $(date +%s) - T_START ))" "$SKIP" <<'EOF'
import glob, json, os, platform, shutil, subprocess, sys

work, out, dev, backend, total = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
skip = set(filter(None, sys.argv[6].split(",")))


def rc_of(name):
    try:
        rc, ms = open(os.path.join(work, "logs", name + ".rc")).read().split()
        return int(rc), int(ms) / 1000
    except (OSError, ValueError):
        return None, None


def last_line(name):
    try:
        lines = [ln for ln in open(os.path.join(work, "logs", name + ".log")).read().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else ""
    except OSError:
        return ""


def results_of(run_root):
    found = glob.glob(os.path.join(run_root, "*", "results.json"))
    return json.load(open(found[0])) if found else None


def write(name, obj):
    with open(os.path.join(out, name), "w") as f:
        json.dump(obj, f, indent=1)


rows = []  # (check, ok, detail)
train = {}
for log in [] if "train" in skip else sorted(glob.glob(os.path.join(work, "logs", "train__*.rc"))):
    name = os.path.basename(log)[:-3]
    _, method, amp = name.split("__")
    rc, sec = rc_of(name)
    res = results_of(os.path.join(work, "runs", "train", f"{method}__{amp}"))
    ok = rc == 0 and res is not None and res.get("tasks_done") == 2
    entry = {"method": method, "amp": amp, "returncode": rc, "seconds": sec, "ok": ok}
    if res:
        pt = res["per_task"]
        entry.update(tasks_done=res["tasks_done"], acc_matrix=res["acc_matrix"], curve=res["curve"],
                     seconds_per_step=[p["seconds_per_step"] for p in pt], steps=[p["steps"] for p in pt],
                     stored_params=[p["stored_params"] for p in pt], final_loss=[p["final_loss"] for p in pt])
    if not ok:
        entry["error"] = last_line(name)
    train[name] = entry
    detail = (f"acc after 2 tasks {res['curve'][-1]:.1f} %, {max(entry['seconds_per_step']):.3f} s/step, "
              f"{sec:.0f} s" if ok else f"rc {rc}: {entry.get('error', '')}")
    rows.append((f"train.py {method} --amp {amp}", ok, detail))
if "train" not in skip:
    write("train_runs.json", {"runs": train})

ps_path = os.path.join(out, f"paper_shapes_{dev}.json")
rc, sec = rc_of("paper_shapes")
if "paper_shapes" in skip:
    pass
elif os.path.isfile(ps_path):
    ps = json.load(open(ps_path))
    for key, r in ps["methods"].items():
        ok = bool(r.get("ok")) and r.get("stored_check") == "ok"
        mem = (f"peak GPU {r['peak_gpu_mib']:,.0f} MiB, " if r.get("peak_gpu_mib") is not None else
               f"peak RSS {r.get('peak_rss_mib') or 0:,.0f} MiB, ")
        sps = f"{r['s_per_step']:.3f} s/step, " if r.get("s_per_step") is not None else ""
        detail = (f"{mem}{sps}stored {r.get('stored_params')} ({r.get('stored_check')})" if r.get("ok")
                  else (r.get("error") or "")[:200])
        rows.append((f"paper shapes {r.get('label', key)}", ok, detail))
else:
    rows.append(("paper shapes", False, f"rc {rc}, no results file: {last_line('paper_shapes')}"))

st_path = os.path.join(out, f"step_time_{dev}.json")
rc, sec = rc_of("step_time")
if "step_time" in skip:
    pass
elif rc == 0 and os.path.isfile(st_path):
    st = json.load(open(st_path))
    rows.append(("step_time.py", True, ", ".join(f"{r['method']} {r['seconds_per_step']:.3f}" for r in st["rows"])
                 + " s/step"))
else:
    rows.append(("step_time.py", False, f"rc {rc}: {last_line('step_time')}"))

if "torchrun" not in skip:
    rc_t, sec_t = rc_of("torchrun_train")
    res = results_of(os.path.join(work, "runs", "torchrun"))
    cfg = glob.glob(os.path.join(work, "runs", "torchrun", "*", "config.json"))
    procs = json.load(open(cfg[0])).get("processes") if cfg else None
    ok_t = rc_t == 0 and res is not None and res.get("tasks_done") == 2
    rows.append(("torchrun --nproc_per_node 1 train.py", ok_t,
                 f"acc after 2 tasks {res['curve'][-1]:.1f} %, processes {procs}, {sec_t:.0f} s" if ok_t
                 else f"rc {rc_t}: {last_line('torchrun_train')}"))
    rc_p, _ = rc_of("torchrun_probe")
    probe = None
    try:
        probe = next(json.loads(ln) for ln in open(os.path.join(work, "logs", "torchrun_probe.log"))
                     if ln.startswith("{"))
    except (OSError, StopIteration, json.JSONDecodeError):
        pass
    rows.append((f"torchrun {backend} all_reduce probe", rc_p == 0 and bool(probe and probe["ok"]),
                 json.dumps(probe) if probe else f"rc {rc_p}: {last_line('torchrun_probe')}"))
    write("torchrun.json", {"train": {"returncode": rc_t, "seconds": sec_t, "processes": procs,
                                      "curve": res["curve"] if res else None}, "probe": probe, "probe_returncode": rc_p})

gpu = None
if shutil.which("nvidia-smi"):
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
failed = [c for c, ok, _ in rows if not ok]
lines = ["| check | result | detail |", "|---|---|---|"]
lines += [f"| {c} | {'ok' if ok else 'FAILED'} | {d.replace('|', '/')} |" for c, ok, d in rows]
lines += [f"| {c} | skipped | --skip |" for c in sorted(skip)]
table = "\n".join(lines)
write("summary.json", {"machine": {"platform": platform.platform(), "gpu": gpu, "cpu_count": os.cpu_count()},
                       "device": dev, "total_seconds": total, "checks": [{"check": c, "ok": ok, "detail": d}
                                                                          for c, ok, d in rows],
                       "failed": failed})
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(f"{gpu or platform.platform()}: {len(rows) - len(failed)}/{len(rows)} checks ok in {total} s\n\n{table}\n")
print(table)
print(f"\n{len(rows) - len(failed)}/{len(rows)} checks ok in {total} s -> {out}/summary.json, summary.md")
sys.exit(1 if failed else 0)
EOF
