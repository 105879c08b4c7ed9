# The two commands of the README:
#   make demo   - install iotauth in .venv and run the full lifecycle demo on emulated devices
#   make test   - install system packages and test dependencies, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test venv system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	./scripts/install-system-deps.sh

demo: venv
	$(VENV)/bin/iotauth demo

test: system-deps venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
