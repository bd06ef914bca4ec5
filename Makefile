# `make test` and `make demo` work on a fresh machine: torch 2.13.0 (CPU wheel) first when no torch is present,
# then hfpipe with its dev extras, then the job.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
STAMP := .install.stamp
NUM_RANKS ?= 2

.PHONY: install test demo bench clean

$(STAMP): setup.py
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q --durations=25 tests

demo: $(STAMP)
	deepspeed --num_gpus $(NUM_RANKS) recipes/finetune_qa.py

bench: $(STAMP)
	$(PYTHON) benchmarks/run_all.py

clean:
	rm -rf $(STAMP) build *.egg-info .pytest_cache out runs
