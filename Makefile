# ermgap — set-up, tests and the demo. `make demo` and `make test` work on a fresh Debian machine.
#
#   make setup   venv + pinned torch + package + DeepSpeed + system packages (idempotent; seconds when done)
#   make test    setup, then the test suite
#   make demo    setup, the bias lab's positive control + pretrained tiny model (cached), then zero-shot / ERM /
#                ERM-MinMaxGAP / Group DRO on it (seed 42): the gap each objective closes, with its interval
#   make demo-seeds  the plain synthetic corpus + random tiny model: 4 objectives × seeds 42-44 vs ERM
#   make bias-lab    positive / irreducible / negative control corpora × 7 rows × seeds 42-44: one table with intervals
#   make bench   all benchmarks (prints ratios; JSON in bench/results/)
#   make lint    ruff (unused names, import order) over the package
#   make docs    regenerate the CLI and config references in docs/, build the docs site into site/ (strict)

PYTHON     ?= python3
VENV       ?= .venv
# Override for CUDA machines, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
STAMP       := $(VENV)/.ermgap-setup
PYTEST_ARGS ?=

# Commands the project needs from Debian: espeak-ng (the synthetic corpus), sox (audio tools),
# chromium (the MLflow UI screenshot test; optional for non-root users).
REQUIRED_CMDS := espeak-ng sox
OPTIONAL_CMDS := chromium

.PHONY: setup system-deps test demo demo-seeds bias-lab bias-lab-quick bench lint docs clean-demo help

help:
	@sed -n '1,12p' Makefile

setup: system-deps $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_SPEC)
	# DeepSpeed's build imports torch, so it goes after torch and without build isolation.
	$(PIP) install -q --no-build-isolation $(DEEPSPEED_SPEC)
	$(PIP) install -q -e '.[dev]'
	$(PY) -c "import torch, ray, deepspeed, transformers, peft, mlflow; print('ermgap setup ok: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
	# On CPU, DeepSpeed JIT-builds its shared-memory collective op on first use (~80 s cold); build it
	# here once (cached in ~/.cache/torch_extensions) rather than inside the first training run.
	# A build lock left by a killed process would make this wait forever: ermgap.deepspeed_ops clears it.
	$(PY) -m ermgap.deepspeed_ops
	@touch $(STAMP)

system-deps:
	@missing=""; for c in $(REQUIRED_CMDS) $(OPTIONAL_CMDS); do command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing system packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
		for c in $(REQUIRED_CMDS); do case " $$missing " in *" $$c "*) \
			echo "error: '$$c' is missing; install it as root: apt-get install -y$$missing" >&2; exit 1;; esac; done; \
		echo "note: optional '$$missing' missing (the MLflow UI screenshot test will be skipped): apt-get install -y$$missing" >&2; \
	fi

# Two pytest-xdist workers: one runs every heavy test (Ray, trainings, DeepSpeed, servers) one after another, the
# other the light ones beside it (tests/conftest.py). PYTEST_WORKERS=0: everything in this process, in order.
PYTEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

SYNTH_CORPUS := data/synth/manifest.csv
TINY_MODEL   := models/tiny/config.json

$(SYNTH_CORPUS): | setup
	$(VENV)/bin/ermgap data synth --out data/synth

$(TINY_MODEL): | setup
	$(VENV)/bin/ermgap model tiny --out models/tiny

# The demo runs on the bias lab's positive control (data/bias_lab/positive, and its oracle twin) with the lab's
# backbone (models/tiny-pretrained): the lab builds both, or reuses them when their recorded settings match.
demo: setup
	$(VENV)/bin/ermgap bias-lab --corpora-only --corpus positive
	$(VENV)/bin/ermgap sweep sweeps/demo.yaml --force

demo-seeds: setup $(SYNTH_CORPUS) $(TINY_MODEL)
	$(VENV)/bin/ermgap sweep sweeps/demo_seeds.yaml --force

# The bias lab: builds its corpora (data/bias_lab) and the pretrained backbone when missing, then one sweep;
# the table goes to the console, bench/results/bias_lab.{json,md,png}. bias-lab-quick: seed 42 only.
bias-lab: setup
	$(VENV)/bin/ermgap bias-lab --force

bias-lab-quick: setup
	$(VENV)/bin/ermgap bias-lab --quick --force

lint: setup
	$(VENV)/bin/ruff check ermgap

docs: setup
	$(PY) -m ermgap.cli.reference docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-demo:
	rm -rf data/synth data/bias_lab models/tiny models/tiny-pretrained runs
