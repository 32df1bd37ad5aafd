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
# The suite runs in 2 pytest-xdist workers, whole test modules each (a Slurm module alone: tests/conftest.py);
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

# Test inputs beside the checkout (CI, developer machines, offline machines): tiktoken's GPT-2 BPE cache, Tiny
# Shakespeare, HellaSwag. Where they are missing, the demo fetches its own (see below).
SHARED ?= ../shared
ifneq ($(wildcard $(SHARED)/tiktoken),)
export TIKTOKEN_CACHE_DIR ?= $(abspath $(SHARED)/tiktoken)
endif

.PHONY: install test demo clean clean-demo

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
# DeepSpeed's CPU communication op, built now into $(VENV)/torch_extensions (train uses that directory), so that
# no CPU run builds it at start-up; without a C++ compiler this only prints a note.
	$(PY) -m train.extensions
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The demo: documents -> tokenize -> tiny-cpu training -> HellaSwag -> report, all under demo/.
# Its inputs, each kept for the next run: documents in demo/input (DEMO_TEXT split into documents; by default Tiny
# Shakespeare from $(SHARED), and without $(SHARED) the first DEMO_DOCS documents of a FineWeb-Edu parquet file read
# from the Hub), HellaSwag in demo/eval (`prep eval-data`: copied from $(SHARED), else downloaded) and the GPT-2 BPE
# (tiktoken's cache: $(SHARED)/tiktoken, else demo/cache/tiktoken, filled on first use).
DEMO_TEXT ?= $(wildcard $(SHARED)/data/tinyshakespeare.txt)
DEMO_HELLASWAG ?= $(wildcard $(SHARED)/data/hellaswag_val.jsonl)
DEMO_DOCS ?= 2000

demo: export TIKTOKEN_CACHE_DIR ?= $(abspath demo/cache/tiktoken)
demo: $(VENV)/.installed
	@cxx="$${CXX:-c++}"; "$$cxx" --version >/dev/null 2>&1 || { echo "error: make demo trains on CPU, where DeepSpeed needs a C++ compiler at start-up ('$$cxx --version' failed): install one (Debian/Ubuntu: apt-get install g++) or set CXX" >&2; exit 1; }
	$(PY) slurm/demo_data.py demo/input --files 2 $(if $(DEMO_TEXT),--text "$(DEMO_TEXT)",--docs $(DEMO_DOCS))
	test -f demo/eval/hellaswag_val.jsonl || \
		$(PY) -m prep eval-data --out demo/eval $(if $(DEMO_HELLASWAG),--from "$(DEMO_HELLASWAG)")
	PYTHON="$(abspath $(PY))" slurm/submit.sh configs/pipelines/tiny-local.env --local

clean-demo:
	rm -rf demo

clean:
	rm -rf $(VENV) demo .pytest_cache
