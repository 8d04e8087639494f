"""Datasets, the seeded class order, task splits, label remapping, transforms and loaders.

Protocol: ../shared/specs/protocol.md §2-§5, §13 (PILOT's data manager, LAMDA-PILOT @ 2647455):
- class order: numpy.random.RandomState(seed).permutation(num_classes), seed 1993; or the natural order
- splits: `init_cls` classes in the first task, then `increment` per task, the remainder as a last task
- labels are remapped to positions in the order: task t owns the global labels [K_t, C_t)
- task t's train loader holds only its own classes; its test loader every class seen so far

Datasets (each a pair of train/test sets of uint8 images (H, W, 3) or image files, with integer labels):
- cifar100: torchvision's folder under DATA_ROOT, else DATA_ROOT/cifar100.npz (uint8 x_train, y_train,
  x_test, y_test), else torchvision's download
- digits: scikit-learn's bundled 8x8 digits (10 classes, 1,797 images), a fixed stratified 80/20 split
- imagenet_r, cub: ImageFolder trees DATA_ROOT/<name>/{train,test}/<class>/<image>
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

DATASETS = ("cifar100", "digits", "imagenet_r", "cub")


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
    if name == "cifar100":
        return _cifar100(root)
    if name == "digits":
        return _digits()
    if name in ("imagenet_r", "cub"):
        return _folder(name, root)
    raise DataError(f"unknown dataset '{name}'; choose one of {', '.join(DATASETS)}")


def _cifar100(root: str) -> Splits:
    tv_folder = os.path.join(root, "cifar-100-python")
    npz = os.path.join(root, "cifar100.npz")
    if os.path.isdir(tv_folder) or not os.path.exists(npz):
        try:
            from torchvision.datasets import CIFAR100
            tr = CIFAR100(root, train=True, download=not os.path.isdir(tv_folder))
            te = CIFAR100(root, train=False, download=False)
            return Splits(ArrayImages(tr.data, tr.targets), ArrayImages(te.data, te.targets), 100, 32)
        except Exception as e:  # noqa: BLE001 - offline, or a broken folder: one message
            if not os.path.exists(npz):
                raise DataError(
                    f"CIFAR-100 not found under '{root}' ({type(e).__name__}). Fix it one of three ways: "
                    f"put torchvision's cifar-100-python/ there, put cifar100.npz there (--data-root or "
                    f"CIL_DATA), or go online so torchvision can download it; or try --preset smoke") from None
    try:
        with np.load(npz) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read '{npz}' ({type(e).__name__}: {e}); it must hold uint8 arrays "
                        "x_train, y_train, x_test, y_test") from None
    for k in ("x_train", "x_test"):
        a = arrays[k]
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1:] != (32, 32, 3):
            raise DataError(f"'{npz}': {k} must be uint8 (N, 32, 32, 3), got {a.dtype} {a.shape}")
    if arrays["y_train"].max() >= 100 or len(arrays["y_train"]) != len(arrays["x_train"]):
        raise DataError(f"'{npz}': y_train must hold one label in [0, 100) per image")
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
        raise DataError(f"{name} needs the folders {tr} and {te} (ImageFolder trees: <split>/<class>/<image>)")
    classes = sorted(c for c in os.listdir(tr) if os.path.isdir(os.path.join(tr, c)))
    missing = sorted(set(classes) ^ {c for c in os.listdir(te) if os.path.isdir(os.path.join(te, c))})
    if not classes or missing:
        raise DataError(f"{name}: train/ and test/ must hold the same non-empty class folders"
                        + (f" (differ in {', '.join(missing[:5])})" if missing else ""))
    return Splits(FolderImages(tr, classes), FolderImages(te, classes), len(classes), 0)


# ----------------------------------------------------------------------------------------------------
# Transforms


def transforms(img_size: int, native_size: int, mean, std, normalize: str, train_aug: str):
    """(train, test) transforms on uint8 CHW tensors -> float tensors.

    224 px (native images larger than 32 px or upsampled CIFAR): PILOT's pipeline, train
    RandomResizedCrop(224, scale (0.05, 1), ratio (3/4, 4/3)) + flip, test Resize(256 * s/224, bicubic) +
    CenterCrop. Native small images (img_size == native size): train RandomResizedCrop(img, scale (0.05, 1))
    + flip ('rrc', protocol.md §13) or RandomCrop(img, padding 4) + flip ('crop'), test identity.
    train_aug 'none': the test transform for training too. normalize 'weights': (x - mean) / std with the
    weights' statistics; 'none_01': inputs stay in [0, 1] (the literature convention for ViT-B/16).
    """
    from torchvision.transforms import v2

    tail = [v2.ToDtype(torch.float32, scale=True)]
    if normalize == "weights":
        tail.append(v2.Normalize(mean=list(mean), std=list(std)))
    elif normalize != "none_01":
        raise ValueError(f"normalize must be 'weights' or 'none_01' (got '{normalize}')")
    if native_size and img_size <= native_size * 2:  # native resolution (or a small resize: digits)
        resize = [] if native_size == img_size else [v2.Resize(img_size, antialias=True)]
        test = resize
        if train_aug == "rrc":
            train = [v2.RandomResizedCrop(img_size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                     v2.RandomHorizontalFlip()]
        elif train_aug == "crop":
            train = resize + [v2.RandomCrop(img_size, padding=4), v2.RandomHorizontalFlip()]
        else:
            train = resize
    else:  # the 224 px pipeline of PILOT / SD-LoRA / CL-LoRA / SR² (protocol.md §5)
        test = [v2.Resize(int(img_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(img_size)]
        if train_aug == "none":
            train = test
        else:
            train = [v2.RandomResizedCrop(img_size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                     v2.RandomHorizontalFlip()]
    return v2.Compose(train + tail), v2.Compose(test + tail)


# ----------------------------------------------------------------------------------------------------
# Loaders


class TaskSubset(Dataset):
    """The images of some classes, with labels remapped to positions in the class order."""

    def __init__(self, base: Dataset, keep: list[int], table: np.ndarray, transform):
        self.base, self.table, self.transform = base, table, transform
        self.idx = np.flatnonzero(np.isin(base.targets, np.asarray(keep)))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int):
        img, y = self.base[int(self.idx[i])]
        return self.transform(img), int(self.table[y])


class ShardedBatches(Sampler):
    """Global batches of a seeded permutation; each of `world` processes takes every world-th index.

    With world = 1 these are ordinary shuffled batches. Under torchrun every process sees the same global
    batches as a single process would, split between the processes, so that averaging the gradients
    (weighted by local batch size) reproduces single-process training. A last global batch smaller than
    `world` is dropped (only then).
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world, self.epoch = n, batch_size, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        for i in range(0, self.n, self.batch_size):
            batch = perm[i : i + self.batch_size]
            if len(batch) >= self.world:
                yield batch[self.rank :: self.world].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest >= self.world if rest else 0)


@dataclass
class TaskLoaders:
    """The data of one task handed to begin_task / end_task."""
    train: DataLoader
    """the task's training images with train transforms, shuffled"""
    plain: DataLoader
    """the same images with test transforms, in a fixed order (prototypes, statistics)"""


class CIL:
    """A dataset cut into tasks: `tasks[t]` global labels, `task_data(t)`, `test_loader(t)`."""

    def __init__(self, splits: Splits, order: list[int], sizes: list[int], train_tf, test_tf,
                 batch_size: int, eval_batch_size: int, workers: int, seed: int):
        assert sorted(order) == list(range(splits.num_classes)) and sum(sizes) == splits.num_classes
        self.splits, self.order, self.sizes = splits, order, sizes
        self.table = remap(order)
        self.tasks = task_classes(sizes)
        self.train_tf, self.test_tf = train_tf, test_tf
        self.batch_size, self.eval_batch_size, self.workers, self.seed = batch_size, eval_batch_size, workers, seed

    def originals(self, t_lo: int, t_hi: int) -> list[int]:
        """Original labels of tasks t_lo .. t_hi (inclusive)."""
        return [self.order[c] for t in range(t_lo, t_hi + 1) for c in self.tasks[t]]

    def train_set(self, t: int, transform=None) -> TaskSubset:
        return TaskSubset(self.splits.train, self.originals(t, t), self.table, transform or self.train_tf)

    def task_data(self, t: int) -> TaskLoaders:
        g = torch.Generator().manual_seed(self.seed * 1000 + t)
        train = DataLoader(self.train_set(t), batch_size=self.batch_size, shuffle=True, generator=g,
                           num_workers=self.workers, drop_last=False, persistent_workers=False)
        plain = DataLoader(self.train_set(t, self.test_tf), batch_size=self.eval_batch_size, shuffle=False,
                           num_workers=self.workers)
        return TaskLoaders(train=train, plain=plain)

    def train_loader(self, t: int, rank: int = 0, world: int = 1) -> DataLoader:
        """The training loop's loader: this process's share of every global batch (ShardedBatches)."""
        ds = self.train_set(t)
        sampler = ShardedBatches(len(ds), self.batch_size, self.seed * 1000 + t, rank, world)
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.workers)

    def test_loader(self, t: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Test images of every class seen up to and including task t (every world-th one for this rank)."""
        ds = TaskSubset(self.splits.test, self.originals(0, t), self.table, self.test_tf)
        ds.idx = ds.idx[rank::world]
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.workers)
