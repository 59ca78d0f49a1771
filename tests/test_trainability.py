"""experiments.trainability: the sweep's files (results.json, table, figure), reuse of completed
runs, the tuning's choice of learning rates, and errors on bad configs. Tiny nets, few steps."""

import math

import numpy as np
import pytest

from configs import digits_trainability
from experiments import reporting, trainability
from resflax import theory


def tiny_config(digits_dir, methods=("plain_bn", "v1_bn")):
    config = digits_trainability.get_config()
    config.data.data_dir = digits_dir
    config.model.width = 4
    with config.unlocked():
        config.methods = tuple(m for m in config.methods if m["name"] in methods)
        config.reference = ("v1_bn",)
    config.depths = (1, 2)
    config.seeds = (0,)
    config.batch_size, config.eval_batch_size, config.num_train_steps = 16, 180, 6
    config.log_every_steps, config.eval_every_steps, config.grad_norm_every_steps = 2, 6, 3
    config.checkpoint_every_steps = 6
    config.optim.boundaries = (4,)
    config.diagnostics.batch_size, config.diagnostics.slq_steps = 8, 4
    config.tuning.depth, config.tuning.num_train_steps = 1, 4
    config.tuning.learning_rates = (0.01, 100.0)
    return config


def test_sweep_writes_results_table_figure_and_reuses_runs(digits_dir, tmp_path):
    config = tiny_config(digits_dir)
    results = trainability.run_sweep(config, str(tmp_path))

    saved = reporting.read_json(tmp_path / "results.json")
    assert saved == reporting.jsonable(results)
    assert [(r["net"], r["method"], r["depth"], r["seed"]) for r in saved["runs"]] == [
        ("plain_bn-4", "plain_bn", 1, 0), ("plain_bn-6", "plain_bn", 2, 0),
        ("v1_bn-4", "v1_bn", 1, 0), ("v1_bn-6", "v1_bn", 2, 0)]
    for run in saved["runs"]:  # degradation's record shape, plus the init diagnostics.
        assert {"model", "weight_layers", "status", "final_train_loss", "final_eval_error",
                "wall_s", "history"} <= set(run)
        assert run["status"] == "completed" and isinstance(run["final_train_loss"], float)
        d = run["init_diagnostics"]
        assert len(d["act_grad_sq"]) == run["depth"] + 1
        assert len(d["param_grad_norm"]) == run["depth"]
        assert d["act_grad_sq_ratio"] == pytest.approx(d["act_grad_sq"][0] / d["act_grad_sq"][-1])
        assert 0 <= d["sv_p10"] <= d["sv_p50"] <= d["sv_p90"] <= d["sv_max"] * (1 + 1e-6)
        assert 0 <= d["sv_zero_frac"] <= 1 and d["sv_spread"] >= 1
    table = {(t["method"], t["weight_layers"]): t for t in saved["table"]}
    for layers in (4, 6):
        plain, twin = table["plain_bn", layers], table["v1_bn", layers]
        assert twin["twin_loss"] == pytest.approx(twin["final_train_loss_mean"])
        assert plain["gap"] == pytest.approx(plain["final_train_loss_mean"]
                                             - twin["final_train_loss_mean"])
        assert plain["closes"] == (plain["gap"] <= config.margin)
        assert plain["diverged"] == 0 and plain["seeds"] == 1
    assert [g["best_plain_method"] for g in saved["gaps"]] == ["plain_bn", "plain_bn"]
    text = trainability.format_table(saved["table"], config.margin)
    assert "| plain_bn | 6 |" in text and "v1_bn" in text
    png = tmp_path / "trainability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    # A restart reuses the completed runs and their diagnostics.
    summary = tmp_path / "runs" / "v1_bn-6_seed0" / "summary.json"
    diag = tmp_path / "runs" / "v1_bn-6_seed0" / trainability.DIAGNOSTICS_FILE
    mtimes = summary.stat().st_mtime_ns, diag.stat().st_mtime_ns
    again = trainability.run_sweep(config, str(tmp_path))
    assert (summary.stat().st_mtime_ns, diag.stat().st_mtime_ns) == mtimes
    assert again["table"] == results["table"]


def test_tuning_writes_the_grid_and_chooses_the_argmin(digits_dir, tmp_path):
    config = tiny_config(digits_dir)
    config.tune = True
    results = trainability.run_sweep(config, str(tmp_path))
    saved = reporting.read_json(tmp_path / "tuning.json")
    assert saved == reporting.jsonable(results)
    assert [(g["method"], g["learning_rate"]) for g in saved["grid"]] == [
        ("plain_bn", 0.01), ("plain_bn", 100.0), ("v1_bn", 0.01), ("v1_bn", 100.0)]
    assert {(g["status"], g["learning_rate"]) for g in saved["grid"]} >= {("completed", 0.01)}
    assert set(saved["chosen"].values()) == {0.01}  # lr 100 diverges or ends far worse.
    assert saved["chosen"] == trainability.choose_learning_rates(saved["grid"])
    assert "plain_bn" in trainability.format_grid(saved["grid"])
    assert not (tmp_path / "results.json").exists()


def test_choose_learning_rates_is_the_argmin_with_diverged_as_inf():
    grid = [dict(method="a", learning_rate=0.1, final_train_loss=0.5),
            dict(method="a", learning_rate=0.1, final_train_loss=0.1),  # mean 0.3
            dict(method="a", learning_rate=0.01, final_train_loss=0.2),
            dict(method="a", learning_rate=0.01, final_train_loss=0.3),  # mean 0.25
            dict(method="b", learning_rate=1.0, final_train_loss=None),  # diverged
            dict(method="b", learning_rate=0.5, final_train_loss=2.0),
            dict(method="c", learning_rate=0.1, final_train_loss=float("nan")),
            dict(method="d", learning_rate=0.2, final_train_loss=1e-3, status="stopped_nonfinite"),
            dict(method="d", learning_rate=0.1, final_train_loss=2.0, status="completed")]
    assert trainability.choose_learning_rates(grid) == {"a": 0.01, "b": 0.5, "c": 0.1,
                                                        "d": 0.1}


def test_spectrum_summary_quantiles():
    nodes = np.array([[4.0, 2.0, 1.0], [8.0, 2.0, 0.5]])
    weights = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])  # Normalized per example.
    s = trainability.spectrum_summary(nodes, weights)
    assert (s["sv_p10"], s["sv_p50"], s["sv_p90"]) == (0.5, 2.0, 8.0)
    assert s["sv_spread"] == 16.0 and s["sv_max"] == 6.0 and s["sv_min"] == 0.75
    assert s["sv_zero_frac"] == 0.0
    # A dead direction: a singular value of 0 with weight 1/3 in one of two examples.
    s = trainability.spectrum_summary(np.array([[4.0, 2.0, 0.0], [4.0, 2.0, 1.0]]), weights)
    assert s["sv_zero_frac"] == pytest.approx(1 / 6) and s["sv_p10"] == 0.0
    assert s["sv_spread"] == 4.0


def test_config_computes_the_critical_point():
    method = next(m for m in digits_trainability.get_config().methods
                  if m["name"] == "plain_tanh_critical")
    assert method["model.weight_scale"] ** 2 == pytest.approx(
        theory.critical_sigma_w2("tanh", 0.01))
    assert method["model.bias_scale"] == pytest.approx(math.sqrt(0.01))
    conv = digits_trainability.get_config("conv")
    assert next(m for m in conv.methods if m["name"] == "plain_tanh_critical")[
        "model.init"] == "delta_orthogonal"
    for preset in digits_trainability.PRESETS:
        trainability.check_config(digits_trainability.get_config(preset))


def test_conv_preset_has_the_shaped_plain_nets():
    methods = {m["name"]: m for m in digits_trainability.get_config("conv").methods}
    for name, transform in (("plain_tat", "tat"), ("plain_dks", "dks")):
        assert methods[name]["model.activation_transform"] == transform
        assert methods[name]["model.init"] == "scaled_delta_orthogonal"
        assert (methods[name]["model.weight_scale"], methods[name]["model.bias_scale"]) == (
            1.0, 0.0)
    # Every method at the conv preset's own (tuned) rate, not the MLP preset's.
    assert {n: m["optim.learning_rate"] for n, m in methods.items()} == (
        digits_trainability.LEARNING_RATES["conv"])


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("methods", ({"name": "a", "model.block": "resnet"},),
         r"config\.methods entry 'a' at depth 3: config\.model: block='resnet'"),
        ("methods", ({"model.block": "plain"},), r"config\.methods\[0\].*must be a dict with a 'name'"),
        ("methods", ({"name": "a", "model.depth": 4},), r"sets model\.depth"),
        ("methods", ({"name": "a", "model.nope": 1},), r"unknown field 'model\.nope'"),
        ("reference", ("v3_bn",), r"config\.reference=.*unknown method\(s\) \['v3_bn'\]"),
        ("depths", (), r"config\.depths=\(\) must be a non-empty tuple"),
        ("margin", -1.0, r"config\.margin=-1\.0"),
        ("seeds", (-1,), r"config\.seeds=\(-1,\) must be a non-empty tuple of ints >= 0"),
        ("workers", 0, r"config\.workers=0 must be an int >= 1"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    config = digits_trainability.get_config()
    with config.unlocked():
        config[field] = value
        if field == "methods":
            config.reference = ("a",) if "name" in value[0] else ()
    with pytest.raises(ValueError, match=message):
        trainability.check_config(config)


def test_unknown_method_in_the_reference_is_an_error():
    config = digits_trainability.get_config()
    with config.unlocked():
        config.methods = config.methods[:2]
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['v1_bn', 'v2_bn'\]"):
        trainability.check_config(config)


def test_cifar10_config_without_the_data_is_one_line_naming_dataset_and_data_dir(tmp_path):
    import os
    import subprocess
    import sys

    from configs import cifar10_trainability

    config = cifar10_trainability.get_config()
    trainability.check_config(config)
    assert config.data.name == "cifar10" and config.depths == (20, 56, 110)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    empty = tmp_path / "tfds"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.trainability",
         "--config=configs/cifar10_trainability.py", f"--config.data.data_dir={empty}",
         f"--workdir={tmp_path / 'work'}"],
        cwd=repo, env=dict(os.environ, PYTHONPATH=repo), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("trainability: error: Dataset 'cifar10' is not prepared")
    assert f"data_dir={str(empty)!r}" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists()


def test_parallel_workers_give_the_same_records_as_one_process(digits_dir, tmp_path):
    """Two worker processes (experiments.workers), runs grouped by architecture and handed out
    longest first: the same records, in the same order, as the sweep in one process."""
    config = tiny_config(digits_dir, methods=("plain_bn", "v1_bn", "plain_dks"))
    one = trainability.run_sweep(config, str(tmp_path / "one"))
    config.workers = 2
    two = trainability.run_sweep(config, str(tmp_path / "two"))
    strip = lambda runs: [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]
    assert strip(two["runs"]) == strip(one["runs"])
    assert two["table"] == one["table"]


def test_parallel_sweep_stopped_midway_resumes_to_the_same_records(digits_dir, tmp_path):
    """Every run stops at step 3 (as on SIGTERM: checkpoint, status 'preempted'); the workers
    take no new run; the rerun resumes and gives the uninterrupted one-process records."""
    config = tiny_config(digits_dir)
    config.seeds = (0, 1)
    one = trainability.run_sweep(config, str(tmp_path / "one"))
    config.workers = 2
    config.stop_at_step = 3
    stopped = trainability.run_sweep(config, str(tmp_path / "two"))
    assert stopped["status"] == "preempted"
    assert 1 <= len(stopped["runs"]) < len(one["runs"])
    assert {r["status"] for r in stopped["runs"]} == {"preempted"}
    config.stop_at_step = None
    resumed = trainability.run_sweep(config, str(tmp_path / "two"))
    strip = lambda runs: [{k: v for k, v in r.items() if k != "wall_s"} for r in runs]
    assert strip(resumed["runs"]) == strip(one["runs"])


def test_architecture_groups_keep_seeds_together_longest_first(digits_dir):
    config = tiny_config(digits_dir)
    config.seeds = (0, 1)
    work = [(trainability.net_name(config, net), net, trainability.run_config(config, net, s))
            for net in trainability.nets(config) for s in config.seeds]
    groups = trainability.architecture_groups(work)
    assert sorted(i for g in groups for i in g) == list(range(len(work)))
    for g in groups:  # One architecture per group: its seeds.
        assert len({(work[i][1].method, work[i][1].depth) for i in g}) == 1 and len(g) == 2
    depths = [work[g[0]][1].depth for g in groups]
    assert depths == sorted(depths, reverse=True)  # The deeper nets first.
