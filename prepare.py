"""Split a publisher's archive into the train/test tree that `train.py --dataset NAME` reads.

    python prepare.py imagenet_r --archive imagenet-r.tar          # -> $CIL_DATA (else ./data)/imagenet_r
    python prepare.py imagenet_a --archive imagenet-a.tar
    python prepare.py cub --archive CUB_200_2011.tgz
    python prepare.py domainnet --archive clipart.zip --archive infograph.zip --archive painting.zip \
        --archive real.zip --archive sketch.zip

It writes OUT/NAME/{train,test}/<class>/<image> and OUT/NAME/split.json (the split's source, the sha256 of
the lists it applied, the counts). Each image of an archive file is extracted once, straight to its place
in the split; an archive already unpacked into a folder gives symbolic links instead (nothing is copied).
Classes are the folder names; train.py labels them in sorted order, as torchvision's ImageFolder does.
Everything is checked before anything is created: the archive must hold every image the split names, and
the counts must be the published ones. The splits:
- imagenet_r: CODA-Prompt's lists (GT-RIPL/CODA-Prompt @ 6417d4f, dataloaders/splits/imagenet-r_{train,test}.yaml;
  24,000 / 6,000), committed gzipped in splits/. InfLoRA @ e08b00e ships the same files (utils/splits/) but
  splits by random_split 80/20 under torch.manual_seed(0) (utils/data.py L187-244); PILOT, SD-LoRA and
  CL-LoRA read the Drive archive of PILOT's README (L170-177), whose file lists are not public.
- domainnet: CODA-Prompt's lists (dataloaders/splits/domainnet_{train,test}.yaml, read by InfLoRA's
  utils/data.py L300-307; 338,804 / 84,702, five domains, no quickdraw), from the copy in
  tachyonicClock/bayescl @ 781f6b2 (metadata/), whose README says it is InfLoRA's split: its paths, sorted,
  one per line, xz-compressed (splits/README.md).
- cub: the archive's own train_test_split.txt (5,994 / 5,794).
- imagenet_a: no public split exists. The rule here: within each class, the files ordered by the sha256 of
  "<wnid>/<file>"; the first floor(n / 5) are test images, the rest training images. This is not the split
  of PILOT's Drive archive, which SD-LoRA and CL-LoRA used.
A tree unpacked from PILOT's Drive archives (DIR/NAME/{train,test}) is read as it is, without split.json.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shutil
import sys
import tarfile
import zipfile
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Spec:
    archives: str
    """what the publisher distributes"""
    classes: int
    counts: tuple[int, int]
    """(train, test) images of the published split; (images, 0) where only the total is known"""
    lists: tuple[str, str] = ("", "")
    """committed split lists (train, test) under splits/, gzipped"""
    sha256: tuple[str, str] = ("", "")
    """sha256 of the uncompressed lists"""
    keep: int = 2
    """an image is named by the last `keep` components of its path, in a list and in the archive
    (class/file; domain/class/file)"""


SPECS = {
    "imagenet_r": Spec("imagenet-r.tar (https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar)", 200,
                       (24000, 6000), ("imagenet_r_train.yaml.gz", "imagenet_r_test.yaml.gz"),
                       ("6bcaa14ca9359915ac3a44c48ae71388146385686eb15da79a37844421a0b845",
                        "57275ac242d68983a4f39ccb81ec34f48b1bd920b9cd79e6e8040d7c042db02a")),
    "domainnet": Spec("clipart.zip, infograph.zip, painting.zip, real.zip, sketch.zip "
                      "(http://ai.bu.edu/M3SDA/)", 345, (338804, 84702),
                      ("domainnet_train.txt.xz", "domainnet_test.txt.xz"),
                      ("744384649ec64a0c0e1996e3ed57f448b1bc69a08c6f11c43587cf381cbe872f",
                       "9ca3ec80f3dcb9c87edef08ce74bedd05c0638ea06e7c8be6dcb6a056c037650"), 3),
    "cub": Spec("CUB_200_2011.tgz (https://data.caltech.edu/records/65de6-vp158)", 200, (5994, 5794)),
    "imagenet_a": Spec("imagenet-a.tar (https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar)", 200,
                       (7500, 0)),  # the split's sizes are the rule's
}
IMAGE = (".jpg", ".jpeg", ".png")


class PrepareError(ValueError):
    """An archive, list or output folder that cannot be used: the message says what is wrong."""


# ----------------------------------------------------------------------------------------------------
# Reading archives: file names first, then the files


def _normal(name: str) -> str:
    return name.replace("\\", "/").removeprefix("./")


def archive_names(path: str, read: tuple[str, ...] = ()) -> tuple[set[str], dict[str, str]]:
    """The file names of an archive (tar, tar.gz, zip) or unpacked folder, and the text of the files whose
    names end in one of `read` (CUB's index files)."""
    names, texts = set(), {}
    try:
        if os.path.isdir(path):
            for folder, _, files in os.walk(path):
                for f in files:
                    names.add(_normal(os.path.relpath(os.path.join(folder, f), path)))
            for name in names:
                if name.endswith(read):
                    with open(os.path.join(path, name), encoding="utf-8") as fh:
                        texts[name] = fh.read()
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if not info.is_dir():
                        names.add(_normal(info.filename))
                        if info.filename.endswith(read):
                            texts[_normal(info.filename)] = z.read(info).decode("utf-8")
        else:
            with tarfile.open(path, "r|*") as tar:
                for m in tar:
                    if m.isfile():
                        names.add(_normal(m.name))
                        if m.name.endswith(read):
                            texts[_normal(m.name)] = tar.extractfile(m).read().decode("utf-8")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read {path}: {str(e) or type(e).__name__} (a truncated download, or not a "
                           "tar, tar.gz or zip archive)") from None
    return names, texts


def extract(path: str, wanted: dict[str, str]) -> None:
    """Every archive file named in `wanted` (name -> destination), each written once (a link from a folder)."""
    def place(dest: str) -> str:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        return dest

    if os.path.isdir(path):
        for name, dest in wanted.items():
            os.symlink(os.path.abspath(os.path.join(path, name)), place(dest))
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if _normal(info.filename) in wanted:
                    with z.open(info) as src, open(place(wanted[_normal(info.filename)]), "wb") as dst:
                        shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if m.isfile() and _normal(m.name) in wanted:
                    with tar.extractfile(m) as src, open(place(wanted[_normal(m.name)]), "wb") as dst:
                        shutil.copyfileobj(src, dst)


# ----------------------------------------------------------------------------------------------------
# Split lists


def read_list(path: str) -> tuple[list[str], str]:
    """(image paths, sha256 of the uncompressed bytes) of a split list: CODA-Prompt's yaml (a `data:` list,
    other keys ignored) or text lines 'path [label]'; gzip- or xz-compressed or not."""
    try:
        with {".gz": gzip.open, ".xz": lzma.open}.get(os.path.splitext(path)[1], open)(path, "rb") as fh:
            raw = fh.read()
        lines = raw.decode("utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError, lzma.LZMAError) as e:
        raise PrepareError(f"cannot read the split list {path}: {e}") from None
    if lines and lines[0].strip() == "data:":
        key, paths = None, []
        for line in lines:
            if line.endswith(":") and not line.startswith("- "):
                key = line[:-1]
            elif key == "data" and line.startswith("- "):
                paths.append(line[2:].strip().strip("'\""))
    else:
        paths = [line.split()[0] for line in lines if line.strip()]
    return paths, hashlib.sha256(raw).hexdigest()


def rule_split(names: list[str]) -> tuple[list[str], list[str]]:
    """ImageNet-A's rule: per class, files ordered by sha256("<class>/<file>"), the first floor(n/5) test."""
    by_class: dict[str, list[str]] = {}
    for n in names:
        by_class.setdefault(n.split("/")[-2], []).append(n)
    train, test = [], []
    for c in sorted(by_class):
        files = sorted(by_class[c], key=lambda n: hashlib.sha256("/".join(n.split("/")[-2:]).encode()).hexdigest())
        test += files[: len(files) // 5]
        train += files[len(files) // 5:]
    return train, test


def cub_split(texts: dict[str, str]) -> tuple[list[str], list[str]]:
    """CUB_200_2011/images.txt ('id path') and train_test_split.txt ('id is_training') -> archive names."""
    idx = {n.rsplit("/", 1)[-1]: t for n, t in texts.items()}
    if "images.txt" not in idx or "train_test_split.txt" not in idx:
        raise PrepareError("the archive has no images.txt and train_test_split.txt: CUB_200_2011.tgz has both")
    path = dict(line.split(maxsplit=1) for line in idx["images.txt"].splitlines() if line.strip())
    is_train = dict(line.split() for line in idx["train_test_split.txt"].splitlines() if line.strip())
    if set(path) != set(is_train):
        raise PrepareError("images.txt and train_test_split.txt name different image ids: a damaged archive")
    split = ([], [])
    for i in sorted(path, key=int):
        split[is_train[i] != "1"].append(path[i].strip())
    return split


# ----------------------------------------------------------------------------------------------------
# Prepare


def key(name: str, keep: int) -> str:
    """The last `keep` components of a path: how a list and an archive name the same image."""
    return "/".join(name.split("/")[-keep:])


def prepare(name: str, archives: list[str], out: str, lists: tuple[str, str] | None = None,
            counts: tuple[int, int] | None = None, classes: int | None = None) -> str:
    """Check, then write OUT/NAME/{train,test}/<class>/<file> and split.json; returns OUT/NAME. `lists`
    replaces the committed lists (their own counts and classes then apply); `counts` and `classes` replace
    the published ones (the tests' small archives)."""
    spec = SPECS[name]
    dest = os.path.join(out, name)
    if os.path.lexists(dest):
        raise PrepareError(f"{dest} exists already; remove it or give another --out")
    for a in archives:
        if not os.path.exists(a):
            raise PrepareError(f"--archive {a}: no such file or folder (the publisher's {spec.archives})")
    found: dict[str, tuple[str, str]] = {}  # image key -> (archive, name in it)
    texts: dict[str, str] = {}
    for a in archives:
        names, t = archive_names(a, ("images.txt", "train_test_split.txt") if name == "cub" else ())
        found.update({key(n, spec.keep): (a, n) for n in names if ".." not in n.split("/")})
        texts.update(t)
    record = {"dataset": name, "archives": [os.path.basename(a) for a in archives]}
    if spec.lists[0] or lists:
        paths = lists or tuple(os.path.join(HERE, "splits", f) for f in spec.lists)
        (train, sha_tr), (test, sha_te) = read_list(paths[0]), read_list(paths[1])
        if not lists and (sha_tr, sha_te) != spec.sha256:
            raise PrepareError(f"the committed lists {', '.join(paths)} do not have their recorded sha256: "
                               "restore them with git checkout splits/")
        counts = counts or ((len(train), len(test)) if lists else spec.counts)
        record.update(split_lists=[os.path.basename(p) for p in paths], lists_sha256=[sha_tr, sha_te])
    elif name == "cub":
        train, test = cub_split(texts)
        record["split_lists"] = ["CUB_200_2011/train_test_split.txt"]
    else:
        train, test = rule_split(sorted(found[k][1] for k in found if k.lower().endswith(IMAGE)))
        record["split_rule"] = "per class, the files ordered by sha256('<class>/<file>'), the first floor(n / 5) test"
    train, test = [key(n, spec.keep) for n in train], [key(n, spec.keep) for n in test]
    n_classes = len({n.split("/")[-2] for n in train + test})
    counts, classes = counts or spec.counts, classes or (n_classes if lists else spec.classes)
    missing = [n for n in train + test if n not in found]
    if missing:
        by = {}  # DomainNet: how many of each domain's images are missing
        for n in missing:
            by[n.split("/")[0]] = by.get(n.split("/")[0], 0) + 1
        by_domain = " (by domain: " + ", ".join(f"{d} {k:,}" for d, k in sorted(by.items())) + ")"
        raise PrepareError(f"{', '.join(archives)} lacks {len(missing):,} of the {len(train) + len(test):,} images "
                           f"the split names{by_domain if spec.keep == 3 else ''} (e.g. {missing[0]}); it must be "
                           f"the publisher's {spec.archives}")
    sizes = (len(train), len(test)) if counts[1] else (len(train) + len(test), 0)
    if sizes != tuple(counts) or n_classes != classes or set(train) & set(test):
        raise PrepareError(f"the split has {len(train):,} training and {len(test):,} test images in {n_classes} "
                           f"classes; {name} has " + (f"{counts[0]:,} and {counts[1]:,}" if counts[1] else
                           f"{counts[0]:,} images") + f" in {classes}: it must be the publisher's {spec.archives}")
    tmp, made_out = dest + ".partial", not os.path.isdir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for a in archives:
            extract(a, {found[k][1]: os.path.join(tmp, part, *k.split("/")[-2:])
                        for part, keys in (("train", train), ("test", test)) for k in keys if found[k][0] == a})
        record.update(train=len(train), test=len(test), classes=classes, linked=os.path.isdir(archives[0]))
        with open(os.path.join(tmp, "split.json"), "w") as fh:
            json.dump(record, fh, indent=1)
        os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_out and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        if isinstance(e, OSError):
            raise PrepareError(f"cannot write {e.filename or out}: {e.strerror or e}; nothing was kept") from None
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=tuple(SPECS))
    p.add_argument("--archive", action="append", required=True,
                   help="the publisher's archive (tar, tar.gz or zip), or the folder it was unpacked into "
                        "(then links are written); domainnet: once per domain zip")
    p.add_argument("--out", default=os.environ.get("CIL_DATA") or "data",
                   help="the data root train.py reads (--data-root); default $CIL_DATA, else ./data")
    p.add_argument("--lists", nargs=2, metavar=("TRAIN", "TEST"),
                   help="imagenet_r, domainnet: other split lists (CODA yaml, or lines 'path [label]')")
    args = p.parse_args(argv)
    try:
        if args.lists and not SPECS[args.name].lists[0]:
            raise PrepareError(f"--lists applies to imagenet_r and domainnet, not {args.name}")
        dest = prepare(args.name, args.archive, args.out, tuple(args.lists) if args.lists else None)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare.py: interrupted; nothing was kept", file=sys.stderr)
        return 130
    with open(os.path.join(dest, "split.json")) as fh:
        rec = json.load(fh)
    print(f"{dest}: {rec['train']:,} training and {rec['test']:,} test images in {rec['classes']} classes; "
          f"run: python train.py --dataset {args.name} --data-root {os.path.abspath(args.out)} --method ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
