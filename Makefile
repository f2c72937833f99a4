# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
PY := .venv/bin/python
SRC := dessam_d2 tools benchmarks tests setup.py

.PHONY: setup demo test lint format

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py $(ARGS)

lint: setup
	$(PY) -m black --check --quiet $(SRC)
	$(PY) -m isort --check-only --quiet $(SRC)
	$(PY) -m flake8 $(SRC)

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests $(ARGS)

format: setup
	$(PY) -m isort --quiet $(SRC)
	$(PY) -m black --quiet $(SRC)
