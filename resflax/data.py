"""Image-classification data: tfds `data_source` (array_record, random access) + grain pipelines.

Reading never needs TensorFlow and never downloads: a dataset must already be prepared in
`data_dir` as array_record (`tfds build NAME --data_dir=DIR --file_format=array_record`, which
needs `pip install 'resflax[prepare]'`), except

- `digits`: scikit-learn's 1797 real 8x8 handwritten digits (UCI ML digits, shipped inside the
  scikit-learn wheel), written once as a local tfds dataset on first use; fully offline.

A loader (`make_loader`) yields batches

    {'image': float32 [B_local, H, W, C], 'label': int32 [B_local]},
    B_local = batch_size / process_count,

with pixels scaled to [0, 1] and normalized per channel, `(x - mean_c) / std_c`, where
`(mean_c, std_c)` are the train-split statistics (`channel_stats`). Its iterator is a grain
`DataLoaderIterator`: `get_state() -> bytes` / `set_state(bytes)` resume at the exact next batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import tempfile
import threading
from typing import Any, Callable, Iterable, Iterator

from absl import flags
import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

# --------------------------------------------------------------------------------------------
# Errors.


class DatasetNotFoundError(ValueError):
    """The dataset is unknown to tfds, or not prepared as array_record in `data_dir`."""


def _not_prepared_message(builder: tfds.core.DatasetBuilder, data_dir: Any) -> str:
    name = builder.name
    # data_dir=None: the root tfds resolved, its default ($TFDS_DATA_DIR, read when tfds is
    # imported, else ~/tensorflow_datasets: tfds.core.constants.DATA_DIR), a path to paste.
    root = os.fspath(data_dir) if data_dir else os.fspath(builder.data_dir_root)
    where = f"data_dir={root!r}" if data_dir else (
        f"tfds' default data_dir {root!r} ($TFDS_DATA_DIR, else ~/tensorflow_datasets)")
    lines = [
        f"Dataset {name!r} is not prepared in {where} (looked for array_record files "
        f"in {os.fspath(builder.data_path)}). resflax reads prepared data offline and never "
        "downloads implicitly. To prepare it (needs TensorFlow and, for most datasets, network):",
        "  pip install 'resflax[prepare]'    # adds tensorflow-cpu; only preparing needs it",
        f"  tfds build {name} --data_dir={root} --file_format=array_record",
    ]
    manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if manual:
        lines += [
            f"{name!r} must be downloaded by hand first: put the files in "
            f"{os.path.join(root, 'downloads', 'manual')} (or pass --manual_dir=DIR to tfds "
            "build).",
            "tfds says: " + " ".join(manual.split()),
        ]
    lines.append("Or pass download=True to let tfds download and prepare it (array_record).")
    return "\n".join(lines)


def _builder(name: str, data_dir: Any) -> tfds.core.DatasetBuilder:
    """`tfds.builder(name, data_dir=data_dir)`; an unknown name is a short DatasetNotFoundError."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} must be a tfds dataset name such as 'cifar10'")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetNotFoundError(
            f"name={name!r} is not a tfds dataset (see tfds.list_builders()); "
            f"the embedded offline dataset is 'digits'"
        ) from None


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """`builder.is_prepared()`, minus tfds' warning when the folder does not exist."""
    return (builder.data_path / "dataset_info.json").exists() and builder.is_prepared()


_PREPARE_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet():
    """Silences tfds' prints and progress bars while preparing (the library does not print).

    sys.stdout/stderr are process-global, so preparations in one process are serialized.
    """
    with _PREPARE_LOCK:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield


# --------------------------------------------------------------------------------------------
# The embedded offline dataset `digits`.

DIGITS_NUM_TEST = 360  # of 1797: 1437 train / 360 test (~80/20)
DIGITS_SPLIT_SEED = 0  # np.random.RandomState(0): a stream NumPy keeps frozen across versions


def digits_split_indices() -> dict[str, np.ndarray]:
    """Rows of `sklearn.datasets.load_digits()` in each split: a fixed random permutation.

    The permutation is `np.random.RandomState(DIGITS_SPLIT_SEED).permutation(1797)`; its first
    `DIGITS_NUM_TEST` (360) rows are `test`, the other 1437 `train`.

    Returns:
      `{'train': int array [1437], 'test': int array [360]}`, each sorted ascending; disjoint,
      together every row once.
    """
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    n = len(load_digits().target)
    perm = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(n)
    return {"train": np.sort(perm[DIGITS_NUM_TEST:]), "test": np.sort(perm[:DIGITS_NUM_TEST])}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits as a tfds dataset named `digits` (no download).

    image: uint8 [8, 8, 1], the 0..16 counts rescaled to round(v * 255 / 16); label: 0..9.
    Splits: `train` (1437) and `test` (360) from a fixed permutation (`digits_split_indices`).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn.datasets.load_digits, fixed 1437/360 split."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        """None: there is no checksums file next to the code (nothing is downloaded).

        Also sidesteps tfds 4.9.10 importing `importlib_resources` (which it does not declare
        for Python >= 3.9) to locate the code of a builder defined inside a package.
        """
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="UCI ML hand-written digits (Alpaydin & Kaynak 1998), via scikit-learn.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        splits = digits_split_indices()
        return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):
        from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

        digits = load_digits()
        for row in rows:
            image = np.round(digits.images[row] * 255.0 / 16.0).astype(np.uint8)[..., None]
            yield int(row), {"image": image, "label": int(digits.target[row])}


def prepare_digits(data_dir: str | os.PathLike | None = None) -> str:
    """Writes `digits` (array_record) under `data_dir` once; returns its directory.

    Idempotent, and safe when several processes call it at once: each writes into its own
    temporary directory inside `data_dir` and atomically renames it into place; the losers of
    that race discard their copy.

    Args:
      data_dir: the tfds data directory; None: tfds' default (`~/tensorflow_datasets` unless
        `TFDS_DATA_DIR` says otherwise).

    Returns:
      The prepared dataset's directory, `data_dir/digits/1.0.0`.
    """
    builder = Digits(data_dir=data_dir, file_format="array_record")
    final = os.fspath(builder.data_path)  # DATA_DIR/digits/1.0.0
    if _is_prepared(builder):
        return final
    root = os.path.dirname(os.path.dirname(final))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".digits-tmp-") as tmp:
        tmp_builder = Digits(data_dir=tmp, file_format="array_record")
        with _quiet():
            tmp_builder.download_and_prepare()
        try:
            os.rename(os.fspath(tmp_builder.data_path), final)
        except OSError:
            if not _is_prepared(Digits(data_dir=data_dir)):
                raise
    return final


# --------------------------------------------------------------------------------------------
# Reading any tfds image-classification dataset.


def source(name: str, split: str, *, data_dir=None, download: bool = False):
    """The random-access tfds data source of `name`/`split` (array_record; no TensorFlow).

    `split` is any tfds split string: 'train', 'test', 'train[:45000]', 'train[45000:]' (He et
    al.'s 45k/5k CIFAR-10 train/validation split), 'train[:90%]', ... `len()` of the result is
    the number of examples; `source[i]` is a dict of numpy features (e.g. image uint8 [H, W, C]).
    `digits` is prepared on first use. Any other dataset must already be prepared in `data_dir`,
    else DatasetNotFoundError says how; `download=True` opts in to
    `builder.download_and_prepare(file_format='array_record')` (needs TensorFlow and network).

    Args:
      name: a tfds dataset name ('digits', 'cifar10', 'mnist', 'imagenet2012', ...).
      split: a tfds split string (above).
      data_dir: the tfds data directory; None: tfds' default.
      download: prepare the dataset if it is not prepared yet (off by default: reading never
        downloads).

    Returns:
      The tfds random-access data source of that split.

    Raises:
      DatasetNotFoundError: the dataset is not prepared in `data_dir` (or `download=True`
        failed), or it is prepared in a file format without random access; the message says
        how to prepare it.
    """
    if name == "digits":
        prepare_digits(data_dir)
    builder = _builder(name, data_dir)
    if download and not _is_prepared(builder):
        try:
            with _quiet():
                builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # No TensorFlow, no network, missing manual files, ...
            raise DatasetNotFoundError(
                f"{_not_prepared_message(builder, data_dir)}\n"
                f"download=True failed: {type(e).__name__}: {e}"
            ) from None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception:
        # tfds.data_source(download=False) on missing data fails with a misleading message.
        # (Not checked before the call: under tfds.testing.mock_data nothing is prepared.)
        if not _is_prepared(builder):
            raise DatasetNotFoundError(_not_prepared_message(builder, data_dir)) from None
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise DatasetNotFoundError(
                f"Dataset {name!r} in {os.fspath(builder.data_path)} is prepared as "
                f"{builder.info.file_format.value}, which has no random access. Rebuild it: "
                f"tfds build {name} --data_dir={os.fspath(builder.data_dir_root)} "
                "--file_format=array_record"
            ) from None
        raise


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
    """What a model and a training loop need to know, from the builder info (no data read).

    image_shape: (H, W, C), with None for variable sizes (e.g. imagenet2012).
    num_examples: examples per prepared split, e.g. {'train': 50000, 'test': 10000}; empty when
      the dataset is not prepared (or mocked): then use `len(source(name, split))`.
    """

    name: str
    num_classes: int
    image_shape: tuple[int | None, ...]
    num_examples: dict[str, int]


def dataset_meta(name: str, *, data_dir=None) -> DatasetMeta:
    """Metadata of `name` (prepares `digits` first; other datasets need not be prepared).

    Args:
      name: a tfds dataset name.
      data_dir: the tfds data directory; None: tfds' default.

    Returns:
      A `DatasetMeta`: `num_classes` of the label feature, `image_shape` (H, W, C) of the image
      feature (None for variable sizes), `num_examples` per prepared split.
    """
    if name == "digits":
        prepare_digits(data_dir)
    info = _builder(name, data_dir).info
    image_key, label_key = _keys(info)
    return DatasetMeta(
        name=name,
        num_classes=int(info.features[label_key].num_classes),
        image_shape=tuple(info.features[image_key].shape),
        num_examples={s: int(v.num_examples) for s, v in info.splits.items()},
    )


def _keys(info: tfds.core.DatasetInfo) -> tuple[str, str]:
    """(image, label) feature names: the supervised keys, else tfds' usual 'image', 'label'."""
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return "image", "label"


# Per-channel (mean, std) of pixel / 255 over each train split: the published values for these
# datasets (ImageNet: the usual torchvision constants). Any other dataset is measured.
_CHANNEL_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_STATS_MAX_EXAMPLES = 10_000


@functools.lru_cache(maxsize=None)
def _measured_stats(name: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    src = source(name, "train", data_dir=data_dir)
    image_key, _ = _keys(_builder(name, data_dir).info)
    rows = np.unique(np.linspace(0, len(src) - 1, min(len(src), _STATS_MAX_EXAMPLES)).astype(int))
    total, total_sq, count = 0.0, 0.0, 0
    for i in rows:
        x = np.asarray(src[int(i)][image_key], np.float64) / 255.0
        x = x.reshape(-1, x.shape[-1])
        total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + len(x)
    mean = total / count
    return mean.astype(np.float32), np.sqrt(total_sq / count - mean * mean).astype(np.float32)


def channel_stats(name: str, *, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std), each float32 [C], of pixel / 255 per channel over the train split.

    Fixed published constants for cifar10, cifar100, mnist, fashion_mnist, svhn_cropped and
    imagenet2012; otherwise (e.g. digits) measured over up to 10,000 evenly spaced train
    examples (all of them for digits) and cached per process.

    Args:
      name: a tfds dataset name.
      data_dir: the tfds data directory (read only for measured statistics); None: tfds'
        default.

    Returns:
      `(mean, std)`, float32 arrays of shape [C]: `mean_c = E[x_c]` and
      `std_c = sqrt(E[x_c^2] - E[x_c]^2)` (population std) of `x = pixel / 255` over every
      pixel of channel `c` of those train examples. Loaders normalize with
      `(x - mean_c) / std_c`.
    """
    if name in _CHANNEL_STATS:
        mean, std = _CHANNEL_STATS[name]
        return np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return _measured_stats(name, None if data_dir is None else os.fspath(data_dir))


# --------------------------------------------------------------------------------------------
# grain transforms (module-level classes: picklable for worker processes).


def _resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, C] -> [size, size, C]: shorter side to `size` (bilinear), then center crop."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    h, w, c = image.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image[..., 0] if c == 1 else image).resize((nw, nh), Image.BILINEAR)
    out = np.asarray(pil).reshape(nh, nw, c)
    top, left = (nh - size) // 2, (nw - size) // 2
    return out[top : top + size, left : left + size]


@dataclasses.dataclass
class _Normalize(grain.transforms.Map):
    """tfds example -> {'image': float32 [H, W, C] = (x / 255 - mean) / std, 'label': int32 []}."""

    image_key: str
    label_key: str
    mean: np.ndarray
    std: np.ndarray
    image_size: int | None = None

    def map(self, example):
        image = np.asarray(example[self.image_key])
        if self.image_size is not None:
            image = _resize_center_crop(image, self.image_size)
        image = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        return {"image": image, "label": np.int32(example[self.label_key])}


@dataclasses.dataclass
class PadCropFlip(grain.transforms.RandomMap):
    """He et al. 2015's CIFAR augmentation, for any [H, W, C] image.

    Zero-pad `pad` pixels on each side (after normalization, so the padding is the mean colour,
    as in He et al.), take a random H x W crop, and flip left-right with probability 1/2.
    The rng comes from grain: deterministic given the loader seed and the example's position.
    """

    pad: int = 4

    def random_map(self, example, rng: np.random.Generator):
        image = example["image"]
        h, w, _ = image.shape
        p = self.pad
        padded = np.pad(image, ((p, p), (p, p), (0, 0)))
        top, left = rng.integers(0, 2 * p + 1, size=2)
        image = padded[top : top + h, left : left + w]
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": example["label"]}


# augment name -> per-example transforms applied after normalization.
AUGMENTATIONS: dict[str, tuple[Any, ...]] = {
    "none": (),
    "cifar": (PadCropFlip(pad=4),),
}


# --------------------------------------------------------------------------------------------
# The input pipeline.


def make_loader(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    data_dir=None,
    augment: str = "none",
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool | None = None,
    worker_count: int = 0,
    image_size: int | None = None,
    download: bool = False,
    read_threads: int | None = None,
) -> grain.DataLoader:
    """A grain DataLoader over `source(name, split)` for this JAX process.

    Iterating yields {'image': float32 [B_local, H, W, C], 'label': int32 [B_local]} with
    B_local = batch_size // process_count (`batch_size` is the GLOBAL batch); images are
    `(pixel / 255 - mean_c) / std_c` with the train-split `channel_stats`.

    Args:
      name: a tfds dataset name (`source`).
      split: a tfds split string (`source`).
      batch_size: the global batch size, a positive multiple of `process_count`.
      train: shuffle and, by default, repeat forever and drop a last partial batch (below).
      seed: the sampler seed in [0, 2**32): shuffling order and augmentation draws.
      data_dir: the tfds data directory; None: tfds' default.
      augment: a name in `AUGMENTATIONS`, 'none' or 'cifar' (below).
      num_epochs: passes over the shard; None: forever when `train`, else 1.
      process_index: this process's shard; None: `jax.process_index()`.
      process_count: the number of shards; None: `jax.process_count()`.
      drop_remainder: below; None: `train`.
      worker_count: grain worker processes (below).
      image_size: below; None: keep the stored size (fixed-size datasets only).
      download: passed to `source`.
      read_threads: below.

    Returns:
      A `grain.DataLoader`; `iter()` of it is a `DataLoaderIterator` (resuming: below).

    Raises:
      ValueError: a bad argument (unknown `augment`, a batch size that is not a positive
        multiple of `process_count`, too few examples for one batch, variable-sized images
        without `image_size`, ...), naming it.
      DatasetNotFoundError: the dataset is not prepared (`source`).

    Details:
    - Sharding: the split is cut into `process_count` contiguous, equal, disjoint shards
      (grain ShardOptions(drop_remainder=True): at most process_count - 1 examples are left
      out); process `process_index` reads only its shard. Defaults: jax.process_index/count().
    - train=True: shuffled (a new order every epoch, fixed by `seed`); `num_epochs=None` repeats
      forever, batches running across epoch boundaries; every example of the shard appears
      exactly once per epoch. train=False: file order, one epoch unless `num_epochs` is given.
    - augment: 'none' or 'cifar' (pad 4 + random H x W crop + random flip, `PadCropFlip`); the
      random draws are a function of (seed, position in the stream) only.
    - drop_remainder: drop a last partial batch (default: `train`).
    - image_size: resize the shorter side and center-crop to image_size x image_size (needed
      for variable-sized images such as imagenet2012).
    - read_threads: threads reading records ahead (grain `ReadOptions.num_threads`; None:
      grain's default, 16 threads and a 500-record buffer, meant for remote storage). 0 reads
      in the consuming thread: about 2.5x faster for small local records on a 2-core CPU, where
      grain's prefetch bookkeeping costs more than the reads. The batches are the same.
    - worker_count: grain worker processes (0: in this process; > 0 needs parsed absl flags).
      Each worker batches its own strided share of the stream, so the batch sequence depends
      on worker_count, and a state restores only into a loader with the same worker_count.

    Resuming: `it = iter(loader)`; `state = it.get_state()` (bytes) after any batch;
    later `it = iter(make_loader(<same arguments>)); it.set_state(state)` continues with the
    very next batch (grain checks that the sampler and source match).
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"augment={augment!r} is not supported; allowed values: {sorted(AUGMENTATIONS)}"
        )
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count={process_count!r} must be a positive int")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index!r} must be in [0, process_count={process_count})"
        )
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size!r} (global) must be a positive multiple of "
            f"process_count={process_count}"
        )
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an int in [0, 2**32) (grain's sampler seed)")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
        raise ValueError(f"num_epochs={num_epochs!r} must be None (forever) or a positive int")
    if not isinstance(worker_count, int) or worker_count < 0:
        raise ValueError(f"worker_count={worker_count!r} must be an int >= 0")
    if worker_count > 0 and not flags.FLAGS.is_parsed():
        raise ValueError(
            f"worker_count={worker_count} needs absl flags parsed (grain reads its flags when it "
            "starts worker processes): run under absl.app.run, as experiments/ do, or call "
            "absl.flags.FLAGS.mark_as_parsed() first; worker_count=0 needs neither"
        )
    if read_threads is not None and (not isinstance(read_threads, int) or read_threads < 0):
        raise ValueError(f"read_threads={read_threads!r} must be None (grain's default) or >= 0")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size={image_size!r} must be None or a positive int")
    if num_epochs is None and not train:
        num_epochs = 1
    if drop_remainder is None:
        drop_remainder = train

    src = source(name, split, data_dir=data_dir, download=download)
    info = _builder(name, data_dir).info
    image_key, label_key = _keys(info)
    if image_size is None and None in tuple(info.features[image_key].shape):
        raise ValueError(
            f"image_size=None, but {name!r} has variable-sized images "
            f"{tuple(info.features[image_key].shape)}; pass image_size (e.g. 224)"
        )
    local_batch = batch_size // process_count
    shard = grain.sharding.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=True
    )
    shard_len = len(src) // process_count
    finite = num_epochs is not None
    if shard_len < 1 or (drop_remainder and finite and shard_len * num_epochs < local_batch):
        raise ValueError(
            f"batch_size={batch_size}: {name}[{split}] has {len(src)} examples, "
            f"{shard_len} per process, too few for one batch of {local_batch} per process"
        )
    mean, std = channel_stats(name, data_dir=data_dir)
    sampler = grain.samplers.IndexSampler(
        num_records=len(src),
        shard_options=shard,
        shuffle=train,
        num_epochs=num_epochs,
        seed=seed,
    )
    operations = [
        _Normalize(image_key, label_key, mean, std, image_size),
        *AUGMENTATIONS[augment],
        grain.transforms.Batch(batch_size=local_batch, drop_remainder=drop_remainder),
    ]
    return grain.DataLoader(
        data_source=src,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard,
        read_options=None if read_threads is None else grain.ReadOptions(num_threads=read_threads),
    )


def padded_batches(batches: Iterable[dict[str, np.ndarray]], size: int
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Each of `batches` zero-padded to `size` examples, with a float32 `'mask'` `[size]`
    (1 = real example, 0 = padding), so that a short last batch runs through the same compiled
    eval step as the others (which then averages over `mask != 0` only).

    Args:
      batches: dicts of arrays with equal leading sizes `n <= size` (`'label'` among them).
      size: the padded leading size (a process's share of the global eval batch).

    Yields:
      The batch's arrays, each `[size, ...]`, plus `'mask'`.
    """
    for batch in batches:
        n = len(batch["label"])
        padded = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
                  for k, v in batch.items()}
        padded["mask"] = np.zeros(size, np.float32)
        padded["mask"][:n] = 1.0
        yield padded


# ----------------------------------------------------------------------------- batch replay


class BatchCache:
    """Keeps the batches (and grain iterator states) that runs read, so that later runs with the
    same data stream, e.g. the other architectures of a sweep with the same seed, replay them
    from memory instead of decoding them again. The batches and the checkpointed iterator states
    are exactly the grain loader's, so checkpoints stay interchangeable with uncached runs.
    Memory grows with the number of distinct batches read: for small datasets only.
    """

    def __init__(self):
        self._train: dict[str, _Stream] = {}
        self._eval: dict[str, list] = {}

    def train_iterator(self, key: str, make_loader: Callable[[], Any]) -> "_ReplayIterator":
        if key not in self._train:
            self._train[key] = _Stream(iter(make_loader()).get_state())
        return _ReplayIterator(self._train[key], make_loader)

    def eval_batches(self, key: str, make_loader: Callable[[], Any]) -> list:
        if key not in self._eval:
            self._eval[key] = list(make_loader())
        return self._eval[key]


class _Stream:
    def __init__(self, initial_state: bytes):
        self.batches: list = []
        self.states: list[bytes] = [initial_state]  # states[i]: after i batches.
        self.position = {initial_state: 0}


class _ReplayIterator:
    """A grain iterator's `next` / `get_state` / `set_state`, served from a `_Stream` and
    extending it from a real grain iterator when a run reads past its end."""

    def __init__(self, stream: _Stream, make_loader):
        self._stream, self._make_loader = stream, make_loader
        self._pos: int | None = 0  # None: reading from `_source` only (state not in the stream).
        self._source, self._source_pos = None, None

    def __iter__(self):
        return self

    def __next__(self):
        stream = self._stream
        if self._pos is None:
            return next(self._source)
        if self._pos < len(stream.batches):
            self._pos += 1
            return stream.batches[self._pos - 1]
        if self._source is None or self._source_pos != self._pos:
            self._source = iter(self._make_loader())
            self._source.set_state(stream.states[self._pos])
        batch = next(self._source)
        stream.batches.append(batch)  # Extend the shared stream.
        state = self._source.get_state()
        stream.states.append(state)
        stream.position.setdefault(state, len(stream.batches))
        self._pos = self._source_pos = self._pos + 1
        return batch

    def get_state(self) -> bytes:
        if self._pos is None:
            return self._source.get_state()
        return self._stream.states[self._pos]

    def set_state(self, state: bytes) -> None:
        self._pos = self._stream.position.get(state)
        self._source = self._source_pos = None
        if self._pos is None:
            self._source = iter(self._make_loader())
            self._source.set_state(state)
