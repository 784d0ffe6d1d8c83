# Two commands do all set-up on a fresh machine with Python >= 3.10:
#   make demo   synthetic raw CT -> care-convert -> care-publish -> usam fit -> usam eval -> usam predict
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo

export HF_DATASETS_DISABLE_PROGRESS_BARS = 1
export HF_HUB_OFFLINE = 1

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch first: a CPU build where one is at hand, so the range `torch>=2.4` in pyproject.toml is already met
# (a bare `pip install torch` can pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.*" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/python -m usam.demo --workdir $(DEMO)

test: install
	HF_DATASETS_CACHE=$$(mktemp -d) $(BIN)/python -m pytest -q -n 2

bench: install
	$(BIN)/python benchmarks/convert_bench.py
	$(BIN)/python benchmarks/load_bench.py
	$(BIN)/python benchmarks/data_bench.py
	$(BIN)/python benchmarks/train_bench.py
	$(BIN)/python benchmarks/infer_bench.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
