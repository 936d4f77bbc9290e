# `make demo` and `make test` set up everything they need in .venv first.

# The first Python >= 3.11 on PATH (macOS's /usr/bin/python3 may be older).
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Test processes side by side (pytest-xdist), each taking whole test files (a file's shared
# dispatcher or cluster then starts once); 0 runs the tests in pytest's own process.
TEST_PROCESSES ?= 2

.PHONY: setup setup-cuda demo test test-deps lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "GenMLX needs Python 3.11 or newer on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# A Linux node with an NVIDIA GPU: MLX's CUDA build in place of the CPU one. Both ship the same
# library file (mlx/lib/libmlx.so), so the CPU build goes and the CUDA one is put back whole.
setup-cuda: setup
	$(BIN)/python -m pip install --quiet -e '.[test,cuda]'
	$(BIN)/python -m pip uninstall --quiet -y mlx-cpu
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
		"mlx-cuda-13==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("mlx"))')"
	$(BIN)/python -c 'import mlx.core as mx; assert mx.cuda.is_available(), "MLX sees no CUDA GPU"; \
		print("MLX runs on", mx.default_device())'

demo: setup
	$(BIN)/genmlx demo

test: setup test-deps
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

# The multi-host tests run nodes in network namespaces, with iproute2's `ip`: install it as root
# where it is missing. The status page tests drive Debian's chromium: installed the same way.
# Without root they are skipped (and fail where CI is set).
test-deps:
	@if ! command -v ip >/dev/null 2>&1 && ! test -x /usr/sbin/ip && ! test -x /sbin/ip; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; \
		else \
			echo "note: iproute2 is missing and this is not a root Debian shell: multi-host tests will skip"; \
		fi; \
	fi
	@if ! test -x /usr/bin/chromium; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
		else \
			echo "note: chromium is missing and this is not a root Debian shell: status page tests will skip"; \
		fi; \
	fi
	@# The service tests check the units genmlx writes with systemd's own systemd-analyze.
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd; \
		else \
			echo "note: systemd-analyze is missing and this is not a root Debian shell: unit checks will skip"; \
		fi; \
	fi
	@# The fault tests cut links between hosts with iptables and set a host's clock with faketime.
	@if ! command -v iptables >/dev/null 2>&1 && ! test -x /usr/sbin/iptables || ! command -v faketime >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iptables faketime; \
		else \
			echo "note: iptables or faketime is missing and this is not a root Debian shell: fault tests will skip"; \
		fi; \
	fi

lint: setup
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check genmlx tests benchmarks
	$(BIN)/lint-imports
