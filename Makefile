# Two commands for a fresh machine: `make run` and `make test`. Both do their own set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/avatar-gateway serve

lint: $(STAMP)
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

# The browser test drives Debian's chromium (Playwright's own browser download cannot work here).
/usr/bin/chromium:
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "note: 'sudo apt-get install chromium' to run the browser test (skipped without it)"; fi

# WebRTC tests run inside a private network namespace (see tests/netns.sh).
pytest: $(STAMP) /usr/bin/chromium
	tests/netns.sh $(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

bench: $(STAMP)
	$(PY) bench/render.py
	tests/netns.sh $(PY) bench/fanout.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
