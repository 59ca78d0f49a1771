# Two entry points, each does all set-up on a fresh machine (Python >= 3.10 and the package
# registries): `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo zoo test install clean

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

clean:
	rm -rf $(VENV) *.egg-info
