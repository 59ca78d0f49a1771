"""resflax.data: the offline `digits` dataset, tfds data sources and the grain input pipeline.

Real data is scikit-learn's digits, prepared into pytest tmp dirs; CIFAR-10 and ImageNet shapes
come from `tfds.testing.mock_data` (which ignores `data_dir` and split slicing).
"""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits

from resflax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    data.prepare_digits(path)
    return path


def _sklearn_examples(rows):
    digits = load_digits()
    images = np.round(digits.images[rows] * 255 / 16).astype(np.uint8)[..., None]
    return images, digits.target[rows]


def _multiset(images, labels):
    """Examples as a multiset (Counter) of (label, image bytes): order-free equality."""
    return collections.Counter((int(y), np.asarray(x).tobytes()) for x, y in zip(images, labels))


def _source_multiset(src):
    examples = [src[i] for i in range(len(src))]
    return _multiset([e["image"] for e in examples], [e["label"] for e in examples])


def _unnormalize(batch_images, name, data_dir):
    """float32 normalized batch -> the uint8 pixels it came from (exact inverse up to rounding)."""
    mean, std = data.channel_stats(name, data_dir=data_dir)
    return np.round((batch_images * std + mean) * 255).astype(np.uint8)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


# --------------------------------------------------------------------------------------------
# The embedded offline dataset.


def test_digits_prepares_offline_with_the_real_sklearn_images(tmp_path):
    path = data.prepare_digits(tmp_path)
    assert path == os.path.join(tmp_path, "digits", "1.0.0")
    info_file = os.path.join(path, "dataset_info.json")
    mtime = os.stat(info_file).st_mtime_ns
    assert data.prepare_digits(tmp_path) == path  # idempotent: reuses the prepared copy
    assert os.stat(info_file).st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == ["digits"]  # no temp dirs or downloads left behind

    rows = data.digits_split_indices()
    assert (len(rows["train"]), len(rows["test"])) == (1437, 360)
    assert sorted(np.concatenate([rows["train"], rows["test"]])) == list(range(1797))
    for split in ("train", "test"):
        src = data.source("digits", split, data_dir=tmp_path)
        assert len(src) == len(rows[split])
        assert _source_multiset(src) == _multiset(*_sklearn_examples(rows[split]))
    meta = data.dataset_meta("digits", data_dir=tmp_path)
    assert meta == data.DatasetMeta("digits", 10, (8, 8, 1), {"train": 1437, "test": 360})
    assert "tensorflow" not in sys.modules


def test_digits_concurrent_prepare_in_two_processes(tmp_path):
    code = "import sys; from resflax import data; print(data.prepare_digits(sys.argv[1]))"
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert {out.strip() for out, _ in outs} == {os.path.join(tmp_path, "digits", "1.0.0")}
    assert sorted(os.listdir(tmp_path)) == ["digits"]
    assert len(data.source("digits", "test", data_dir=tmp_path)) == 360


def test_digits_prepare_that_loses_the_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    """Another process renamed its copy into place while this one was writing its own."""
    path = data.prepare_digits(tmp_path)
    info_file = os.path.join(path, "dataset_info.json")
    mtime = os.stat(info_file).st_mtime_ns
    answers = iter([False])  # "not prepared yet" once, then the truth
    real_is_prepared, real_rename, renames = data._is_prepared, os.rename, []

    def is_prepared(builder):
        return next(answers, None) is not False and real_is_prepared(builder)

    def rename(src, dst):
        renames.append(os.fspath(dst))
        return real_rename(src, dst)

    monkeypatch.setattr(data, "_is_prepared", is_prepared)
    monkeypatch.setattr(os, "rename", rename)
    assert data.prepare_digits(tmp_path) == path
    assert os.stat(info_file).st_mtime_ns == mtime
    assert renames.count(path) == 1  # it wrote its own copy, and its rename lost
    assert sorted(os.listdir(tmp_path)) == ["digits"]  # the loser's temp copy is gone


def test_split_strings_slice_the_train_split(digits_dir):
    """He et al.'s 45k/5k CIFAR split is 'train[:45000]' / 'train[45000:]'; here 1000/437."""
    head = data.source("digits", "train[:1000]", data_dir=digits_dir)
    tail = data.source("digits", "train[1000:]", data_dir=digits_dir)
    full = data.source("digits", "train", data_dir=digits_dir)
    assert (len(head), len(tail)) == (1000, 437)
    assert _source_multiset(head) + _source_multiset(tail) == _source_multiset(full)


def test_channel_stats_are_the_train_split_statistics(digits_dir):
    src = data.source("digits", "train", data_dir=digits_dir)
    pixels = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float64) / 255
    mean, std = data.channel_stats("digits", data_dir=digits_dir)
    assert mean.shape == std.shape == (1,) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Datasets that are not prepared.


def test_missing_dataset_raises_a_clear_error_and_downloads_nothing(tmp_path):
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.source("cifar10", "train", data_dir=tmp_path)
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    for part in ("'cifar10'", str(tmp_path), "resflax[prepare]",
                 f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record"):
        assert part in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(data.DatasetNotFoundError, match="cifar10"):
        data.make_loader("cifar10", "train", batch_size=8, train=True, data_dir=tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match=r"ILSVRC2012_img_train\.tar"):
        data.source("imagenet2012", "validation", data_dir=tmp_path)
    with pytest.raises(data.DatasetNotFoundError, match="not a tfds dataset"):
        data.source("no_such_dataset", "train", data_dir=tmp_path)
    assert not any(files for _, _, files in os.walk(tmp_path))  # nothing downloaded or written


def test_missing_dataset_without_data_dir_names_the_tfds_default(tmp_path, monkeypatch):
    # tfds reads $TFDS_DATA_DIR once, at import, into constants.DATA_DIR, and resolves
    # data_dir=None from that constant (and registered dirs) at call time.
    default = tmp_path / "tfds_default"
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(default))
    monkeypatch.setattr(tfds.core.utils.file_utils, "_REGISTERED_DATA_DIRS", set())
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.source("cifar10", "train")
    msg = str(err.value)
    assert "the default tfds data_dir" not in msg
    assert f"tfds' default data_dir {str(default)!r}" in msg
    assert f"tfds build cifar10 --data_dir={default} --file_format=array_record" in msg
    assert not any(files for _, _, files in os.walk(tmp_path))  # nothing downloaded or written


def test_download_opt_in_wraps_failures_in_the_same_error(tmp_path, monkeypatch):
    def fail(self, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
    expected = r"(?s)tfds build mnist.*download=True failed.*tensorflow"
    with pytest.raises(data.DatasetNotFoundError, match=expected):
        data.source("mnist", "train", data_dir=tmp_path, download=True)


# --------------------------------------------------------------------------------------------
# The pipeline on CIFAR-10- and ImageNet-shaped mock data.


@pytest.fixture
def mock_64():
    with tfds.testing.mock_data(num_examples=64):
        yield


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_cifar10_shaped_batches(mock_64, tmp_path, augment):
    loader = data.make_loader("cifar10", "train", batch_size=16, train=True, seed=3,
                              data_dir=tmp_path, augment=augment, num_epochs=1)
    batches = list(loader)
    assert len(batches) == 4
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
        assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
        assert ((batch["label"] >= 0) & (batch["label"] < 10)).all()


def test_eval_batches_are_the_normalized_source_in_order(mock_64, tmp_path):
    src = data.source("cifar10", "test", data_dir=tmp_path)
    mean, std = data.channel_stats("cifar10")
    loader = data.make_loader("cifar10", "test", batch_size=8, train=False, data_dir=tmp_path)
    batch = next(iter(loader))
    expected = np.stack([src[i]["image"] for i in range(8)]).astype(np.float32) / 255
    np.testing.assert_allclose(batch["image"], (expected - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], [src[i]["label"] for i in range(8)])


def test_pad_crop_flip_is_a_shifted_and_maybe_flipped_copy():
    image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    out = data.PadCropFlip(pad=4).random_map({"image": image, "label": 1}, np.random.default_rng(1))
    assert out["image"].shape == image.shape and out["image"].dtype == np.float32
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crops = [padded[i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
    flips = [c[:, ::-1] for c in crops]
    assert any(np.array_equal(out["image"], c) for c in crops + flips)


def test_variable_sized_images_need_image_size(tmp_path):
    with tfds.testing.mock_data(num_examples=8):
        with pytest.raises(ValueError, match="image_size"):
            data.make_loader("imagenet2012", "train", batch_size=4, train=True, data_dir=tmp_path)
        loader = data.make_loader("imagenet2012", "train", batch_size=4, train=True, image_size=16,
                                  augment="cifar", num_epochs=1, data_dir=tmp_path)
        shapes = [b["image"].shape for b in loader]
    assert shapes == [(4, 16, 16, 3)] * 2


@pytest.mark.parametrize(
    "kwargs, field",
    [({"augment": "autoaugment"}, "augment"), ({"batch_size": 9, "process_count": 2}, "batch_size"),
     ({"process_index": 2, "process_count": 2}, "process_index"), ({"num_epochs": 0}, "num_epochs"),
     ({"seed": -1}, "seed"), ({"worker_count": -1}, "worker_count")],
)
def test_bad_arguments_name_the_argument(digits_dir, kwargs, field):
    args = dict(batch_size=8, train=True, data_dir=digits_dir) | kwargs
    with pytest.raises(ValueError, match=field):
        data.make_loader("digits", "test", **args)


@pytest.mark.skipif(flags.FLAGS.is_parsed(), reason="absl flags already parsed in this process")
def test_worker_processes_without_parsed_absl_flags_fail_early(digits_dir):
    with pytest.raises(ValueError, match="worker_count=2 needs absl flags parsed"):
        data.make_loader("digits", "test", batch_size=8, train=True, data_dir=digits_dir,
                         worker_count=2)


# --------------------------------------------------------------------------------------------
# Shuffling, coverage, sharding, resuming: real digits, 120 test examples = 3 batches of 40.

SPLIT = "test[:120]"


def _loader(digits_dir, **kwargs):
    args = dict(batch_size=40, train=True, seed=0, data_dir=digits_dir, augment="cifar") | kwargs
    return data.make_loader("digits", args.pop("split", SPLIT), **args)


def test_same_seed_same_batches_other_seed_other_order(digits_dir):
    first = _take(iter(_loader(digits_dir, seed=7)), 5)  # crosses the epoch boundary
    again = _take(iter(_loader(digits_dir, seed=7)), 5)
    _assert_same_batches(first, again)
    other = _take(iter(_loader(digits_dir, seed=8)), 5)
    assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_every_example_exactly_once_per_epoch(digits_dir):
    src = data.source("digits", SPLIT, data_dir=digits_dir)
    batches = list(_loader(digits_dir, augment="none", num_epochs=2, drop_remainder=False))
    assert len(batches) == 6
    epochs = [batches[:3], batches[3:]]
    seen = [
        _multiset(_unnormalize(np.concatenate([b["image"] for b in e]), "digits", digits_dir),
                  np.concatenate([b["label"] for b in e]))
        for e in epochs
    ]
    assert seen[0] == seen[1] == _source_multiset(src)
    orders = [np.concatenate([b["label"] for b in e]) for e in epochs]
    assert not np.array_equal(*orders)  # reshuffled each epoch


@pytest.mark.parametrize("n, dropped", [(40, 0), (41, 1)])
def test_two_processes_get_disjoint_shards_covering_the_split(digits_dir, n, dropped):
    """Shards of n // 2 examples; with n odd grain drops the remainder of 1 (equal shards)."""
    split = f"test[:{n}]"
    shards = []
    for process_index in (0, 1):
        batches = list(_loader(digits_dir, split=split, batch_size=8, augment="none",
                               num_epochs=1, drop_remainder=False,
                               process_index=process_index, process_count=2))
        assert [b["label"].shape[0] for b in batches] == [4] * 5  # B_local = 8 / 2
        images = np.concatenate([b["image"] for b in batches])
        shards.append(_multiset(_unnormalize(images, "digits", digits_dir),
                                np.concatenate([b["label"] for b in batches])))
    whole = _source_multiset(data.source("digits", split, data_dir=digits_dir))
    union = shards[0] + shards[1]
    assert not union - whole  # no example twice across processes: the shards are disjoint
    assert sum((whole - union).values()) == dropped


@pytest.mark.parametrize("process_index, process_count", [(0, 1), (1, 2)])
def test_resume_from_iterator_state_continues_exactly(digits_dir, process_index, process_count):
    def loader():
        return _loader(digits_dir, seed=5, batch_size=32, process_index=process_index,
                       process_count=process_count)

    uninterrupted = _take(iter(loader()), 10)  # 120 / 32 = 3.75 batches an epoch
    it = iter(loader())
    _take(it, 5)
    state = it.get_state()
    assert isinstance(state, bytes)
    resumed = iter(loader())
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 5), uninterrupted[5:])


def test_padded_batches_pad_with_zeros_and_mask_the_padding():
    batches = [{"image": np.ones((4, 2), np.float32), "label": np.arange(4, dtype=np.int32)},
               {"image": np.ones((1, 2), np.float32), "label": np.array([9], np.int32)}]
    full, short = data.padded_batches(batches, 4)
    np.testing.assert_array_equal(full["mask"], np.ones(4, np.float32))
    np.testing.assert_array_equal(full["label"], batches[0]["label"])
    assert short["image"].shape == (4, 2) and short["image"].dtype == np.float32
    np.testing.assert_array_equal(short["mask"], [1.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(short["label"], [9, 0, 0, 0])
    np.testing.assert_array_equal(short["image"][1:], np.zeros((3, 2)))
