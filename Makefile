# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv, installs the project and trains with the defaults
#   make test    creates .venv, installs the project with its test dependencies (and the GPU
#                machine's Triton beside it, for the compile check) and runs the tests
# Extra arguments: make train ARGS="--epochs 10 --data-dir ~/data"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# The GPU machine's Triton (kernels/h100.py's GPU_MACHINE_TRITON): the tests compile every kernel
# under it as well as under the installed one. It lies alone in its directory, which the
# compiling process puts ahead of the installed Triton; torch comes from $(VENV).
GPU_MACHINE_TRITON := 3.6.0
GPU_MACHINE_TRITON_DIR := .triton-3.6.0

.PHONY: install train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(GPU_MACHINE_TRITON_DIR)/.installed: | $(VENV)/.installed
	rm -rf $(GPU_MACHINE_TRITON_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(GPU_MACHINE_TRITON_DIR) triton==$(GPU_MACHINE_TRITON)
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) train.py $(ARGS)

# The tests run on one pytest-xdist worker per CPU, at most 4 (each holds torch and a model in
# memory), a test file at a time, so that a module-scoped fixture (the GPU session's dry run,
# the bench's smoke run) is built once; the files in tests/conftest.py's order (the longest first).
test: install $(GPU_MACHINE_TRITON_DIR)/.installed
	$(PY) -m pytest tests -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder --durations=10 $(ARGS)

bench: install
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) $(GPU_MACHINE_TRITON_DIR) *.egg-info
