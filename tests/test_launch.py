"""The cluster launch scripts of experiments/launch/, checked without a cluster.

- Both scripts parse (`bash -n`) and, with DRY_RUN=1, print the commands they would run, with the
  config, workdir, data_dir and extra flags given through the environment and arguments.
- The python command line each would start is extracted from that output and its flags are
  parsed by experiments.train itself, with `--config.num_train_steps=0` added: check_config
  rejects that value with exit status 2 and one line, after absl has parsed every flag and
  config override and before any data is read or anything compiles; so that line being the only
  error proves the rest of the command line is valid.
- jax's SLURM detection, fed the environment of a 2-task job, derives the coordinator, process
  count, process id and per-process GPU that the sbatch script's layout (one task per GPU)
  expects. jax.distributed.initialize itself is never called (it would wait for the peers).
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SLURM = ROOT / "experiments" / "launch" / "slurm_train.sbatch"
TPU = ROOT / "experiments" / "launch" / "tpu_vm_train.sh"
TIMEOUT = 120  # seconds, for every subprocess
STEPS_ERROR = "train: error: config.num_train_steps=0 must be an integer >= 1"

# Variables that the scripts or jax's cluster detection read: the tests set their own.
_CLEARED = ("DRY_RUN", "CONFIG", "WORKDIR", "DATA_DIR", "EXTRA_FLAGS", "PYTHON", "REPO_DIR",
            "REPO_URL", "TPU_NAME", "ZONE", "PROJECT", "JAX_COORDINATOR_PORT",
            "JAX_LOCAL_DEVICE_IDS", "KUBERNETES_SERVICE_HOST")


def _env(**overrides) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _CLEARED and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _bash(script, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _dry_run(script, *args, **env) -> list[list[str]]:
    """The commands the script prints with DRY_RUN=1, each split as a shell would."""
    result = _bash(script, *args, DRY_RUN=1, **env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _train_argv(words: list[str]) -> list[str]:
    """`python -m experiments.train FLAGS...` from a command's words (the interpreter first)."""
    i = words.index("-m")
    assert words[i + 1] == "experiments.train", words
    return words[i - 1:]


@pytest.fixture()
def run_env(tmp_path):
    """Overrides of every parameter, with a space in the paths (quoting)."""
    return dict(
        CONFIG="configs/cifar10_he2015.py",
        WORKDIR=str(tmp_path / "shared fs" / "run-56"),
        DATA_DIR=str(tmp_path / "tfds data"),
        EXTRA_FLAGS="--config.model.depth=56  --config.optim.learning_rate=0.05",
    )


def _expected_flags(run_env) -> list[str]:
    return [f"--config={run_env['CONFIG']}", f"--workdir={run_env['WORKDIR']}", "--distributed",
            f"--config.data.data_dir={run_env['DATA_DIR']}", "--config.model.depth=56",
            "--config.optim.learning_rate=0.05", "--config.model.block=plain",
            "--config.seed=3"]


def _slurm_train(run_env) -> list[str]:
    commands = _dry_run(SLURM, "--config.model.block=plain", "--config.seed=3", **run_env)
    assert commands[0] == ["cd", str(ROOT)]  # REPO_DIR: $SLURM_SUBMIT_DIR, else the cwd.
    assert commands[1] == ["mkdir", "-p", run_env["WORKDIR"]]
    assert commands[2][:2] == ["srun", "--kill-on-bad-exit=1"]
    assert len(commands) == 3
    return _train_argv(commands[2])


def _tpu_train(run_env) -> list[str]:
    (gcloud,) = _dry_run(TPU, "train", "--config.model.block=plain", "--config.seed=3",
                         TPU_NAME="pod-v4-32", ZONE="us-central2-b", PROJECT="proj", **run_env)
    assert gcloud[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-v4-32",
                          "--zone=us-central2-b"]
    assert "--project=proj" in gcloud and "--worker=all" in gcloud
    (command,) = [w[len("--command="):] for w in gcloud if w.startswith("--command=")]
    inner = shlex.split(command)  # What every worker's shell runs.
    assert inner[:3] == ["cd", "resflax", "&&"]
    assert inner[3] == "python3"
    return _train_argv(inner[3:])


TRAIN_COMMANDS = {"slurm": _slurm_train, "tpu": _tpu_train}


@pytest.mark.parametrize("script", [SLURM, TPU], ids=["slurm", "tpu"])
def test_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert os.access(script, os.X_OK)


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_dry_run_prints_the_train_command(name, run_env):
    argv = TRAIN_COMMANDS[name](run_env)
    assert argv[1:3] == ["-m", "experiments.train"]
    assert argv[3:] == _expected_flags(run_env)
    assert not pathlib.Path(run_env["WORKDIR"]).exists()  # Nothing ran.


def test_dry_run_defaults():
    (_, mkdir, srun) = _dry_run(SLURM)
    home = os.environ["HOME"]
    assert mkdir == ["mkdir", "-p", f"{home}/resflax_runs/cifar10_he2015"]
    assert _train_argv(srun) == [
        "python", "-m", "experiments.train", "--config=configs/cifar10_he2015.py",
        f"--workdir={home}/resflax_runs/cifar10_he2015", "--distributed",
        f"--config.data.data_dir={home}/tensorflow_datasets"]
    (gcloud,) = _dry_run(TPU)
    assert "--worker=all" in gcloud
    assert gcloud[-1].startswith("--command=cd resflax && python3 -m experiments.train ")


def test_slurm_header_is_one_task_per_gpu():
    """The layout jax's SLURM detection assumes: every task of a node sees all of the node's
    GPUs and uses number SLURM_LOCALID, so tasks per node = GPUs per node, no per-task GPUs."""
    header = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(\S+))?", SLURM.read_text(), re.M))
    assert header["gres"] == f"gpu:{header['ntasks-per-node']}"
    assert "gpus-per-task" not in header and "gpus" not in header
    for key in ("nodes", "time", "output", "signal"):
        assert key in header
    assert header["signal"].startswith("TERM@")  # SIGTERM: experiments.train checkpoints.


def test_outside_slurm_without_dry_run_refuses():
    result = _bash(SLURM)
    assert result.returncode == 2
    assert "sbatch" in result.stderr and result.stdout == ""


def test_tpu_setup_and_refusals(tmp_path):
    (gcloud,) = _dry_run(TPU, "setup", TPU_NAME="t", ZONE="z", REPO_URL="https://example.com/r.git")
    assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t"]
    assert "--worker=all" in gcloud
    inner = shlex.split(gcloud[-1][len("--command="):])
    assert inner[-10:] == ["cd", "resflax", "&&", "python3", "-m", "pip", "install", "-e", ".",
                           "jax[tpu]"]
    assert "git" in inner and "https://example.com/r.git" in inner

    result = _bash(TPU, "train", WORKDIR=str(tmp_path))  # No TPU_NAME / ZONE.
    assert result.returncode == 2 and "TPU_NAME" in result.stderr
    result = _bash(TPU, "train", DRY_RUN=1, WORKDIR="gs://bucket/run")
    assert result.returncode == 2 and "gcsfuse" in result.stderr
    result = _bash(TPU, "bogus", DRY_RUN=1)
    assert result.returncode == 2 and "usage" in result.stderr


def _parse_with_experiments_train(argv: list[str]) -> subprocess.CompletedProcess:
    """experiments.train run on `argv`'s flags (minus --distributed: that would wait for the
    cluster) plus `--config.num_train_steps=0`, in the repository root (the scripts' cd)."""
    flags = [a for a in argv[3:] if a != "--distributed"]
    return subprocess.run(
        [sys.executable, "-m", "experiments.train", *flags, "--config.num_train_steps=0"],
        cwd=ROOT, env=_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=TIMEOUT,
    )


@pytest.mark.parametrize("name", TRAIN_COMMANDS)
def test_printed_flags_parse_in_experiments_train(name, run_env):
    argv = TRAIN_COMMANDS[name](run_env)
    assert "--distributed" in argv
    result = _parse_with_experiments_train(argv)
    # Exit status 2 and this one line: every flag and override parsed, the config validated up
    # to num_train_steps; the (absent) data_dir was not read and nothing was created.
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [STEPS_ERROR], result.stderr
    assert not pathlib.Path(run_env["WORKDIR"]).exists()


@pytest.mark.parametrize("bad, named", [("--config.model.deptth=56", "deptth"),
                                         ("--config.model.depth=57", "6n+2")])
def test_flag_check_catches_a_bad_flag(bad, named, run_env):
    """The check above is not vacuous: a misspelled field, or a value check_config rejects
    (validated before num_train_steps), fails with its own error."""
    argv = _slurm_train(run_env) + [bad]
    result = _parse_with_experiments_train(argv)
    assert result.returncode != 0
    assert STEPS_ERROR not in result.stderr
    assert named in result.stderr


# The environment SLURM gives each task of a 2-task job, for the script's two layouts of 2 GPUs:
# one node with 2 GPUs (2 tasks on it), and 2 nodes with 1 GPU each. Loopback names only.
_JOB_ID = 12345
_PORT = 65535 - 2**12 + 1 + _JOB_ID % 2**12  # jax's choice: 61497.
_LAYOUTS = {
    "1node_2gpus": [dict(SLURM_PROCID=i, SLURM_LOCALID=i, SLURM_NODEID=0,
                         SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES=1,
                         SLURM_NNODES=1, SLURM_NTASKS_PER_NODE=2, SLURM_GPUS_ON_NODE=2)
                    for i in range(2)],
    "2nodes_1gpu": [dict(SLURM_PROCID=i, SLURM_LOCALID=0, SLURM_NODEID=i,
                         SLURM_STEP_NODELIST="localhost,127.0.0.1", SLURM_STEP_NUM_NODES=2,
                         SLURM_NNODES=2, SLURM_NTASKS_PER_NODE=1, SLURM_GPUS_ON_NODE=1)
                    for i in range(2)],
}


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_jax_slurm_detection_matches_the_layout(layout, monkeypatch):
    from jax._src import clusters

    for var in list(os.environ):
        if var in _CLEARED or var.startswith(("SLURM_", "OMPI_", "PMI_")):
            monkeypatch.delenv(var)
    assert not clusters.SlurmCluster.is_env_present()

    for task in _LAYOUTS[layout]:
        common = dict(SLURM_JOB_ID=_JOB_ID, SLURM_NTASKS=2, SLURM_STEP_NUM_TASKS=2,
                      SLURM_JOB_NUM_NODES=task["SLURM_NNODES"])
        for var, value in {**common, **task}.items():
            monkeypatch.setenv(var, str(value))
        slurm = clusters.SlurmCluster
        assert slurm.is_env_present()
        assert slurm.get_coordinator_address(None, None) == f"localhost:{_PORT}"
        assert slurm.get_process_count() == 2  # = nodes x GPUs per node, one task per GPU.
        assert slurm.get_process_id() == task["SLURM_PROCID"]
        assert slurm.get_local_process_id() == task["SLURM_LOCALID"]
        # What jax.distributed.initialize() fills in with every argument unset: the same
        # coordinator for every task, and each task restricted to its own GPU of its node.
        detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, None)
        assert tuple(detected) == (f"localhost:{_PORT}", 2, task["SLURM_PROCID"],
                                   [task["SLURM_LOCALID"]])
        monkeypatch.setenv("JAX_COORDINATOR_PORT", "23456")
        assert clusters.ClusterEnv.auto_detect_unset_distributed_params(
            None, None, None, None, None, None)[0] == "localhost:23456"
        monkeypatch.delenv("JAX_COORDINATOR_PORT")


def test_readme_points_at_both_scripts():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Running on a cluster", 1)[1].split("\n## ", 1)[0]
    for script in (SLURM, TPU):
        assert str(script.relative_to(ROOT)) in section
    assert "DRY_RUN=1" in section and "sbatch experiments/launch/slurm_train.sbatch" in section
