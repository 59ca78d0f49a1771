"""What a training config (configs/train.py's fields) sets up: its checks and the library objects
it builds, shared by every app that trains (`experiments.train`, `.degradation`,
`.trainability`).

- `check_config`: the boundary. Raises ValueError naming the first bad field and what it
  allows, before anything compiles or reads data.
- `optim_config`, `build_programs`: the optimizer's and the compiled programs' inputs.
- `train_batches`, `eval_batches`, `input_shape`, `check_data`, `evaluate`: the data section
  as loaders (a `resflax.data.BatchCache` lets runs of one data stream share their batches).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import ml_collections

from experiments import common
from resflax import checks, data, training

ON_NONFINITE = ("stop", "skip_step")


def optim_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config.optim` as a dict, with `total_steps` defaulting to `num_train_steps` (cosine)."""
    optim = config.optim.to_dict()
    if optim.get("total_steps") is None:
        optim["total_steps"] = config.num_train_steps
    return optim


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field and what it allows. Reads no data."""
    common.require_fields(config, ("seed", "data", "model", "optim", "batch_size",
                                   "num_train_steps", "on_nonfinite", "max_skips",
                                   "grad_spread_warning"), "configs/train.py")
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2**31:
        raise ValueError(f"config.seed={config.seed!r} must be an integer in [0, 2**31)")
    common.model_config(config)
    try:
        training.make_optimizer(optim_config(config))
    except ValueError as e:
        raise ValueError(f"config.{e}" if str(e).startswith("optim.") else f"config.optim: {e}")
    checks.registered("config.data.augment", config.data.augment, data.AUGMENTATIONS)
    for name, minimum in (("num_train_steps", 1), ("batch_size", 1), ("eval_batch_size", 1),
                          ("log_every_steps", 1), ("eval_every_steps", 0),
                          ("grad_norm_every_steps", 0), ("checkpoint_every_steps", 1),
                          ("stop_at_step", 0)):
        if name != "stop_at_step" or config[name] is not None:  # stop_at_step: None = never.
            checks.integer(f"config.{name}", config[name], minimum)
    checks.choice("config.on_nonfinite", config.on_nonfinite, ON_NONFINITE)
    checks.integer("config.max_skips", config.max_skips, 0)
    checks.number("config.grad_spread_warning", config.grad_spread_warning, 0.0)
    n = config.num_devices or jax.device_count()
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n:
            raise ValueError(
                f"config.{name}={config[name]} must be a multiple of the number of devices ({n})"
            )


def build_programs(config: ml_collections.ConfigDict) -> training.Programs:
    """`training.build_programs` for `config.model`, `config.optim` and `config.num_devices`."""
    return training.build_programs(common.model_config(config), optim_config(config),
                                   config.num_devices)


def loader(config: ml_collections.ConfigDict, split: str, *, train_mode: bool,
           batch_size: int):
    """`data.make_loader` of `config.data`'s `split`: shuffled, augmented and resumable in
    `train_mode`, else one ordered pass."""
    ds = config.data
    return data.make_loader(
        ds.name, split, batch_size=batch_size, train=train_mode, seed=config.seed,
        data_dir=ds.data_dir, augment=ds.augment if train_mode else "none",
        worker_count=ds.worker_count if train_mode else 0,  # Eval: no worker start-up per pass.
        image_size=ds.image_size, read_threads=ds.read_threads,
    )


def _cache_key(config: ml_collections.ConfigDict, split: str) -> str:
    return json.dumps({"data": config.data.to_dict(), "split": split, "seed": config.seed,
                       "batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size},
                      sort_keys=True)


def train_batches(config: ml_collections.ConfigDict, cache: data.BatchCache | None = None):
    """The train split's resumable iterator (`get_state`/`set_state`), served through `cache`
    (shared with other runs of the same data stream) when given."""
    split = config.data.train_split
    make = functools.partial(loader, config, split, train_mode=True,
                             batch_size=config.batch_size)
    return iter(make()) if cache is None else cache.train_iterator(_cache_key(config, split), make)


def eval_batches(config: ml_collections.ConfigDict, cache: data.BatchCache | None = None):
    """One ordered pass over `data.eval_split`, through `cache` when given."""
    split = config.data.eval_split
    make = functools.partial(loader, config, split, train_mode=False,
                             batch_size=config.eval_batch_size)
    return make() if cache is None else cache.eval_batches(_cache_key(config, split), make)


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`(1, H, W, C)` of the dataset's images (after `data.image_size`). Checks that the
    dataset exists (a clear error naming it and `data_dir`) and that `model.num_classes` fits."""
    meta = data.dataset_meta(config.data.name, data_dir=config.data.data_dir)
    shape = meta.image_shape
    if config.data.image_size:
        shape = (config.data.image_size, config.data.image_size, shape[-1])
    num_classes = common.model_config(config).num_classes
    if num_classes != meta.num_classes:
        raise ValueError(
            f"config.model.num_classes={num_classes} but {meta.name} has "
            f"{meta.num_classes} classes"
        )
    return (1,) + tuple(shape)


def check_data(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Before anything compiles: the dataset exists and both splits are prepared offline (a
    clear error naming the dataset and `data_dir` otherwise); returns `input_shape(config)`."""
    shape = input_shape(config)
    for split in (config.data.train_split, config.data.eval_split):
        data.source(config.data.name, split, data_dir=config.data.data_dir)
    return shape


def evaluate(programs: training.Programs, state, config: ml_collections.ConfigDict,
             cache: data.BatchCache | None = None) -> dict[str, float]:
    """`eval/loss`, `eval/error`, `eval/accuracy`: means over the whole `data.eval_split` (the
    last batch padded and masked), with running batch-norm statistics."""
    local = config.eval_batch_size // jax.process_count()
    means = training.evaluate(programs, state,
                              data.padded_batches(eval_batches(config, cache), local))
    return {"eval/loss": means["loss"], "eval/error": means["error"],
            "eval/accuracy": 1.0 - means["error"]}
