# AIOS: `make run` starts the kernel on the embedded model and runs the demo;
# `make test` runs the whole suite. Both install everything they need into
# .venv first (llama-cpp-python compiles from source: a few minutes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Compile llama.cpp with every core this machine has.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)
# llama.cpp is built for this CPU (-march=native), except for its AMX
# kernels: on CPUs with AMX-INT8 they crash the process on every batch of
# more than one token (any prompt) with the embedded model's Q4_1 weights.
# Where the compiler knows the flag, turn them off; AVX-512 and VNNI stay.
NO_AMX := $(shell echo | $${CC:-cc} -mno-amx-int8 -E - >/dev/null 2>&1 && echo -mno-amx-int8)
ifneq ($(NO_AMX),)
export CMAKE_ARGS := $(CMAKE_ARGS) -DCMAKE_C_FLAGS=$(NO_AMX) -DCMAKE_CXX_FLAGS=$(NO_AMX)
endif
# `make install GPU=cuda` (NVIDIA) or `GPU=rocm` (AMD): llama.cpp with GPU
# offload. llama-cpp-python is rebuilt even where a CPU build is installed,
# once per GPU kind and version (GPU_STAMP records which).
GPU ?=
GPU_FLAGS_cuda := -DGGML_CUDA=on
GPU_FLAGS_rocm := -DGGML_HIP=on
GPU_STAMP := $(VENV)/.installed-gpu
ifneq ($(GPU),)
ifeq ($(GPU_FLAGS_$(GPU)),)
$(error GPU=$(GPU): no such build; use GPU=cuda (NVIDIA) or GPU=rocm (AMD), or no GPU= for the CPU build)
endif
export CMAKE_ARGS := $(CMAKE_ARGS) $(GPU_FLAGS_$(GPU))
endif
# Whether llama-cpp-python is installed before this make runs: if not, the
# install builds it with the GPU flags already, and once is enough.
LLAMA_BEFORE := $(wildcard $(VENV)/lib/python*/site-packages/llama_cpp/__init__.py)

.PHONY: install run demo test test-unit test-integration bench bench-tasks bench-trust lint clean

install: $(STAMP)
ifneq ($(GPU),)
	@version="$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"; \
	offloads="$$($(BIN)/python -c 'import llama_cpp; print(llama_cpp.llama_supports_gpu_offload())' 2>/dev/null)"; \
	if [ "$$(cat $(GPU_STAMP) 2>/dev/null)" = "$(GPU) $$version" ]; then \
		echo "==> llama-cpp-python $$version is built for $(GPU) already"; \
	elif [ -z "$(LLAMA_BEFORE)" ] && [ "$$offloads" = True ]; then \
		echo "==> llama-cpp-python $$version was built for $(GPU) above"; \
		echo "$(GPU) $$version" > $(GPU_STAMP); \
	else \
		echo "==> rebuilding llama-cpp-python $$version for $(GPU) ($(GPU_FLAGS_$(GPU))): many minutes"; \
		$(BIN)/python -m pip install --force-reinstall --no-cache-dir --no-deps --progress-bar on \
			"llama-cpp-python==$$version" && echo "$(GPU) $$version" > $(GPU_STAMP); \
	fi
endif

$(STAMP): pyproject.toml setup.cfg
	@test -x $(BIN)/python || { echo "==> creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	@echo "==> upgrading pip"
	$(BIN)/python -m pip install --progress-bar on --upgrade pip setuptools wheel
	@echo "==> installing AIOS and its dependencies (llama-cpp-python compiles from source, about 4 minutes)"
	$(BIN)/python -m pip install --no-cache-dir --progress-bar on -e '.[test,bench]'
	@touch $(STAMP)

# Start aiosd in the background on the embedded model, run the demo agents,
# then stop the daemon whatever the demo's outcome.
run: $(STAMP)
	$(BIN)/aiosctl start
	$(BIN)/aiosctl demo; status=$$?; $(BIN)/aiosctl stop; exit $$status

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration

# The workload at N = 1, 8, 32 and 250 agents (N=8: one size; N=500: the
# largest): prints the figures, writes benchmarks/results/latest.json and
# draws it as latest.png; then the two-core affinity run and the null call.
N ?=
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(if $(N),--n $(N),)

# Task quality under concurrency: the task set directly on llama-cpp-python,
# one agent at a time, then all agents at once through aiosd.
bench-tasks: $(STAMP)
	$(BIN)/python -m benchmarks.tasks

# What one hostile local process costs other agents: big bodies before and
# after hello, and a flood of connections, against a bystander's null calls.
bench-trust: $(STAMP)
	$(BIN)/python -m benchmarks.trust

clean:
	rm -rf $(VENV) build *.egg-info libaios/build libaios/*.egg-info .pytest_cache
