# Two commands do all the set-up on a fresh machine:
#   make train   creates .venv, installs the project and trains with the defaults
#   make test    creates .venv, installs the project with its test dependencies and runs the tests
# Extra arguments: make train ARGS="--epochs 10 --data-dir ~/data"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest tests $(ARGS)

bench: install
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
