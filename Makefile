# Two commands for a fresh machine: `make run` and `make test`. Both do their own set-up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint lint-web pytest bench clean gstreamer

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/avatar-gateway serve

lint: $(STAMP) lint-web
	$(VENV)/bin/ruff check gateway tests bench
	$(VENV)/bin/mypy

# The browser code has no build step; syntax and the SDK's TypeScript declarations are checked.
lint-web:
	@if command -v node >/dev/null && command -v npx >/dev/null; then \
	  for f in web/*.js web/sdk/*.js; do node --check $$f || exit 1; done; \
	  npx --yes --loglevel=error -p typescript@5.9.3 tsc --noEmit --strict --lib es2022,dom web/sdk/index.d.ts \
	    && echo "web/: node --check and tsc --strict passed"; \
	else echo "note: install nodejs (with npx) to check web/ (skipped)"; fi

# Debian tools the tests drive: chromium (Playwright's own browser download cannot work here),
# prometheus + promtool (a real Prometheus scrapes the gateway; promtool checks deploy/) and
# redis-server (replicas share it).
DEBIAN_TOOLS := /usr/bin/chromium /usr/bin/prometheus /usr/bin/redis-server
$(DEBIAN_TOOLS):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium prometheus redis-server; \
	else echo "note: 'sudo apt-get install chromium prometheus redis-server' to run the tests that need them (skipped without)"; fi

# A WHEP player we did not write (tests/test_gstreamer.py): GStreamer's webrtcbin from Debian,
# driven by Debian's python3 (python3-gi), not the venv.
GST_CHECK := /usr/bin/python3 -c "import gi; gi.require_version('GstWebRTC', '1.0'); from gi.repository import GstWebRTC"
gstreamer:
	@if $(GST_CHECK) 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-gi \
	    gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
	    gstreamer1.0-nice gstreamer1.0-libav gir1.2-gst-plugins-bad-1.0; \
	else echo "note: 'sudo apt-get install python3-gi gstreamer1.0-plugins-bad gstreamer1.0-nice gir1.2-gst-plugins-bad-1.0' for the GStreamer player test (skipped without)"; fi

# WebRTC tests run inside a private network namespace (see tests/netns.sh), where no package
# registry is reachable: the providers' own clients (npm SDKs, LiveKit's plugin) come first.
pytest: $(STAMP) $(DEBIAN_TOOLS) gstreamer
	$(PY) -m tests.prefetch
	tests/netns.sh $(PY) -m pytest $(PYTEST_ARGS)

test: lint pytest

# The Pion load client (bench/whepload) builds offline against Debian's packages; without Go
# the fan-out benchmark runs with its aiortc client only.
bench: $(STAMP)
	$(PY) bench/render.py
	@if command -v go >/dev/null && [ -d /usr/share/gocode/src/github.com/pion/webrtc ]; then \
	  $(PY) -c "import sys; sys.path[:0] = ['bench']; import fanout; sys.exit(fanout.build_whepload())"; \
	else echo "note: apt-get install golang-go golang-github-pion-webrtc.v3-dev for the Pion load client (skipped)"; fi
	tests/netns.sh $(PY) bench/fanout.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
