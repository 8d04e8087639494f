"""Datasets, the seeded class order, task splits, label remapping, transforms and loaders.

The protocol is PILOT's data manager (sun-hailong/LAMDA-PILOT @ 2647455, utils/data_manager.py):
- class order: numpy's seeded permutation of the classes, seed 1993 (`_setup_data`, L153-160); or the
  natural order
- splits: `init_cls` classes in the first task, then `increment` per task, the remainder as a last task
  (`DataManager.__init__`, L15-20)
- labels are remapped to positions in the order (`_map_new_class_index`, L212-213): task t owns the global
  labels [K_t, C_t)
- task t's train loader holds only its own classes; its test loader every class seen so far

Datasets (each a pair of train/test sets of uint8 images (H, W, 3) or image files, with integer labels):
- cifar100: DATA_ROOT may be a .npz file (uint8 x_train, y_train, x_test, y_test), read as it is; a folder
  is searched for torchvision's cifar-100-python/, else DATA_ROOT/cifar100.npz; when neither exists and the
  CIFAR server answers, torchvision downloads into DATA_ROOT (the only case in which anything is created)
- digits: scikit-learn's bundled 8x8 digits (10 classes, 1,797 images), a fixed stratified 80/20 split
- imagenet_r, imagenet_a, cub, domainnet: ImageFolder trees DATA_ROOT/<name>/{train,test}/<class>/<image>, as
  prepare.py writes them from the publishers' archives (or as PILOT's Drive archives unpack); classes in
  sorted order. A tree with prepare.py's split.json must hold the counts it records
Every label must lie in [0, num_classes) and every class must have a training image (else DataError).

Augmentation does not depend on the number of loader workers: each image's random draws come from a
generator seeded with (seed, task, loader, epoch, image index) (`sample_seed`), set around the transform
only, so the global random state of the training process is never touched by the loaders.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DATASETS = ("cifar100", "digits", "imagenet_r", "imagenet_a", "cub", "domainnet")


class DataError(ValueError):
    """A dataset that cannot be found or read: the message says how to fix it."""


# ----------------------------------------------------------------------------------------------------
# Class order, splits, remapping


def class_order(num_classes: int, seed: int | None = 1993) -> list[int]:
    """RandomState(seed).permutation(num_classes) (PILOT, iCaRL seed 1993); seed None = natural order."""
    if seed is None:
        return list(range(num_classes))
    return np.random.RandomState(seed).permutation(num_classes).tolist()


def task_sizes(num_classes: int, init_cls: int, increment: int) -> list[int]:
    """PILOT's split rule: [init_cls, increment, ..., remainder]; the remainder task is never merged."""
    if not (1 <= init_cls <= num_classes) or increment < 1:
        raise ValueError(f"init_cls must be in [1, {num_classes}] and increment >= 1 (got {init_cls}, {increment})")
    sizes = [init_cls]
    while sum(sizes) + increment < num_classes:
        sizes.append(increment)
    if num_classes - sum(sizes) > 0:
        sizes.append(num_classes - sum(sizes))
    return sizes


def equal_split(num_classes: int, tasks: int) -> tuple[int, int]:
    """(init_cls, increment) for `tasks` tasks: B0-Inc(N/T); N must be a multiple of T."""
    if tasks < 1 or tasks > num_classes:
        raise ValueError(f"--tasks must be between 1 and {num_classes} for {num_classes} classes (got {tasks})")
    if num_classes % tasks:
        raise ValueError(f"{num_classes} classes do not split into {tasks} equal tasks; "
                         "use --init-cls/--increment for uneven splits")
    return num_classes // tasks, num_classes // tasks


def task_classes(sizes: list[int]) -> list[list[int]]:
    """Global labels (positions in the order) of every task: [[0..n_0), [n_0..n_0+n_1), ...]."""
    bounds = np.cumsum([0] + list(sizes))
    return [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]


def remap(order: list[int]) -> np.ndarray:
    """Lookup table original label -> position in the order (the inverse permutation)."""
    table = np.empty(len(order), dtype=np.int64)
    table[np.asarray(order)] = np.arange(len(order))
    return table


# ----------------------------------------------------------------------------------------------------
# Datasets


class ArrayImages(Dataset):
    """uint8 images (N, H, W, 3) in memory, labels (N,); returns (transform(uint8 CHW tensor), label)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, transform=None):
        self.x, self.targets, self.transform = x, np.asarray(y, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.x[i]).permute(2, 0, 1)
        return (self.transform(img) if self.transform else img), int(self.targets[i])


class FolderImages(Dataset):
    """An ImageFolder tree root/<class>/<file> with classes in alphabetical order (torchvision's rule)."""

    def __init__(self, root: str, classes: list[str], transform=None):
        from PIL import Image  # noqa: F401  (pillow comes with torchvision)
        self.files, targets = [], []
        for c, name in enumerate(classes):
            folder = os.path.join(root, name)
            for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
                if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
                    self.files.append(os.path.join(folder, f))
                    targets.append(c)
        self.targets, self.transform = np.asarray(targets, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
        return (self.transform(img) if self.transform else img), int(self.targets[i])


@dataclass
class Splits:
    train: Dataset
    test: Dataset
    num_classes: int
    native_size: int  # the images' side in pixels (0 when they vary)


def load_dataset(name: str, root: str) -> Splits:
    """The dataset `name` from `root`; checks everything and creates nothing (bar a torchvision download)."""
    if name == "cifar100":
        splits, source = _cifar100(root)
    elif name == "digits":
        splits, source = _digits(), "scikit-learn's digits"
    elif name in ("imagenet_r", "imagenet_a", "cub", "domainnet"):
        splits, source = _folder(name, root), os.path.join(root, name)
    else:
        raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")
    check_labels(splits, source)
    return splits


def check_labels(splits: Splits, source: str = "the dataset") -> None:
    """Every label in [0, num_classes) and at least one training image per class, else one DataError line."""
    for part, ds in (("train", splits.train), ("test", splits.test)):
        y = np.asarray(ds.targets)
        bad = y[(y < 0) | (y >= splits.num_classes)]
        if len(bad):
            raise DataError(f"{source}: {len(bad)} {part} label(s) outside [0, {splits.num_classes}), e.g. "
                            f"{int(bad[0])}; labels must be class indices 0..{splits.num_classes - 1}")
    counts = np.bincount(np.asarray(splits.train.targets, dtype=np.int64), minlength=splits.num_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise DataError(f"{source}: {len(empty)} class(es) have no training image (e.g. class "
                        f"{int(empty[0])}); every one of the {splits.num_classes} classes needs one")


CIFAR_FIXES = ("Fix it one of three ways: put torchvision's cifar-100-python/ folder there, put cifar100.npz "
               "there or pass the .npz file itself (--data-root or CIL_DATA), or go online so torchvision can "
               "download it; or try --preset smoke")


def _cifar100(root: str) -> tuple[Splits, str]:
    """torchvision's folder under root, else root/cifar100.npz (or root itself when it is a .npz file), else a
    download, tried only when the CIFAR server answers: nothing is created before that."""
    if os.path.isfile(root):
        if not root.endswith(".npz"):
            raise DataError(f"--data-root '{root}' is a file but not a .npz; give a folder or a .npz file")
        return _npz(root), root
    tv_folder, npz = os.path.join(root, "cifar-100-python"), os.path.join(root, "cifar100.npz")
    if os.path.isdir(tv_folder):
        try:
            return _torchvision(root, download=False), tv_folder
        except Exception as e:  # noqa: BLE001 - a broken folder: the npz if there is one, else one line
            if not os.path.isfile(npz):
                raise DataError(f"cannot read '{tv_folder}' ({type(e).__name__}: {str(e)[:120]}). "
                                f"{CIFAR_FIXES}") from None
    if os.path.isfile(npz):
        return _npz(npz), npz
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"--data-root '{root}' is not a folder. {CIFAR_FIXES}")
    if not _online():
        where = f"under '{root}'" if os.path.isdir(root) else f"('{root}' does not exist)"
        raise DataError(f"CIFAR-100 not found {where} and the download server cannot be reached. {CIFAR_FIXES}")
    try:
        return _torchvision(root, download=True), tv_folder
    except Exception as e:  # noqa: BLE001 - a failed download: one line
        raise DataError(f"downloading CIFAR-100 into '{root}' failed ({type(e).__name__}: {str(e)[:120]}). "
                        f"{CIFAR_FIXES}") from None


def _online(timeout: float = 5.0) -> bool:
    """Whether the server of torchvision's CIFAR-100 answers (a HEAD request; nothing is downloaded)."""
    import urllib.request
    try:
        from torchvision.datasets import CIFAR100
        urllib.request.urlopen(urllib.request.Request(CIFAR100.url, method="HEAD"), timeout=timeout).close()
        return True
    except Exception:  # noqa: BLE001 - no network, DNS, proxy, HTTP error: all mean "cannot download"
        return False


def _torchvision(root: str, download: bool) -> Splits:
    from torchvision.datasets import CIFAR100
    tr = CIFAR100(root, train=True, download=download)
    te = CIFAR100(root, train=False, download=False)
    return Splits(ArrayImages(tr.data, tr.targets), ArrayImages(te.data, te.targets), 100, 32)


def _npz(path: str) -> Splits:
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read '{path}' ({type(e).__name__}: {e}); it must hold uint8 arrays "
                        "x_train, y_train, x_test, y_test") from None
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"'{path}': x_{part} must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"'{path}': y_{part} must hold one integer label per image "
                            f"(got {y.dtype} {y.shape} for {len(x)} images)")
    return Splits(ArrayImages(arrays["x_train"], arrays["y_train"]),
                  ArrayImages(arrays["x_test"], arrays["y_test"]), 100, 32)


def _digits() -> Splits:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    x = np.repeat((d.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None], 3, axis=3)  # (N, 8, 8, 3)
    y = d.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):  # every 5th image of each class is a test image: a fixed stratified 80/20 split
        test[np.flatnonzero(y == c)[::5]] = True
    return Splits(ArrayImages(x[~test], y[~test]), ArrayImages(x[test], y[test]), 10, 8)


def _folder(name: str, root: str) -> Splits:
    base = os.path.join(root, name)
    tr, te = os.path.join(base, "train"), os.path.join(base, "test")
    if not (os.path.isdir(tr) and os.path.isdir(te)):
        raise DataError(f"{name} needs the folders {tr} and {te} (ImageFolder trees: <split>/<class>/<image>); "
                        f"make them with: python prepare.py {name} --archive FILE --out {root}")
    classes = sorted(c for c in os.listdir(tr) if os.path.isdir(os.path.join(tr, c)))
    missing = sorted(set(classes) ^ {c for c in os.listdir(te) if os.path.isdir(os.path.join(te, c))})
    if not classes or missing:
        raise DataError(f"{name}: train/ and test/ must hold the same non-empty class folders"
                        + (f" (differ in {', '.join(missing[:5])})" if missing else ""))
    splits = Splits(FolderImages(tr, classes), FolderImages(te, classes), len(classes), 0)
    record = os.path.join(base, "split.json")
    if os.path.isfile(record):  # written by prepare.py: the tree must still be that split
        with open(record) as fh:
            want = json.load(fh)
        have = {"train": len(splits.train), "test": len(splits.test), "classes": len(classes)}
        if any(have[k] != want.get(k) for k in have):
            raise DataError(f"{base} holds {have['train']} training and {have['test']} test images in "
                            f"{have['classes']} classes, but its split.json says {want.get('train')}, "
                            f"{want.get('test')} and {want.get('classes')}: images were removed or added; "
                            f"remove {base} and run prepare.py {name} again")
    return splits


# ----------------------------------------------------------------------------------------------------
# Transforms


def transforms(img_size: int, native_size: int, mean, std, normalize: str, train_aug: str):
    """(train, test) transforms on uint8 CHW tensors -> float tensors (two ImageTransform).

    224 px (native images larger than 32 px or upsampled CIFAR): PILOT's pipeline, train
    RandomResizedCrop(224, scale (0.05, 1), ratio (3/4, 4/3)) + flip, test Resize(256 * s/224, bicubic) +
    CenterCrop. Native small images (img_size == native size): train RandomResizedCrop(img, scale (0.05, 1))
    + flip ('rrc': PILOT's crop at the native size) or RandomCrop(img, padding 4) + flip ('crop'), test identity.
    train_aug 'none': the test transform for training too. normalize 'weights': (x - mean) / std with the
    weights' statistics; 'none_01': inputs stay in [0, 1] (the literature convention for ViT-B/16).
    """
    if normalize not in ("weights", "none_01"):
        raise ValueError(f"normalize must be 'weights' or 'none_01' (got '{normalize}')")
    if train_aug not in ("rrc", "crop", "none"):
        raise ValueError(f"train_aug must be 'rrc', 'crop' or 'none' (got '{train_aug}')")
    stats = (list(mean), list(std)) if normalize == "weights" else None
    if native_size and img_size <= native_size * 2:  # native resolution (or a small resize: digits)
        test = [] if native_size == img_size else [("resize", img_size, "bilinear")]
        train = {"rrc": [("rrc", img_size), ("flip",)], "crop": test + [("crop", img_size, 4), ("flip",)],
                 "none": test}[train_aug]
    else:  # the 224 px pipeline of PILOT (utils/data.py L95-117 @ 2647455), SD-LoRA, CL-LoRA, SR²
        test = [("resize", int(img_size * 256 / 224), "bicubic"), ("center", img_size)]
        train = test if train_aug == "none" else [("rrc", img_size), ("flip",)]
    return ImageTransform(train, stats), ImageTransform(test, stats)


class ImageTransform:
    """uint8 (3, H, W) -> float32: the steps, then scaling to [0, 1] and (with `stats`) (x - mean) / std.

    Steps: ("resize", s, interpolation) the shorter side to s, antialiased; ("rrc", s) RandomResizedCrop(s,
    scale (0.05, 1), ratio (3/4, 4/3)); ("crop", s, p) RandomCrop(s, padding p); ("flip",) a horizontal flip
    with probability 1/2; ("center", s) CenterCrop(s). They are torchvision's kernels and parameter draws (from
    torch's global generator), in the order of the equivalent v2.Compose and with its output, called directly:
    v2.Compose's per-call overhead was most of the loading time on 8-32 px images.
    """

    def __init__(self, steps: list[tuple], stats: tuple | None):
        self.steps, self.stats = steps, stats

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        for step in self.steps:
            if step[0] == "resize":
                img = F.resize(img, [step[1]], interpolation=InterpolationMode(step[2]), antialias=True)
            elif step[0] == "rrc":
                i, j, h, w = RandomResizedCrop.get_params(img, scale=[0.05, 1.0], ratio=[3 / 4, 4 / 3])
                img = F.resized_crop(img, i, j, h, w, [step[1], step[1]], antialias=True)
            elif step[0] == "crop":
                s, p = step[1], step[2]
                img = F.pad(img, [p, p, p, p], fill=0)
                H, W = img.shape[-2:]
                top = int(torch.randint(0, H - s + 1, size=())) if H > s else 0
                left = int(torch.randint(0, W - s + 1, size=())) if W > s else 0
                img = F.crop(img, top, left, s, s)
            elif step[0] == "flip":
                if torch.rand(1) < 0.5:
                    img = F.horizontal_flip(img)
            elif step[0] == "center":
                img = F.center_crop(img, [step[1], step[1]])
            else:
                raise ValueError(f"unknown transform step {step!r}")
        img = F.to_dtype(img, torch.float32, scale=True)
        return F.normalize(img, mean=self.stats[0], std=self.stats[1]) if self.stats else img

    def __repr__(self) -> str:
        return f"ImageTransform({self.steps}, normalize={self.stats})"


# ----------------------------------------------------------------------------------------------------
# Loaders


def sample_seed(*key: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence): one per (seed, task, loader, epoch, image)."""
    state = np.random.SeedSequence([k % 2**64 for k in key]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class TaskSubset(Dataset):
    """The images of some classes, with labels remapped to positions in the class order.

    Item `i` or `(epoch, i)` (the form ShardedBatches yields): the transform's random draws come from torch's
    CPU generator seeded with sample_seed(*key, epoch, base index) and restored afterwards, so an image's
    augmentation depends on neither the worker that loads it nor the order of loading, and the process's
    own random state is left as it was. ImageTransform draws from that generator only.
    """

    def __init__(self, base: Dataset, keep: list[int], table: np.ndarray, transform, key: tuple = (0,)):
        self.base, self.table, self.transform, self.key = base, table, transform, tuple(key)
        self.idx = np.flatnonzero(np.isin(base.targets, np.asarray(keep)))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, item):
        epoch, i = item if isinstance(item, tuple) else (0, item)
        j = int(self.idx[i])
        img, y = self.base[j]
        gen = torch.default_generator
        state = gen.get_state()
        try:
            gen.manual_seed(sample_seed(*self.key, epoch, j))
            img = self.transform(img)
        finally:
            gen.set_state(state)
        return img, int(self.table[y])


class ShardedBatches(Sampler):
    """Global batches of a seeded permutation; each of `world` processes takes every world-th index.

    With world = 1 these are ordinary shuffled batches. Under torchrun every process sees the same global
    batches as a single process would, split between the processes, so that averaging the gradients
    (weighted by local batch size) reproduces single-process training. A last global batch smaller than
    `world` is dropped (only then). Items are (epoch, index) pairs, so the epoch reaches TaskSubset's
    augmentation seed in whichever worker loads the image. The epoch is set_epoch's, or with
    `count_passes` the number of earlier passes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 count_passes: bool = False):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.epoch = n, batch_size, seed, rank, world, 0
        self.count_passes = count_passes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch
        if self.count_passes:
            self.epoch += 1
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        for i in range(0, self.n, self.batch_size):
            batch = perm[i : i + self.batch_size]
            if len(batch) >= self.world:
                yield [(epoch, int(k)) for k in batch[self.rank :: self.world]]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world if rest else 0)


@dataclass
class TaskLoaders:
    """The data of one task handed to begin_task / end_task."""
    train: DataLoader
    """the task's training images with train transforms, shuffled (each pass a new order and augmentation)"""
    plain: DataLoader
    """the same images with test transforms, in a fixed order (prototypes, statistics)"""


# the loader kinds in the augmentation seed: the training loop's, the methods' passes, the test images
TRAIN_LOOP, METHOD_PASSES, TEST = 0, 1, 2


class CIL:
    """A dataset cut into tasks: `tasks[t]` global labels, `task_data(t)`, `train_loader(t)`, `test_loader(t)`."""

    def __init__(self, splits: Splits, order: list[int], sizes: list[int], train_tf, test_tf,
                 batch_size: int, eval_batch_size: int, workers: int, seed: int):
        if sorted(order) != list(range(splits.num_classes)) or sum(sizes) != splits.num_classes:
            raise ValueError(f"the order must permute the {splits.num_classes} classes and the task sizes "
                             f"sum to them (got {len(order)} classes in the order, sizes summing to {sum(sizes)})")
        check_labels(splits)
        self.splits, self.order, self.sizes = splits, order, sizes
        self.table = remap(order)
        self.tasks = task_classes(sizes)
        self.train_tf, self.test_tf = train_tf, test_tf
        self.batch_size, self.eval_batch_size, self.workers, self.seed = batch_size, eval_batch_size, workers, seed

    def originals(self, t_lo: int, t_hi: int) -> list[int]:
        """Original labels of tasks t_lo .. t_hi (inclusive)."""
        return [self.order[c] for t in range(t_lo, t_hi + 1) for c in self.tasks[t]]

    def train_set(self, t: int, transform=None, kind: int = TRAIN_LOOP) -> TaskSubset:
        return TaskSubset(self.splits.train, self.originals(t, t), self.table, transform or self.train_tf,
                          key=(self.seed, t, kind))

    def task_data(self, t: int) -> TaskLoaders:
        ds = self.train_set(t, kind=METHOD_PASSES)
        sampler = ShardedBatches(len(ds), self.batch_size, self.seed * 1000 + t + 500, count_passes=True)
        train = DataLoader(ds, batch_sampler=sampler, num_workers=self.workers, generator=_quiet())
        plain = DataLoader(self.train_set(t, self.test_tf, METHOD_PASSES), batch_size=self.eval_batch_size,
                           shuffle=False, num_workers=self.workers, generator=_quiet())
        return TaskLoaders(train=train, plain=plain)

    def train_loader(self, t: int, rank: int = 0, world: int = 1) -> DataLoader:
        """The training loop's loader: this process's share of every global batch (ShardedBatches); call
        `loader.batch_sampler.set_epoch(epoch)` before each epoch (a new order and new augmentations)."""
        ds = self.train_set(t)
        sampler = ShardedBatches(len(ds), self.batch_size, self.seed * 1000 + t, rank, world)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.workers, generator=_quiet())

    def test_loader(self, t: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Test images of every class seen up to and including task t (every world-th one for this rank)."""
        ds = TaskSubset(self.splits.test, self.originals(0, t), self.table, self.test_tf, key=(self.seed, t, TEST))
        ds.idx = ds.idx[rank::world]
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.workers,
                          generator=_quiet())


def _quiet() -> torch.Generator:
    """A generator of its own for a DataLoader: it draws its workers' base seed from this, not from the global
    RNG, so creating an iterator does not move the training process's random state (the workers' own seeds
    are unused: TaskSubset seeds every image)."""
    return torch.Generator().manual_seed(0)
