"""experiments/: the training app end to end (embedded digits, mock CIFAR-10), resume bit for bit,
the stops (non-finite, SIGTERM), the degradation sweep's files, and errors on bad configs.

Tiny nets (width 4-16, 1-2 blocks or CIFAR depth 8), batches of 8-16, tens of steps."""

import os
import shutil
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from configs import digits_degradation
from configs import train as train_config
from experiments import degradation, reporting, train_setup
from experiments import train as app
import resflax
from resflax import data, parallel, training
from experiments import common
from run_helpers import assert_trees_equal, final_state, records
from resflax.config import FIELDS, config_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir, **overrides):
    """A 2-block v1 MLP of width 16 on digits, batch 16, 30 steps."""
    c = train_config.get_config()
    c.data.data_dir = data_dir
    c.model = config_dict(family="mlp", block="v1", depth=2, width=16, layers_per_block=2,
                               norm="batch")
    c.optim.learning_rate = 0.1
    c.optim.boundaries = (20,)
    c.batch_size, c.eval_batch_size = 16, 64  # 360 test digits: the last eval batch is padded.
    c.num_train_steps = 30
    c.log_every_steps, c.eval_every_steps = 4, 15
    c.grad_norm_every_steps, c.checkpoint_every_steps = 5, 10
    c.progress_every_secs = 0.0
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


# ------------------------------------------------------------------ end to end


def test_digits_end_to_end_learns_evaluates_and_writes_files(digits_dir, tmp_path):
    config = tiny_config(digits_dir)
    summary = app.train_and_evaluate(config, str(tmp_path))

    files = os.listdir(tmp_path)
    assert {"metrics.jsonl", "summary.json", "checkpoints"} <= set(files)
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert os.path.isdir(tmp_path / "checkpoints" / "30")
    assert reporting.read_json(tmp_path / "summary.json") == reporting.jsonable(summary)
    assert summary["status"] == "completed" and summary["step"] == 30
    assert summary["config"] == config.to_dict() and summary["wall_s"] > 0

    rs = records(tmp_path)
    train_rs = [r for r in rs if "train/loss" in r]
    assert [r["step"] for r in train_rs] == [4, 8, 12, 16, 20, 24, 28, 30]
    losses = [r["train/loss"] for r in train_rs]
    assert losses[-1] < 0.6 * losses[0], losses
    assert [r["train/learning_rate"] for r in train_rs][-1] == pytest.approx(0.01)
    eval_rs = [r for r in rs if "eval/loss" in r]
    assert [r["step"] for r in eval_rs] == [15, 30]
    assert 0.0 <= summary["eval_error"] < 0.9 and summary["eval_loss"] == eval_rs[-1]["eval/loss"]
    assert summary["train_loss"] == losses[-1]

    grad_rs = [r for r in rs if "param_grad_norm" in r]
    assert [r["step"] for r in grad_rs] == [0, 5, 10, 15, 20, 25]
    programs = train_setup.build_programs(config)
    assert all(len(r["param_grad_norm"]) == programs.model.num_blocks() == 2 for r in grad_rs)
    assert {"grad_norm/stem", "grad_norm/stages_0", "grad_norm/head"} <= set(grad_rs[0])

    # The app's initializer (one compile for every seed) is the library's create_train_state.
    shape = train_setup.input_shape(config)
    ours = programs.init(3, shape)
    ref = training.create_train_state(programs.model, train_setup.optim_config(config), jax.random.key(3),
                                   np.zeros(shape, np.float32), programs.mesh)
    assert_trees_equal(jax.device_get(ours), jax.device_get(ref))

    # Evaluation covers the whole split: padding is masked, the batch size does not matter.
    state, _ = final_state(config, str(tmp_path))
    state = jax.device_put(state, parallel.replicated(programs.mesh))
    whole = train_setup.evaluate(programs, state, tiny_config(digits_dir, eval_batch_size=360))
    assert whole["eval/loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert whole["eval/error"] == pytest.approx(summary["eval_error"], abs=1e-6)


def test_mock_cifar10_end_to_end(tmp_path):
    config = tiny_config(
        str(tmp_path / "tfds"), **{"data.name": "cifar10", "data.augment": "cifar"}
    )
    config.model = config_dict(family="cifar_resnet", block="v1", depth=8, width=4)
    config.batch_size, config.eval_batch_size, config.num_train_steps = 8, 16, 4
    config.log_every_steps, config.eval_every_steps, config.grad_norm_every_steps = 2, 4, 2
    with tfds.testing.mock_data(num_examples=24):
        summary = app.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["status"] == "completed" and summary["step"] == 4
    assert np.isfinite(summary["train_loss"]) and 0.0 <= summary["eval_error"] <= 1.0
    rs = records(tmp_path / "run")
    assert [r["step"] for r in rs if "train/loss" in r] == [2, 4]
    assert [len(r["param_grad_norm"]) for r in rs if "param_grad_norm" in r] == [3, 3]
    files = os.listdir(tmp_path / "run")
    assert any(f.startswith("events.out.tfevents") for f in files) and "summary.json" in files
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "4")


def test_block_grad_norms_split_scanned_layers():
    from resflax import build_model
    from resflax.topology import per_block_norms

    model = build_model(dict(family="cifar_resnet", depth=14, width=2))  # 2 blocks per stage.
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 3))))
    grads = jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes["params"])
    stage0 = grads["stages_0"]["rest"]["block"]  # Stacked [2, ...] leaves.
    for leaf in jax.tree.leaves(stage0):
        leaf[1] *= 2.0  # The second scanned block: norm doubles.
    norms = np.asarray(per_block_norms(model.config, grads))
    assert norms.shape == (model.num_blocks(),) == (6,)
    per_layer = np.sqrt(sum(leaf[0].size for leaf in jax.tree.leaves(stage0)))
    np.testing.assert_allclose(norms[:2], [per_layer, 2 * per_layer], rtol=1e-6)
    first = grads["stages_1"]["first"]["block"]
    np.testing.assert_allclose(norms[2], np.sqrt(sum(x.size for x in jax.tree.leaves(first))),
                               rtol=1e-6)


def test_read_threads_zero_gives_the_same_batches(digits_dir):
    """resflax.data.make_loader(read_threads=0) (the configs' default) changes speed only."""
    kwargs = dict(batch_size=32, train=True, seed=1, data_dir=digits_dir)
    default = iter(data.make_loader("digits", "train", **kwargs))
    inline = iter(data.make_loader("digits", "train", read_threads=0, **kwargs))
    for _ in range(3):
        a, b = next(default), next(inline)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert inline.get_state() == default.get_state()
    with pytest.raises(ValueError, match="read_threads=-1"):
        data.make_loader("digits", "train", read_threads=-1, **kwargs)


# ------------------------------------------------------------------ resume


def test_resume_equals_uninterrupted_run_bit_for_bit(digits_dir, tmp_path):
    """Stopped at step 13 (after the checkpoint at 10, mid logging window) and restarted, from
    the checkpoint at 13 and, as after a crash, from the one at 10: the final parameters,
    optimizer state, batch-norm statistics, data position and metrics equal a straight run's.
    The straight run reads grain directly; the others share a BatchCache (replayed batches)."""
    config = tiny_config(digits_dir)
    straight = app.train_and_evaluate(config, str(tmp_path / "straight"))

    cache = data.BatchCache()
    a = str(tmp_path / "a")
    stopped = app.train_and_evaluate(tiny_config(digits_dir, stop_at_step=13), a, cache=cache)
    assert stopped["status"] == "preempted" and stopped["step"] == 13
    assert reporting.read_json(os.path.join(a, "summary.json"))["status"] == "preempted"
    assert sorted(os.listdir(os.path.join(a, "checkpoints"))) == ["10", "13"]
    # "Crash" copy: only the checkpoint at 10 survives; records up to 13 must be dropped.
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    shutil.rmtree(os.path.join(b, "checkpoints", "13"))
    assert any(r["step"] == 12 for r in records(b))

    resumed_a = app.train_and_evaluate(config, a, cache=cache)  # Replays, then extends.
    resumed_b = app.train_and_evaluate(config, b, cache=data.BatchCache())  # Reads grain.
    replayed = app.train_and_evaluate(config, str(tmp_path / "replayed"), cache=cache)

    want_state, want_iterator = final_state(config, str(tmp_path / "straight"))
    want_records = records(tmp_path / "straight")
    for run, summary in ((a, resumed_a), (b, resumed_b), (tmp_path / "replayed", replayed)):
        state, iterator_state = final_state(config, str(run))
        assert_trees_equal(state, want_state)
        assert iterator_state == want_iterator
        assert records(run) == want_records
        for key in ("status", "step", "train_loss", "train_error", "eval_loss", "eval_error"):
            assert summary[key] == straight[key], key


# ------------------------------------------------------------------ stops


def test_nonfinite_loss_stops_with_the_step_and_parameter(digits_dir, tmp_path):
    config = tiny_config(digits_dir, **{"optim.learning_rate": 1e30, "optim.momentum": 0.0})
    config.model = config_dict(family="mlp", block="plain", depth=2, width=4, norm="none")
    summary = app.train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "stopped_nonfinite"
    bad = summary["nonfinite"]
    assert summary["step"] == bad["step"] < 10
    paths = training.param_paths(train_setup.build_programs(config).init(0, train_setup.input_shape(config)).params)
    assert bad["param"] is None or bad["param"] in paths
    assert reporting.read_json(tmp_path / "summary.json")["status"] == "stopped_nonfinite"
    assert not os.listdir(tmp_path / "checkpoints")  # No checkpoint of a failed step.


def test_sigterm_checkpoints_and_reports_preempted(digits_dir, tmp_path, monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    update, sent = reporting.Progress.update, []

    def update_and_signal(self, step, force=False):
        if step == 7 and not sent:  # As if the scheduler sent it during step 7.
            sent.append(step)
            signal.raise_signal(signal.SIGTERM)
        update(self, step, force)

    monkeypatch.setattr(reporting.Progress, "update", update_and_signal)
    before = signal.getsignal(signal.SIGTERM)
    summary = app.train_and_evaluate(tiny_config(digits_dir), str(tmp_path))
    assert summary["status"] == "preempted" and summary["step"] == 7
    assert os.path.isdir(tmp_path / "checkpoints" / "7")
    assert signal.getsignal(signal.SIGTERM) == before  # Handlers restored.


# ------------------------------------------------------------------ degradation


def test_degradation_sweep_writes_results_and_plot(digits_dir, tmp_path):
    config = digits_degradation.get_config()
    config.data.data_dir = digits_dir
    config.model.width = 4
    config.nets = ({"model.block": "plain", "model.depth": 1},
                   {"model.block": "v1", "model.depth": 2})
    config.seeds = (0, 1)
    config.batch_size, config.eval_batch_size, config.num_train_steps = 16, 180, 6
    config.log_every_steps, config.eval_every_steps, config.grad_norm_every_steps = 2, 6, 3
    config.optim.boundaries = (4,)
    results = degradation.run_sweep(config, str(tmp_path))

    saved = reporting.read_json(tmp_path / "results.json")
    assert saved == reporting.jsonable(results)
    assert saved["provenance"]["versions"]["jax"] and saved["provenance"]["argv"]
    assert saved["config"] == reporting.jsonable(config.to_dict())
    assert [(r["net"], r["seed"]) for r in saved["runs"]] == [
        ("plain-4", 0), ("plain-4", 1), ("v1-6", 0), ("v1-6", 1)]
    for run in saved["runs"]:
        assert set(run["model"]) == set(FIELDS)
        assert isinstance(run["seed"], int) and run["status"] == "completed"
        for key in ("final_train_loss", "final_train_error", "final_eval_error"):
            assert isinstance(run[key], float)
        h = run["history"]
        assert h["step"] == [2, 4, 6] and len(h["train_loss"]) == 3
        assert h["eval_step"] == [6] and h["grad_step"] == [0, 3]
        assert len(h["param_grad_norm"][0]) == run["model"]["depth"]
    table = saved["table"]
    assert [(t["net"], t["weight_layers"], t["seeds"]) for t in table] == [
        ("plain-4", 4, 2), ("v1-6", 6, 2)]
    losses = [r["final_train_loss"] for r in saved["runs"][:2]]
    assert table[0]["final_train_loss_mean"] == pytest.approx(np.mean(losses))
    assert table[0]["final_train_loss_std"] == pytest.approx(np.std(losses))
    png = tmp_path / "degradation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "plain-4" in degradation.format_table(table)

    # A restart reuses the completed runs.
    summary_file = tmp_path / "runs" / "v1-6_seed1" / "summary.json"
    mtime = summary_file.stat().st_mtime_ns
    again = degradation.run_sweep(config, str(tmp_path))
    assert summary_file.stat().st_mtime_ns == mtime
    assert again["table"] == results["table"]


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("model.block", "resnet", r"config\.model: block='resnet'.*allowed values"),
        ("model.depth", 0, r"config\.model: depth=0"),
        ("model.weight_scale", -2.0, r"config\.model: weight_scale=-2.0 must be a finite number >= 0"),
        ("optim.name", "rmsprop", r"config\.optim\.name.*allowed values"),
        ("optim.schedule", "linear", r"config\.optim\.schedule.*allowed values"),
        ("data.augment", "mixup", r"config\.data\.augment='mixup'.*allowed values"),
        ("batch_size", 0, r"config\.batch_size=0"),
        ("log_every_steps", 0, r"config\.log_every_steps=0"),
        ("seed", -1, r"config\.seed=-1"),
    ],
)
def test_bad_config_names_the_field(key, value, message):
    config = tiny_config(None)
    with config.unlocked():
        section, _, leaf = key.rpartition(".")
        (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        train_setup.check_config(config)


def test_wrong_num_classes_names_the_field(digits_dir):
    config = tiny_config(digits_dir, **{"model.num_classes": 3})
    with pytest.raises(ValueError, match=r"config\.model\.num_classes=3.*10 classes"):
        train_setup.input_shape(config)


@pytest.mark.parametrize(
    "net, message",
    [
        ({"model.block": "plain", "model.colour": "red"},
         r"unknown field 'model\.colour'.*allowed model fields"),
        ("block=plain,depth=1", r"config\.nets=.*must be a non-empty tuple of dicts"),
        ({"model.block": "plain", "optim.nope": 1}, r"unknown field 'optim\.nope'"),
        ({"model.block": "plain", "model.depth": "deep"}, r"config\.nets entry .*depth"),
        ({"model.block": "nope"}, r"config\.model: block='nope'"),
    ],
)
def test_bad_degradation_nets(net, message):
    config = digits_degradation.get_config()
    config.nets = (net,)
    with pytest.raises(ValueError, match=message):
        degradation.check_config(config)


def parse_flags(*args):
    """`--config=...` command-line arguments as experiments/ parse them (the family rule of
    `experiments.common` included)."""
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, sys_argv=argv)
    fv(argv)
    common.command_line_family_switch(fv.config, flag_values=fv)
    return fv.config


@pytest.mark.parametrize("config_file", ["train", "gradient_flow", "digits_degradation"])
def test_choosing_a_family_on_the_command_line_gives_that_familys_net(config_file):
    """`--config.model.family=cifar_resnet --config.model.depth=56` is He et al.'s ResNet-56 in
    every app, whatever MLP preset the config file holds (width 64, no norm, 2 layers per block)."""
    config = parse_flags(f"--config={REPO}/configs/{config_file}.py",
                         "--config.model.family=cifar_resnet", "--config.model.depth=56")
    model = common.model_config(config)
    assert model == resflax.ModelConfig(family="cifar_resnet", depth=56)
    assert (model.block, model.width, model.norm, model.shortcut) == ("v1", 16, "batch", "A")
    # Fields given with the family are kept; the same family keeps the file's fields.
    config = parse_flags(f"--config={REPO}/configs/{config_file}.py",
                         "--config.model.family=cifar_resnet", "--config.model.block=v2",
                         "--config.model.depth=20", "--config.model.width=8")
    assert common.model_config(config) == resflax.ModelConfig(
        family="cifar_resnet", block="v2", depth=20, width=8)
    base = common.model_config(parse_flags(f"--config={REPO}/configs/{config_file}.py"))
    same = parse_flags(f"--config={REPO}/configs/{config_file}.py", "--config.model.family=mlp")
    assert common.model_config(same) == base


def test_sweep_overrides_that_change_the_family_start_from_its_defaults():
    config = train_config.get_config()  # An MLP: width 64, two layers per block.
    run = common.apply_overrides(config, {"model.family": "cifar_resnet", "model.depth": 56})
    assert common.model_config(run) == resflax.ModelConfig(family="cifar_resnet", depth=56)
    run = common.apply_overrides(config, {"model.depth": 3, "optim.learning_rate": 0.5})
    assert common.model_config(run).width == 64 and run.optim.learning_rate == 0.5
    assert config.model.depth == 9  # The original is left alone.
    with pytest.raises(ValueError, match=r"unknown field 'optim\.nope'"):
        common.apply_overrides(config, {"optim.nope": 1})


def test_command_line_overrides_type_check():
    config = parse_flags(
        f"--config={REPO}/configs/train.py", "--config.model.depth=5",
        "--config.model.residual_scale=0", "--config.model.learnable_residual_scale=True",
        "--config.optim.clip_global_norm=1.5", "--config.data.data_dir=/tmp/x",
    )
    fields = common.model_config(config).to_dict()
    assert fields["depth"] == 5 and fields["learnable_residual_scale"] is True
    assert fields["residual_scale"] == 0.0
    assert config.optim.clip_global_norm == 1.5 and config.data.data_dir == "/tmp/x"
    config = parse_flags(f"--config={REPO}/configs/train.py", "--config.model.residual_scale=0.25")
    assert common.model_config(config).residual_scale == 0.25
    with pytest.raises(flags.IllegalFlagValueError, match="depth"):
        parse_flags(f"--config={REPO}/configs/train.py", "--config.model.depth=deep")
    for name in ("cifar10_he2015", "digits_degradation"):
        degradation.check_config(parse_flags(f"--config={REPO}/configs/{name}.py"))


def test_he2015_config_builds_the_papers_nets():
    """Plain/v1 with option A (He et al. 2015); pre-act 164/1001 bottleneck with projections (B,
    He et al. 2016), with the paper's parameter counts."""
    config = parse_flags(f"--config={REPO}/configs/cifar10_he2015.py")
    models = {}
    for net in config.nets:
        fields = common.model_config(degradation.run_config(config, net, 0)).to_dict()
        models[(fields["block"], fields["depth"])] = fields
    for (block, depth), fields in models.items():
        assert fields["shortcut"] == ("B" if block == "v2" else "A"), (block, depth)
        assert fields["bottleneck"] == (block == "v2")
    shapes = lambda f: jax.eval_shape(resflax.build_model(f).init, jax.random.key(0),
                                      jnp.zeros((1, 32, 32, 3)))["params"]
    count = lambda f: sum(a.size for a in jax.tree.leaves(shapes(f)))
    assert count(models[("v1", 110)]) == 1_727_962  # He et al. 2015: 1.7 M.
    assert abs(count(models[("v2", 164)]) - 1.70e6) < 0.01e6  # He et al. 2016: 1.7 M.
    assert abs(count(models[("v2", 1001)]) - 10.2e6) < 0.2e6  # He et al. 2016: 10.2 M.


@pytest.mark.parametrize(
    "module, args, field",
    [
        ("experiments.train", ["--config=configs/train.py", "--config.model.block=v3"],
         "block='v3'"),
        ("experiments.train", ["--config=configs/train.py", "--config.data.name=mnist",
                               "--config.data.data_dir={tmp}/tfds"], "mnist"),
        ("experiments.degradation", ["--config=configs/digits_degradation.py",
                                     "--config.model.width=-3"], "width=-3"),
        ("experiments.train", ["--config=configs/nope.py"], "configs/nope.py"),
        ("experiments.degradation", ["--config=configs/digits_degradation.py",
                                     "--config.model.widht=3"], "widht"),
        ("experiments.train", ["--config=configs/train.py", "--workdir={tmp}/a_file"],
         "is not a directory"),
        ("experiments.degradation", ["--config=configs/digits_degradation.py",
                                     "--workdir={tmp}/a_file"], "is not a directory"),
        ("experiments.gradient_flow", ["--config=configs/gradient_flow.py:single",
                                       "--workdir={tmp}/a_file"], "is not a directory"),
        ("experiments.train", ["--config=configs/train.py", "--config.optim.learning_rate=-1"],
         "learning_rate=-1"),
    ],
)
def test_command_line_user_errors_are_one_line_with_exit_status_2(tmp_path, module, args, field):
    import subprocess
    import sys

    (tmp_path / "a_file").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={tmp_path / 'work'}")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == common.USAGE_ERROR_EXIT_CODE == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith((module.split(".")[1] + ": error:", "FATAL Flags parsing error:"))
    assert field in last, last
    assert not os.path.exists(tmp_path / "work")  # Nothing written, nothing compiled.
