"""experiments/gradient_flow.py: results.json schema, plots, presets, data, errors, determinism."""

import contextlib
import json
import math
import os
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import gradient_flow as gf_config
from experiments import gradient_flow
from resflax.config import FIELDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SWEEP = (
    {"name": "plain", "model.family": "mlp", "model.block": "plain", "model.depth": 2,
     "model.width": 8},
    {"name": "v2 bn", "model.family": "mlp", "model.block": "v2", "model.depth": 4,
     "model.width": 8, "model.norm": "batch"},
    {"name": "cifar v1", "model.family": "cifar_resnet", "model.block": "v1", "model.depth": 8,
     "model.width": 4, "model.norm": "batch", "model.shortcut": "A"},
)


def tiny_config(preset=None, **data):
    config = gf_config.get_config(preset)
    config.batch_size = 8
    config.seeds = (0,)
    config.data.update(data)
    if preset == "single":
        config.model.update(dict(depth=3, width=8))
    else:
        config.sweep = TINY_SWEEP
    return config


@contextlib.contextmanager
def without_compilation_cache():
    """No persistent compilation cache (conftest turns it on): programs compile afresh."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # It remembers whether it is used: ask again.
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()


def strict_load(path):
    def reject(constant):
        raise AssertionError(f"non-standard JSON constant {constant} in {path}")

    with open(path) as f:
        return json.load(f, parse_constant=reject)


def test_sweep_writes_results_json_and_plots(tmp_path):
    workdir = str(tmp_path)
    returned = gradient_flow.run(tiny_config(), workdir)
    results = strict_load(os.path.join(workdir, "results.json"))
    assert results["config"]["batch_size"] == 8
    prov = results["provenance"]
    assert prov["versions"]["jax"] and prov["devices"] and prov["start_utc"] <= prov["end_utc"]
    assert [r["name"] for r in results["runs"]] == ["plain", "v2 bn", "cifar v1"]
    for run in results["runs"]:
        assert set(run["model"]) == set(FIELDS)
        assert run["seed"] == 0 and run["num_params"] > 0 and math.isfinite(run["loss"])
        blocks = run["blocks"]
        num_blocks = len(blocks["param_grad_norm"])
        for key in ("fwd_sq", "fwd_chan_mean_sq", "fwd_chan_var", "act_grad_sq"):
            assert len(blocks[key]) == num_blocks + 1, key  # x_0 .. x_L
        for key in ("jac_fro_sq", "jac_fro_sq_stderr", "jac_spectral",
                    "jac_spectral_rel_change", "jac_spectral_iterations"):
            assert len(blocks[key]) == num_blocks, key  # blocks 1 .. L
        assert blocks["jac_fro_method"] in ("exact", "hutchinson", "exact+hutchinson")
        assert {"e2e_jac_fro_sq", "e2e_jac_spectral", "e2e_jac_fro_method"} <= set(run["e2e"])
        assert run["nonfinite"] == {}
    plain, v2, cifar = results["runs"]
    assert len(plain["blocks"]["act_grad_sq"]) == 3 and len(v2["blocks"]["jac_spectral"]) == 4
    # Theory where it applies (MLP plain / v2), anchored at the measured end points.
    for run in (plain, v2):
        t = run["theory"]
        assert len(t["fwd_sq"]) == len(t["act_grad_sq"]) == len(run["blocks"]["fwd_sq"])
        assert len(t["jac_fro_sq"]) == len(run["blocks"]["jac_fro_sq"])
        assert t["fwd_sq"][0] == pytest.approx(run["blocks"]["fwd_sq"][0])
        assert t["act_grad_sq"][-1] == pytest.approx(run["blocks"]["act_grad_sq"][-1])
    assert cifar["theory"] is None
    assert cifar["model"]["layers_per_block"] is None  # MLP-only field dropped for convs.
    assert returned["runs"][0]["blocks"]["fwd_sq"] == plain["blocks"]["fwd_sq"]
    for name in ("act_grad_sq.png", "fwd_sq.png", "jac_spectral.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(os.path.join(workdir, gradient_flow.SPECTRUM_FILE))  # Off.


def test_spectrum_option_writes_the_singular_value_density(tmp_path, monkeypatch):
    config = tiny_config()
    v1 = {"name": "v1", "model.family": "mlp", "model.block": "v1", "model.depth": 2,
          "model.width": 8}
    config.sweep = (TINY_SWEEP[0], v1)  # With theory (plain MLP) and without (v1).
    config.seeds = (0, 1)
    config.diagnostics.e2e_spectrum = True
    config.diagnostics.slq_steps = 4
    drawn = []
    real = gradient_flow.plots_lib.singular_value_density
    monkeypatch.setattr(gradient_flow.plots_lib, "singular_value_density",
                        lambda *a, **k: (drawn.append((a, k)), real(*a, **k))[1])
    results = gradient_flow.run(config, str(tmp_path))
    with open(tmp_path / gradient_flow.SPECTRUM_FILE, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    [(args, kwargs)] = drawn
    _, nodes, weights, labels = args
    assert labels == ["plain", "v1"]
    for name, pooled in zip(labels, nodes):
        runs = [r for r in results["runs"] if r["name"] == name]
        assert pooled.shape == (2 * 8, 4)  # Both seeds' [B, m] nodes, pooled.
        assert pooled[8:].tolist() == runs[1]["e2e"]["e2e_slq_nodes"]
    plain = [r for r in results["runs"] if r["name"] == "plain"]
    assert kwargs["theory_mean_sq"] == [
        pytest.approx(sum(r["theory"]["e2e_jac_fro_sq"] for r in plain) / 2), None]


def test_single_preset_with_overrides_and_gaussian_data_is_deterministic(tmp_path):
    config = tiny_config("single", name="gaussian", input_dim=(5,))
    config.model.block = "v2"
    config.model.activation = "tanh"
    first = gradient_flow.run(config, str(tmp_path / "a"))
    with without_compilation_cache():
        second = gradient_flow.run(config, str(tmp_path / "b"))  # A fresh compile.
    (run,) = first["runs"]
    assert run["model"]["block"] == "v2" and run["model"]["depth"] == 3
    assert len(run["blocks"]["act_grad_sq"]) == 4 and run["theory"] is not None
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}
    assert strip(run) == strip(second["runs"][0])


def test_nonfinite_values_are_kept_and_named(tmp_path):
    # sigma_w^2 = 2 * 10^2 per ReLU layer: x_20 ~ 14^20 = 1e23, its square overflows float32.
    config = tiny_config("single")
    config.model.update(dict(depth=20, weight_scale=10.0))
    result = gradient_flow.run(config, str(tmp_path))
    (run,) = result["runs"]
    assert math.isinf(run["blocks"]["fwd_sq"][-1])  # Kept in memory ...
    assert "inf" in run["nonfinite"]["blocks.fwd_sq"]
    (written,) = strict_load(tmp_path / "results.json")["runs"]  # ... null in strict JSON.
    assert written["blocks"]["fwd_sq"][-1] is None
    assert written["nonfinite"] == run["nonfinite"]
    assert os.path.getsize(tmp_path / "act_grad_sq.png") > 0


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(depth=0), "depth=0"),
        (dict(width=-4), "width=-4"),
        (dict(activation="nope"), "activation='nope'"),
    ],
)
def test_bad_model_field_names_it(tmp_path, change, message):
    config = tiny_config("single")
    config.model.update(change)
    with pytest.raises(ValueError, match=message):
        gradient_flow.run(config, str(tmp_path))


def test_bad_config_fields_name_them(tmp_path):
    config = tiny_config()
    config.sweep = ({"model.depth": 2, "model.colour": "red"},)
    with pytest.raises(ValueError, match=r"sweep\[0\].*colour"):
        gradient_flow.run(config, str(tmp_path))
    config.sweep = ({"model.depth": 2, "batch_size": 3},)
    with pytest.raises(ValueError, match=r"sweep\[0\].*batch_size.*not model fields"):
        gradient_flow.run(config, str(tmp_path))
    config = tiny_config()
    config.sweep = ({"model.depth": 2, "model.width": -1},)
    with pytest.raises(ValueError, match=r"sweep\[0\].*width=-1"):
        gradient_flow.run(config, str(tmp_path))
    config = tiny_config("single")
    config.unlock()
    config.diagnostics.nope = 1
    with pytest.raises(ValueError, match="diagnostics.*nope"):
        gradient_flow.run(config, str(tmp_path))
    config = tiny_config("single")
    config.diagnostics.fro_method = "svd"
    with pytest.raises(ValueError, match="fro_method='svd'"):
        gradient_flow.run(config, str(tmp_path))
    config = tiny_config("single")
    config.seeds = ()
    with pytest.raises(ValueError, match="config.seeds"):
        gradient_flow.run(config, str(tmp_path))
    with pytest.raises(ValueError, match="preset='nope'"):
        gf_config.get_config("nope")


def test_dataset_not_prepared_offline_names_it_and_data_dir(tmp_path):
    data_dir = str(tmp_path / "tfds")
    config = tiny_config("single", name="mnist", data_dir=data_dir)
    with pytest.raises(ValueError, match="mnist") as error:
        gradient_flow.run(config, str(tmp_path / "work"))
    assert data_dir in str(error.value)
    config = tiny_config("single", name="no_such_dataset", data_dir=data_dir)
    with pytest.raises(ValueError, match="no_such_dataset"):
        gradient_flow.run(config, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")  # Failed before writing anything.


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "experiments.gradient_flow", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def test_command_line_errors_are_one_line(tmp_path):
    data_dir = str(tmp_path / "tfds")
    proc = _cli(
        "--config=configs/gradient_flow.py:single", "--config.data.name=mnist",
        f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path / 'work'}",
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gradient_flow: error:") and "mnist" in last and data_dir in last
    proc = _cli("--config=configs/gradient_flow.py:single", "--config.model.dept=3",
                f"--workdir={tmp_path / 'work'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dept" in proc.stderr.strip().splitlines()[-1]
