# `make run` and `make test` are the two set-up commands; both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv test run bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	@# The web page test drives Debian's Chromium; install it when we can (root with apt), else it is skipped.
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi
	touch $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

run: venv
	$(VENV)/bin/rdm demo --data data --out outputs

bench: venv
	$(PY) bench/sampler.py

lint: venv
	$(VENV)/bin/ruff check rdm cluster jobs tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
