# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch where there is no GPU keeps a fresh 2-core machine's set-up to minutes; override freely.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=
# `make test`: one pytest-xdist worker per core and one more (3 on the 2-core reference machine): many tests wait
# on their subprocesses (a timeout to hit, a server to become ready, a run to kill), leaving a core idle, which the
# extra worker fills; a second extra one oversubscribes the cores once the multi-rank tests (4 ranks each) run
# (2026-12-07, 2-core machine: 1973 tests 6m49s with 2 workers, 5m42s with 3; 2088 tests 6m45s with 3, 6m12s
# with 4; 2026-12-08: 2186 tests 5m40s, 6m03s, 6m04s with 4, 5m26s and 5m29s with 3). A test file per worker at a
# time (its module fixtures are built once), the slowest files first (tests/conftest.py).
TEST_WORKERS ?= $(shell echo $$(( $$(nproc 2>/dev/null || echo 1) + 1 )))
# What the suite may take on an idle 2-core machine; `make test` prints its wall time against it.
TEST_BUDGET_S ?= 360

.PHONY: setup demo test test-floors lint wheelhouse clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: setup
	@# --resume: a later `make demo` continues (here: re-emits) the first's study instead of refusing it (one at a
	@# time: two at once, the second is refused);
	@# --force: it makes best.mp4 again (generate refuses to write over a file otherwise).
	$(VENV)/bin/wanctl tune --model tiny --trials 10 --out $(DEMO_OUT) --inject oom_decode@1 --resume
	$(VENV)/bin/wanctl generate --best --model tiny --out-dir $(DEMO_OUT) --out $(DEMO_OUT)/best.mp4 --force

test: setup
	@start=$$(date +%s); \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 4 --dist loadfile --no-loadscope-reorder \
		--durations 10 $(PYTEST_ARGS); rc=$$?; \
	s=$$(( $$(date +%s) - start )); load=$$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); \
	printf 'make test: %dm%02ds wall (budget %dm%02ds on an idle 2-core machine; load average now %s)\n' \
		$$((s / 60)) $$((s % 60)) $$(($(TEST_BUDGET_S) / 60)) $$(($(TEST_BUDGET_S) % 60)) "$$load"; \
	if [ $$s -gt $(TEST_BUDGET_S) ]; then \
		echo 'make test: over budget: if the machine was idle, see the slowest durations above and README "Tests"'; fi; \
	exit $$rc

# Every direct dependency (and the dev extra's) at the floor pyproject.toml declares (tools/floors.py reads them),
# in a throwaway venv made anew each run, then the fast tests: a floor is a version the suite ran with. The one
# exception is torch: PyPI serves its floor (2.11) only as a multi-GB CUDA build, so this run takes FLOORS_TORCH,
# the CPU wheel `make test` takes; torch 2.11 is the one the GPU hosts ran the GPU tests with (BENCHMARKS.md).
# README.md, "The oldest versions", says what this proves and what it does not.
FLOORS_VENV ?= .venv-floors
FLOORS_TORCH ?= torch==2.13.0
FLOORS_MARKERS ?= not slow and not gpu

test-floors:
	rm -rf $(FLOORS_VENV)
	python3 -m venv $(FLOORS_VENV)
	python3 tools/floors.py --extra dev --skip torch > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q --disable-pip-version-check '$(FLOORS_TORCH)' -r $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	$(FLOORS_VENV)/bin/python -m pip check
	$(FLOORS_VENV)/bin/python -m pip freeze --exclude-editable > $(FLOORS_VENV)/installed.txt
	$(FLOORS_VENV)/bin/python -m pytest -q -m '$(FLOORS_MARKERS)' $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Wheels for an offline GPU host (cp312, manylinux x86_64): README.md, "Offline GPU hosts".
wheelhouse:
	bash tools/wheelhouse.sh

clean:
	rm -rf $(VENV) $(FLOORS_VENV) $(DEMO_OUT) .pytest_cache
