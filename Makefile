# The two set-up commands: `make demo` and `make test`. Both bootstrap a fresh machine first.
VENV ?= .venv
STAMP := $(VENV)/.bootstrapped

.PHONY: setup demo test unit lint bench bench-ingest bench-stream bench-serve bench-archive bench-score
setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml infra/bootstrap.sh
	VENV=$(VENV) bash infra/bootstrap.sh
	touch $(STAMP)

demo: setup
	$(VENV)/bin/sluice demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Two pytest-xdist workers, each taking whole files (session fixtures, a module's servers and
# its tests stay together): the integration tests wait on brokers, JVMs and live windows most of
# the time (a load of about 1 on 2 cores, run one at a time), so two at once took CI's pytest
# from 30:56 to 19:55 on this 2-core machine (2026-12-06, 929 tests). TEST_WORKERS=0 runs them
# in one process.
TEST_WORKERS ?= 2
PYTEST := $(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile

# pytest exits 5 when it collects no test; that is not a failure of the code.
test: lint
	$(PYTEST); rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" && rc=0; exit $$rc

# The fast loop: lint, types and the unit tests (no broker, Redis, Spark or Flink; ~2 min).
unit: lint
	$(PYTEST) -m "not integration"

# Every benchmark prints ratios against a baseline measured in the same run (about 10 minutes).
bench: bench-ingest bench-stream bench-serve bench-archive bench-score

bench-ingest: setup
	$(VENV)/bin/python -m bench.produce_ingest

bench-stream: setup
	$(VENV)/bin/python -m bench.stream

bench-serve: setup
	$(VENV)/bin/python -m bench.serve

bench-archive: setup
	$(VENV)/bin/python -m bench.archive

bench-score: setup
	$(VENV)/bin/python -m bench.score
