# streamgen: `make demo` and `make test` are the two commands; both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.streamgen-installed

PROTO_GEN := protos/streamgen/v1/stream_pb2.py

.PHONY: setup test test-slow demo bench clean

setup: $(STAMP) $(PROTO_GEN)

# Generated gRPC modules: rebuilt when the .proto changes, never edited by hand.
$(PROTO_GEN): protos/streamgen/v1/stream.proto $(STAMP)
	$(PY) protos/build.py --force

# Idempotent: re-runs only when pyproject.toml changes. torch first, pinned, so the CPU wheel on
# disk is taken instead of a multi-GB CUDA build pulled in by another package.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: setup
	$(PY) -m pytest -q -m slow

# The embedded default: local Ray, the tiny model, 2 stages, a real gRPC stream into out/demo.mp4.
demo: setup
	$(PY) -m orchestrator.cli demo --out out/demo.mp4

bench: setup
	$(PY) bench/model_forward.py --out bench/out/model_forward.json
	$(PY) bench/pipeline_scaling.py --out bench/out/pipeline_scaling.json

clean:
	rm -rf $(VENV) build *.egg-info bench/out out protos/streamgen/v1/*_pb2*
