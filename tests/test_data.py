"""data.py: class order, splits, remapping, datasets and loaders (protocol.md §2, §3, §11)."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import data as D

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")

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


def test_missing_cifar_gives_three_fixes(tmp_path, monkeypatch):
    import torchvision.datasets
    def offline(*a, **k):
        raise RuntimeError("no internet")
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(D.DataError) as e:
        D.load_dataset("cifar100", str(tmp_path))
    assert "cifar100.npz" in str(e.value) and "--preset smoke" in str(e.value)
