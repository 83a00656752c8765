# The README's commands. `make serve` and `make test` build the virtual environment on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# PyTorch's CPU-only wheels (about 190 MB); PyPI's torch is the CUDA build (several GB). For a GPU
# machine: make TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: install serve test test-docker test-stack stack-up stack-down test-harness lint format bench default-model default-model-index clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, from the CPU index: PyPI's (or an unpinned) torch is a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX_URL)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed  ## create .venv and install the project with its test extra

# The default model's copy index (`copies` on /generate) is built here, not committed: it opens only with Tiny
# Shakespeare, which this repository never holds. `make serve` builds it when it is missing (the corpus is taken
# from a local copy or downloaded and checked against its sha256) and serves without it if that fails.
DEFAULT_CHECKPOINT := service/default_model/shakespeare.safetensors
DEFAULT_INDEX := service/default_model/shakespeare.copies

serve: install  ## serve the shipped default model on http://127.0.0.1:8000
	@test -f $(DEFAULT_INDEX) || $(MAKE) --no-print-directory default-model-index \
	    || echo "make serve: the default model has no copy index, so /generate refuses copies (see README)"
	$(BIN)/charrnn serve

default-model-index: install  ## build the default model's copy index from Tiny Shakespeare (seconds)
	$(BIN)/charrnn index $(DEFAULT_CHECKPOINT) --corpus tinyshakespeare

lint: install  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint  ## lint, then the whole test suite (slow tests included)
	$(BIN)/python -m pytest

# The docker tier: builds the image from the Dockerfile (and, once, the stand-in base image) and runs it;
# needs root, a Docker engine, debootstrap, docker-compose and nginx (.ci/run installs them). CI runs it.
test-docker: install  ## the docker tier: the image built and run for real (minutes; see README "Docker")
	$(BIN)/python -m pytest -m docker tests/docker

# The Swarm stack (deploy/stack.yml): replicas behind nginx, Prometheus. stack-up builds the app image from the
# Dockerfile (PYTHON_IMAGE and TORCH_INDEX_URL, as the docker tier), the proxy and Prometheus images from
# Debian's packages (DEBIAN_IMAGE), makes a one-node Swarm if the engine is in none, deploys the stack and
# returns once every replica is healthy; stack-down removes it (and leaves a Swarm that stack-up made).
# Settings: deploy/stack.yml's CHARRNN_* variables (docs/SCALING.md).
stack-up:  ## deploy deploy/stack.yml on this Docker engine (one-node Swarm; see docs/SCALING.md)
	TORCH_INDEX_URL=$(TORCH_INDEX_URL) bash deploy/stack.sh up

stack-down:  ## remove the stack (and the Swarm, if stack-up made it)
	bash deploy/stack.sh down

# The stack tier: stack-up with 3 replicas, load through the proxy during a rolling update, a scale 3 -> 5 -> 3
# and a hung replica (no request may fail), then stack-down. Reuses the docker tier's image when it exists.
test-stack: install  ## the stack tier: deploy/stack.yml under load on a one-node Swarm (minutes)
	$(BIN)/python -m pytest -m stack tests/stack

# lm-evaluation-harness, a real client of the scoring API, evaluates the served default model. It is heavy
# (transformers, datasets, ...), so it gets its own virtual environment, with the same CPU torch first.
HARNESS_VENV ?= .venv-harness
LM_EVAL_VERSION ?= 0.4.13

$(HARNESS_VENV)/.installed:
	$(PYTHON) -m venv $(HARNESS_VENV)
	$(HARNESS_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX_URL)
	$(HARNESS_VENV)/bin/python -m pip install --quiet 'lm-eval[api]==$(LM_EVAL_VERSION)'
	touch $@

test-harness: install $(HARNESS_VENV)/.installed  ## the harness tier: lm-eval scores and generates through the server
	CHARRNN_REQUIRE_HARNESS=1 CHARRNN_LM_EVAL=$(HARNESS_VENV)/bin/lm_eval $(BIN)/python -m pytest -m harness tests/harness

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install  ## the benchmark scripts (minutes; see README "Benchmarks")
	$(BIN)/python bench/train_speed.py
	$(BIN)/python bench/memory.py

DEFAULT_MODEL_COMMAND := charrnn train --corpus tinyshakespeare --out runs/shakespeare --preset shakespeare --threads 2

default-model: install  ## retrain the shipped default model (55 minutes on 2 CPU cores; leave them idle), then export it
	$(BIN)/$(DEFAULT_MODEL_COMMAND)
	$(BIN)/charrnn export runs/shakespeare --half --corpus tinyshakespeare \
	    --out service/default_model/shakespeare.safetensors --command "$(DEFAULT_MODEL_COMMAND)" \
	    --chat-template service/default_model/shakespeare.chat_template.json
	$(BIN)/charrnn index $(DEFAULT_CHECKPOINT) --corpus tinyshakespeare

clean:
	rm -rf $(VENV) $(HARNESS_VENV) .pytest_cache .ruff_cache *.egg-info
