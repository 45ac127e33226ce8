# tokenpo: `make test` and `make reproduce` each create the environment first when it is missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Profile for `make reproduce` (smoke | cpu | paper); `make test` always uses smoke.
PROFILE ?= cpu
# Parallel test workers are not used: the suite is sized for 2 cores.
PYTEST_ARGS ?=

.PHONY: all env test unit nbtest reproduce lab readme bench clean-env

all: test

# The environment: a virtualenv with the package installed editable, the dev tools and a Jupyter kernel.
# Re-installs only when pyproject.toml is newer than the stamp (idempotent).
$(STAMP): pyproject.toml
	@test -x $(PY) || { echo "creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)
	@echo "environment ready: $(VENV)"

# The notebooks' kernel. GOMP_SPINCOUNT=3000: torch's OpenMP threads spin briefly, then sleep, while they wait. On 2
# cores with one busy with other work, the default long spin made a notebook training step 8x slower than on the idle
# machine; with 3000 it is 2.2x (1 thread: 1.8x) and costs 12 % when idle (benchmarks/bench_threads.py).
KERNEL := $(VENV)/share/jupyter/kernels/tokenpo/kernel.json
$(KERNEL): $(STAMP) Makefile
	$(PY) -m ipykernel install --sys-prefix --name tokenpo --display-name "Python (tokenpo)" \
		--env GOMP_SPINCOUNT 3000 >/dev/null

env: $(STAMP) $(KERNEL)

# Unit tests, then every notebook under the smoke profile (nbval: cells must run without error).
test: env
	TOKENPO_PROFILE=smoke $(PY) -m pytest $(PYTEST_ARGS) tests notebooks --nbval-lax --nbval-current-env \
		--nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

unit: env
	$(PY) -m pytest $(PYTEST_ARGS) tests

nbtest: env
	TOKENPO_PROFILE=smoke $(PY) -m pytest $(PYTEST_ARGS) notebooks --nbval-lax --nbval-current-env

# The main job: every numbered notebook through papermill with the chosen profile, results into results/<notebook>/.
reproduce: env
	$(PY) -m tokenpo.reproduce --profile $(PROFILE)

readme: env
	$(PY) -m tokenpo.report

lab: env
	$(VENV)/bin/jupyter lab notebooks/

bench: env
	$(PY) benchmarks/bench_token_stats.py

clean-env:
	rm -rf $(VENV)
