"""prepare.py on synthetic archives with the publishers' layouts and names, and the committed split lists."""
import dataclasses
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

import data as D
import prepare as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path, files: dict, mode="w"):
    with tarfile.open(path, mode) as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def write_yaml(path, paths, targets):
    """CODA-Prompt's layout, gzipped."""
    text = "data:\n" + "".join(f"- {p}\n" for p in paths) + "targets:\n" + "".join(f"- {t}\n" for t in targets)
    with gzip.open(path, "wt") as fh:
        fh.write(text)


def committed(name: str, part: int) -> list[str]:
    return P.read_list(os.path.join(ROOT, "splits", P.SPECS[name].lists[part]))[0]


@pytest.fixture(scope="module")
def imagenet_r(tmp_path_factory):
    """imagenet-r.tar cut to 4 of CODA's classes (3 training and 1 test image each, named as in the lists),
    with the README.txt the publisher's tar has, and the cut lists."""
    tmp = tmp_path_factory.mktemp("inr")
    train_all, test_all = committed("imagenet_r", 0), committed("imagenet_r", 1)
    wnids = sorted({p.split("/")[-2] for p in test_all})[:4]
    train = [p for w in wnids for p in [q for q in train_all if f"/{w}/" in q][:3]]
    test = [p for w in wnids for p in [q for q in test_all if f"/{w}/" in q][:1]]
    write_yaml(tmp / "tr.yaml.gz", train, [0] * len(train))
    write_yaml(tmp / "te.yaml.gz", test, [0] * len(test))
    files = {"imagenet-r/README.txt": b"readme"}
    files.update({p.removeprefix("data/"): jpeg(i) for i, p in enumerate(train + test)})
    write_tar(tmp / "imagenet-r.tar", files)
    return tmp, train, test


def test_committed_lists_are_the_published_ones():
    for name, classes in (("imagenet_r", 200), ("domainnet", 345)):
        spec = P.SPECS[name]
        (train, sha_tr), (test, sha_te) = (P.read_list(os.path.join(ROOT, "splits", f)) for f in spec.lists)
        assert (sha_tr, sha_te) == spec.sha256
        assert (len(train), len(test)) == spec.counts
        assert len(set(train)) == len(train) and not set(train) & set(test)
        keys = {P.key(p, spec.keep) for p in train + test}
        assert len(keys) == len(train) + len(test)  # the keys name every image once
        assert len({k.split("/")[-2] for k in keys}) == classes
    assert committed("imagenet_r", 0)[0] == "data/imagenet-r/n02128757/sculpture_4.jpg"


def test_imagenet_r_gives_the_split_and_loads(imagenet_r, tmp_path):
    src, train, test = imagenet_r
    dest = P.prepare("imagenet_r", [str(src / "imagenet-r.tar")], str(tmp_path),
                     lists=(str(src / "tr.yaml.gz"), str(src / "te.yaml.gz")), classes=4)
    rec = json.load(open(os.path.join(dest, "split.json")))
    assert (rec["train"], rec["test"], rec["classes"]) == (12, 4, 4) and not rec["linked"]
    for part, names in (("train", train), ("test", test)):
        got = sorted(os.path.relpath(os.path.join(d, f), os.path.join(dest, part))
                     for d, _, fs in os.walk(os.path.join(dest, part)) for f in fs)
        assert got == sorted("/".join(p.split("/")[-2:]) for p in names)
    splits = D.load_dataset("imagenet_r", str(tmp_path))
    assert (len(splits.train), len(splits.test), splits.num_classes) == (12, 4, 4)
    assert splits.train[0][0].shape == (3, 12, 12)
    os.remove(splits.test.files[0])  # a tree that no longer holds its split is refused
    with pytest.raises(D.DataError, match="split.json says 12, 4 and 4"):
        D.load_dataset("imagenet_r", str(tmp_path))


def test_a_folder_gives_links(imagenet_r, tmp_path):
    src, train, test = imagenet_r
    with tarfile.open(src / "imagenet-r.tar") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    dest = P.prepare("imagenet_r", [str(tmp_path / "unpacked" / "imagenet-r")], str(tmp_path / "out"),
                     lists=(str(src / "tr.yaml.gz"), str(src / "te.yaml.gz")), classes=4)
    linked = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs if f != "split.json"]
    assert len(linked) == 16 and all(os.path.islink(p) for p in linked)
    assert json.load(open(os.path.join(dest, "split.json")))["linked"]


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_bad_archives_give_one_line_and_create_nothing(imagenet_r, tmp_path):
    src, train, test = imagenet_r
    lists = ("--lists", src / "tr.yaml.gz", src / "te.yaml.gz")
    whole = (src / "imagenet-r.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[: len(whole) // 2])
    write_tar(tmp_path / "wrong.tar", {"imagenet-a/n01498041/0.jpg": jpeg(0)})
    write_tar(tmp_path / "short.tar", {p.removeprefix("data/"): jpeg(0) for p in train[1:] + test})
    (tmp_path / "text.tar").write_text("not an archive")
    cases = {"cut.tar": "cannot read", "text.tar": "cannot read", "wrong.tar": "lacks 16 of the 16 images",
             "short.tar": "lacks 1 of the 16 images", "missing.tar": "no such file"}
    for archive, message in cases.items():
        r = run_cli("imagenet_r", "--archive", tmp_path / archive, "--out", tmp_path / "out", *lists)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "out").exists()
    # the full list against a cut archive: the published counts are checked, with the archive's name
    r = run_cli("imagenet_r", "--archive", src / "imagenet-r.tar", "--out", tmp_path / "out")
    assert r.returncode == 2 and "lacks 29,984 of the 30,000" in r.stderr and "imagenet-r.tar" in r.stderr
    (tmp_path / "file").write_text("a file")  # a write that fails: one line, nothing kept
    r = run_cli("imagenet_r", "--archive", src / "imagenet-r.tar", "--out", tmp_path / "file" / "out", *lists)
    assert r.returncode == 2 and r.stderr.startswith("prepare.py: error: cannot write") and r.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["cut.tar", "file", "short.tar", "text.tar", "wrong.tar"]
    r = run_cli("imagenet_r", "--archive", src / "imagenet-r.tar", "--out", tmp_path / "ok", *lists)
    assert r.returncode == 0 and "12 training and 4 test images in 4 classes" in r.stdout, r.stderr
    r = run_cli("imagenet_r", "--archive", src / "imagenet-r.tar", "--out", tmp_path / "ok", *lists)
    assert r.returncode == 2 and "exists already" in r.stderr  # an existing tree is never touched
    assert json.load(open(tmp_path / "ok" / "imagenet_r" / "split.json"))["train"] == 12


def test_cub_uses_the_archives_own_split(tmp_path):
    names = [f"{c:03d}.Bird_{c}/Bird_{c}_{i:04d}.jpg" for c in (1, 2, 3) for i in range(4)]
    is_train = [int(i % 4 != 0) for i in range(len(names))]
    files = {f"CUB_200_2011/images/{n}": jpeg(k) for k, n in enumerate(names)}
    files["CUB_200_2011/images.txt"] = "".join(f"{k + 1} {n}\n" for k, n in enumerate(names)).encode()
    files["CUB_200_2011/train_test_split.txt"] = "".join(f"{k + 1} {t}\n" for k, t in enumerate(is_train)).encode()
    files["attributes.txt"] = b"1 has_bill_shape::curved\n"
    write_tar(tmp_path / "CUB_200_2011.tgz", files, "w:gz")
    dest = P.prepare("cub", [str(tmp_path / "CUB_200_2011.tgz")], str(tmp_path), counts=(9, 3), classes=3)
    assert sorted(os.listdir(os.path.join(dest, "test"))) == ["001.Bird_1", "002.Bird_2", "003.Bird_3"]
    assert os.listdir(os.path.join(dest, "test", "002.Bird_2")) == ["Bird_2_0000.jpg"]
    splits = D.load_dataset("cub", str(tmp_path))
    assert (len(splits.train), len(splits.test)) == (9, 3)
    with pytest.raises(P.PrepareError, match="5,994 and 5,794 in 200"):  # the published counts by default
        P.prepare("cub", [str(tmp_path / "CUB_200_2011.tgz")], str(tmp_path / "again"))


def test_imagenet_a_rule_is_per_class_and_fixed(tmp_path):
    sizes = {"n01498041": 3, "n01531178": 5, "n01534433": 11, "n01558993": 7}
    files = {f"imagenet-a/{w}/0.{w}_{i}.jpg": jpeg(i) for w, n in sizes.items() for i in range(n)}
    files["imagenet-a/README.txt"] = b"readme"
    write_tar(tmp_path / "imagenet-a.tar", files)
    dest = P.prepare("imagenet_a", [str(tmp_path / "imagenet-a.tar")], str(tmp_path), counts=(26, 0), classes=4)
    for w, n in sizes.items():  # floor(n / 5) test images, the first by sha256 of "<class>/<file>"
        test = os.listdir(os.path.join(dest, "test", w)) if n >= 5 else []
        assert len(test) == n // 5 and len(os.listdir(os.path.join(dest, "train", w))) == n - n // 5
        ranked = sorted((f for f in files if f"/{w}/" in f), key=lambda f: P.hashlib.sha256(
            "/".join(f.split("/")[-2:]).encode()).hexdigest())
        assert sorted(test) == sorted(f.split("/")[-1] for f in ranked[: n // 5])
    with pytest.raises(P.PrepareError, match="7,500 images in 200"):
        P.prepare("imagenet_a", [str(tmp_path / "imagenet-a.tar")], str(tmp_path / "again"))


def test_domainnet_reads_one_zip_per_domain(tmp_path):
    paths = [f"{d}/{c}/{d}_{k:03d}_{i:06d}.jpg" for d in ("clipart", "sketch") for k, c in enumerate(("apple", "bee"))
             for i in range(3)]
    train, test = [p for p in paths if not p.endswith("0.jpg")], [p for p in paths if p.endswith("0.jpg")]
    for name, part in (("tr", train), ("te", test)):  # the committed lists' format: sorted paths, xz
        (tmp_path / f"{name}.txt.xz").write_bytes(lzma.compress("".join(p + "\n" for p in sorted(part)).encode()))
    for d in ("clipart", "sketch"):
        with zipfile.ZipFile(tmp_path / f"{d}.zip", "w") as z:
            for k, p in enumerate(p for p in paths if p.startswith(d)):
                z.writestr(p, jpeg(k))
    dest = P.prepare("domainnet", [str(tmp_path / "clipart.zip"), str(tmp_path / "sketch.zip")], str(tmp_path),
                     lists=(str(tmp_path / "tr.txt.xz"), str(tmp_path / "te.txt.xz")), classes=2)
    assert sorted(os.listdir(os.path.join(dest, "test", "bee"))) == ["clipart_001_000000.jpg", "sketch_001_000000.jpg"]
    with pytest.raises(P.PrepareError, match=r"lacks 6 of the 12 images the split names \(by domain: sketch 6\)"):
        P.prepare("domainnet", [str(tmp_path / "clipart.zip")], str(tmp_path / "again"),
                  lists=(str(tmp_path / "tr.txt.xz"), str(tmp_path / "te.txt.xz")), classes=2)


def test_smoke_run_on_a_prepared_imagenet_r(imagenet_r, tmp_path):
    src, _, _ = imagenet_r
    P.prepare("imagenet_r", [str(src / "imagenet-r.tar")], str(tmp_path / "data"),
              lists=(str(src / "tr.yaml.gz"), str(src / "te.yaml.gz")), classes=4)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--method", "seq_lora", "--preset", "smoke",
                        "--dataset", "imagenet_r", "--data-root", str(tmp_path / "data"), "--tasks", "2",
                        "--epochs", "1", "--out", str(tmp_path / "runs"), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    (run,) = os.listdir(tmp_path / "runs")
    res = json.load(open(tmp_path / "runs" / run / "results.json"))
    assert len(res["acc_matrix"]) == 2 and json.load(open(tmp_path / "runs" / run / "config.json"))[
        "identity"]["task_sizes"] == [2, 2]


def test_committed_lists_whose_sha256_changed_are_refused(imagenet_r, tmp_path, monkeypatch):
    src, _, _ = imagenet_r
    spec = P.SPECS["imagenet_r"]
    monkeypatch.setitem(P.SPECS, "imagenet_r", dataclasses.replace(spec, sha256=("0" * 64, spec.sha256[1])))
    with pytest.raises(P.PrepareError, match="do not have their recorded sha256"):
        P.prepare("imagenet_r", [str(src / "imagenet-r.tar")], str(tmp_path))
    assert not os.listdir(tmp_path)
