# Two commands do all set-up on a fresh machine with Python >= 3.10:
#   make demo   synthetic raw CT -> care-convert -> care-publish -> usam fit -> usam eval -> usam predict
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= demo

export HF_DATASETS_DISABLE_PROGRESS_BARS = 1
export HF_HUB_OFFLINE = 1

# nnU-Net v2 checks care-export's output in the tests. Its declared dependencies reach torchvision (through
# timm) and would replace the CPU torch, so it comes without them, plus what its dataset check and planning use.
NNUNET = nnunetv2==2.8.1 acvl-utils==0.2.6 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5
NNUNET_PLANNING_NEEDS = "blosc2>=3.3.2" "scikit-image>=0.19.3" scikit-learn
# timm is not installed at all: it imports torchvision when imported (timm.layers.create_norm, timm.data), and no
# torchvision runs beside the CPU torch, so TransUNet and Swin-Unet are built on MONAI's blocks (pyproject.toml).
# peft is not used either: SAMed adapts the q and v thirds of SAM's fused qkv projection, which peft cannot target.

.PHONY: install demo test bench clean

install: $(VENV)/.installed

# torch first: a CPU build where one is at hand, so the range `torch>=2.4` in pyproject.toml is already met
# (a bare `pip install torch` can pull a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.*" || $(BIN)/python -m pip install -q "torch>=2.4"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(NNUNET)
	$(BIN)/python -m pip install -q $(NNUNET_PLANNING_NEEDS)
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
