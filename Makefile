# The single entry point: `make test` checks everything, `make demo` shows the library at work.
# Build outputs go to tests/build/ (ignored by git); the top level holds sources only.

CXX_GCC ?= g++
CXX_CLANG ?= clang++
CXX_CLANG19 ?= clang++-19
WARN := -std=c++20 -Wall -Wextra -Wpedantic -Werror
PYTHON ?= python3
BUILD := tests/build

export CXX_GCC CXX_CLANG CXX_CLANG19 WARN

.PHONY: all test demo bench check clean deps deps-reliability test-sanitize stress fuzz

# Regenerates the single header from src/.
all:
	$(PYTHON) amalgamate.py

# Installs what the tests need (doctest, clang 14 and 19) when it is missing; needs root for
# apt-get.
deps:
	@missing=""; \
	echo '#include <doctest/doctest.h>' | $(CXX_GCC) -std=c++20 -x c++ -fsyntax-only - \
	  >/dev/null 2>&1 || missing="$$missing doctest-dev"; \
	command -v $(CXX_GCC) >/dev/null || missing="$$missing g++"; \
	command -v $(CXX_CLANG) >/dev/null || missing="$$missing clang"; \
	command -v $(CXX_CLANG19) >/dev/null || missing="$$missing clang-19"; \
	command -v $(PYTHON) >/dev/null || missing="$$missing python3"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing:$$missing -- install$$missing (apt-get install$$missing) or run make as root"; \
	  exit 1; \
	fi; \
	echo "installing:$$missing"; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing

# What test-sanitize, stress and fuzz need beyond that: valgrind, and clang's runtime libraries
# (sanitizers, libFuzzer: libclang-rt-N-dev).
deps-reliability: deps
	@missing=""; \
	command -v valgrind >/dev/null || missing="$$missing valgrind"; \
	echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' | \
	  $(CXX_CLANG) -fsanitize=fuzzer,address -x c++ - -o /dev/null >/dev/null 2>&1 || \
	  missing="$$missing libclang-rt-$$($(CXX_CLANG) -dumpversion | cut -d. -f1)-dev"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "missing:$$missing -- install$$missing (apt-get install$$missing) or run make as root"; \
	  exit 1; \
	fi; \
	echo "installing:$$missing"; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y$$missing

# Every check; the last line of output is "tests: N passed, M failed". UNIT_FULL=1 builds the
# embedded suite with every compiler on every backend (default: a covering subset).
test: deps
	@UNIT_FULL=$(UNIT_FULL) tests/run_tests.sh

# The embedded suite under ASan+UBSan and under TSan (each with g++ and clang++, covering epoll,
# poll and io_uring; SAN_FULL=1 for all twelve combinations), and the
# runtime's suites under Valgrind memcheck. Any report fails. Ends with the same summary line.
test-sanitize: deps-reliability
	@SAN_FULL=$(SAN_FULL) tests/run_tests.sh sanitize valgrind

# The stress programs of tests/stress/ (counts, time and peak RSS of each; see RESULTS.md there).
# QUICK=1: the short CI version, built with ASan+UBSan (and the threaded ones with TSan too).
QUICK ?=
stress: deps-reliability
	@STRESS_QUICK=$(filter 1,$(QUICK)) tests/run_tests.sh stress

# The libFuzzer targets tests/fuzz/{schedule,stream}_fuzzer.cpp for FUZZ_TIME seconds each, from the
# corpus tests/fuzz/corpus/TARGET/ (new inputs go to tests/build/fuzz/corpus_TARGET/).
FUZZ_TIME ?= 60
fuzz: deps-reliability
	@FUZZ_TIME=$(FUZZ_TIME) tests/run_tests.sh fuzz

# The demo, built from the single header: an echo service and its clients in two nurseries.
# ARGS passes flags through, e.g. make demo ARGS="--seconds 10 --clients 64 --fault".
demo:
	@mkdir -p $(BUILD)
	@$(CXX_GCC) $(WARN) -pthread -O2 -I. tests/demo/demo.cpp -o $(BUILD)/demo
	@$(BUILD)/demo $(ARGS)

# Our workloads against asyncio, uvloop, Boost.Asio, libuv and a raw epoll floor, in one run.
# QUICK=1 scales N down (under a minute); CSV=file also writes the table as CSV.
bench:
	@QUICK="$(QUICK)" CSV="$(CSV)" ONLY="$(ONLY)" sh tests/bench/run.sh

# Static checks: the header is fresh, the includes point down the layering, every src/ header
# compiles alone (g++ and clang++), cppcheck (if installed) finds nothing, kqueue compiles.
check:
	@tests/run_tests.sh freshness layering self_contained cppcheck kqueue

clean:
	rm -rf $(BUILD)
