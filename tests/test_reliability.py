"""Runs that lose nothing and explain themselves: SIGKILL anywhere, corrupt checkpoints, a locked
workdir, a changed config on resume, provenance, non-finite steps named by block."""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import train as train_config
from experiments import common, reporting, train_setup
from experiments import train as app
from resflax import training
from resflax.config import config_dict
from run_helpers import assert_trees_equal, final_state, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The tiny run, as command-line flags (for subprocesses) and as a config (in process).
TINY = {
    "model.family": "mlp", "model.block": "v1", "model.depth": 2, "model.width": 16,
    "model.layers_per_block": 2, "model.norm": "batch", "optim.learning_rate": 0.1,
    "optim.boundaries": (20,), "batch_size": 16, "eval_batch_size": 120,
    "num_train_steps": 30, "log_every_steps": 2, "eval_every_steps": 10,
    "grad_norm_every_steps": 5, "checkpoint_every_steps": 5, "max_checkpoints_to_keep": 3,
    "progress_every_secs": 0.0,
}


def tiny_config(digits_dir, **overrides):
    config = common.apply_overrides(train_config.get_config(),
                                    {**TINY, "data.data_dir": digits_dir, **overrides})
    return config


def flags_of(digits_dir, **overrides):
    values = {**TINY, "data.data_dir": digits_dir, **overrides}
    return [f"--config.{k}={v}" for k, v in values.items()]


def cli(workdir, digits_dir, *extra, wait=True, **overrides):
    args = [sys.executable, "-m", "experiments.train", "--config=configs/train.py",
            f"--workdir={workdir}", *flags_of(digits_dir, **overrides), *extra]
    kwargs = dict(cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True)
    if not wait:
        return subprocess.Popen(args, **kwargs)
    return subprocess.run(args, timeout=300, **kwargs)


def final_params(config, workdir):
    return final_state(config, workdir)[0].params


def comparable(summary):
    skip = ("wall_s", "provenance")
    return {k: v for k, v in summary.items() if k not in skip}


# ------------------------------------------------------------------ SIGKILL anywhere


def test_sigkill_at_random_points_loses_and_duplicates_nothing(digits_dir, tmp_path):
    """A few SIGKILLs at random moments (bounded: 3 kills, each after a random number of
    metric records, every process with a timeout); the resumed run ends with the parameters,
    `summary.json` and `metrics.jsonl` of an uninterrupted run, every record exactly once."""
    steps = {"num_train_steps": 60}
    straight = tmp_path / "straight"
    proc = cli(straight, digits_dir, **steps)
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = records(straight)

    killed = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        target = rng.randint(3, len(want) - 3)  # Kill once this many records are written.
        p = cli(killed, digits_dir, wait=False, **steps)
        deadline = time.monotonic() + 240
        while p.poll() is None and time.monotonic() < deadline:
            if len(reporting.read_jsonl(killed / "metrics.jsonl")) >= target:
                p.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        p.communicate(timeout=60)
    assert kills >= 1
    proc = cli(killed, digits_dir, **steps)  # Resume to the end.
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = tiny_config(digits_dir, **steps)
    assert_trees_equal(final_params(config, str(killed)), final_params(config, str(straight)))
    got = records(killed)
    assert got == want  # Nothing missing, nothing twice.
    assert len({(r["step"], tuple(sorted(r))) for r in got}) == len(got)
    a, b = (reporting.read_json(d / "summary.json") for d in (killed, straight))
    assert comparable(a) == comparable(b)


# ------------------------------------------------------------------ corrupt checkpoints


def _latest_dir(workdir):
    root = os.path.join(workdir, app.CHECKPOINT_DIR)
    return os.path.join(root, str(max(int(s) for s in os.listdir(root) if s.isdigit())))


def _flip_a_bit(path, rng):
    with open(path, "r+b") as f:
        raw = bytearray(f.read())
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
        f.seek(0)
        f.write(raw)


@pytest.mark.parametrize("damage", ["bit_flip", "truncate", "delete", "digest_mismatch"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_good_one(
        digits_dir, tmp_path, damage):
    config = tiny_config(digits_dir)
    straight = app.train_and_evaluate(config, str(tmp_path / "straight"))
    want = final_params(config, str(tmp_path / "straight"))

    run = str(tmp_path / "run")
    app.train_and_evaluate(tiny_config(digits_dir, stop_at_step=20), run)
    latest = _latest_dir(run)
    assert latest.endswith("/20")
    rng = random.Random(damage)
    files = sorted(f for f in glob.glob(os.path.join(latest, "**", "*"), recursive=True)
                   if os.path.isfile(f) and os.path.getsize(f) > 0)
    # The arrays' data file (the largest): damage there changes numbers, not just metadata.
    victim = max(files, key=os.path.getsize)
    if damage == "bit_flip":
        _flip_a_bit(victim, rng)
    elif damage == "digest_mismatch":
        # An array that restores without complaint but differs from what was saved: the one
        # case only the digests can catch (here the recorded digest of one array changes).
        [meta] = glob.glob(os.path.join(latest, "integrity", "metadata"))
        integrity = reporting.read_json(meta)
        first = sorted(integrity["state"])[0]
        integrity["state"][first] = "0" * 64
        reporting.write_json(meta, integrity)
    elif damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    else:
        os.unlink(victim)

    summary = app.train_and_evaluate(config, run)
    assert summary["status"] == "completed"
    assert_trees_equal(final_params(config, run), want)
    assert comparable(summary)["train_loss"] == straight["train_loss"]
    corrupt = os.path.join(run, app.CORRUPT_DIR)
    if damage == "bit_flip" and not os.path.exists(corrupt):
        # The flipped bit changed nothing that restores (e.g. unused bytes of a chunk): step 20
        # restored, and its arrays matched their digests, so the parameters above are right.
        return
    # Step 20 was refused (one warning, moved aside) and step 15 restored instead.
    quarantined = os.listdir(corrupt)
    assert len(quarantined) == 1 and quarantined[0].startswith("20.")


def test_a_flipped_array_bit_is_caught_by_the_digest(digits_dir, tmp_path):
    """Whatever Orbax's own checks see, a restored array that differs from the saved one is
    refused: flip a bit of a restored state and verify against the saved digests."""
    config = tiny_config(digits_dir, stop_at_step=10)
    run = str(tmp_path / "run")
    app.train_and_evaluate(config, run)
    programs = train_setup.build_programs(config)
    state = programs.init(config.seed, train_setup.input_shape(config))
    digests = training.state_digests(state)
    leaves, tree = jax.tree.flatten(jax.device_get(state))
    arr = np.array(leaves[3])
    arr.view(np.uint8).reshape(-1)[0] ^= 1
    leaves[3] = arr
    bad = training.state_digests(jax.tree.unflatten(tree, leaves))
    assert sum(bad[k] != digests[k] for k in digests) == 1


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(digits_dir, tmp_path):
    run = str(tmp_path / "run")
    app.train_and_evaluate(tiny_config(digits_dir, stop_at_step=5), run)
    for f in glob.glob(os.path.join(run, app.CHECKPOINT_DIR, "5", "state", "**", "*"),
                       recursive=True):
        if os.path.isfile(f):
            os.unlink(f)
    with pytest.raises(training.CheckpointError, match="step 5"):
        app.train_and_evaluate(tiny_config(digits_dir), run)


# ------------------------------------------------------------------ workdir and config


def test_a_second_run_on_a_locked_workdir_stops_at_once_with_one_line(digits_dir, tmp_path):
    workdir = tmp_path / "run"
    with common.WorkdirLock(str(workdir)):
        start = time.monotonic()
        proc = cli(workdir, digits_dir)
        elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith("train: error: workdir") and "in use" in last
    assert f'"pid": {os.getpid()}' in last
    assert not os.path.exists(workdir / "summary.json")
    assert elapsed < 120  # It did not train (a full run compiles and trains for longer).


def test_resume_with_a_changed_config_is_refused_unless_overridden(digits_dir, tmp_path):
    run = str(tmp_path / "run")
    app.train_and_evaluate(tiny_config(digits_dir, stop_at_step=10), run)
    changed = tiny_config(digits_dir, **{"optim.learning_rate": 0.05, "batch_size": 8})
    with pytest.raises(ValueError, match=r"config\.batch_size: 16 -> 8.*"
                                         r"config\.optim\.learning_rate: 0\.1 -> 0\.05"):
        app.check_resume(changed, run)
    with pytest.raises(ValueError, match=r"another config"):
        app.train_and_evaluate(changed, run)
    app.check_resume(tiny_config(digits_dir), run)  # Same config (stop_at_step may change).
    summary = app.train_and_evaluate(changed, run, allow_config_change=True)
    assert summary["status"] == "completed"
    assert summary["config_history"] == [{"step": 10, "changed": {
        "batch_size": [16, 8], "optim.learning_rate": [0.1, 0.05]}}]
    # On the command line: one line, exit 2, naming the fields; the override flag proceeds.
    run2 = str(tmp_path / "run2")
    app.train_and_evaluate(tiny_config(digits_dir, stop_at_step=10), run2)
    proc = cli(run2, digits_dir, **{"optim.learning_rate": 0.05})
    assert proc.returncode == 2 and "optim.learning_rate: 0.1 -> 0.05" in proc.stderr
    proc = cli(run2, digits_dir, "--allow_config_change", **{"optim.learning_rate": 0.05})
    assert proc.returncode == 0, proc.stderr[-2000:]
    history = reporting.read_json(os.path.join(run2, "summary.json"))["config_history"]
    assert history[0]["changed"] == {"optim.learning_rate": [0.1, 0.05]}


def test_every_results_file_carries_provenance(digits_dir, tmp_path):
    summary = app.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), str(tmp_path))
    prov = reporting.read_json(tmp_path / "summary.json")["provenance"]
    assert prov == reporting.jsonable(summary["provenance"])
    for key in ("versions", "backend", "devices", "process_count", "git", "python", "host",
                "argv", "start_utc", "end_utc"):
        assert key in prov, key
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                    "tensorflow-datasets"):
        assert prov["versions"][package], package
    assert prov["start_utc"] <= prov["end_utc"] and prov["backend"] == jax.default_backend()


# ------------------------------------------------------------------ non-finite steps


def test_an_overflowing_forward_pass_names_the_block(digits_dir, tmp_path):
    """A plain net without norm at weight_scale 1e8 overflows float32 a few blocks in: the run
    stops at step 0 and names the first non-finite activation's block and scan position."""
    config = tiny_config(digits_dir)
    config.model = config_dict(family="mlp", block="plain", depth=8, width=16, norm="none",
                               weight_scale=1e8)
    summary = app.train_and_evaluate(config, str(tmp_path))
    bad = summary["nonfinite"]
    assert summary["status"] == "stopped_nonfinite" and bad["step"] == 0
    assert bad["first"] == "activations" and 1 <= bad["block"] <= 8
    assert bad["where"] == f"stages_0/rest[{bad['block'] - 1}]"
    # Checked by hand: the first x_l with a non-finite entry.
    programs = train_setup.build_programs(config)
    state = programs.init(config.seed, train_setup.input_shape(config))
    batch = next(iter(train_setup.loader(config, config.data.train_split, train_mode=True,
                                  batch_size=config.batch_size)))
    (_, signals), _ = programs.model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        mutable=["batch_stats"])
    xs = np.concatenate([np.asarray(s) for s in signals])
    first = next(l for l in range(len(xs)) if not np.all(np.isfinite(xs[l])))
    assert bad["block"] == first


def test_an_overflowing_update_names_the_block_and_skip_step_keeps_the_parameters(
        digits_dir, tmp_path):
    """float16 parameters (largest value 65504) and lr 1e6: the step-0 forward and backward
    passes are finite, the update is not."""
    half = {"model.dtype": "float16", "model.param_dtype": "float16",
            "optim.learning_rate": 1e6, "optim.momentum": 0.0}
    config = tiny_config(digits_dir, **half)
    summary = app.train_and_evaluate(config, str(tmp_path / "stop"))
    bad = summary["nonfinite"]
    assert summary["status"] == "stopped_nonfinite" and bad["step"] == 0
    assert bad["first"] == "params" and bad["block"] in (1, 2) and bad["param"]
    assert bad["where"].startswith("stages_0/rest[")

    skip = tiny_config(digits_dir, **half, on_nonfinite="skip_step", max_skips=4)
    summary = app.train_and_evaluate(skip, str(tmp_path / "skip"))
    assert summary["status"] == "stopped_nonfinite" and summary["step"] == 0
    assert len(summary["skipped_steps"]) == 4  # Then the 5th in a row stops.
    assert all(r["first"] == "params" for r in summary["skipped_steps"])
    assert not os.listdir(tmp_path / "skip" / "checkpoints")  # A stopped run saves nothing.


def test_skip_step_skips_only_the_bad_batch(digits_dir, tmp_path, monkeypatch):
    """A batch made non-finite on purpose is skipped; the parameters are untouched by it and the
    run completes with one skipped step."""
    config = tiny_config(digits_dir, on_nonfinite="skip_step", num_train_steps=6,
                         checkpoint_every_steps=1)
    real = app.parallel.global_batch
    calls = {"train": 0}

    def poisoned(mesh, batch):
        if len(batch["label"]) == config.batch_size:  # A training batch (eval's are larger).
            calls["train"] += 1
            if calls["train"] == 3:  # The third: NaN inputs.
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return real(mesh, batch)

    monkeypatch.setattr(app.parallel, "global_batch", poisoned)
    summary = app.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "completed" and summary["step"] == 6
    [skipped] = summary["skipped_steps"]
    assert skipped["step"] == 2 and skipped["first"] == "activations" and skipped["block"] == 0
    assert skipped["where"] == "stem"
    # What a skipped step leaves behind: exactly the state it was given.
    programs = train_setup.build_programs(config)
    state = programs.init(config.seed, train_setup.input_shape(config))
    before = jax.device_get(state)
    batch = next(iter(train_setup.loader(config, config.data.train_split, train_mode=True,
                                  batch_size=config.batch_size)))
    batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    after, metrics = programs.train_step(state, real(programs.mesh, batch))
    assert not bool(metrics["finite"])
    assert_trees_equal(jax.device_get(after), before)


def test_a_wide_gradient_spread_at_step_0_is_a_warning(digits_dir, tmp_path):
    summary = app.train_and_evaluate(
        tiny_config(digits_dir, num_train_steps=2, grad_spread_warning=1.0), str(tmp_path / "a"))
    assert summary["grad_spread_step0"] > 1.0 and len(summary["warnings"]) == 1
    assert "per-block gradient norms span" in summary["warnings"][0]
    summary = app.train_and_evaluate(
        tiny_config(digits_dir, num_train_steps=2, grad_spread_warning=1e30), str(tmp_path / "b"))
    assert summary["warnings"] == [] and summary["grad_spread_step0"] < 1e30
