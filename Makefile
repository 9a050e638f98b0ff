# streamgen: `make demo` and `make test` are the two commands; both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.streamgen-installed

.PHONY: setup lint test test-slow demo demo-v2v train-demo bench clean tools

setup: $(STAMP)

# Idempotent: re-runs only when the packaging or the .proto changes. torch first, pinned, so the CPU wheel
# on disk is taken instead of a multi-GB CUDA build pulled in by another package. The install's build step
# (setup.py) generates the gRPC modules from the .proto, so there is no separate proto step.
$(STAMP): pyproject.toml setup.py protos/streamgen/v1/stream.proto
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -qq --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check .

test: lint tools
	$(PY) -m pytest -q -m "not slow and not gpu" --durations=15

# promtool for tests/unit/test_k8s.py, beside the venv's python: taken out of Debian's prometheus package rather
# than installing it (which would start a Prometheus server). Best effort: where apt is missing, or the package
# lists are stale and this is not root, the promtool check is skipped (saying so); the build never fails here.
# Headless Chromium and its driver for tests/integration/test_web_browser.py: installed (root with apt), else
# those tests skip, saying why.
tools: setup
	@test -x $(VENV)/bin/promtool || command -v promtool >/dev/null 2>&1 || ( \
	  set -e; command -v apt-get >/dev/null; tmp=$$(mktemp -d); cd $$tmp; \
	  apt-get download prometheus >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update -qq >/dev/null 2>&1 && \
	    apt-get download prometheus >/dev/null 2>&1; }; \
	  dpkg-deb -x prometheus_*.deb x && cp x/usr/bin/promtool $(CURDIR)/$(VENV)/bin/promtool; rm -rf $$tmp \
	) || echo "promtool not available (no apt, or stale package lists and not root): its check is skipped"
	@command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 || ( \
	  set -e; command -v apt-get >/dev/null; [ "$$(id -u)" = 0 ]; \
	  echo "installing Debian's chromium and chromium-driver for the browser page's tests (a few minutes) ..."; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && \
	    apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } \
	) || echo "chromium not available (no apt, or not root): the browser page's tests are skipped"

test-slow: setup
	$(PY) -m pytest -q -m slow

# The embedded default: local Ray, the demo model (trained, shipped), 2 stages, a real gRPC stream into out/demo.mp4.
demo: setup
	$(PY) -m orchestrator.cli demo --out out/demo.mp4

# Video-to-video: makes a 64-frame test clip (out/input.mp4), restyles it through a real Transform stream
# (chunks of one latent frame, 4 video frames, as StreamDiffusionV2: less input buffering).
demo-v2v: setup
	$(PY) -m orchestrator.cli demo-v2v --in out/input.mp4 --out out/demo_v2v.mp4 --chunk-frames 1

# Retrain the demo model from scratch on CPU (VAE on one thread, DiT on every core; 32 min measured on a 2-core
# AMD EPYC VM, 1 h 23 min on a 2-core Xeon one, more with busy neighbours; resumes from out/train-demo/state.pt,
# and kill or Ctrl-C saves it).
# DEMO_CKPT=workers/weights/demo.pt replaces the shipped checkpoint.
DEMO_CKPT ?= out/train-demo/demo.pt
train-demo: setup
	$(PY) -m workers.demo.train --out $(DEMO_CKPT) --state out/train-demo/state.pt

bench: setup
	$(PY) bench/model_forward.py --out bench/out/model_forward.json
	$(PY) bench/pipeline_scaling.py --ring-ceiling --out bench/out/pipeline_scaling.json
	$(PY) bench/service_overhead.py --out bench/out/service_overhead.json
	$(PY) bench/quality.py --out bench/out/quality.json

clean:
	rm -rf $(VENV) build *.egg-info bench/out out protos/streamgen/v1/*_pb2*
