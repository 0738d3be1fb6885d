# Two commands a new user needs: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_DIR ?= data
export OMP_NUM_THREADS ?= 2
# Keep freed large blocks in the process instead of returning them to the OS after every step:
# re-zeroing fresh pages costs CDEP's doubled activations ~12% of a CPU step.
FAST_MALLOC := GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456

.PHONY: setup run test test-all bench-cost clean

$(VENV)/.installed: requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

## The default experiment (DecoyMNIST), vanilla next to CDEP, offline on CPU.
run: setup
	$(FAST_MALLOC) $(PY) train.py -m experiment=demo paths.data_dir=$(DATA_DIR)
	$(PY) -m cdep_exp.results --glob 'outputs/demo/**/metrics.json'

## Fast CPU tests; slow ones are skipped (see test-all).
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q --runslow

## Seconds per training step and peak memory of each penalty (paper Table S1 ratios).
bench-cost: setup
	$(FAST_MALLOC) $(PY) scripts/bench_cost.py

clean:
	rm -rf outputs multirun .pytest_cache
