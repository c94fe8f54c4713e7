# `make run` runs the embedded default job; `make test` runs the test suite, `make test-fast`
# its quick tier (no Ray cluster).
# Both create .venv on first use. torch comes from the pinned 2.14.1 / 0.29.1 pair.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/digits_lt.yaml
OUT ?= runs/digits_lt

.PHONY: run test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/ray-lt run $(CONFIG) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

# Without the tests that start Ray clusters or run whole pipelines (marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check ray_lt jobs tests bench

clean:
	rm -rf $(VENV) runs
