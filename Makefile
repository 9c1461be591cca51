# `make demo` and `make test` set everything up from a fresh clone (a .venv with pinned deps).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo test lint bench ablations wild unseen unseen-dev clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: install
	$(BIN)/delta-router demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collects no test: that is a failure to fix, not a pass.
test: install lint
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; fi; exit $$rc

bench: install
	$(BIN)/python benchmarks/embed_throughput.py

# The paper's analyses and the selection-vs-random comparison on the full zoo (built first). Every
# part is cached, so a rerun (or a resumed one) only does what is missing. Time of each part on
# 2 cores: benchmarks/RESULTS.md. COMPARE_ARGS / LORAHUB_ARGS widen or narrow the grid.
COMPARE_ARGS ?= --k 1 --k 3 --k 5 --recipe linear --recipe ties --seeds 5 --limit 40 --lorahub 0
LORAHUB_ARGS ?= --domain sentiment --domain science --domain biomedical --k 3 --recipe linear \
	--seeds 5 --limit 40 --lorahub 5
ablations: install
	$(BIN)/delta-router -v zoo build --zoo full
	$(BIN)/delta-router -v ablations --zoo full --out reports
	$(BIN)/delta-router -v compare --zoo full $(COMPARE_ARGS) --out reports/compare
	$(BIN)/delta-router -v compare --zoo full $(LORAHUB_ARGS) --out reports/compare-lorahub

# The wild zoo (41 finetunes that differ in seed, rank, LoRA variant, modules, steps, format and
# dataset; ~75 min to build on 2 cores, cached): its report, the clustering / recipe-factor /
# few-shot analyses and the router's accuracy, with a README table next to the full zoo's figures.
# Each zoo's data-free router is mapped by the other, so the full zoo is built too (cached) and its
# routing benchmark (reports/routing.json, reports/routing/) runs here.
WILD_FEWSHOT ?= --fewshot-sizes 20 --fewshot-queries 2 --fewshot-formats alpaca chat qa
WILD_COMPARE ?= --domain sentiment --domain science --domain biomedical --domain commonsense --domain legal \
	--k 3 --recipe linear --seeds 5 --limit 40 --lorahub 0
wild: install
	$(BIN)/delta-router -v zoo build --zoo full
	$(BIN)/delta-router -v zoo build --zoo wild
	$(BIN)/delta-router -v zoo report --zoo wild --eval-size 200 --where variant=strong --out reports/wild
	$(BIN)/python benchmarks/route_accuracy.py --zoo wild --no-arrow --downstream 0 --settings mean:128 \
		--reference-zoo full --json reports/wild/routing.json --abstention reports/wild/abstention.png --force
	$(BIN)/python benchmarks/registry_replay.py --zoo wild --reference-zoo full \
		--json reports/wild/registry_replay.json --force
	$(BIN)/python benchmarks/route_accuracy.py --zoo full --no-arrow --downstream 0 --settings mean:128 \
		--alphas 0.001 0.01 0.1 --reference-zoo wild --json reports/routing.json \
		--abstention reports/routing/abstention.png --force
	$(BIN)/python benchmarks/registry_replay.py --zoo full --reference-zoo wild \
		--json reports/routing/registry_replay.json --force
	$(BIN)/delta-router -v ablations --zoo wild --only clustering --only nuisance --only probes \
		--out reports/wild --reference reports
	$(BIN)/delta-router -v ablations --zoo wild --only fewshot $(WILD_FEWSHOT) --out reports/wild \
		--reference reports
	$(BIN)/delta-router -v compare --zoo wild $(WILD_COMPARE) --out reports/wild/compare
	$(BIN)/delta-router route fit --data-free --force --out reports/wild/router-data-free \
		--index "$$($(BIN)/python -c 'from delta_router import Zoo; print(Zoo("wild").index_dir)')"
	$(BIN)/delta-router -v compare --zoo wild $(WILD_COMPARE) --method queries \
		--router reports/wild/router-data-free --out reports/wild/compare-queries

# build on 5 tasks whose datasets no zoo trains on (BoolQ, SciQ, MedQA, BioASQ, MMLU psychology):
# base vs returned vs selected vs random merges vs the oracle single, on 200 held-out records each.
unseen: install
	$(BIN)/delta-router -v zoo build --zoo full
	$(BIN)/delta-router -v compare --zoo full --suite unseen --out reports/unseen

# The same on five other unseen tasks (PIQA, Social IQa, Qasper, MMLU biology and nutrition): the
# dev suite, to choose build's settings on without looking at the suite above.
unseen-dev: install
	$(BIN)/delta-router -v zoo build --zoo full
	$(BIN)/delta-router -v compare --zoo full --suite unseen-dev --out reports/unseen-dev

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
