# Everything a new machine needs: `make demo` (the offline quickstart) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# torch/torchvision/torchcodec are pinned here (pyproject asks for ranges) so every machine gets the same build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 torchcodec==0.17.0
	$(BIN)/pip install -q -e '.[dev,tensorboard,export]'
	touch $(STAMP)

demo: install
	$(BIN)/vit pretrain recipes/quickstart.yaml --out runs/quickstart --force

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

# the suite without its end-to-end runs (marked slow): under 3 minutes here
test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
