# Two entry points, each does all set-up on a fresh machine (Python >= 3.10 and the package
# registries): `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo zoo test bench install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m experiments.gradient_flow --config=configs/gradient_flow.py --workdir=runs/gradient_flow

zoo: $(STAMP)
	$(VENV)/bin/python -m experiments.zoo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -n auto -q tests

# Speed measurements (not part of `make test`): each script writes JSON under benchmarks/results/.
# Adds PyTorch (the peer of the train-step benchmark) and oneDNN (resflax's fastest CPU
# convolutions, `conv_impl='auto'` once installed) to the environment.
bench: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet -e '.[bench,onednn]'
	$(VENV)/bin/python -m benchmarks.train_step
	$(VENV)/bin/python -m benchmarks.onednn_conv
	$(VENV)/bin/python -m benchmarks.scan_gap
	$(VENV)/bin/python -m benchmarks.batch_norm_grad
	$(VENV)/bin/python -m benchmarks.compile_depth
	$(VENV)/bin/python -m benchmarks.diagnostics_speed

clean:
	rm -rf $(VENV) *.egg-info
