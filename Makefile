# invariscope: `make demo` and `make test` each set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: test browser demo docs docs-figures lint format bench bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,pretrained,docs]"
	@touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest

# The report's browser test (tests/test_report_browser.py) drives Debian's chromium
# through chromedriver. Installed here when missing and we are root; otherwise make
# carries on and the test skips (CI sets INVARISCOPE_REQUIRE_BROWSER=1: it fails there).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium and chromium-driver for the browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	    || echo "could not install chromium: the browser test will skip (fail in CI)"; \
	else \
	  echo "chromium or chromedriver missing (apt-get install chromium chromium-driver as root): the browser test will skip"; \
	fi

demo: $(STAMP)
	$(VENV)/bin/invariscope demo

# the documentation site (mkdocs.yml, docs/), offline, into site/; any warning fails it
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# regenerate the demo figures of docs/ from a fresh demo run (minutes; not in CI);
# REPRO=1 also reruns the paper reproductions behind the pages' other figures (about an hour)
docs-figures: $(STAMP)
	$(PY) benchmarks/docs_figures.py $(if $(REPRO),--repro)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/bench_224.py
	$(PY) benchmarks/bench_shift.py
	$(PY) benchmarks/bench_equivariance.py
	$(PY) benchmarks/bench_lee.py
	$(PY) benchmarks/bench_zoo.py

# every analysis on CUDA against a CPU run of the same work (needs a GPU; under 5 minutes on one H100)
bench-gpu: $(STAMP)
	$(PY) benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist site src/*.egg-info
