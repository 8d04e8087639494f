"""bench/paper_shapes.py and bench/device_check.sh: the parts that run without a GPU, at tiny shapes."""
import dataclasses
import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

import paper_shapes as ps  # noqa: E402
import train  # noqa: E402
from methods import METHODS  # noqa: E402


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Every default variant at tiny shapes, in this process (seconds): (exit code, results, path)."""
    out = str(tmp_path_factory.mktemp("ps") / "quick.json")
    rc = ps.main(["--quick", "--in-process", "--out", out])
    with open(out) as f:
        return rc, json.load(f), out


def quick_args(*extra):
    args = ps.build_parser().parse_args(["--quick", *extra])
    ps.resolve(args)
    return args


def test_every_variant_runs_through_the_contract_and_matches_its_stored_formula(quick):
    rc, res, _ = quick
    assert rc == 0
    assert list(res["methods"]) == ps.default_variants()
    assert set(METHODS) <= set(res["methods"])
    assert {"inflora:ca=true", "sd_lora:variant=rr", "sd_lora:variant=kd", "sr2_lora:ca=ce"} <= set(res["methods"])
    v = res["backbone"]
    assert (v["embed_dim"], v["depth"]) == (32, 4)
    for key, r in res["methods"].items():
        assert r["ok"], (key, r.get("traceback"))
        assert r["stored_check"] == "ok" and r["stored_params_per_task"] == r["stored_params_expected_per_task"], key
        assert r["peak_rss_mib"] >= r["rss_after_import_mib"] > 0
        if key == "simple_cil":  # nothing trains
            assert r["step_seconds"] == [] and r["s_per_step"] is None
        else:  # 2 tasks x --steps 2 batches, timed; s/step leaves out the first
            assert len(r["step_seconds"]) == 4 and r["s_per_step"] == pytest.approx(
                sum(r["step_seconds"][1:]) / 3, abs=1e-3)
            assert r["trainable_params"][1] > 0
    cl = METHODS["cl_lora"].Config()
    if getattr(cl, "kd_update", None) == "two_step":  # the generator loss: two optimiser steps per batch
        assert res["methods"]["cl_lora"]["optimizer_steps_per_batch"] == 2
    assert res["methods"]["seq_lora"]["optimizer_steps_per_batch"] == 1


def test_table_is_generated_from_the_results_file(quick, capsys):
    _, res, out = quick
    assert ps.main(["--table", "--out", out]) == 0
    text = capsys.readouterr().out
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert len(rows) == len(res["methods"])
    for row, (key, r) in zip(rows, res["methods"].items()):
        assert row.startswith(f"| `{ps.label(key)}` | ok |")
        assert f"| {r['stored_params']:,} | {r['stored_params_expected']:,} | ok |" in row


def test_a_failing_variant_is_a_row_and_the_bench_goes_on(tmp_path):
    out = str(tmp_path / "r.json")
    assert ps.main(["--quick", "--in-process", "--methods", "seq_lora:rank=0,simple_cil", "--out", out]) == 1
    rows = json.load(open(out))["methods"]
    assert not rows["seq_lora:rank=0"]["ok"] and "rank" in rows["seq_lora:rank=0"]["error"]
    assert rows["simple_cil"]["ok"] and rows["simple_cil"]["stored_check"] == "ok"


def test_a_stored_count_off_its_formula_is_a_mismatch(tmp_path, monkeypatch):
    words, fn = ps.EXPECTED["seq_lora"]
    monkeypatch.setitem(ps.EXPECTED, "seq_lora", (words, lambda c, d, L, N, n: fn(c, d, L, N, n) + 1))
    out = str(tmp_path / "r.json")
    assert ps.main(["--quick", "--in-process", "--methods", "seq_lora", "--out", out]) == 1
    r = json.load(open(out))["methods"]["seq_lora"]
    assert r["ok"] and r["stored_check"] == "mismatch"
    assert r["stored_params_expected"] == r["stored_params"] + 1


def test_a_child_that_never_reports_is_a_row_not_a_hang():
    args = quick_args("--timeout", "0.01")
    dead = ps.run_child("seq_lora", args, ps.shape_argv(args))
    assert not dead["ok"] and "timed out after 0.01 s" in dead["error"]


def test_variants_parse_to_configs_and_train_py_flags():
    _, cfg = ps.parse_variant("inflora:ca=true")
    assert cfg.ca is True
    _, cfg = ps.parse_variant("sd_lora:variant=rr:rank=4")
    assert (cfg.variant, cfg.rank) == ("rr", 4)
    assert ps.label("sr2_lora:ca=ce") == "sr2_lora --ca ce"
    assert ps.label("inflora:ca=true") == "inflora --ca"
    for bad in ("nope", "seq_lora:bogus=1", "seq_lora:rank"):
        with pytest.raises(ValueError):
            ps.parse_variant(bad)
    with pytest.raises(SystemExit):
        ps.main(["--quick", "--methods", "nope"])


# ----------------------------------------------------------------------------------------------------
# bench/device_check.sh


@pytest.fixture
def parse_train(monkeypatch):
    """train.py's own parser on a command of the GPU machine: CUDA is pretended here, the flags are real."""
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(train.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(train.torch.cuda, "is_bf16_supported", lambda *a, **k: True)

    def parse(argv):
        run = train.parse(argv)[0]
        return run if isinstance(run, dict) else dataclasses.asdict(run)
    return parse


def dry_run(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CIL_DATA", "CIL_WEIGHTS")}
    env.update({"PYTHON": sys.executable, **env_extra})  # the interpreter of these tests, on PATH or not
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "device_check.sh"), "--dry-run"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout, [shlex.split(ln[2:]) for ln in p.stdout.splitlines() if ln.startswith("+ ")]


def test_device_check_dry_run_lists_valid_commands_for_every_method_and_precision(tmp_path, parse_train):
    (tmp_path / "cifar100.npz").write_bytes(b"")  # only its presence is checked by a dry run
    (tmp_path / "w.pth").write_bytes(b"")
    text, cmds = dry_run({"CIL_DATA": str(tmp_path), "CIL_WEIGHTS": str(tmp_path / "w.pth")})
    trains = [c for c in cmds if c[:2] == [sys.executable, "train.py"]]
    assert len(trains) == 3 * len(METHODS)
    seen = set()
    for c in trains:
        run = parse_train(c[2:])  # every flag is one train.py knows
        assert (run["preset"], run["device"], run["stop_after"], run["tasks"]) == ("cpu", "cuda", 2, 10)
        assert os.path.abspath(run["data_root"]) == str(tmp_path)
        assert os.path.abspath(run["weights"]) == str(tmp_path / "w.pth")
        seen.add((run["method"], run["amp"]))
    assert seen == {(m, a) for m in METHODS for a in ("none", "bf16", "fp16")}
    shapes = [c for c in cmds if "bench/paper_shapes.py" in c]
    assert len(shapes) == 1
    a = ps.build_parser().parse_args(shapes[0][2:])
    assert (a.device, a.batch, a.steps, a.methods) == ("cuda", 128, 20, "")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    tr = [c for c in cmds if c[:3] == torchrun and "train.py" in c]
    assert len(tr) == 1 and "--nproc_per_node" in tr[0] and tr[0][tr[0].index("--nproc_per_node") + 1] == "1"
    run = parse_train(tr[0][tr[0].index("train.py") + 1:])
    assert run["device"] == "cuda"
    assert any(c[:3] == torchrun and c[-1] == "nccl" for c in cmds)
    assert any("step_time.py" in " ".join(c) and "cuda" in c for c in cmds)
    assert "NOTE" not in text


def test_device_check_without_data_or_weights_falls_back_and_says_so(tmp_path, parse_train):
    text, cmds = dry_run({"CIL_DATA": str(tmp_path)})
    assert "NOTE: no CIFAR-100" in text
    for c in cmds:
        if c[:2] == [sys.executable, "train.py"]:
            run = parse_train(c[2:])
            assert (run["dataset"], run["tasks"]) == ("digits", 5)
            if not os.path.isfile(os.path.join(REPO, "weights", "vit_small32_tin.pth")):
                assert run["weights"] == "random"


def test_device_check_cpu_path_runs_and_writes_its_summary(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    p = subprocess.run(["bash", os.path.join(REPO, "bench", "device_check.sh"), "--device", "cpu", "--quick",
                        "--methods", "seq_lora", "--skip", "step_time,torchrun", "--out", str(out),
                        "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    summary = json.load(open(out / "summary.json"))
    checks = {c["check"]: c for c in summary["checks"]}
    assert checks["train.py seq_lora --amp none"]["ok"]
    assert checks["paper shapes seq_lora"]["ok"] and "(ok)" in checks["paper shapes seq_lora"]["detail"]
    assert summary["failed"] == []
    row = json.load(open(out / "paper_shapes_cpu.json"))["methods"]["seq_lora"]  # measured in its own process
    assert row["ok"] and row["peak_rss_mib"] >= row["rss_after_import_mib"] > 50  # torch alone is hundreds of MiB
    runs = json.load(open(out / "train_runs.json"))["runs"]
    assert runs["train__seq_lora__none"]["tasks_done"] == 2
    assert "| train.py seq_lora --amp none | ok |" in p.stdout and "| torchrun | skipped |" in p.stdout


# ----------------------------------------------------------------------------------------------------
# bench/step_time.py


def test_step_time_times_an_entry_under_bf16_beside_fp32(tmp_path):
    out = tmp_path / "st.json"
    cmd = [sys.executable, os.path.join(REPO, "bench", "step_time.py"), "--backbone", "vit_tiny_test", "--steps", "1",
           "--rounds", "1", "--warmup", "0", "--batch-size", "8", "--per-class", "4", "--out", str(out)]
    r = subprocess.run(cmd + ["--methods", "seq_lora,seq_lora@bf16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(x["method"], x["amp"]) for x in rows] == [("seq_lora", "none"), ("seq_lora@bf16", "bf16")]
    assert rows[0]["ratio_to_seq_lora"] == 1.0 and rows[1]["seconds_per_step"] > 0
    out.unlink()
    r = subprocess.run(cmd + ["--methods", "seq_lora@fp16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "seq_lora@fp16: the autocast after '@' must be bf16 or none" in r.stderr
    assert not out.exists()  # refused before anything is built or written
