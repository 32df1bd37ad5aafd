# Everything runs from a virtual environment in .venv, created on first use.
# On a GPU cluster pick the CUDA build of torch, e.g.:
#   make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
VENV        ?= .venv
PY          := $(VENV)/bin/python
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
# DeepSpeed ships only a source archive whose setup.py imports torch: build it against the torch above.
DEEPSPEED_SPEC ?= deepspeed==0.19.8
PYTEST_ARGS ?=

# Offline machines (CI, compute nodes): tiktoken's GPT-2 BPE cache beside the checkout, if it is there.
ifneq ($(wildcard ../shared/tiktoken),)
export TIKTOKEN_CACHE_DIR ?= $(abspath ../shared/tiktoken)
endif

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# The demo's inputs: any UTF-8 text (blank-line-separated blocks become documents) and the HellaSwag jsonl
# that configs/pipelines/tiny-local.env names (write one with `python -m prep eval-data`).
DEMO_TEXT ?= ../shared/data/tinyshakespeare.txt

demo: $(VENV)/.installed
	@test -f "$(DEMO_TEXT)" || { echo "error: demo text $(DEMO_TEXT) not found; run make demo DEMO_TEXT=any.txt" >&2; exit 1; }
	$(PY) slurm/split_text.py "$(DEMO_TEXT)" demo/input --files 2
	PYTHON="$(abspath $(PY))" slurm/submit.sh configs/pipelines/tiny-local.env --local

clean:
	rm -rf $(VENV) demo .pytest_cache
