"""bench/table.py: the results tables are generated from the results files, and --check catches a stale one."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import cpu_benchmark  # noqa: E402
import table  # noqa: E402


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_table(root, *args, numbers=False):
    """table.main in this process (as `python bench/table.py --root ROOT ARGS` would run it); the trees' results
    are fakes, so the prose's numbers are not checked against them unless numbers=True."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = table.main(["--root", str(root), *args, *([] if numbers else ["--skip-numbers"])])
    except SystemExit as e:  # a usage error: its message is the one line the command prints
        return Result(1, out.getvalue(), str(e.code) + "\n")
    return Result(rc, out.getvalue(), "")


@pytest.fixture
def tree(tmp_path):
    """A copy of the documents and results files: the tests change it, never the repository."""
    os.makedirs(tmp_path / "bench" / "probes")
    for doc in table.DOCS:
        shutil.copy(os.path.join(ROOT, doc), tmp_path / doc)
    shutil.copytree(os.path.join(ROOT, "bench", "results"), tmp_path / "bench" / "results")
    shutil.copy(os.path.join(ROOT, "bench", "paper_numbers.json"), tmp_path / "bench" / "paper_numbers.json")
    shutil.rmtree(tmp_path / "bench" / "results" / "cpu", ignore_errors=True)  # start from no runs
    for f in table.FIGURES:
        if os.path.exists(tmp_path / f):
            os.remove(tmp_path / f)
    assert run_table(tmp_path).returncode == 0  # the tables of no runs
    return tmp_path


def fake_run(root, row, seed, last, avg, forget, task_id=20.0, tasks=10):
    d = root / "bench" / "results" / "cpu" / row / f"seed{seed}"
    os.makedirs(d)
    curve = [avg] * (tasks - 1) + [last]
    acc = [[50.0] * (t + 1) for t in range(tasks)]
    (d / "results.json").write_text(json.dumps({
        "curve": curve, "last_acc": last, "avg_inc_acc": avg, "forgetting": forget, "forgetting_pilot": forget,
        "bwt": -forget, "acc_matrix": acc, "n_test": [100] * tasks, "tasks_done": tasks}))
    (d / "task_id.json").write_text(json.dumps({"task_agnostic": last, "within_task": 60.0, "task_id": task_id}))


def test_the_repository_tables_are_up_to_date():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "table.py"), "--check"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_mean_and_sample_std_over_seeds(tree):
    fake_run(tree, "seq_lora", 0, last=10.0, avg=20.0, forget=30.0, task_id=12.0)
    fake_run(tree, "seq_lora", 1, last=14.0, avg=22.0, forget=26.0, task_id=16.0)
    fake_run(tree, "joint", 0, last=55.0, avg=55.0, forget=0.0, tasks=1)
    md = table.t_cpu(str(tree))
    row = next(line for line in md.splitlines() if line.startswith("| seq_lora (`--method seq_lora`) |"))
    # sample std of (10, 14) is sqrt(8) = 2.83; of (30, 26) too; task-id (12, 16)
    assert row == ("| seq_lora (`--method seq_lora`) | 2 of 3 | 12.00 ± 2.83 | 21.00 ± 1.41 | 28.00 ± 2.83 "
                   "| 14.00 ± 2.83 | 60.00 ± 0.00 |")
    joint = next(line for line in md.splitlines() if line.startswith("| joint"))
    assert joint.endswith("| 1 of 3 | 55.00 | 55.00 | – | – | – |")  # one seed: no std; one task: no F, no probe
    assert "| simple_cil (`--method simple_cil`) | 0 of 3 | pending |" in md
    s = table.summary(str(tree))
    assert [r["row"] for r in s["rows"]] == ["joint", "seq_lora"]  # the table's order, finished rows only
    seq = s["rows"][1]
    assert seq["seeds"] == [0, 1]
    assert seq["last_acc"] == {"mean": 12.0, "std": round(8 ** 0.5, 4)}
    assert seq["avg_inc_acc"]["mean"] == 21.0 and seq["forgetting"]["mean"] == 28.0
    assert s["rows"][0]["forgetting"] is None and s["rows"][0]["last_acc"]["std"] is None


def test_goal_table_compares_each_row_with_seq_lora_and_joint(tree):
    assert "needs the seq_lora and joint runs" in table.t_cpu_goal(str(tree))
    fake_run(tree, "seq_lora", 0, last=10.0, avg=20.0, forget=30.0)
    fake_run(tree, "joint", 0, last=40.0, avg=40.0, forget=0.0, tasks=1)
    fake_run(tree, "sd_lora", 0, last=38.5, avg=45.0, forget=12.0)
    fake_run(tree, "c_lora", 0, last=9.0, avg=19.0, forget=31.0)
    fake_run(tree, "c_lora", 1, last=11.5, avg=19.0, forget=31.0)
    md = table.t_cpu_goal(str(tree)).splitlines()
    # c_lora's mean is above seq_lora's, but seed by seed only its seed 0 run has a seq_lora run to meet: below
    assert md[2:] == [
        "| sd_lora (`--method sd_lora`) | 1 of 3 | +28.50 | yes | 1 of 1 | -18.00 | yes | 1 of 1 | 1.50 | yes | – |",
        "| c_lora (`--method c_lora`) | 2 of 3 | +0.25 | yes | 0 of 1 | +1.00 | NO | 0 of 1 | 29.75 | no | – |"]
    fake_run(tree, "seq_lora", 1, last=10.0, avg=20.0, forget=32.0)
    md = table.t_cpu_goal(str(tree)).splitlines()  # seq_lora's mean F is now 31.0: c_lora's 31.0 is not below it
    assert md[3] == ("| c_lora (`--method c_lora`) | 2 of 3 | +0.25 | yes | 1 of 2 | +0.00 | NO | 1 of 2 | 29.75 "
                     "| no | – |")
    fake_run(tree, "simple_cil", 0, last=30.0, avg=40.0, forget=15.0)
    md = table.t_cpu_goal(str(tree)).splitlines()
    assert md[2] == ("| simple_cil (`--method simple_cil`) | 1 of 3 | +20.00 | yes | 1 of 1 | -16.00 | yes | 1 of 1 "
                     "| 10.00 | no | – |")
    assert md[3].endswith("| 1.50 | yes | +8.50 |") and md[4].endswith("| no | -19.75 |")


def test_check_fails_on_a_new_run_and_the_rewrite_fixes_it(tree):
    assert run_table(tree, "--check").returncode == 0
    fake_run(tree, "inflora", 2, last=11.0, avg=21.0, forget=9.0)
    r = run_table(tree, "--check")
    assert r.returncode == 1
    assert "README.md: table 'cpu' is out of date" in r.stdout
    assert "bench/results/cpu_summary.json is out of date" in r.stdout
    assert "cpu_curves.png is missing" in r.stdout
    before = (tree / "README.md").read_text()
    assert run_table(tree).returncode == 0
    assert run_table(tree, "--check").returncode == 0
    after = (tree / "README.md").read_text()
    assert "| inflora (`--method inflora`) | 1 of 3 | 11.00 | 21.00 | 9.00 | 20.00 | 60.00 |" in after
    assert after != before
    for f in table.FIGURES:
        assert (tree / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tree / table.SUMMARY).read_text())
    assert summary["rows"][0]["row"] == "inflora" and summary["rows"][0]["seeds"] == [2]


def test_a_hand_edit_inside_the_markers_is_caught(tree):
    doc = tree / "bench" / "README.md"
    text = doc.read_text()
    assert "| old (slots in Attention.forward) | 0.4504 |" in text
    doc.write_text(text.replace("| old (slots in Attention.forward) | 0.4504 |", "| old (slots in Attention.forward) | 0.4000 |"))
    r = run_table(tree, "--check")
    assert r.returncode == 1 and "bench/README.md: table 'adapter_mechanism' is out of date" in r.stdout
    assert run_table(tree).returncode == 0 and doc.read_text() == text


def test_a_results_table_outside_the_markers_is_caught(tree):
    doc = tree / "README.md"
    doc.write_text(doc.read_text() + "\n| method | A_T |\n|---|---|\n| seq_lora | 99.0 |\n")
    r = run_table(tree, "--check")
    assert r.returncode == 1 and "a results table outside the table markers: | method | A_T |" in r.stdout


def test_a_number_typed_into_the_prose_needs_a_source(tmp_path):
    os.makedirs(tmp_path / "bench" / "results")
    os.makedirs(tmp_path / "bench" / "probes")
    (tmp_path / "bench" / "README.md").write_text("no tables here\n")
    (tmp_path / "bench" / "probes" / "README.md").write_text("none here either\n")
    (tmp_path / "bench" / "results" / "probe.json").write_text('{"residual": 1.312e-01, "acc": 27.72}')
    head = "# x\n\n| metric | formula | in results.json |\n|---|---|---|\n| A_T | 12.34 | last_acc |\n\n```\n56.78\n```\n\n"
    (tmp_path / "README.md").write_text(head + "A paragraph citing 27.72 and 0.13\n(`results/probe.json`).\n\n"
                                        "- a bullet: 27.72 again,\n  with eps_0 = 0.95\n- 27.7 but 0.131\n")
    r = run_table(tmp_path, "--check", numbers=True)
    # a file named in one bullet is no source for the next; tables that are not results and code are not prose
    assert [ln for ln in r.stdout.splitlines() if "CONSTANTS" in ln] == [
        "README.md:14: 27.72 is in no generated table, no results file the paragraph names, no CONSTANTS",
        "README.md:16: 27.7 is in no generated table, no results file the paragraph names, no CONSTANTS",
        "README.md:16: 0.131 is in no generated table, no results file the paragraph names, no CONSTANTS",
    ] and r.returncode == 1
    (tmp_path / "README.md").write_text(head + "A paragraph citing 27.72 and 0.13\n(`results/probe.json`).\n")
    r = run_table(tmp_path, "--check", numbers=True)
    assert "CONSTANTS" not in r.stdout and r.stdout.strip() == "bench/results/cpu_summary.json is out of date"


@pytest.mark.parametrize("bad,message", [
    ("<!-- table:nonsense -->\n<!-- /table:nonsense -->", "unknown table 'nonsense'"),
    ("<!-- table:cpu -->\n| x |", "table 'cpu' is not closed"),
    ("<!-- /table:cpu -->", "closes no open table"),
])
def test_broken_markers_are_one_line_errors(tree, bad, message):
    doc = tree / "README.md"
    doc.write_text(doc.read_text() + "\n" + bad + "\n")
    r = run_table(tree, "--check")
    assert r.returncode != 0 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_benchmark_rows_are_valid_train_commands(tmp_path):
    import train
    assert list(cpu_benchmark.ROWS)[:3] == ["joint", "seq_lora", "simple_cil"]
    assert len(cpu_benchmark.ROWS) == 13 and cpu_benchmark.SEEDS == (0, 1, 2)
    data, weights = os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "shared", "weights",
                                                                              "vit_small32_tin.pth")
    if not os.path.isfile(weights):
        pytest.skip("../shared/weights is not beside the project")
    for row in cpu_benchmark.ROWS:
        cmd = cpu_benchmark.command(row, 2, data, weights, str(tmp_path / row))
        assert cmd[1] == "train.py" and cmd.count("--tasks") == 1 and cmd[cmd.index("--seed") + 1] == "2"
        args, cfg, _ = train.parse(cmd[2:])
        assert args.preset == "cpu" and args.seed == 2 and args.order_seed == 1993
        assert args.tasks == (1 if row == "joint" else 10)
        # every method at its defaults but the row's own options
        assert table.label(row) == f"{row} (`{' '.join(cpu_benchmark.ROWS[row])}`)" and row.startswith(
            "joint" if row == "joint" else args.method)
    args, cfg, _ = train.parse(cpu_benchmark.command("sr2_lora_ca_ce", 0, data, weights, str(tmp_path))[2:])
    assert cfg.ca == "ce"
    args, cfg, _ = train.parse(cpu_benchmark.command("sd_lora_kd", 0, data, weights, str(tmp_path))[2:])
    assert cfg.variant == "kd"
    args, cfg, _ = train.parse(cpu_benchmark.command("inflora_ca", 0, data, weights, str(tmp_path))[2:])
    assert cfg.ca is True


def test_a_stopped_run_is_resumed_with_the_rows_own_options(tmp_path):
    import dataclasses
    import json
    import train
    data, weights = os.path.join(ROOT, "..", "shared", "data"), os.path.join(ROOT, "..", "shared", "weights",
                                                                              "vit_small32_tin.pth")
    if not os.path.isfile(weights):
        pytest.skip("../shared/weights is not beside the project")
    out = tmp_path / "sd_lora_kd_s1"
    assert cpu_benchmark.unfinished(str(out)) is None  # no earlier attempt
    run_dir = out / "cifar100__sd_lora__s1__20261201-000000"
    run_dir.mkdir(parents=True)
    assert cpu_benchmark.unfinished(str(out)) is None  # stopped before its first task finished: start again
    cmd = cpu_benchmark.command("sd_lora_kd", 1, data, weights, str(out))
    args, cfg, _ = train.parse(cmd[2:])
    (run_dir / "config.json").write_text(json.dumps({  # what train.py writes when a run starts
        "run": dataclasses.asdict(args), "method_config": dataclasses.asdict(cfg), "identity": {}}))
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert cpu_benchmark.unfinished(str(out)) == str(run_dir)
    resumed, rcfg, saved = train.parse(cmd[2:] + ["--resume", str(run_dir)])
    assert saved is not None and resumed.resume == str(run_dir) and rcfg == cfg
    assert dataclasses.replace(resumed, resume="") == args
    with pytest.raises(train.UsageError, match="seed"):  # a run of another row or seed is refused by train.py
        train.parse(cpu_benchmark.command("sd_lora_kd", 2, data, weights, str(out))[2:] + ["--resume", str(run_dir)])


def test_sr2_alignment_probe_rows_come_from_each_runs_printout(tree):
    assert "(no sr2_lora run yet)" in table.t_sr2_ca_probe(str(tree))
    fake_run(tree, "sr2_lora", 1, last=5.0, avg=15.0, forget=4.0)
    (tree / "bench" / "results" / "cpu" / "sr2_lora" / "seed1" / "ca_probe.txt").write_text(
        "RUN: after task 10, 10000 test images of 100 classes\n"
        "plain CE (vanilla / SLCA)        test acc 24.01  replay acc 26.30  test images won by each task's head "
        "[1030, 1048]\n")
    assert table.t_sr2_ca_probe(str(tree)).splitlines()[2] == \
        "| 1 | plain CE (vanilla / SLCA) | 24.01 | 26.30 | 1030, 1048 |"


def test_cl_lora_prototype_probe_rows_come_from_each_runs_json(tree):
    assert "(no cl_lora probe yet)" in table.t_cl_lora_proto_probe(str(tree))
    fake_run(tree, "cl_lora", 2, last=20.0, avg=30.0, forget=10.0)
    fake_run(tree, "cl_lora", 0, last=21.0, avg=31.0, forget=11.0)  # no probe file: no row
    (tree / "bench" / "results" / "cpu" / "cl_lora" / "seed2" / "proto_probe.json").write_text(json.dumps({
        "cos_stored_fresh": [0.5, 1.0], "stored": {"acc": 20.0, "task_id": 25.5, "won": [94, 1906]},
        "fresh": {"acc": 27.125, "task_id": 33.0, "won": [900, 1100]}}))
    lines = table.t_cl_lora_proto_probe(str(tree)).splitlines()
    assert len(lines) == 3 and lines[2] == "| 2 | 0.50 / 1.00 | 20.00 | 25.50 | 94 / 1906 | 27.12 | 33.00 | 900 / 1100 |"


def test_ncm_probe_rows_come_from_each_runs_json(tree):
    assert "(no probe yet)" in table.t_ncm_probe(str(tree))
    fake_run(tree, "c_lora", 0, last=12.0, avg=25.0, forget=40.0)
    fake_run(tree, "seq_lora", 1, last=12.0, avg=25.0, forget=30.0)  # no probe file: no row
    (tree / "bench" / "results" / "cpu" / "c_lora" / "seed0" / "ncm_probe.json").write_text(json.dumps({
        "run": {"acc": 12.0, "task_id": 17.5, "won": [1, 1999]},
        "ncm": {"acc": 20.0, "task_id": 30.0, "won": [990, 1010]}}))
    lines = table.t_ncm_probe(str(tree)).splitlines()
    assert len(lines) == 3 and lines[2] == ("| c_lora (`--method c_lora`) | 0 | 12.00 | 17.50 | 1 / 1999 | 20.00 "
                                           "| 30.00 | 990 / 1010 |")


def test_ca_stats_probe_rows_come_from_each_runs_json_with_its_drift_once(tree):
    assert "(no probe yet)" in table.t_ca_stats_probe(str(tree))
    fake_run(tree, "inflora_ca", 2, last=20.0, avg=30.0, forget=35.0, tasks=2)
    (tree / "bench" / "results" / "cpu" / "inflora_ca" / "seed2" / "ca_stats_probe.json").write_text(json.dumps({
        "checkpoint": {"acc": 20.0, "task_id": 25.0, "won": [10, 1990]},
        "variants": {"fresh statistics": {"acc": 31.0, "task_id": 38.5, "won": [1001, 999]}},
        "drift": [{"cos": 0.7712, "rel_shift": 0.65}, {"cos": 1.0, "rel_shift": 0.0}]}))
    lines = table.t_ca_stats_probe(str(tree)).splitlines()
    assert lines[2:] == [
        "| inflora_ca (`--method inflora --ca`) | 2 | checkpoint (aligned in the run) | 20.00 | 25.00 | 10 / 1990 | "
        "0.771 / 1.000 | 0.650 / 0.000 |",
        "| inflora_ca (`--method inflora --ca`) | 2 | fresh statistics | 31.00 | 38.50 | 1001 / 999 |  |  |"]


def test_inflora_memory_probe_rows_are_one_per_block(tree):
    assert "(no probe yet)" in table.t_inflora_memory_probe(str(tree))
    fake_run(tree, "inflora", 1, last=16.0, avg=29.0, forget=19.0)
    (tree / "bench" / "results" / "cpu" / "inflora" / "seed1" / "memory_probe.json").write_text(json.dumps({
        "blocks": [{"d": 192, "captured_final_memory": 0.9111, "code": {"directions": 6, "captured": 0.715},
                    "paper": {"directions": 16, "captured": 0.9474}}] * 2}))
    lines = table.t_inflora_memory_probe(str(tree)).splitlines()
    assert lines[2:] == ["| 1 | 0 | 6 of 192 | 71.5 | 16 of 192 | 94.7 | 91.1 |",
                         "| 1 | 1 | 6 of 192 | 71.5 | 16 of 192 | 94.7 | 91.1 |"]


def test_frozen_ca_probe_rows_sit_beside_the_runs_of_the_same_seed(tree):
    shutil.rmtree(tree / "bench" / "results" / "frozen_ca_probe", ignore_errors=True)
    assert "(no probe yet)" in table.t_frozen_ca_probe(str(tree))
    os.makedirs(tree / "bench" / "results" / "frozen_ca_probe")
    (tree / "bench" / "results" / "frozen_ca_probe" / "seed1.json").write_text(json.dumps({"runs": {
        "ce": {"last_acc": 30.0, "avg_inc_acc": 40.0, "task_id": 38.5, "won": [1000, 1000]}}}))
    fake_run(tree, "sr2_lora_ca_ce", 1, last=31.0, avg=41.0, forget=5.0, task_id=39.0)
    fake_run(tree, "sr2_lora_ca_ce", 0, last=1.0, avg=1.0, forget=1.0)  # another seed: not beside seed 1's probe
    probe = tree / "bench" / "results" / "cpu" / "sr2_lora_ca_ce" / "seed1" / "task_id.json"
    probe.write_text(json.dumps({**json.loads(probe.read_text()), "won": [900, 1100]}))
    lines = table.t_frozen_ca_probe(str(tree)).splitlines()
    assert lines[2:] == ["| 1 | frozen (this probe) | sr2_lora heads, `--ca ce` alignment | 30.00 | 40.00 | 38.50 | "
                         "1000 / 1000 |",
                         "| 1 | trained (the run) | sr2_lora heads, `--ca ce` | 31.00 | 41.00 | 39.00 | 900 / 1100 |"]


def test_the_probes_after_a_run_depend_on_its_row_and_seed():
    def scripts(row, seed):
        return [s[0] for _, s in cpu_benchmark.probes(row, seed, "RUN", "DEST", "DATA", "W")]
    assert scripts("simple_cil", 0) == ["task_id_probe.py"]
    assert scripts("cl_lora", 1) == ["task_id_probe.py", "cl_lora_proto_probe.py"]
    assert scripts("sr2_lora", 0) == ["task_id_probe.py", "sr2_ca_probe.py", "ncm_probe.py"]
    assert scripts("sr2_lora_ca_ce", 2) == ["task_id_probe.py", "ca_stats_probe.py", "frozen_ca_probe.py"]
    assert scripts("inflora_ca", 1) == ["task_id_probe.py", "ca_stats_probe.py"]
    assert scripts("inflora", 2) == ["task_id_probe.py", "inflora_memory_probe.py"]
    assert scripts("sd_lora_kd", 0) == ["task_id_probe.py", "ncm_probe.py"]
    assert scripts("sd_lora_kd", 1) == ["task_id_probe.py"]
    for row in cpu_benchmark.ROWS:
        for txt, (script, *args) in cpu_benchmark.probes(row, 0, "RUN", "DEST", "DATA", "W"):
            assert os.path.isfile(os.path.join(ROOT, "bench", "probes", script))
            assert txt.endswith(".txt") and all(a.endswith(".json") for a in args if a.startswith("DEST"))
    txt, (_, *args) = cpu_benchmark.probes("sr2_lora_ca_ce", 2, "RUN", "DEST", "DATA", "W")[-1]
    assert txt == os.path.join(ROOT, "bench", "results", "frozen_ca_probe", "seed2.txt")
    assert args[args.index("--seed") + 1] == "2" and args[args.index("--json") + 1] == txt[:-4] + ".json"


def test_until_starts_only_a_run_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_benchmark, "RESULTS", str(tmp_path))
    for row, seed, line in [("joint", 0, "wall time of the run: 1300 s (probe included)"),
                            ("joint", 1, "wall time of the run: 1250 s (probes included)"),
                            ("cl_lora", 0, "wall time of the run: 4272 s (probes included)"),
                            ("keep_lora", 0, "wall time of the run since it resumed: 1508 s (probes included)")]:
        d = tmp_path / row / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "train.log").write_text(f"task 10/10 ...\n{line}\n")
    expected = {r: cpu_benchmark.expected_seconds(r) for r in ("joint", "cl_lora", "keep_lora", "c_lora")}
    # the longest uninterrupted run; a resumed run's time is only a part; no log: no estimate
    assert expected == {"joint": 1300.0, "cl_lora": 4272.0, "keep_lora": None, "c_lora": None}
    todo = [("cl_lora", 1), ("keep_lora", 1), ("joint", 2)]
    assert cpu_benchmark.fitting(todo, 5000, expected) == ("cl_lora", 1)  # the usual order where all fit
    assert cpu_benchmark.fitting(todo, 4000, expected) == ("joint", 2)  # keep_lora: taken as the longest (4272)
    assert cpu_benchmark.fitting(todo, 1299, expected) is None
    assert cpu_benchmark.fitting([("c_lora", 1)], 10 ** 9, {"c_lora": None}) is None  # no estimate anywhere
    assert cpu_benchmark.until("2026-12-06T21:20") == cpu_benchmark.datetime(2026, 12, 6, 21, 20)
    t = cpu_benchmark.until("07:05")
    assert (t.hour, t.minute, t.date()) == (7, 5, cpu_benchmark.datetime.now().date())
    with pytest.raises(Exception, match="neither HH:MM"):
        cpu_benchmark.until("tonight")


def test_out_runs_a_committed_row_again_into_its_folder_and_compares(tmp_path, monkeypatch, capsys):
    """--out: a run even where the committed one is done, its results in DIR, the committed run beside it; no
    commit, no table rewritten. (The cpu preset's command is swapped for a 2-task smoke run, the probes left out.)"""
    committed = tmp_path / "committed"
    (committed / "sd_lora" / "seed0").mkdir(parents=True)
    (committed / "sd_lora" / "seed0" / "results.json").write_text(json.dumps(
        {"curve": [50.0, 40.0], "last_acc": 40.0, "avg_inc_acc": 45.0, "forgetting": 10.0, "tasks_done": 2}))
    monkeypatch.setattr(cpu_benchmark, "RESULTS", str(committed))
    monkeypatch.setattr(cpu_benchmark, "command", lambda row, seed, data, weights, out: [
        sys.executable, "train.py", "--preset", "smoke", "--method", "sd_lora", "--tasks", "2", "--weights", "random",
        "--seed", str(seed), "--out", out])
    monkeypatch.setattr(cpu_benchmark, "probes", lambda *a: [])
    monkeypatch.setattr(cpu_benchmark, "commit", lambda *a: pytest.fail("--out must not commit"))
    readme = open(os.path.join(ROOT, "bench", "README.md")).read()
    data, weights, out = tmp_path / "data", tmp_path / "w.pth", tmp_path / "mine"
    data.mkdir()
    weights.write_bytes(b"")
    common = ["--rows", "sd_lora", "--seeds", "0", "--data-root", str(data), "--weights", str(weights)]
    with pytest.raises(SystemExit) as e:  # neither --out nor --commit: one error, nothing run or created
        cpu_benchmark.main(common)
    assert e.value.code == 2 and "--out DIR" in capsys.readouterr().err and not out.exists()
    cpu_benchmark.main(common + ["--out", str(out)])
    text = capsys.readouterr().out
    mine = json.loads((out / "sd_lora" / "seed0" / "results.json").read_text())
    assert f"sd_lora seed 0: results in {out / 'sd_lora' / 'seed0'}" in text
    assert f"this run:      A_T {mine['last_acc']:.2f}," in text
    assert "committed run: A_T 40.00, average incremental 45.00, forgetting 10.00, 2 tasks" in text
    assert f"A_T differs by {mine['last_acc'] - 40.0:+.2f} points" in text
    assert (out / "sd_lora" / "seed0" / "train.log").read_text().startswith("$ train.py --preset smoke")
    assert os.listdir(committed / "sd_lora" / "seed0") == ["results.json"]  # the committed run untouched
    assert open(os.path.join(ROOT, "bench", "README.md")).read() == readme  # no table rewritten
    cpu_benchmark.main(common + ["--out", str(out)])  # done in DIR: said, not run again
    text = capsys.readouterr().out
    assert "sd_lora seed 0: already done in" in text and "nothing left to run" in text



def test_the_paper_table_follows_paper_numbers_json(tree):
    path = tree / "bench" / "paper_numbers.json"
    doc = json.load(open(path))
    doc["rows"][0]["last_acc"] = 12.34
    json.dump(doc, open(path, "w"))
    r = run_table(tree, "--check")
    assert r.returncode == 1 and "README.md: table 'paper' is out of date" in r.stdout
    assert run_table(tree).returncode == 0 and "| 12.34 / " in (tree / "README.md").read_text()
