# Two commands: `make demo` (the whole pipeline on offline demo data) and `make test` (the test suite).
# Both create the virtualenv and install what is missing, idempotently.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DEMO_DIR ?= demo-data
APT_PACKAGES := dataset-fashion-mnist tuxpaint-stamps-default chromium
# The files each Debian package installs; present means installed.
APT_MARKERS := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz /usr/share/tuxpaint/stamps /usr/bin/chromium

.PHONY: demo test install install-test system-deps demo-gallery clean-demo

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# the test extra (pytest, playwright) on top of the runtime install; autofaiss (bench/recall.py's
# other side) without its dependencies: it pins numpy < 2, while its code runs on the numpy installed
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q six termcolor
	$(BIN)/pip install -q --no-deps autofaiss==2.18.0 fire==0.6.0
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

system-deps:
	@missing=""; for m in $(APT_MARKERS); do [ -e $$m ] || missing="yes"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(APT_PACKAGES)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES) >/dev/null || \
	    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES) >/dev/null; }; \
	  else \
	    echo "missing system packages; install them with: sudo apt-get install $(APT_PACKAGES)"; exit 1; \
	  fi; \
	fi

test: install-test system-deps
	$(BIN)/python -m pytest -q

demo-gallery: install system-deps
	$(BIN)/python -m jobs.demo_gallery --out $(DEMO_DIR)

demo: demo-gallery
	$(BIN)/python -m jobs.demo --data $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
