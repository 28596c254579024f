# The README's two commands: `make demo` and `make test`. Both set up .venv on first use.
PY := .venv/bin/python
STAMP := .venv/.fastgrpo-setup
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-all lint format bench gpu-test clean

$(STAMP): requirements/cpu.txt requirements/gpu.txt pyproject.toml setup.py scripts/setup.sh $(wildcard csrc/*.cpp csrc/*.h csrc/*/*)
	bash scripts/setup.sh

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fastgrpo.demo

test: $(STAMP)
	@$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

gpu-test: $(STAMP)
	$(PY) -m pytest -q -m gpu

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(STAMP)
	$(PY) -m fastgrpo.cli bench

clean:
	rm -rf .venv build *.egg-info fastgrpo/_C*.so
