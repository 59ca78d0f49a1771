"""Tests for resflax.training and resflax.parallel: optimizer recipe, steps, non-finite policy,
checkpoint resume (bit-for-bit) and data parallelism over simulated devices."""

import functools
import os
import re
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resflax import parallel, training
from resflax.layers import BatchNorm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
    """conv -> BN -> relu -> global mean pool -> dense; the models' calling convention."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.relu(BatchNorm()(nn.Conv(4, (3, 3))(x), train))
        pooled = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes)(pooled), (h,)


class SqrtGain(nn.Module):
    """`logits = dense(x) * (1 + sqrt(s))`, s = 0: finite loss, infinite d loss / d s."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.param("sqrt_gain", nn.initializers.zeros, ())
        return nn.Dense(3)(x) * (1 + jnp.sqrt(s)), ()


def optim(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            learning_rate=0.1,
            momentum=0.9,
            nesterov=False,
            weight_decay=0.0,
            weight_decay_mask="all",
            clip_global_norm=None,
            adaptive_clip=None,
            schedule="constant",
            boundaries=[],
            decay_factor=0.1,
            warmup_steps=0,
            warmup_lr=None,
            total_steps=100,
        )
    )
    cfg.update(overrides)
    return cfg


def make_batch(index, batch=8):
    """Learnable: the channel named by the label is brighter."""
    rs = np.random.RandomState(index)
    label = rs.randint(0, 3, batch).astype(np.int32)
    image = rs.randn(batch, 6, 6, 3) + 1.5 * np.eye(3)[label][:, None, None, :]
    return {"image": image.astype(np.float32), "label": label}


def to_numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


@functools.lru_cache
def _initial_variables():
    mesh = parallel.make_mesh(1)
    example = make_batch(0)["image"]
    state = training.create_train_state(TinyNet(), optim(), jax.random.key(0), example, mesh)
    return to_numpy((state.params, state.batch_stats, state.rng))


def fresh_state(cfg, mesh):
    """`create_train_state(TinyNet(), cfg, key(0), ...)`, reusing one compiled init (XLA on CPU
    takes seconds to compile random initializers)."""
    params, batch_stats, rng = _initial_variables()
    tx = training.make_optimizer(cfg)
    state = training.TrainState(np.int32(0), params, batch_stats, tx.init(params), rng)
    return jax.device_put(state, parallel.replicated(mesh))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def mesh():
    return parallel.make_mesh(1)


# ------------------------------------------------------------------ optimizer and schedule


def test_loss_decreases_on_a_fixed_batch(mesh):
    model, cfg = TinyNet(), optim(learning_rate=0.1)
    batch = parallel.global_batch(mesh, make_batch(0))
    state = training.create_train_state(model, cfg, jax.random.key(0), batch["image"], mesh)
    step = training.make_train_step(model, cfg, mesh)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        assert bool(m["finite"])
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 30
    # Batch-norm running statistics moved away from their init (0, 1).
    assert not np.allclose(np.asarray(state.batch_stats["BatchNorm_0"]["mean"]), 0.0)
    metrics = training.make_eval_step(model, mesh)(state, batch)
    assert 0.0 <= float(metrics["error"]) <= 1.0 and float(metrics["count"]) == 8


def _grads(norm_, seed=0):
    rs = np.random.RandomState(seed)
    g = {"a": {"kernel": rs.randn(3, 4), "bias": rs.randn(4)}, "b": {"kernel": rs.randn(4, 2)}}
    return jax.tree.map(lambda x: jnp.asarray(x * (norm_ / norm(g)), jnp.float32), g)


def test_clip_by_global_norm_bounds_the_sgd_update_exactly():
    c = 1.0
    tx = training.make_optimizer(optim(learning_rate=1.0, momentum=0.0, clip_global_norm=c))
    params = jax.tree.map(jnp.ones_like, _grads(1.0))
    big = _grads(10.0)
    update, _ = tx.update(big, tx.init(params), params)
    assert norm(update) <= c * (1 + 1e-6)
    np.testing.assert_allclose(norm(update), c, rtol=1e-6)
    small = _grads(0.5)
    update, _ = tx.update(small, tx.init(params), params)
    assert_trees_equal(update, jax.tree.map(jnp.negative, small))  # Unclipped: exactly -g.


def test_train_step_reports_grad_norm_before_clipping(mesh):
    model, c = TinyNet(), 1e-3
    cfg = optim(learning_rate=1.0, momentum=0.0, clip_global_norm=c)
    batch = parallel.global_batch(mesh, make_batch(1))
    state = fresh_state(cfg, mesh)
    before = to_numpy(state.params)
    state, m = training.make_train_step(model, cfg, mesh)(state, batch)
    delta = jax.tree.map(lambda a, b: a - b, to_numpy(state.params), before)
    assert float(m["grad_norm"]) > 10 * c
    np.testing.assert_allclose(norm(delta), c, rtol=1e-3)


def test_adaptive_clip_bounds_unitwise_ratio():
    lam = 0.01
    tx = training.make_optimizer(optim(learning_rate=1.0, momentum=0.0, adaptive_clip=lam))
    params = {"d": {"kernel": jnp.ones((5, 3))}}
    grads = {"d": {"kernel": 100.0 * jnp.arange(15.0).reshape(5, 3)}}
    update, _ = tx.update(grads, tx.init(params), params)
    unit_norm = functools.partial(np.linalg.norm, axis=0)  # One unit per output column.
    ratio = unit_norm(update["d"]["kernel"]) / unit_norm(params["d"]["kernel"])
    assert np.all(ratio <= lam * (1 + 1e-5)) and np.allclose(ratio, lam, rtol=1e-5)


def _decay_params():
    """Conv, BN, scan-stacked (2-D bias) and a scalar residual scale."""
    return {
        "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
        "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "stage": {"Dense_0": {"kernel": jnp.ones((2, 4, 4)), "bias": jnp.ones((2, 4))}},
        "residual_scale": jnp.ones(()),
    }


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("mask", ["all", "kernels"])
def test_weight_decay_mask(name, mask):
    wd = 0.1
    tx = training.make_optimizer(
        optim(name=name, learning_rate=1.0, momentum=0.0, weight_decay=wd, weight_decay_mask=mask)
    )
    params = _decay_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    update, _ = tx.update(zeros, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(update)[0]:
        decayed = mask == "all" or path[-1].key == "kernel"
        if name == "adam":
            # Coupled L2: Adam normalises g = wd * w, so the step is -lr * sign(w) (w = 1).
            expected = -1.0 if decayed else 0.0
            np.testing.assert_allclose(np.asarray(u), expected, rtol=1e-4, err_msg=str(path))
        else:  # sgd: -lr * wd * w; adamw: decoupled, -lr * wd * w.
            np.testing.assert_allclose(np.asarray(u), -wd if decayed else 0.0, err_msg=str(path))


def test_he_et_al_piecewise_schedule_with_constant_warmup():
    cfg = optim(
        schedule="piecewise", boundaries=[32000, 48000], decay_factor=0.1,
        warmup_steps=400, warmup_lr=0.01,
    )
    lr = training.make_schedule(cfg)
    expected = {0: 0.01, 399: 0.01, 400: 0.1, 31999: 0.1, 32000: 0.01, 47999: 0.01,
                48000: 0.001, 63999: 0.001}
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, err_msg=str(step))
        np.testing.assert_allclose(float(jax.jit(lr)(jnp.int32(step))), value, rtol=1e-6)


def test_cosine_and_constant_schedules():
    cfg = optim(schedule="cosine", total_steps=110, warmup_steps=10, warmup_lr=0.0)
    lr = training.make_schedule(cfg)
    values = [float(lr(s)) for s in (0, 9, 10, 60, 110)]
    np.testing.assert_allclose(values, [0, 0, 0.1, 0.05, 0], atol=1e-7)
    assert float(training.make_schedule(optim())(12345)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "field, value",
    [("name", "rmsprop"), ("schedule", "linear"), ("weight_decay_mask", "biases")],
)
def test_unknown_names_raise(field, value):
    with pytest.raises(ValueError, match=rf"optim\.{field}.*allowed values"):
        training.make_optimizer(optim(**{field: value}))


@pytest.mark.parametrize(
    "overrides, field, bound",
    [
        (dict(learning_rate=-1), "learning_rate", "> 0"),
        (dict(learning_rate=0.0), "learning_rate", "> 0"),
        (dict(learning_rate=float("inf")), "learning_rate", "> 0"),
        (dict(learning_rate=float("nan")), "learning_rate", "> 0"),
        (dict(learning_rate=None), "learning_rate", "> 0"),
        (dict(learning_rate="0.1"), "learning_rate", "> 0"),
        (dict(momentum=-0.9), "momentum", ">= 0"),
        (dict(weight_decay=-1e-4), "weight_decay", ">= 0"),
        (dict(name="adamw", weight_decay=-1e-4), "weight_decay", ">= 0"),
        (dict(warmup_steps=10, warmup_lr=-0.01), "warmup_lr", ">= 0"),
        (dict(warmup_steps=-1), "warmup_steps", ">= 0"),
        (dict(warmup_steps=True), "warmup_steps", ">= 0"),
        (dict(schedule="piecewise", boundaries=[5], decay_factor=-0.1), "decay_factor", ">= 0"),
        (dict(clip_global_norm=0.0), "clip_global_norm", "> 0"),
        (dict(adaptive_clip=-0.01), "adaptive_clip", "> 0"),
        (dict(nesterov="False"), "nesterov", "True or False"),
    ],
)
def test_bad_numbers_raise(overrides, field, bound):
    value = overrides[field]  # A plain dict: a ConfigDict would cast or refuse some values.
    with pytest.raises(ValueError, match=rf"^optim\.{field}={re.escape(repr(value))} must be.*"
                                         rf"{re.escape(bound)}"):
        training.make_optimizer(optim().to_dict() | overrides)


# ------------------------------------------------------------------ non-finite detection


def test_nan_input_is_reported_and_not_applied(mesh):
    model, cfg = TinyNet(), optim()
    step = training.make_train_step(model, cfg, mesh)
    state = fresh_state(cfg, mesh)
    for i in range(2):
        state, m = step(state, parallel.global_batch(mesh, make_batch(i)))
        assert bool(m["finite"]) and int(m["nonfinite_leaf"]) == -1
    before = to_numpy(state)
    bad = make_batch(2)
    bad["image"][3, 1, 1, 0] = np.nan
    state, m = step(state, parallel.global_batch(mesh, bad))
    assert not bool(m["finite"]) and int(m["step"]) == 2
    assert int(m["nonfinite_leaf"]) >= 0
    assert_trees_equal(to_numpy(state), before)  # Old state kept, step included.
    state, m = step(state, parallel.global_batch(mesh, make_batch(3)))
    assert bool(m["finite"]) and int(m["step"]) == 2 and int(state.step) == 3


def test_huge_learning_rate_is_caught_and_state_stays_finite(mesh):
    model, cfg = TinyNet(), optim(learning_rate=1e30, momentum=0.0)
    step = training.make_train_step(model, cfg, mesh)
    state = fresh_state(cfg, mesh)
    failed = None
    for i in range(5):
        state, m = step(state, parallel.global_batch(mesh, make_batch(i)))
        if not bool(m["finite"]):
            failed = int(m["step"])
            break
    assert failed is not None
    assert int(state.step) == failed
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(to_numpy(state)))


def test_nonfinite_leaf_names_the_parameter(mesh):
    model, cfg = SqrtGain(), optim()
    batch = parallel.global_batch(mesh, {"image": np.ones((4, 5), np.float32),
                                         "label": np.zeros(4, np.int32)})
    state = training.create_train_state(model, cfg, jax.random.key(0), batch["image"], mesh)
    paths = training.param_paths(state.params)
    state, m = training.make_train_step(model, cfg, mesh)(state, batch)
    assert np.isfinite(float(m["loss"])) and not bool(m["finite"])
    assert paths == ["Dense_0/bias", "Dense_0/kernel", "sqrt_gain"]
    assert paths[int(m["nonfinite_leaf"])] == "sqrt_gain"


def test_nonfinite_message_names_the_step_where_and_parameter():
    report = {"step": 7, "loss": float("nan"), "first": "gradients", "block": 2,
              "where": "stages_0/rest[1]", "param": "stages_0/rest/kernel"}
    assert training.nonfinite_message(report) == (
        "Non-finite values at step 7 (loss nan): first in gradients at stages_0/rest[1], "
        "parameter stages_0/rest/kernel")
    report.update(first="loss", where=None, param=None)
    assert training.nonfinite_message(report) == (
        "Non-finite values at step 7 (loss nan): first in loss at -")


def test_gradient_spread_warns_past_the_limit_or_when_not_finite():
    assert training.gradient_spread([1.0, 0.0, 100.0], 1e3) == (100.0, None)
    spread, warning = training.gradient_spread([1.0, 0.0, 100.0], 10.0)
    assert spread == 100.0 and warning.startswith(
        "step 0: per-block gradient norms span 100x (blocks 3 and 2), more than "
        "grad_spread_warning=10")
    spread, warning = training.gradient_spread([0.0, float("nan")], 10.0)
    assert np.isnan(spread) and "span nanx" in warning
    spread, warning = training.gradient_spread([0.0, 0.0, 0.0], 10.0)  # Fixup's zero head.
    assert np.isnan(spread) and warning is None


def test_grad_norms_by_module():
    grads = {"a": {"x": {"kernel": 3 * jnp.ones((1,)), "bias": 4 * jnp.ones((1,))}},
             "b": {"kernel": jnp.ones((2, 2))}}
    top = training.grad_norms_by_module(grads)
    assert set(top) == {"a", "b"}
    np.testing.assert_allclose([float(top["a"]), float(top["b"])], [5.0, 2.0])
    leaf = training.grad_norms_by_module(grads, depth=None)
    assert set(leaf) == {"a/x", "b"}


# ------------------------------------------------------------------ checkpoint resume


def test_resume_equals_uninterrupted_run(mesh, tmp_path):
    model = TinyNet()
    cfg = optim(
        momentum=0.9, nesterov=True, weight_decay=5e-4, weight_decay_mask="kernels",
        clip_global_norm=5.0, schedule="piecewise", boundaries=[4], warmup_steps=2,
        warmup_lr=0.01,
    )

    def run(step, state, start, stop):
        metrics = []
        for i in range(start, stop):
            state, m = step(state, parallel.global_batch(mesh, make_batch(i)))
            metrics.append(to_numpy(m))
        return state, metrics

    step = training.make_train_step(model, cfg, mesh)
    full, full_metrics = run(step, fresh_state(cfg, mesh), 0, 6)
    full = to_numpy(full)

    state, metrics = run(step, fresh_state(cfg, mesh), 0, 3)
    manager = training.make_checkpoint_manager(str(tmp_path))
    iterator_state = {"next_index": 3, "epoch": 0}  # As grain's DatasetIterator.get_state().
    assert training.save_checkpoint(manager, state, iterator_state, {"note": "k=3"})
    run(step, state, 3, 4)  # Donates `state` while the async save may still be writing.
    manager.wait_until_finished()
    manager.close()

    # "New process": fresh manager and step function; the target only gives shapes/shardings.
    manager = training.make_checkpoint_manager(str(tmp_path))
    target = training.abstract_state(fresh_state(cfg, mesh))
    restored, it_state, extra = training.restore_latest(manager, target)
    assert it_state == iterator_state and extra == {"note": "k=3"}
    assert int(restored.step) == 3
    assert restored.params["Dense_0"]["kernel"].sharding == parallel.replicated(mesh)
    step = training.make_train_step(model, cfg, mesh)
    resumed, more = run(step, restored, it_state["next_index"], 6)

    assert_trees_equal(to_numpy(resumed), full)
    assert_trees_equal(metrics + more, full_metrics)
    assert [float(m["learning_rate"]) for m in full_metrics] == pytest.approx(
        [0.01, 0.01, 0.1, 0.1, 0.01, 0.01]
    )

    # grain's DataLoader state is JSON bytes: it comes back as bytes.
    assert training.save_checkpoint(manager, resumed, b'{"next_index": 6}', force=True)
    manager.wait_until_finished()
    restored, it_state, extra = training.restore_latest(manager, target)
    assert it_state == b'{"next_index": 6}' and extra == {} and int(restored.step) == 6
    assert_trees_equal(to_numpy(restored), full)


def test_restore_latest_without_checkpoint_is_none(tmp_path):
    assert training.restore_latest(training.make_checkpoint_manager(str(tmp_path)), None) is None


# ------------------------------------------------------------------ data parallelism


def test_global_batch_single_process(mesh):
    batch = parallel.global_batch(mesh, make_batch(0))
    assert batch["image"].shape == (8, 6, 6, 3) and batch["label"].dtype == jnp.int32
    assert batch["image"].sharding == parallel.data_sharding(mesh)
    with pytest.raises(ValueError, match="num_devices"):
        parallel.make_mesh(jax.device_count() + 1)


TWO_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from tests.test_train import TinyNet, optim, make_batch, to_numpy
    from resflax import parallel, training

    assert jax.device_count() == 2, jax.devices()
    model, cfg = TinyNet(), optim(weight_decay=1e-4, clip_global_norm=1.0)
    state2 = training.create_train_state(model, cfg, jax.random.key(0), make_batch(0)["image"],
                                      parallel.make_mesh(2))
    initial = to_numpy(state2)
    results = []
    for n in (1, 2):
        mesh = parallel.make_mesh(n)
        state = jax.device_put(initial, parallel.replicated(mesh))
        step, evaluate = training.make_train_step(model, cfg, mesh), training.make_eval_step(model, mesh)
        metrics = []
        for i in range(3):
            batch = parallel.global_batch(mesh, make_batch(i))
            state, m = step(state, batch)
            metrics.append(to_numpy(m))
        assert len(state.params["Dense_0"]["kernel"].sharding.device_set) == n
        assert len(batch["image"].sharding.device_set) == n
        eval_batch = dict(make_batch(9), mask=np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32))
        metrics.append(to_numpy(evaluate(state, parallel.global_batch(mesh, eval_batch))))
        results.append((to_numpy(state), metrics))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print("OK")
    """
)


def test_two_simulated_devices_equal_one():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    out = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


TWO_PROCESSES = textwrap.dedent(
    """
    import sys
    import numpy as np
    from resflax import parallel

    pid, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    parallel.initialize_distributed(f"127.0.0.1:{port}", num_processes=2, process_id=pid)

    import jax
    from tests.test_train import TinyNet, optim, make_batch, to_numpy
    from resflax import training

    assert jax.process_count() == 2 and jax.device_count() == 2
    mesh = parallel.make_mesh()
    model, cfg = TinyNet(), optim(weight_decay=1e-4)
    state = training.create_train_state(model, cfg, jax.random.key(0), make_batch(0)["image"], mesh)
    step = training.make_train_step(model, cfg, mesh)
    for i in range(2):  # Each process feeds its half of the global batch.
        local = {k: v[4 * pid:4 * (pid + 1)] for k, v in make_batch(i).items()}
        state, m = step(state, parallel.global_batch(mesh, local))
    manager = training.make_checkpoint_manager(workdir + "/ckpt")
    training.save_checkpoint(manager, state, {"next_index": 2, "process": pid}, {"p": 0})
    manager.wait_until_finished()
    restored, it_state, extra = training.restore_latest(manager, state)
    assert it_state == {"next_index": 2, "process": pid} and extra == {"p": 0}, it_state
    for a, b in zip(jax.tree.leaves(to_numpy(restored)), jax.tree.leaves(to_numpy(state))):
        np.testing.assert_array_equal(a, b)
    manager.close()
    if pid == 0:
        np.savez(workdir + "/out.npz", loss=m["loss"], *jax.tree.leaves(to_numpy(state.params)))
    """
)


def test_two_processes_equal_one(mesh, tmp_path):
    """jax.distributed on 127.0.0.1: per-process batches, steps and per-process iterator state
    in the checkpoint; the result equals one process on the whole batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="",
        PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESSES, str(pid), str(port), str(tmp_path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for pid in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

    cfg = optim(weight_decay=1e-4)
    state, step = fresh_state(cfg, mesh), training.make_train_step(TinyNet(), cfg, mesh)
    for i in range(2):
        state, m = step(state, parallel.global_batch(mesh, make_batch(i)))
    out = np.load(tmp_path / "out.npz")
    np.testing.assert_allclose(out["loss"], np.asarray(m["loss"]), rtol=1e-5)
    for i, ref in enumerate(jax.tree.leaves(to_numpy(state.params))):
        np.testing.assert_allclose(out[f"arr_{i}"], ref, rtol=1e-5, atol=1e-6)
