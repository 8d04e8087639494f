"""data.py: class order, splits, remapping, datasets, loaders, seeded augmentation and input checks."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import data as D

SHARED_DATA = os.environ.get("CIL_DATA", "")  # a folder holding cifar100_mini.npz (tests that need it skip)

CIFAR_1993 = [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38, 58, 70, 77, 1, 85,
              19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16, 15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54,
              37, 95, 14, 71, 96, 98, 97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11,
              12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93, 39, 67, 29, 49, 57, 33]


def test_class_order_reproduces_protocol():
    assert D.class_order(100, 1993) == CIFAR_1993
    assert D.class_order(100, 1994)[:5] == [72, 6, 33, 96, 60]
    assert D.class_order(200, 1993)[:20] == [168, 136, 51, 9, 183, 101, 171, 99, 42, 159, 191, 70, 16, 188,
                                             27, 10, 175, 26, 68, 187]
    assert D.class_order(200, 1995)[:5] == [146, 198, 169, 126, 142]
    assert D.class_order(7, None) == list(range(7))


@given(st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_order_is_a_permutation_and_remap_a_bijection(n, seed):
    order = D.class_order(n, seed)
    assert sorted(order) == list(range(n))
    table = D.remap(order)
    assert sorted(table.tolist()) == list(range(n))
    assert all(table[order[i]] == i for i in range(n))


@given(st.data())
def test_splits_partition_the_classes(data):
    n = data.draw(st.integers(1, 250))
    init = data.draw(st.integers(1, n))
    inc = data.draw(st.integers(1, n))
    sizes = D.task_sizes(n, init, inc)
    assert sum(sizes) == n and sizes[0] == init
    assert all(s == inc for s in sizes[1:-1])
    if len(sizes) > 1:
        assert 1 <= sizes[-1] <= inc
    tasks = D.task_classes(sizes)
    flat = [c for t in tasks for c in t]
    assert flat == list(range(n))  # disjoint, in order, covering every class


def test_standard_splits():
    assert D.task_sizes(100, *D.equal_split(100, 10)) == [10] * 10
    assert D.task_sizes(100, 30, 30) == [30, 30, 30, 10]
    assert D.task_sizes(100, 50, 10) == [50] + [10] * 5
    with pytest.raises(ValueError):
        D.equal_split(100, 7)
    with pytest.raises(ValueError):
        D.equal_split(100, 0)
    with pytest.raises(ValueError):
        D.equal_split(10, 11)


def _stream(splits, sizes, seed=1993):
    tf = lambda img: img.float() / 255  # noqa: E731
    return D.CIL(splits, D.class_order(splits.num_classes, seed), sizes, tf, tf, 16, 64, 0, 0)


def test_digits_loaders_hold_exactly_the_right_classes():
    splits = D.load_dataset("digits", "unused")
    assert splits.num_classes == 10 and len(splits.train) + len(splits.test) == 1797
    stream = _stream(splits, D.task_sizes(10, 4, 3))
    assert stream.tasks == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for t, classes in enumerate(stream.tasks):
        ys = torch.cat([y for _, y in stream.task_data(t).train]).tolist()
        assert set(ys) == set(classes)
        assert len(ys) == sum(int((splits.train.targets == stream.order[c]).sum()) for c in classes)
        yt = torch.cat([y for _, y in stream.test_loader(t)]).tolist()
        assert set(yt) == set(range(classes[-1] + 1))
        assert len(yt) == sum(int((splits.test.targets == stream.order[c]).sum()) for t2 in range(t + 1)
                              for c in stream.tasks[t2])
        # remapping: the position of the original label in the order
        x, y = stream.train_set(t)[0]
        orig = splits.train.targets[stream.train_set(t).idx[0]]
        assert stream.order[y] == orig


@pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED_DATA, "cifar100_mini.npz")), reason="no shared data")
def test_cifar_npz_and_transforms(tmp_path):
    import shutil
    shutil.copy(os.path.join(SHARED_DATA, "cifar100_mini.npz"), tmp_path / "cifar100.npz")
    # a .npz file given as the root is read as it is, whatever its name: the same arrays
    direct = D.load_dataset("cifar100", os.path.join(SHARED_DATA, "cifar100_mini.npz"))
    assert np.array_equal(direct.train.x, np.load(tmp_path / "cifar100.npz")["x_train"])
    splits = D.load_dataset("cifar100", str(tmp_path))
    assert splits.num_classes == 100 and len(splits.train) == 1000 and len(splits.test) == 300
    train_tf, test_tf = D.transforms(32, 32, [0.5] * 3, [0.5] * 3, "weights", "rrc")
    stream = D.CIL(splits, D.class_order(100), D.task_sizes(100, 10, 10), train_tf, test_tf, 32, 64, 0, 0)
    x, y = next(iter(stream.task_data(0).train))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert set(y.tolist()) <= set(range(10))
    xs = torch.cat([x for x, _ in stream.test_loader(2)])
    assert len(xs) == 90  # 3 test images for each of 30 classes
    # the test transform of 32 px images is the identity (then scaling and normalisation)
    img, _ = splits.test[0]
    torch.testing.assert_close(test_tf(img), (img.float() / 255 - 0.5) / 0.5)
    # 224 px pipeline on the same images
    tr, te = D.transforms(224, 32, [0.5] * 3, [0.5] * 3, "none_01", "rrc")
    assert tr(img).shape == (3, 224, 224) and te(img).shape == (3, 224, 224) and te(img).min() >= 0


def test_corrupt_npz_is_a_clear_error(tmp_path):
    (tmp_path / "cifar100.npz").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="cannot read"):
        D.load_dataset("cifar100", str(tmp_path))
    np.savez(tmp_path / "cifar100.npz", x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(2, np.uint8),
             x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.zeros(2, np.uint8))
    with pytest.raises(D.DataError, match=r"\(N, 32, 32, 3\)"):
        D.load_dataset("cifar100", str(tmp_path))


def test_image_folder_tree(tmp_path):
    from PIL import Image
    rng = np.random.RandomState(0)
    names = ["cat", "ant", "dog", "bee"]
    for split, n in (("train", 3), ("test", 2)):
        for c in names:
            os.makedirs(tmp_path / "imagenet_r" / split / c)
            for i in range(n):
                Image.fromarray(rng.randint(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "imagenet_r" / split / c / f"{i}.png")
    splits = D.load_dataset("imagenet_r", str(tmp_path))
    assert splits.num_classes == 4 and len(splits.train) == 12 and len(splits.test) == 8
    assert splits.train.targets.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3  # alphabetical: ant bee cat dog
    train_tf, test_tf = D.transforms(32, 0, [0.5] * 3, [0.5] * 3, "none_01", "rrc")
    stream = D.CIL(splits, D.class_order(4, 0), [2, 2], train_tf, test_tf, 4, 4, 0, 0)
    x, y = next(iter(stream.task_data(1).train))
    assert x.shape[1:] == (3, 32, 32) and set(y.tolist()) <= {2, 3}
    assert sorted(torch.cat([y for _, y in stream.test_loader(1)]).tolist()) == [0] * 2 + [1] * 2 + [2] * 2 + [3] * 2
    with pytest.raises(D.DataError, match="needs the folders"):
        D.load_dataset("cub", str(tmp_path))


def test_missing_cifar_gives_three_fixes_at_once_and_creates_nothing(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_download(*a, **k):
        raise AssertionError("torchvision must not be asked to download when offline")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_download)
    monkeypatch.setattr(D, "_online", lambda timeout=5.0: False)
    monkeypatch.chdir(tmp_path)
    for root in (str(tmp_path / "nonexistent" / "dir"), "data", str(tmp_path)):  # CIL_DATA typo, the default
        with pytest.raises(D.DataError) as e:
            D.load_dataset("cifar100", root)
        msg = str(e.value)
        assert "\n" not in msg and "cifar100.npz" in msg and "cifar-100-python" in msg and "online" in msg
        assert "--preset smoke" in msg
    assert sorted(os.listdir(tmp_path)) == []  # neither ./data nor nonexistent/dir was created


def test_data_root_that_is_another_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(D.DataError, match="not a .npz"):
        D.load_dataset("cifar100", str(tmp_path / "notes.txt"))


def _npz(path, y_train, y_test):
    np.savez(path, x_train=np.zeros((len(y_train), 32, 32, 3), np.uint8), y_train=np.asarray(y_train),
             x_test=np.zeros((len(y_test), 32, 32, 3), np.uint8), y_test=np.asarray(y_test))


def test_labels_out_of_range_and_classes_without_images_are_errors(tmp_path):
    every = np.arange(100)
    _npz(tmp_path / "ok.npz", every, every)
    assert D.load_dataset("cifar100", str(tmp_path / "ok.npz")).num_classes == 100
    for name, y_train, y_test, match in (
            ("train_high", np.r_[every, 100], every, r"1 train label\(s\) outside \[0, 100\), e.g. 100"),
            ("test_high", every, np.r_[every, 250], r"test label\(s\) outside \[0, 100\), e.g. 250"),
            ("negative", np.r_[every, -1], every, r"outside \[0, 100\), e.g. -1"),
            ("empty_class", np.r_[every[:7], every[8:]], every, r"class\(es\) have no training image \(e.g. class 7\)")):
        _npz(tmp_path / f"{name}.npz", y_train, y_test)
        with pytest.raises(D.DataError, match=match) as e:
            D.load_dataset("cifar100", str(tmp_path / f"{name}.npz"))
        assert "\n" not in str(e.value)
    # the same checks guard splits built by hand (CIL is the one place every loader passes through)
    x = np.zeros((3, 4, 4, 3), np.uint8)
    bad = D.Splits(D.ArrayImages(x, [0, 1, 3]), D.ArrayImages(x, [0, 1, 2]), 3, 4)
    with pytest.raises(D.DataError, match="outside"):
        D.CIL(bad, [0, 1, 2], [3], None, None, 2, 2, 0, 0)
    # an ImageFolder class whose train folder holds no image
    from PIL import Image
    for split in ("train", "test"):
        for c in ("a", "b"):
            os.makedirs(tmp_path / "cub" / split / c)
            if (split, c) != ("train", "b"):
                Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "cub" / split / c / "0.png")
    with pytest.raises(D.DataError, match=r"no training image \(e.g. class 1\)"):
        D.load_dataset("cub", str(tmp_path))


def _aug_stream(workers, seed=3):
    """60 distinct 8x8 images of 3 classes, random crop + flip: every draw shows in the pixels."""
    rng = np.random.RandomState(0)
    x = rng.randint(0, 256, (60, 8, 8, 3)).astype(np.uint8)
    y = np.arange(60) % 3
    splits = D.Splits(D.ArrayImages(x, y), D.ArrayImages(x[:6], y[:6]), 3, 8)
    train_tf, test_tf = D.transforms(8, 8, [0.5] * 3, [0.5] * 3, "weights", "crop")
    return D.CIL(splits, [2, 0, 1], [2, 1], train_tf, test_tf, 8, 16, workers, seed)


def _epochs(stream, t=0, epochs=2, rank=0, world=1):
    loader = stream.train_loader(t, rank, world)
    out = []
    for epoch in range(epochs):
        loader.batch_sampler.set_epoch(epoch)
        out.append([(x, y) for x, y in loader])
    return out


def test_augmentation_does_not_depend_on_workers_and_changes_with_the_epoch():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    zero = _epochs(_aug_stream(0))
    assert torch.equal(torch.get_rng_state(), before)  # the loaders leave the training process's RNG alone
    two = _epochs(_aug_stream(2))
    for e in range(2):
        assert len(zero[e]) == len(two[e]) == 5  # 40 images of task 0, batches of 8
        for (x0, y0), (x2, y2) in zip(zero[e], two[e]):
            assert torch.equal(y0, y2) and torch.equal(x0, x2)  # bit-identical
    # epoch 1 draws other crops and flips of the same images
    key = lambda batches: {int(y): x for xs, ys in batches for x, y in zip(xs, ys)}  # noqa: E731
    idx = lambda batches: [i for b in batches for i in b]  # noqa: E731
    loader = _aug_stream(0).train_loader(0)
    loader.batch_sampler.set_epoch(0)
    order0 = idx(loader.batch_sampler)
    loader.batch_sampler.set_epoch(1)
    order1 = idx(loader.batch_sampler)
    assert sorted(i for _, i in order0) == sorted(i for _, i in order1) and order0 != order1
    ds = loader.dataset
    same = [torch.equal(ds[(0, i)][0], ds[(1, i)][0]) for i in range(len(ds))]
    assert sum(same) < len(ds) // 4
    assert all(torch.equal(ds[(1, i)][0], ds[(1, i)][0]) for i in range(5))  # a function of (epoch, image)
    # another seed gives other augmentations
    other = _aug_stream(0, seed=4).train_loader(0).dataset
    assert sum(torch.equal(ds[(0, i)][0], other[(0, i)][0]) for i in range(len(ds))) < len(ds) // 4


def test_torchrun_shards_are_the_single_process_batches():
    stream = _aug_stream(0)
    single = _epochs(stream, epochs=1)[0]
    ranks = [_epochs(stream, epochs=1, rank=r, world=2)[0] for r in (0, 1)]
    for b, (x, y) in enumerate(single):
        x0, y0 = ranks[0][b]
        x1, y1 = ranks[1][b]
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1) and torch.equal(y[0::2], y0)


def test_method_passes_are_seeded_and_new_each_pass():
    passes = {}
    for workers in (0, 2):
        train = _aug_stream(workers).task_data(1).train
        passes[workers] = [torch.cat([x for x, _ in train]) for _ in range(2)]
    assert torch.equal(passes[0][0], passes[2][0]) and torch.equal(passes[0][1], passes[2][1])
    assert not torch.equal(passes[0][0], passes[0][1])  # a second pass: another order and other crops


def _v2_reference(img_size, native_size, mean, std, normalize, train_aug):
    """The same pipelines as a torchvision v2.Compose (what data.ImageTransform replaces for speed)."""
    from torchvision.transforms import v2
    tail = [v2.ToDtype(torch.float32, scale=True)] + ([v2.Normalize(mean, std)] if normalize == "weights" else [])
    rrc = v2.RandomResizedCrop(img_size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
    if native_size and img_size <= native_size * 2:
        test = [] if native_size == img_size else [v2.Resize(img_size, antialias=True)]
        train = {"rrc": [rrc, v2.RandomHorizontalFlip()], "none": test,
                 "crop": test + [v2.RandomCrop(img_size, padding=4), v2.RandomHorizontalFlip()]}[train_aug]
    else:
        test = [v2.Resize(int(img_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.CenterCrop(img_size)]
        train = test if train_aug == "none" else [rrc, v2.RandomHorizontalFlip()]
    return v2.Compose(train + tail), v2.Compose(test + tail)


@pytest.mark.parametrize("args", [(16, 8, "weights", "none"), (16, 8, "weights", "crop"), (16, 8, "none_01", "rrc"),
                                  (32, 32, "weights", "rrc"), (32, 32, "none_01", "crop"), (224, 32, "none_01", "rrc"),
                                  (64, 0, "weights", "rrc"), (64, 0, "none_01", "none")])
def test_transforms_equal_torchvision_v2_bit_for_bit(args):
    size, native, normalize, aug = args
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    ours, ref = D.transforms(size, native, mean, std, normalize, aug), _v2_reference(size, native, mean, std,
                                                                                        normalize, aug)
    g = torch.Generator().manual_seed(size)
    for k in range(12):
        hw = (native, native) if native else (40 + 3 * k, 70 - 2 * k)  # folder images of varying shapes
        img = torch.randint(0, 256, (3, *hw), dtype=torch.uint8, generator=g)
        for a, b in zip(ours, ref):
            torch.manual_seed(k)
            x = a(img)
            torch.manual_seed(k)
            assert torch.equal(x, b(img)) and x.dtype == torch.float32
