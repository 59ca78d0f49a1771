"""Train state, optax optimizer from config, jitted train/eval steps, Orbax checkpoints.

Pieces:
- `make_schedule(optim)` / `make_optimizer(optim)`: the learning-rate schedule and the optax chain
  `[clip_by_global_norm] -> [adaptive_grad_clip] -> optimizer (with weight decay) -> -lr(step)`.
- `create_train_state(model, optim, rng, example_input, mesh)`: a replicated `TrainState`;
  `make_init(model, optim, mesh)`: the same as one program for every seed.
- `make_grad_stats_step(model, mesh)`: per-block gradient norms of the train step's loss.
- `make_train_step(model, optim, mesh)`, `make_eval_step(model, mesh)`: `jax.jit` with the
  batch sharded over the `('data',)` mesh and the state replicated; the same code for 1 CPU
  and N devices, one or many processes. Batch-norm statistics and the mean loss are over the
  *global* batch.
- `build_programs(model_config, optim, num_devices)`: all of the above for one model as
  `Programs`, compiled once and shared by runs; `evaluate(programs, state, batches)`: exact
  means over masked batches (`data.padded_batches`).
- `gradient_spread`, `nonfinite_message`: the step-0 gradient-spread warning and the log line of
  a refused step, for the loop to log.
- `save_checkpoint` / `restore_latest`: Orbax `CheckpointManager` with items `state`
  (the `TrainState` pytree: step, params, batch_stats, opt_state, rng), `data` (each process's
  input-iterator state, one JSON file per process) and `extra` (JSON), so a resumed run equals
  an uninterrupted one.

Batches are dicts `{'image': float [B, H, W, C] or [B, D], 'label': int [B]}`; `eval_step`
also takes an optional `'mask'` `[B]` (1 = real example, 0 = padding).

Non-finite policy: a train step whose loss, gradient, or new state (params, batch_stats,
opt_state) has any NaN/inf *is not applied*: the returned state equals the input state, step
included, so `state.step` always counts applied updates and stays equal to optax's internal
step counts (which drive the schedule). `metrics['finite']` is False, `metrics['step']` is the
step that failed, `metrics['nonfinite_leaf']` indexes (into `param_paths(params)`, tree-flatten
order) the first parameter whose gradient is non-finite (-1 if all gradients are finite). The
caller decides whether to stop or to go on with the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import struct
from jax.sharding import Mesh

from resflax import checks, parallel
from resflax.models import build_model
from resflax.topology import block_location, is_stacked_path, per_block_norms, per_block_sums
from resflax.layers import lookup

Array = jax.Array
PyTree = Any
Metrics = dict[str, Array]

# --------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule from config.


def _get(config: Mapping[str, Any], field: str, default: Any = None) -> Any:
    value = config.get(field, default)
    return default if value is None else value


def _piecewise(config, lr: float) -> optax.Schedule:
    """lr times `decay_factor` at each boundary (He et al. 2015: 0.1 at 32k and 48k)."""
    factor = checks.number("optim.decay_factor", _get(config, "decay_factor", 0.1), 0.0,
                           finite=True)
    boundaries = [int(b) for b in _get(config, "boundaries", ())]
    return optax.piecewise_constant_schedule(lr, {b: factor for b in boundaries})


def _cosine(config, lr: float) -> optax.Schedule:
    """Cosine from lr to 0 over `[warmup_steps, total_steps]`."""
    total, warmup = config.get("total_steps"), _get(config, "warmup_steps", 0)
    if not total or total <= warmup:
        raise ValueError(f"schedule='cosine' needs total_steps > warmup_steps, got {total}")
    cosine = optax.cosine_decay_schedule(lr, decay_steps=total - warmup)
    return lambda step: cosine(step - warmup)


SCHEDULES: dict[str, Callable[[Mapping[str, Any], float], optax.Schedule]] = {
    "constant": lambda config, lr: optax.constant_schedule(lr),
    "piecewise": _piecewise,
    "cosine": _cosine,
}


def make_schedule(config: Mapping[str, Any]) -> optax.Schedule:
    """Learning rate as a function of the update count (`state.step`), jit-compatible.

    `lr(step) = warmup_lr` for `step < warmup_steps` (a *constant* warm-up, as He et al. 2015
    use for ResNet-110: 0.01 for the first ~400 iterations, then 0.1), otherwise the schedule
    named by `config.schedule`. Piecewise boundaries count from step 0, not from the warm-up end.
    """
    lr = checks.positive("optim.learning_rate", config.get("learning_rate"))
    main = lookup(SCHEDULES, _get(config, "schedule", "constant"), "optim.schedule")(config, lr)
    warmup = checks.integer("optim.warmup_steps", _get(config, "warmup_steps", 0), 0)
    if warmup == 0:
        return main
    warmup_lr = config.get("warmup_lr")
    if warmup_lr is None:
        raise ValueError("optim.warmup_steps > 0 needs optim.warmup_lr")
    warmup_lr = checks.number("optim.warmup_lr", warmup_lr, 0.0, finite=True)
    return lambda step: jnp.where(step < warmup, jnp.float32(warmup_lr), main(step))


def _is_kernel(path) -> bool:
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"


def kernel_mask(params: PyTree) -> PyTree:
    """True on weight matrices / conv filters (flax `kernel`), False on biases, norm scales and
    residual scales. By name, not `ndim > 1`: under `nn.scan` biases are stacked to 2-D."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _is_kernel(path), params)


DECAY_MASKS: dict[str, Any] = {
    "all": None,  # He et al. 2015 decay every weight, biases and BN parameters included.
    "kernels": kernel_mask,
}


def _layerwise_unitwise_norm(x: Array, stacked: bool) -> Array:
    """optax's unit-wise norm (`x`'s shape, each unit's L2 norm broadcast over it), taken per
    layer of a scanned stack: its leading axis indexes layers, not fan-in, and a slice is
    exactly the unrolled layer's parameter."""
    norm = optax.transforms.unitwise_norm
    return jax.vmap(norm)(x) if stacked else norm(x)


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """`optax.adaptive_grad_clip` (Brock et al. 2021: each unit's `||g_i|| <= clipping *
    max(||w_i||, eps)`), with the units of a scanned stack's parameters (under a `rest` scope,
    leading layer axis) taken per layer, so a `scan=True` net clips exactly as its unrolled
    twin. optax alone would take a stacked dense kernel `[n, in, out]`'s units along the layer
    axis and a stacked conv kernel `[n, kh, kw, in, out]`'s over layers and fan-in together."""

    def update_fn(updates, state, params):
        if params is None:
            raise ValueError("adaptive_grad_clip needs params: tx.update(grads, state, params)")

        def clip(path, g, p):
            stacked = is_stacked_path(path)
            g_norm = _layerwise_unitwise_norm(g, stacked)
            max_norm = clipping * jnp.maximum(_layerwise_unitwise_norm(p, stacked), eps)
            return optax.transforms.unitwise_clip(g_norm, max_norm, g)

        return jax.tree_util.tree_map_with_path(clip, updates, params), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _nesterov(config) -> bool:
    return checks.boolean("optim.nesterov", _get(config, "nesterov", False))


def _sgd(config, schedule, weight_decay, mask):
    """SGD with L2 regularisation: `g + wd * w` enters the momentum (He et al. 2015)."""
    momentum = checks.number("optim.momentum", _get(config, "momentum", 0.9), 0.0, finite=True)
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity(),
        optax.sgd(schedule, momentum or None, nesterov=_nesterov(config)),
    )


def _adam(config, schedule, weight_decay, mask):
    """Adam with L2 regularisation added to the gradient (coupled, like torch's Adam)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity(),
        optax.adam(schedule, nesterov=_nesterov(config)),
    )


def _adamw(config, schedule, weight_decay, mask):
    """Decoupled weight decay (Loshchilov & Hutter 2019), optax convention: `w -= lr * wd * w`."""
    return optax.adamw(
        schedule, weight_decay=weight_decay, mask=mask,
        nesterov=_nesterov(config),
    )


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
}


def make_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optax chain for `config` (a ConfigDict or mapping, the `optim` part of a config).

    Order: `clip_by_global_norm(clip_global_norm)` (if not None), then
    `adaptive_grad_clip(adaptive_clip)` (if not None; unit-wise `||g_i|| <= lambda ||w_i||`,
    Brock et al. 2021, here on every parameter, the classifier included; per layer for
    scanned stacks), then the optimizer
    `name` with `weight_decay` on the leaves chosen by `weight_decay_mask`, at the learning rate
    `make_schedule(config)(step)`. Missing or None fields take the defaults: name 'sgd',
    momentum 0.9, nesterov False, weight_decay 0, weight_decay_mask 'all', schedule 'constant',
    decay_factor 0.1, warmup_steps 0. Unknown names raise a ValueError listing the allowed ones;
    a bad number (`learning_rate` and clip thresholds finite and > 0; momentum, weight_decay,
    decay_factor, warmup_lr finite and >= 0; warmup_steps an integer >= 0) one naming it.
    """
    make = lookup(OPTIMIZERS, _get(config, "name", "sgd"), "optim.name")
    mask = lookup(DECAY_MASKS, _get(config, "weight_decay_mask", "all"), "optim.weight_decay_mask")
    clip, agc = config.get("clip_global_norm"), config.get("adaptive_clip")
    if clip is not None:
        clip = checks.positive("optim.clip_global_norm", clip)
    if agc is not None:
        agc = checks.positive("optim.adaptive_clip", agc)
    weight_decay = checks.number("optim.weight_decay", _get(config, "weight_decay", 0.0), 0.0,
                                 finite=True)
    return optax.chain(
        optax.clip_by_global_norm(clip) if clip is not None else optax.identity(),
        adaptive_grad_clip(agc) if agc is not None else optax.identity(),
        make(config, make_schedule(config), weight_decay, mask),
    )


# --------------------------------------------------------------------------------------------
# Train state.


@struct.dataclass
class TrainState:
    """Everything a step reads and writes, all arrays: exactly what a checkpoint holds.

    `step` counts applied updates (int32 scalar); `rng` is raw `uint32[2]` key data, the base
    key for per-step randomness `fold_in(rng, step)` (it never changes, so a resumed run draws
    the same numbers). The model and the optimizer are not fields: the step factories close over
    them, so two states from two calls have the same tree structure and never force a retrace.
    """

    step: Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    rng: Array


Optimizer = optax.GradientTransformation | Mapping[str, Any]


def _optimizer(optimizer: Optimizer) -> optax.GradientTransformation:
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer
    return make_optimizer(optimizer)


def _key_data(rng) -> np.ndarray:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return np.asarray(rng)


def initial_state(model, tx: optax.GradientTransformation, key, shape, dtype) -> TrainState:
    """The `TrainState` at step 0 from raw key data `key` (`uint32[2]`, traced or not):
    `model.init` (with `train=False`) on zeros of `shape`/`dtype`, and `tx.init`."""
    init_rng, state_rng = jax.random.split(key)
    params_rng, dropout_rng = jax.random.split(init_rng)
    variables = model.init(
        {"params": params_rng, "dropout": dropout_rng}, jnp.zeros(shape, dtype), train=False
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=state_rng,
    )


def create_train_state(model, optimizer: Optimizer, rng, example_input, mesh: Mesh) -> TrainState:
    """Initialises `model` (with `train=False`) and `optimizer` (an optax transformation or an
    `optim` config), replicated over `mesh`. Only the shape and dtype of `example_input` are
    used. `rng`: a typed or raw jax key."""
    tx = _optimizer(optimizer)
    key = _key_data(rng)  # A host constant: the same in every process.
    shape, dtype = tuple(example_input.shape), example_input.dtype
    init = functools.partial(initial_state, model, tx, key, shape, dtype)
    return jax.jit(init, out_shardings=parallel.replicated(mesh))()


def make_init(model, optimizer: Optimizer, mesh: Mesh, dtype=jnp.float32
              ) -> Callable[[int, tuple[int, ...]], TrainState]:
    """`init(seed, input_shape) -> TrainState`, one compiled program for every seed (the seed
    is traced): equal to `create_train_state(model, optimizer, jax.random.PRNGKey(seed), ...)`."""
    tx = _optimizer(optimizer)
    jitted = jax.jit(
        lambda seed, shape: initial_state(model, tx, jax.random.PRNGKey(seed), shape, dtype),
        static_argnums=1, out_shardings=parallel.replicated(mesh),
    )
    return lambda seed, shape: jitted(np.int32(seed), tuple(shape))


# --------------------------------------------------------------------------------------------
# Steps.


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_paths(params: PyTree) -> list[str]:
    """`'a/b/kernel'` for each leaf, in tree-flatten order (indexes `metrics['nonfinite_leaf']`)."""
    return [_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def grad_norms_by_module(grads: PyTree, depth: int | None = 1) -> dict[str, Array]:
    """`{path: ||g||_2}` over the leaves grouped by the first `depth` keys of their path
    (`depth=1`: top-level modules; `depth=None`: each leaf's module, i.e. the path without the
    parameter name). Scalar jax arrays; usable inside `jit`."""
    sq: dict[str, Array] = {}
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        key = _path_str(path[:depth] if depth is not None else path[:-1]) or _path_str(path)
        sq[key] = sq.get(key, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
    return {k: jnp.sqrt(v) for k, v in sq.items()}


def _global_norm(tree: PyTree) -> Array:
    """`sqrt(sum of squares)` over every leaf (in float32)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _all_finite(tree: PyTree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _per_example_stats(logits: Array, labels: Array) -> tuple[Array, Array]:
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    error = (jnp.argmax(logits, -1) != labels).astype(jnp.float32)
    return loss, error


def _train_loss(model, state: TrainState, batch, params):
    """The training loss at `params`: mean cross-entropy of `batch` in train mode, with
    `(mean error, updated batch_stats)` as aux. Shared by the train and grad-stats steps."""
    rng = jax.random.fold_in(state.rng, state.step)
    variables = {"params": params, "batch_stats": state.batch_stats}
    (logits, _), updates = model.apply(
        variables, batch["image"], train=True, mutable=["batch_stats"], rngs={"dropout": rng},
    )
    loss, error = _per_example_stats(logits, batch["label"])
    return jnp.mean(loss), (jnp.mean(error), updates.get("batch_stats", {}))


def _grad_stats(model, state: TrainState, batch) -> Metrics:
    grads = jax.grad(lambda p: _train_loss(model, state, batch, p)[0])(state.params)
    stats = {"param_grad_norm": per_block_norms(model.config, grads)}
    stats.update({f"grad_norm/{k}": v for k, v in grad_norms_by_module(grads).items()})
    return stats


def make_grad_stats_step(model, mesh: Mesh) -> Callable[[TrainState, Mapping[str, Array]], Metrics]:
    """`grad_stats(state, batch) -> metrics`, jitted: the gradient of the train step's loss at
    `state` (not applied), as `param_grad_norm` `[L]` (`||dL/dtheta_l||_2` per block of a
    `resflax.Network`, in signal order) and `grad_norm/<module>` per top-level module."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return jax.jit(functools.partial(_grad_stats, model), in_shardings=(rep, data),
                   out_shardings=rep)


def gradient_spread(param_grad_norm, grad_spread_warning: float) -> tuple[float, str | None]:
    """How far apart the per-block gradient norms are, and a warning when too far (a plain net
    whose early blocks barely train, or an exploding one).

    Args:
      param_grad_norm: `[L]` per-block norms `||dL/dtheta_l||_2` (`grad_stats`' output).
      grad_spread_warning: the largest acceptable `max / min` over the finite, positive norms.

    Returns:
      `(spread, warning)`: `spread = max / min` over those norms (NaN if there are none), and
      a one-line warning naming the blocks when `spread` exceeds the limit or is not finite,
      else None. All norms exactly 0 is no warning: a zero-initialized head (Fixup's) passes
      no gradient to the blocks before its first update, by design.
    """
    norms = np.asarray(param_grad_norm, np.float64)
    positive = norms[np.isfinite(norms) & (norms > 0)]
    spread = float(positive.max() / positive.min()) if len(positive) else float("nan")
    if (np.isfinite(spread) and spread <= grad_spread_warning) or np.all(norms == 0):
        return spread, None
    return spread, (f"step 0: per-block gradient norms span {spread:.3g}x (blocks "
                    f"{int(np.argmax(norms)) + 1} and {int(np.argmin(norms)) + 1}), more than "
                    f"grad_spread_warning={grad_spread_warning:g}: some blocks "
                    "will barely train (or blow up)")


def _first(flags: Array) -> Array:
    """Index of the first True of a bool vector, -1 if none."""
    return jnp.where(jnp.any(flags), jnp.argmax(flags), -1).astype(jnp.int32)


def _first_leaf(tree: PyTree) -> Array:
    bad = [~jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return _first(jnp.stack(bad)) if bad else jnp.int32(-1)


def _nonfinite_probe(model, tx, state: TrainState, batch) -> Metrics:
    """Where a step's non-finite values first appear (see `make_nonfinite_report`)."""
    rng = jax.random.fold_in(state.rng, state.step)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    (logits, signals), _ = model.apply(variables, batch["image"], train=True,
                                       mutable=["batch_stats"], rngs={"dropout": rng})
    act_ok = jnp.concatenate([jnp.all(jnp.isfinite(s.reshape(s.shape[0], -1)), axis=1)
                              for s in signals])  # [L + 1]: x_0 .. x_L
    (loss, (_, batch_stats)), grads = jax.value_and_grad(
        functools.partial(_train_loss, model, state, batch), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    not_finite = lambda x: ~jnp.isfinite(x)
    return {
        "logits_finite": jnp.all(jnp.isfinite(logits)),
        "loss_finite": jnp.isfinite(loss),
        "first_activation": _first(~act_ok),
        "first_grad_block": _first(per_block_sums(model.config, grads, not_finite) > 0),
        "first_grad_leaf": _first_leaf(grads),
        "first_param_block": _first(per_block_sums(model.config, params, not_finite) > 0),
        "first_param_leaf": _first_leaf(params),
        "first_batch_stats_leaf": _first_leaf(batch_stats),
        "first_opt_state_leaf": _first_leaf(opt_state),
    }


def make_nonfinite_report(model, optimizer: Optimizer, mesh: Mesh
                          ) -> Callable[[TrainState, Mapping[str, Array]], dict[str, Any]]:
    """`report(state, batch) -> dict`: where the non-finite values of the step from `state` on
    `batch` first appear, in the order they are computed: activations (the first `x_l`, block
    index `l` and its place in a scanned stack), the loss, gradients (first block, first
    parameter), new parameters, batch statistics, optimizer state. For a step the train step
    refused (the state passed in is the state before it); compiled on first use, never paid by
    healthy runs. `model` must be a `resflax.Network`."""
    tx = _optimizer(optimizer)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    probe = jax.jit(functools.partial(_nonfinite_probe, model, tx), in_shardings=(rep, data),
                    out_shardings=rep)

    def report(state: TrainState, batch) -> dict[str, Any]:
        p = {k: v.item() for k, v in jax.device_get(probe(state, batch)).items()}
        paths = param_paths(state.params)
        config = model.config
        block = lambda i: None if i < 0 else {"block": i + 1,
                                              "where": block_location(config, i + 1)}
        out = {"step": int(jax.device_get(state.step)), "first": None, "block": None,
               "where": None, "param": None}
        act = p["first_activation"]
        if act >= 0:  # x_0 (the stem's output) is index 0; block l makes x_l.
            out.update(first="activations", block=act,
                       where="stem" if act == 0 else block_location(config, act))
        elif not p["logits_finite"] or not p["loss_finite"]:
            out.update(first="loss", where="head" if not p["logits_finite"] else "loss")
        elif p["first_grad_leaf"] >= 0:
            out.update(first="gradients", param=paths[p["first_grad_leaf"]],
                       **(block(p["first_grad_block"]) or {}))
        elif p["first_param_leaf"] >= 0:
            out.update(first="params", param=paths[p["first_param_leaf"]],
                       **(block(p["first_param_block"]) or {}))
        elif p["first_batch_stats_leaf"] >= 0:
            out.update(first="batch_stats")
        elif p["first_opt_state_leaf"] >= 0:
            out.update(first="opt_state")
        if out["param"] is None and p["first_grad_leaf"] >= 0:
            out["param"] = paths[p["first_grad_leaf"]]
        return out

    return report


def nonfinite_message(report: Mapping[str, Any]) -> str:
    """One line for a log: `"Non-finite values at step S (loss L): first in F at W[, parameter
    P]"`.

    Args:
      report: `make_nonfinite_report`'s dict, with the step's `'loss'` added.

    Returns:
      The message, without a final period.
    """
    where = report["where"] or "-"
    return (f"Non-finite values at step {report['step']} (loss {report['loss']}): "
            f"first in {report['first']} at {where}"
            + (f", parameter {report['param']}" if report["param"] else ""))


def _train_step(model, tx, learning_rate_fn, state: TrainState, batch):
    """See `make_train_step`."""
    (loss, (error, batch_stats)), grads = jax.value_and_grad(
        functools.partial(_train_loss, model, state, batch), has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=state.rng,
    )
    # Non-finite policy (module docstring): keep the old state, step included.
    grad_ok = jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)])
    finite = (
        jnp.isfinite(loss)
        & jnp.all(grad_ok)
        & _all_finite((new.params, new.batch_stats, new.opt_state))
    )
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {
        "loss": loss,
        "error": error,
        "grad_norm": _global_norm(grads),
        "finite": finite,
        "nonfinite_leaf": jnp.where(jnp.all(grad_ok), -1, jnp.argmin(grad_ok)).astype(jnp.int32),
        "step": state.step,
    }
    if learning_rate_fn is not None:
        metrics["learning_rate"] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    return new, metrics


def _eval_step(model, state: TrainState, batch) -> Metrics:
    logits, _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    loss, error = _per_example_stats(logits, batch["label"])
    mask = batch.get("mask")
    mask = jnp.ones_like(loss) if mask is None else mask.astype(jnp.float32)
    count = jnp.sum(mask)
    denom = jnp.maximum(count, 1.0)
    return {
        "loss": jnp.sum(loss * mask) / denom,
        "error": jnp.sum(error * mask) / denom,
        "count": count,
    }


def make_train_step(
    model, optimizer: Optimizer, mesh: Mesh, learning_rate_fn: optax.Schedule | None = None
) -> Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, Metrics]]:
    """`train_step(state, batch) -> (state, metrics)`, jitted: batch sharded over `'data'`,
    state replicated and donated (do not reuse the state passed in).

    One step of `optimizer` (an optax transformation, or an `optim` config, which also gives
    `learning_rate_fn = make_schedule(config)`) on the mean cross-entropy of the global batch,
    with batch-norm statistics updated in train mode. Metrics (replicated scalars): `loss`,
    `error`, `grad_norm` (global, before clipping), `learning_rate` (used by this update; when
    known), `finite`, `nonfinite_leaf`, `step` (of this update); see the non-finite policy in
    the module docstring.
    """
    tx = _optimizer(optimizer)
    if learning_rate_fn is None and not isinstance(optimizer, optax.GradientTransformation):
        learning_rate_fn = make_schedule(optimizer)
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return jax.jit(
        functools.partial(_train_step, model, tx, learning_rate_fn),
        in_shardings=(rep, data),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def make_eval_step(model, mesh: Mesh) -> Callable[[TrainState, Mapping[str, Array]], Metrics]:
    """`eval_step(state, batch) -> metrics`, jitted (batch sharded, state replicated): mean
    `loss` and `error` with running batch-norm statistics over the examples with `mask != 0`
    (all when the batch has no `'mask'`), and their `count`, for exact averaging."""
    rep, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
    return jax.jit(
        functools.partial(_eval_step, model), in_shardings=(rep, data), out_shardings=rep
    )


# --------------------------------------------------------------------------------------------
# Programs: every step of one (model, optimizer, mesh), compiled once.


@dataclasses.dataclass(frozen=True)
class Programs:
    """The model and its jitted programs for one (model, optimizer, mesh). Built once by
    `build_programs`; a sweep passes the same `Programs` to every run (seed) of an architecture,
    so each program compiles once."""

    model: Any
    mesh: Mesh
    init: Callable[[int, tuple[int, ...]], TrainState]  # (seed, input shape) -> state
    train_step: Callable
    eval_step: Callable
    grad_stats: Callable
    nonfinite_report: Callable  # (state, batch) -> where the step's non-finite values start


def build_programs(model_config, optimizer: Mapping[str, Any],
                   num_devices: int | None) -> Programs:
    """Builds the model and makes (lazily compiled) programs for it.

    Args:
      model_config: a `resflax.ModelConfig`.
      optimizer: an `optim` config dict (`make_optimizer`).
      num_devices: devices of the `('data',)` mesh (None: all; `parallel.make_mesh`).

    Returns:
      `Programs` with `init`, `train_step`, `eval_step`, `grad_stats` and `nonfinite_report`.
    """
    model = build_model(model_config)
    mesh = parallel.make_mesh(num_devices)
    return Programs(
        model=model, mesh=mesh, init=make_init(model, optimizer, mesh),
        train_step=make_train_step(model, optimizer, mesh),
        eval_step=make_eval_step(model, mesh),
        grad_stats=make_grad_stats_step(model, mesh),
        nonfinite_report=make_nonfinite_report(model, optimizer, mesh),
    )


def programs_key(model_config, optimizer: Mapping[str, Any], num_devices: int | None) -> str:
    """What `build_programs` depends on, as a string: equal keys can share one `Programs`.

    Args:
      model_config, optimizer, num_devices: as for `build_programs`.

    Returns:
      Sorted-key JSON of the three.
    """
    return json.dumps({"model": model_config.to_dict(), "optim": dict(optimizer),
                       "num_devices": num_devices}, sort_keys=True)


def evaluate(programs: Programs, state: TrainState, batches) -> dict[str, float]:
    """Mean loss and error of `state` over every real example of `batches`, summed in float64
    on the host (exact whatever the batch size).

    Args:
      programs: gives `eval_step` and the mesh.
      state: a replicated `TrainState`.
      batches: this process's batches, each with a `'mask'` (`data.padded_batches`), all of one
        size so that `eval_step` compiles once.

    Returns:
      `{'loss', 'error'}` means over the examples with `mask != 0` (0.0 if there are none).
    """
    totals = np.zeros(3)  # loss sum, error sum, count
    for batch in batches:
        m = jax.device_get(programs.eval_step(state, parallel.global_batch(programs.mesh, batch)))
        totals += [float(m["loss"]) * float(m["count"]), float(m["error"]) * float(m["count"]),
                   float(m["count"])]
    count = max(totals[2], 1.0)
    return {"loss": float(totals[0] / count), "error": float(totals[1] / count)}


# --------------------------------------------------------------------------------------------
# Checkpoints.


class _ProcessLocalJsonHandler(ocp.CheckpointHandler):
    """One JSON file per process, `process_<i>-of-<n>.json` (grain's own layout): each host's
    data iterator is at a different position of its own shard, so each keeps its own state
    (Orbax's `JsonSave` writes only the primary host's)."""

    def save(self, directory, args: "_ProcessLocalJsonSave"):
        _process_file(directory).write_text(json.dumps(args.item))

    def restore(self, directory, args: "_ProcessLocalJsonRestore | None" = None):
        path = _process_file(directory)
        if not path.exists():
            raise ValueError(f"{path} not found: restore with as many processes as were saved")
        return json.loads(path.read_text())


def _process_file(directory):
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(_ProcessLocalJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessLocalJsonSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_ProcessLocalJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessLocalJsonRestore(ocp.args.CheckpointArgs):
    pass


def make_checkpoint_manager(
    directory: str, max_to_keep: int | None = 3, save_interval_steps: int = 1
) -> ocp.CheckpointManager:
    """An Orbax manager writing `<directory>/<step>/{state,data,extra}` (asynchronously:
    call `manager.wait_until_finished()` before reading the files or exiting)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps
    )
    return ocp.CheckpointManager(directory, options=options)


class CheckpointError(RuntimeError):
    """No checkpoint in the directory can be restored (each failure is named)."""


def _sha256(data: bytes) -> str:
    import hashlib  # pylint: disable=g-import-not-at-top

    return hashlib.sha256(data).hexdigest()


def _host_array(x) -> np.ndarray:
    """This process's copy of a (replicated) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def state_digests(state: TrainState) -> dict[str, str]:
    """`{path: sha256 of dtype, shape and bytes}` of every array of `state` (on the host)."""
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(_host_array(leaf))
        digests[_path_str(path)] = _sha256(f"{a.dtype}{a.shape}".encode() + a.tobytes())
    return digests


def _json_digest(obj: Any) -> str:
    return _sha256(json.dumps(obj, sort_keys=True).encode())


def save_checkpoint(
    manager: ocp.CheckpointManager,
    state: TrainState,
    data_iterator_state: Mapping[str, Any] | bytes | None = None,
    extra: Mapping[str, Any] | None = None,
    force: bool = False,
) -> bool:
    """Saves at step `state.step` (when the manager's interval says so, or `force`).

    `data_iterator_state`: this process's grain `iterator.get_state()` (JSON bytes, or a dict),
    kept per process and returned with its type by `restore_latest`. `extra`: a JSON dict
    (the primary host's is kept). Every process must call it. Returns whether a save started.

    Integrity: a SHA-256 digest of every array of `state` (as it is on the host now) and of
    `extra` is saved beside them (item `integrity`), and one of the iterator state inside its
    per-process file; `restore_latest` checks them all.
    """
    if isinstance(data_iterator_state, (bytes, bytearray)):
        data = {"format": "bytes", "value": bytes(data_iterator_state).decode("utf-8")}
    else:
        data = {"format": "json", "value": data_iterator_state}
    data["sha256"] = _json_digest(data["value"])
    extra = dict(extra or {})
    integrity = {"state": state_digests(state), "extra": _json_digest(extra)}
    return manager.save(
        int(jax.device_get(state.step)),
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=_ProcessLocalJsonSave(data),
            extra=ocp.args.JsonSave(extra),
            integrity=ocp.args.JsonSave(integrity),
        ),
        force=force,
    )


def abstract_state(state: TrainState) -> TrainState:
    """`ShapeDtypeStruct`s with the shardings of `state`: the restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _restore_step(manager: ocp.CheckpointManager, step: int, target: TrainState):
    """`(state, iterator state, extra)` of `step`, verified; raises on any failure."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state(target)),
            data=_ProcessLocalJsonRestore(),
            extra=ocp.args.JsonRestore(),
            integrity=ocp.args.JsonRestore(),
        ),
    )
    integrity, data, extra = restored["integrity"], restored["data"], dict(restored["extra"])
    if _json_digest(data["value"]) != data.get("sha256"):
        raise ValueError("the data-iterator state does not match its digest")
    if _json_digest(extra) != integrity["extra"]:
        raise ValueError("the loop state ('extra') does not match its digest")
    got, want = state_digests(restored["state"]), integrity["state"]
    bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    if bad:
        raise ValueError(f"{len(bad)} array(s) do not match their digests, first {bad[0]}")
    iterator_state = data["value"]
    if data["format"] == "bytes":
        iterator_state = iterator_state.encode("utf-8")
    return restored["state"], iterator_state, extra


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def restore_latest(
    manager: ocp.CheckpointManager, target: TrainState, quarantine: str | None = None,
) -> tuple[TrainState, Any, dict] | None:
    """`(state, data_iterator_state, extra)` from the newest checkpoint that restores and
    matches its digests, or None if there is no checkpoint at all.

    `target` is a `TrainState` (e.g. fresh from `create_train_state`, or its `abstract_state`)
    that gives the tree structure, shapes, dtypes and shardings. A checkpoint that fails
    (unreadable, truncated, missing files, a flipped bit) is skipped with one warning naming its
    step and the reason, and moved into `quarantine` (a directory) if given, so that the run can
    save that step again. Raises `CheckpointError` when checkpoints exist but none restores:
    never a silent restart from scratch.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            result = _restore_step(manager, step, target)
        except Exception as e:  # pylint: disable=broad-except
            failures.append(f"step {step}: {_one_line(e)}")
            logging.warning("Checkpoint at step %d in %s cannot be used (%s); trying the previous "
                            "one.", step, manager.directory, _one_line(e))
            if quarantine is not None and jax.process_index() == 0:
                os.makedirs(quarantine, exist_ok=True)
                shutil.move(os.path.join(os.fspath(manager.directory), str(step)),
                            os.path.join(quarantine, f"{step}.{int(time.time())}"))
            continue
        if quarantine is not None:
            manager.reload()
        return result
    if failures:
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored: "
                              + "; ".join(failures))
    return None


def latest_extra(manager: ocp.CheckpointManager) -> tuple[int, dict] | None:
    """`(step, extra)` of the newest checkpoint whose `extra` reads and matches its digest,
    without restoring arrays (cheap: for checks before anything compiles); None if none."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                extra=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()))
        except Exception:  # pylint: disable=broad-except
            continue  # restore_latest names it when it falls back.
        extra = dict(restored["extra"])
        if _json_digest(extra) == restored["integrity"]["extra"]:
            return step, extra
    return None
