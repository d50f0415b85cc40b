# The two entry points: `make test` and `make demo`. Both create .venv when missing and
# are idempotent: the install step re-runs only when packaging inputs change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidsearch-installed
INSTALL_INPUTS := pyproject.toml setup.py $(wildcard protos/vidsearch/v1/*.proto)

.PHONY: install test demo bench shipped-model image clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=69" wheel

$(STAMP): $(PY) $(INSTALL_INPUTS)
	$(PY) -m pip install -q "grpcio-tools==1.85.1"
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest

demo: install
	$(VENV)/bin/vidsearch demo $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/ingest.py --realistic
	$(PY) benchmarks/serve.py
	$(PY) benchmarks/faults.py
	$(PY) benchmarks/quality.py --long
	$(PY) benchmarks/quality_perturbations.py
	$(PY) benchmarks/distill_probe.py
	$(PY) benchmarks/regions.py
	$(PY) -m pip install -q --no-build-isolation -e '.[dev,bench]'
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/store.py

# Re-train the shipped model (deploy/models) with the recorded command.
shipped-model: install
	$(VENV)/bin/vidsearch synth --out data/synth-train --n 3000 --seed 7 --workers 2 --overwrite
	$(VENV)/bin/vidsearch train --config deploy/train/shipped.yaml --registry deploy/models --reindex never

# Build deploy/Dockerfile with buildah and smoke-test the image as uid 10001 (not part of
# `make test`: it downloads ~4.5 GB the first time). Settings: see deploy/build_image.sh
# (PYTHON_IMAGE, IMAGE, CA_BUNDLE); deploy/README.md has the measured times.
image:
	deploy/build_image.sh $(IMAGE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
