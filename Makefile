# The single entry point: `make test` checks everything, `make demo` shows the library at work.
# Build outputs go to tests/build/ (ignored by git); the top level holds sources only.

CXX_GCC ?= g++
CXX_CLANG ?= clang++
WARN := -std=c++20 -Wall -Wextra -Wpedantic -Werror
PYTHON ?= python3
BUILD := tests/build

export CXX_GCC CXX_CLANG WARN

.PHONY: all test demo bench check clean deps

# Regenerates the single header from src/.
all:
	$(PYTHON) amalgamate.py

# Installs what the tests need (doctest, clang) when it is missing; needs root for apt-get.
deps:
	@missing=""; \
	echo '#include <doctest/doctest.h>' | $(CXX_GCC) -std=c++20 -x c++ -fsyntax-only - \
	  >/dev/null 2>&1 || missing="$$missing doctest-dev"; \
	command -v $(CXX_GCC) >/dev/null || missing="$$missing g++"; \
	command -v $(CXX_CLANG) >/dev/null || missing="$$missing clang"; \
	command -v $(PYTHON) >/dev/null || missing="$$missing python3"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing:$$missing -- install$$missing (apt-get install$$missing) or run make as root"; \
	  exit 1; \
	fi; \
	echo "installing:$$missing"; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing

# Every check; the last line of output is "tests: N passed, M failed".
test: deps
	@tests/run_tests.sh

# The demo and the benchmarks arrive with later issues (tests/demo/, tests/bench/).
demo:
	@if [ -f tests/demo/demo.cpp ]; then \
	  mkdir -p $(BUILD) && \
	  $(CXX_GCC) $(WARN) -pthread -O2 -I. tests/demo/demo.cpp -o $(BUILD)/demo && $(BUILD)/demo; \
	else \
	  echo "demo: not written yet (tests/demo/demo.cpp arrives with a later issue)"; \
	fi

# Our workloads against asyncio, uvloop, Boost.Asio, libuv and a raw epoll floor, in one run.
# QUICK=1 scales N down (under a minute); CSV=file also writes the table as CSV.
bench:
	@QUICK="$(QUICK)" CSV="$(CSV)" sh tests/bench/run.sh

# Static checks: the header is fresh, cppcheck (if installed) finds nothing, kqueue compiles.
check:
	@tests/run_tests.sh freshness cppcheck kqueue

clean:
	rm -rf $(BUILD)
