# The whole set-up on a fresh machine is `make book` (install, data, train+evaluate under the cpu profile,
# render the book) and `make test` (ruff + pytest, unit tests and notebooks through nbval).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed-stamp
PROFILE ?= cpu
DATA ?= data
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
EXECUTED := $(patsubst notebooks/%,book/%,$(NOTEBOOKS))
export PYTHONHASHSEED := 0

.PHONY: all install book data validation-data notebooks html test lint format dist reproduce reproduce-first reproduce-textures readings mechanism memory memory-grid memory-validation scoring-validation memory-budget memory-1200 memae-validation memae seeds sweep bench bench-reproduce clean

all: book

# (Re)install into .venv when it is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PY) -m trustmae_lib data synthetic --profile $(PROFILE) --out $(DATA)/$(PROFILE)/synthetic
	$(PY) -m trustmae_lib data elpv --profile $(PROFILE) --out $(DATA)/$(PROFILE)/elpv

# Each chapter runs with papermill under $(PROFILE) into book/ (executed copies are build products).
book/%.ipynb: notebooks/%.ipynb $(STAMP)
	@mkdir -p book
	$(BIN)/papermill --cwd notebooks --progress-bar -k python3 $< $@.partial.ipynb -p profile $(PROFILE)
	@mv $@.partial.ipynb $@

notebooks: $(EXECUTED)

html: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going

book: install data notebooks html
	@echo "Book: $(CURDIR)/_build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check trustmae_lib tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format trustmae_lib tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider tests
	$(BIN)/pytest -q -p no:cacheprovider --nbval-lax --nbval-current-env notebooks

# A wheel and an sdist of trustmae_lib in $(DIST)/ (the wheel carries the profiles and the paper's tables): for a
# machine without the checkout, e.g. Colab, upload dist/trustmae_lib-*.whl and `pip install` it there.
DIST ?= dist
BUILD_FLAGS ?=
dist: $(STAMP)
	rm -f $(DIST)/trustmae_lib-*.whl $(DIST)/trustmae_lib-*.tar.gz
	$(PY) -m build $(BUILD_FLAGS) --outdir $(DIST) .
	@ls $(DIST)/trustmae_lib-*

# The core of the noise study from scratch (chapters 11-13): every method on the widget and elpv/mono, both
# protocols, clean and 40 % noise, three seeds, 300 steps each (configs/sweep_cpu_core*.yaml, 144 cells);
# `make sweep` only fills in missing or stale cells of every committed sweep.
reproduce: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_core --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_core_disjoint --fresh --jobs 2

# The first noise study (configs/sweep_cpu.yaml: 0-40 % noise, the library's memory, baselines at 600 steps).
reproduce-first: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu --fresh --jobs 2

# The embedded benchmark's calibration and the disjoint protocol (chapters 1, 13), chapter 13's runs on the textures
# and the gear (300 steps) and on the widget at the profile's 600 steps.
reproduce-textures: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_calibration --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_disjoint --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_textures --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_bar --fresh --jobs 2

readings: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_readings --fresh --jobs 2

# What the memory does in real training runs (chapter 4): the mechanism diagnostics of 12 noise-study cells.
mechanism: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_mechanism --fresh --jobs 2

# Validation copies for choosing settings, never the book's test images: the widget drawn with generator seed 1.
validation-data: $(STAMP)
	$(PY) -m trustmae_lib data synthetic --profile cpu --seed 1 --categories widget --out $(DATA)/validation/synthetic-s1

# The learned memory (chapter 4): chosen on validation copies, then the noise study's core under it (both protocols).
memory-validation: validation-data
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_validation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_ablation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_readout --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_lr_validation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_steps300_validation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_steps_validation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_lr_steps_validation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_steps1200_validation --fresh --jobs 2

# Chapter 10's scoring probe: the validation runs of 600 and 1200 steps re-scored with other combinations of the
# per-layer perceptual distance (their checkpoints in runs/cpu_memory_validation; `make memory-validation` trains them).
SCORING_SWEEPS := sweep_cpu_memory_steps_validation sweep_cpu_memory_steps1200_validation sweep_cpu_memory_lr_steps_validation
scoring-validation: $(STAMP)
	$(PY) -m trustmae_lib.study.layers results/analysis/scoring_layers_validation.json $(SCORING_SWEEPS)

# The budget the validation copies chose (1200 steps), measured on the book's solar cells, clean (chapter 4).
memory-budget: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_steps1200 --fresh --jobs 2

# The noise study's core at that budget (chapter 12): TrustMAE and w/o TR on the widget and elpv/mono, clean and at
# 40 %, five seeds, 1200 steps, under both protocols (its clean overlap TrustMAE cells on elpv/mono are
# memory-budget's, same files); the baselines at 1200 steps under overlap, three seeds (chapter 13); and TrustMAE clean
# on the brick texture at 1200 steps (chapter 4).
memory-1200: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_memory1200 --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory1200_disjoint --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_baselines1200 --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_baselines1200_disjoint --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_texture1200 --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_textures1200 --fresh --jobs 2

memory: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_memory --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_disjoint --fresh --jobs 2

# The rest of the learned-memory grid: the same cells at 20 % noise (overlap), and the brick texture at 0 and 40 %.
memory-grid: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_grid --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_texture --fresh --jobs 2

# MemAE's shrinkage threshold and learning rate (chapter 13), on validation copies; then MemAE with the threshold and
# its memory-less twin at the first study's 600 steps (`make reproduce` has both at the core study's 300).
memae-validation: validation-data
	$(PY) -m trustmae_lib sweep sweep_cpu_memae_validation --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memae_lr_validation --fresh --jobs 2

memae: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_memae --fresh --jobs 2

# Seeds 3-4 of the core study's baselines (AE-L2, AE-SSIM, MemAE and its twin, the PatchCore-style bank), both
# protocols: with `make memory`'s seeds of TrustMAE and w/o TR, every method of chapters 11-13 has five seeds.
seeds: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_seeds --fresh --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_seeds_disjoint --fresh --jobs 2

sweep: $(STAMP)
	$(PY) -m trustmae_lib sweep sweep_cpu_core --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_core_disjoint --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_calibration --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_disjoint --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_textures --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_bar --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_readings --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_mechanism --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_disjoint --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_grid --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_texture --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memae --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_seeds --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_seeds_disjoint --jobs 2
	$(MAKE) validation-data
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_validation --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_ablation --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_readout --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memory_lr_validation --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memae_validation --jobs 2
	$(PY) -m trustmae_lib sweep sweep_cpu_memae_lr_validation --jobs 2

# Performance benchmarks (benchmarks/README.md) -> results/bench/*.json, read by the performance chapter.
bench: $(STAMP)
	$(PY) benchmarks/bench_train.py --out results/bench/train.json
	$(PY) benchmarks/bench_score.py --out results/bench/score.json
	$(PY) benchmarks/bench_memory.py --out results/bench/memory.json
	$(PY) benchmarks/profile_step.py --out results/bench/profile.json
	$(PY) benchmarks/bench_changes.py --out results/bench/changes.json
	$(PY) benchmarks/bench_speedup.py --out results/bench/speedup.json  # ~8 min: default vs RunSpec.fast (+bf16, +compile)
	-$(PY) benchmarks/sweep_data.py --out results/bench/sweep_data.json  # needs the sweep's run folders
	$(PY) benchmarks/sweep_time.py --out results/bench/sweep_time.json  # ~13 min: noise-study cells, 3 code versions
	$(PY) benchmarks/report.py results/bench

# `make reproduce` from scratch in a clean worktree of HEAD, timed -> results/bench/reproduce.json (~1.5 h).
bench-reproduce: $(STAMP)
	$(PY) benchmarks/bench_reproduce.py --out results/bench/reproduce.json

clean:
	rm -rf _build book/[0-9][0-9]_*.ipynb
