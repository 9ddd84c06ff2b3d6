# Two commands do all set-up on a fresh machine: `make demo` and `make test`. Both create .venv here.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest
# 2 cores: let XLA and torch use both, not oversubscribe.
export OMP_NUM_THREADS ?= 2

.PHONY: demo recipe test test-slow test-plan plan-deps test-all bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU torch first and pinned: any other spec would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cairl fetch-model smollm2-135m-instruct
	$(BIN)/cairl train --config configs/demo.yaml

# The recipe (configs/smollm2-cai.yaml, docs/recipe.md): the whole method on SmolLM2-135M-Instruct with
# the 3,000 red-team prompts of a local data directory, then base | SL | RL on the held-out suites.
CAIRL_DATA ?= ../shared/data
RECIPE_RUN := runs/smollm2-cai
RECIPE_EVAL := --suites harmless,overrefusal,helpful,bbq --data-dir $(CAIRL_DATA) --max-examples harmless=64 \
	--max-examples overrefusal=54 --max-examples helpful=42 --max-examples bbq=24

recipe: $(STAMP)
	$(BIN)/cairl fetch-model smollm2-135m-instruct
	$(BIN)/cairl train --config configs/smollm2-cai.yaml \
		'data.prompts=[$(CAIRL_DATA)/red_team/red_team_prompts_sample3000.jsonl.gz,default:red_team_train,default:helpful_train,default:benign_risky_train]' \
		'data.ppo_sets=[$(CAIRL_DATA)/red_team/red_team_prompts_sample3000.jsonl.gz,default:benign_risky_rl]'
	$(BIN)/cairl eval --model $(RECIPE_RUN):sl --model $(RECIPE_RUN):rl --baseline $(RECIPE_RUN):base \
		$(RECIPE_EVAL) --out $(RECIPE_RUN)/eval
	$(BIN)/cairl eval --model $(RECIPE_RUN):base --suites hhh,pm_human --preference-model $(RECIPE_RUN):rm \
		--data-dir $(CAIRL_DATA) --max-examples hhh=48 --max-examples pm_human=48 --out $(RECIPE_RUN)/eval/feedback

# The suites run on two pytest workers (xdist): a test's time is mostly one-threaded XLA compiles and process
# start-up, so two at a time keep both cores busy. `make test XDIST=` runs them in this process, e.g. to debug one.
# In the slow suite the tests that start Ray clusters or several JAX processes share one worker, one at a time
# (tests/conftest.py): two Ray heads starting beside each other on a loaded 2-core machine missed Ray's
# start-up deadline.
XDIST ?= -n 2 --dist worksteal
XDIST_SLOW ?= -n 2 --dist loadgroup

# The fast default suite: tiny models, 8 fake CPU devices.
test: $(STAMP)
	$(PYTEST) $(XDIST) -m "not slow and not real_model and not ray and not multiprocess and not plan" -q

# Real model, Ray clusters, several JAX processes: CI runs these too.
test-slow: $(STAMP)
	$(PYTEST) $(XDIST_SLOW) -m "slow or real_model or ray or multiprocess" -q --durations=20

# `cairl plan` for targets that are not here, in a venv of its own (.venv-plan) so that the other
# suites keep XLA:CPU's own settings: libtpu (the [plan] extra) and the CUDA plugin without its CUDA
# libraries (--no-deps: compiling for a GPU needs none of them).
PLAN_VENV := .venv-plan
PLAN_STAMP := $(PLAN_VENV)/.installed-stamp

$(PLAN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(PLAN_VENV)
	$(PLAN_VENV)/bin/pip install --quiet --upgrade pip
	$(PLAN_VENV)/bin/pip install --quiet -e '.[plan]' pytest pytest-timeout pytest-xdist filelock
	$(PLAN_VENV)/bin/pip install --quiet --no-deps jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2
	touch $(PLAN_STAMP)

plan-deps: $(PLAN_STAMP)

# Compiles for local fake devices, TPU slices and GPUs (a few minutes on 2 cores).
test-plan: $(PLAN_STAMP)
	$(PLAN_VENV)/bin/python -m pytest -m plan -q

test-all: $(STAMP)
	$(PYTEST) -q

clean-venv:
	rm -rf $(VENV) $(PLAN_VENV)
