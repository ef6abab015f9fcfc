# Two commands do all the set-up on a fresh machine:  make run  and  make test
# Override the torch build, e.g. for CUDA:  make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PARTNERS ?= 5
RUN_CONFIG ?=
# make test: pytest-xdist worker processes (0 = one process); each test file stays on one worker
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_HOME=$(CURDIR)/.flwr
export RUN_CONFIG  # passed through the environment: any quotes in it reach --run-config unchanged

.PHONY: install run test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: install
	FEDREC_MAKE_RUN=1 $(PY) -m simulations.run --num-partners $(PARTNERS) $(if $(RUN_CONFIG),--run-config "$$RUN_CONFIG")

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf runs .flwr .pytest_cache
