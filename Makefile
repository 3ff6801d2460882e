# Two commands do all the set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= config.example.toml
# Extras to install. `systemd` (journald logging) builds against libsystemd: it needs libsystemd-dev and
# pkg-config, so it is not in the default. CI runs `make test EXTRAS=dev,systemd`.
EXTRAS ?= dev
comma  := ,
# One stamp per set of extras, so a venv set up with other extras is completed, not taken as up to date.
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv run once test lint typecheck generate check-generated bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

venv: $(STAMP)

# Start the daemon on the example config; its folders live under ./var/.
run: $(STAMP)
	mkdir -p var/inbox
	$(BIN)/anondrop run --config $(CONFIG)

# One pass over ./var/inbox with the example config.
once: $(STAMP)
	mkdir -p var/inbox
	$(BIN)/anondrop once --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python daemon/tools/gen_ps315.py --check
	$(BIN)/ruff check daemon tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

generate: $(STAMP)
	$(BIN)/python daemon/tools/gen_ps315.py

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var bench/corpus bench/out .pytest_cache .mypy_cache .ruff_cache
