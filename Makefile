# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch where there is no GPU keeps a fresh 2-core machine's set-up to minutes; override freely.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.6' || echo 'torch==2.13.0')
DEMO_OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup demo test lint wheelhouse clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: setup
	@# --resume: a second `make demo` continues (here: re-emits) the first's study instead of refusing it;
	@# --force: it makes best.mp4 again (generate refuses to write over a file otherwise).
	$(VENV)/bin/wanctl tune --model tiny --trials 10 --out $(DEMO_OUT) --inject oom_decode@3 --resume
	$(VENV)/bin/wanctl generate --best --model tiny --out-dir $(DEMO_OUT) --out $(DEMO_OUT)/best.mp4 --force

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Wheels for an offline GPU host (cp312, manylinux x86_64): README.md, "Offline GPU hosts".
wheelhouse:
	bash tools/wheelhouse.sh

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
