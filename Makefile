# Set-up, tests and benchmarks on a fresh machine:  make test  |  make bench
#
#   PYTHON=python3.12 make setup     interpreter that creates .venv (default python3)
#   make test PYTEST_ARGS="-k word"  extra pytest arguments
#   make bench BENCH_ARGS="--help"   arguments for `python -m benchmarks`
#   NO_TESTS_OK=1 make test          exit 0 when pytest collected no test (exit 5); CI sets it

PYTHON ?= python3
VENV ?= .venv
VENV_PYTHON := $(VENV)/bin/python
# Re-run the set-up when the pins, the build files or the native sources change.
SETUP_STAMP := $(VENV)/.spanbert_fast-setup.stamp
SETUP_INPUTS := requirements-cpu.txt setup.py pyproject.toml csrc $(wildcard csrc/*)
PYTEST_ARGS ?=
BENCH_ARGS ?=
NO_TESTS_OK ?= 0

.PHONY: setup test bench clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): $(SETUP_INPUTS)
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(VENV_PYTHON) -m pip install --upgrade pip
	$(VENV_PYTHON) -m pip install -r requirements-cpu.txt
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV_PYTHON) -m pip install -e . --no-build-isolation
	touch $@

test: setup
	@rc=0; $(VENV_PYTHON) -m pytest -q -ra $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then \
		echo "make test: pytest collected no tests (exit 5)"; \
		if [ "$(NO_TESTS_OK)" = 1 ]; then rc=0; fi; \
	fi; \
	exit $$rc

bench: setup
	$(VENV_PYTHON) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info spanbert_fast/*.so $(SETUP_STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
