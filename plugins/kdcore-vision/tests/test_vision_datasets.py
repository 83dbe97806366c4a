"""Datasets: CIFAR from local files (and its errors), ImageFolder, the offline digits set."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import kdcore
from kdcore.data import DataSplits
from kdcore_vision import cifar


def write_cifar(root, name, n_train=10, n_test=6, classes=4):
    """A tiny copy in the layout and pickle format of the real python-version archives."""
    folder, train_files, test_file, meta_file, label_key, names_key, *_ = cifar.LAYOUT[name]
    d = root / folder
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, fname in enumerate(train_files + [test_file]):
        n = n_test if fname == test_file else n_train
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(i + j) % classes for j in range(n)]
        if fname == test_file:
            data[0, :1024] = 255  # first test image: red channel saturated, green/blue dark
            data[0, 1024:] = 0
        with open(d / fname, "wb") as f:
            pickle.dump({"data": data, label_key: labels}, f)
    with open(d / meta_file, "wb") as f:
        pickle.dump({names_key: [f"c{k}" for k in range(classes)]}, f)


@pytest.mark.parametrize("name,folder,files", [
    ("cifar10", "cifar-10-batches-py", "data_batch_1"), ("cifar100", "cifar-100-python", "meta")])
def test_missing_cifar_names_the_expected_files(tmp_path, name, folder, files):
    with pytest.raises(kdcore.ConfigError) as err:
        kdcore.create("dataset", name, root=str(tmp_path))
    msg = str(err.value)
    assert msg.startswith("root:") and folder in msg and files in msg and "download = true" in msg
    assert "cifar.html" in msg


def test_partly_present_cifar_lists_what_is_missing(tmp_path):
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(kdcore.ConfigError, match=r"missing: test\)"):
        kdcore.create("dataset", "cifar100", root=str(tmp_path))


def test_download_is_only_attempted_when_asked(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar, "fetch", lambda name, root: calls.append((name, root)))
    with pytest.raises(kdcore.ConfigError, match="not found"):
        kdcore.create("dataset", "cifar10", root=str(tmp_path))
    assert calls == []
    with pytest.raises(kdcore.ConfigError, match="not found"):
        kdcore.create("dataset", "cifar10", root=str(tmp_path), download=True)
    assert calls == [("cifar10", tmp_path)]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_a_local_copy(tmp_path, name):
    write_cifar(tmp_path, name)
    splits = kdcore.create("dataset", name, root=str(tmp_path))
    n_files = len(cifar.LAYOUT[name][1])
    assert isinstance(splits, DataSplits) and splits.num_classes == 4 and splits.input_shape == (3, 32, 32)
    assert len(splits.train) == 10 * n_files and len(splits.test) == 6
    assert splits.val is splits.test and splits.meta["val_is_test"]
    x, y = splits.test[0]
    mean, std = cifar.LAYOUT[name][6], cifar.LAYOUT[name][7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y.item() == n_files % 4
    torch.testing.assert_close(x[0], torch.full((32, 32), (1 - mean[0]) / std[0]))
    torch.testing.assert_close(x[1], torch.full((32, 32), -mean[1] / std[1]))
    torch.testing.assert_close(splits.test[0][0], x)  # evaluation splits are not augmented
    torch.manual_seed(0)
    views = torch.stack([splits.train[0][0] for _ in range(20)])
    assert views.shape == (20, 3, 32, 32) and (views != views[0]).any()  # random crop / flip


def test_cifar_augmentation_is_pad4_random_crop_and_flip(tmp_path):
    """Every training view is a 32x32 window of the image zero-padded by 4 (in pixel space,
    i.e. -mean/std after normalisation), mirrored or not; all 81 offsets and both flips occur."""
    write_cifar(tmp_path, "cifar100")
    splits = kdcore.create("dataset", "cifar100", root=str(tmp_path))
    plain = kdcore.create("dataset", "cifar100", root=str(tmp_path), augment=False).train[0][0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in cifar.LAYOUT["cifar100"][6:8])
    padded = (-mean / std).expand(3, 40, 40).clone()
    padded[:, 4:36, 4:36] = plain
    keys = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)]
    windows = torch.stack([padded[:, dy:dy + 32, dx:dx + 32].flip(-1) if flip else
                           padded[:, dy:dy + 32, dx:dx + 32] for dy, dx, flip in keys])
    torch.manual_seed(0)
    seen = set()
    for _ in range(600):
        hits = ((windows - splits.train[0][0]).abs().flatten(1).amax(1) < 1e-6).nonzero().flatten()
        assert len(hits) == 1
        seen.add(keys[hits.item()])
    assert {k[:2] for k in seen} == {(dy, dx) for dy in range(9) for dx in range(9)}
    assert {k[2] for k in seen} == {False, True}


def test_cifar_val_split_holds_out_training_images(tmp_path):
    write_cifar(tmp_path, "cifar100", n_train=40)
    splits = kdcore.create("dataset", "cifar100", root=str(tmp_path), val_split=0.25, seed=3)
    assert len(splits.train) == 30 and len(splits.val) == 10 and splits.val is not splits.test
    assert not splits.val.augment and splits.train.augment and not splits.meta["val_is_test"]
    with pytest.raises(kdcore.ConfigError, match="val_split"):
        kdcore.create("dataset", "cifar100", root=str(tmp_path), val_split=1.5)


def test_cifar_without_augmentation_is_deterministic(tmp_path):
    write_cifar(tmp_path, "cifar10")
    splits = kdcore.create("dataset", "cifar10", root=str(tmp_path), augment=False)
    torch.testing.assert_close(splits.train[3][0], splits.train[3][0])


def test_digits_offline():
    splits = kdcore.create("dataset", "digits")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1258, 270, 269)
    assert splits.num_classes == 10 and splits.input_shape == (3, 32, 32)
    x = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    y = torch.stack([splits.val[i][1] for i in range(len(splits.val))])
    assert x.shape == (270, 3, 32, 32) and y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    torch.testing.assert_close(x[:, 0], x[:, 2])  # grey replicated over RGB
    train = torch.stack([splits.train[i][0] for i in range(200)])
    assert abs(train.mean().item()) < 0.15 and 0.8 < train.std().item() < 1.2  # normalised on train
    again = kdcore.create("dataset", "digits")
    assert torch.equal(again.test.labels, splits.test.labels)  # same seed, same split
    other = kdcore.create("dataset", "digits", seed=1, image_size=16, split=[0.8, 0.2, 0.0])
    assert other.test is None and other.input_shape == (3, 16, 16) and len(other.val) == 359


def test_digits_batches_through_a_dataloader():
    splits = kdcore.create("dataset", "digits")
    x, y = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=8, shuffle=True)))
    assert x.shape == (8, 3, 32, 32) and y.shape == (8,)


@pytest.mark.parametrize("params,match", [
    ({"image_size": 4}, "image_size"), ({"split": [0.5, 0.5]}, "split"), ({"seed": "a"}, "seed"),
    ({"augment": "yes"}, "augment")])
def test_digits_parameters_are_checked(params, match):
    with pytest.raises(kdcore.ConfigError, match=match):
        kdcore.create("dataset", "digits", **params)


def make_folder(root, split, classes, per_class=2, size=20):
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size + 4, 3), 40 * i, dtype=np.uint8)).save(d / f"{i}.png")


def test_imagefolder(tmp_path):
    make_folder(tmp_path, "train", ["cat", "dog", "emu"])
    make_folder(tmp_path, "val", ["dog"])
    splits = kdcore.create("dataset", "imagefolder", root=str(tmp_path), image_size=16, augment="cifar")
    assert splits.num_classes == 3 and splits.test is None and splits.meta["classes"] == ["cat", "dog", "emu"]
    x, y = splits.val[0]
    assert x.shape == (3, 16, 16) and y == 1  # labels follow train/'s classes
    assert splits.train[0][0].shape == (3, 16, 16)
    imagenet = kdcore.create("dataset", "imagefolder", root=str(tmp_path), image_size=16)
    assert imagenet.train[5][0].shape == imagenet.val[0][0].shape == (3, 16, 16)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(kdcore.ConfigError, match="train.*val.*missing: train, val"):
        kdcore.create("dataset", "imagefolder", root=str(tmp_path))
    make_folder(tmp_path, "train", ["a", "b"])
    make_folder(tmp_path, "val", ["a", "zebra"])
    with pytest.raises(kdcore.ConfigError, match="zebra"):
        kdcore.create("dataset", "imagefolder", root=str(tmp_path))
    with pytest.raises(kdcore.ConfigError, match="augment"):
        kdcore.create("dataset", "imagefolder", root=str(tmp_path), augment="strong")
