# Two commands for a new user: `make demo` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean browser

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

data/digits: | $(STAMP)
	$(BIN)/tunecv data digits data/digits --image-size 64

demo: $(STAMP) data/digits
	$(BIN)/tunecv run --config configs/demo.yaml

# report.html is checked in a real headless Chromium: the OS's package, installed here
# when running as root (CI); elsewhere the browser tests skip and say how to install it.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "no Chromium: report.html's browser tests will skip (apt-get install chromium)"

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -ra

bench: $(STAMP) data/digits
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.search_overhead
	$(BIN)/python -m bench.search_efficiency
	$(BIN)/python -m bench.export_latency
	$(BIN)/python -m bench.resume_tuner_restore
	$(BIN)/python -m bench.cluster_sim

clean:
	rm -rf runs data/digits
