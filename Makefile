# occ-exp: common commands. `make help` lists them.
PY ?= python
QUICK ?= 0
SCALE ?= tiny

.PHONY: help setup test test-all train data reproduce-table1 reproduce-table2 reproduce-figure4 bench clean

help:
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup: ## install the package with its test dependencies (CPU torch pinned)
	$(PY) -m pip install -e '.[dev]'

test: ## the test suite CI runs (CPU)
	$(PY) -m pytest -q

train: ## the default experiment (tiny model, regime=occ)
	$(PY) -m occ_exp.train

data: ## fetch the six benchmarks and DAPO-Math-17k into data/ (needs the network and pyarrow: pip install -e '.[data]')
	$(PY) scripts/fetch_data.py --data-dir data

clean: ## remove run outputs (keeps the warm-start cache)
	rm -rf outputs multirun
