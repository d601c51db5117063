# xnai-tasks: `make demo`, `make test`, `make lint`, `make bench`. Each installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# llama-cpp-python is built once per machine into this folder, outside the clone, and installed from it.
LLAMA_VERSION    := 0.3.36
WHEELS           ?= $(HOME)/.cache/xnai-tasks/wheels/portable
# Portable: no -march=native; every x86-64 CPU variant of llama.cpp's CPU backend is built as a library and
# the best one for the CPU it runs on is picked at run time (GGML_BACKEND_DL), so a wheel made on one machine
# runs on another. `make install LLAMA_CMAKE_ARGS=-DGGML_NATIVE=ON WHEELS=...` builds for this CPU only.
# deploy/llama-cpp/portable.cmake puts the variant libraries into the wheel (llama-cpp-python leaves them out).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON \
	-DCMAKE_PROJECT_llama_cpp_INCLUDE=$(CURDIR)/deploy/llama-cpp/portable.cmake

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

# torch is pinned to the CPU build first so nothing pulls a multi-GB CUDA build. llama-cpp-python compiles
# once per machine (all CPU variants: about 25 minutes on 2 cores) into $(WHEELS); pip's own wheel cache is
# bypassed because it keys a build by version only, not by how it was built (a native build would be reused).
$(STAMP): pyproject.toml deploy/llama-cpp/portable.cmake
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	$(PIP) install --quiet "torch==2.13.0"
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PIP) wheel --quiet --no-deps --no-cache-dir -w $(WHEELS) "llama-cpp-python==$(LLAMA_VERSION)"
	$(PIP) install --quiet --find-links $(WHEELS) -e '.[models,dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/xnai demo

# Two test processes (pytest-xdist), a test file each at a time: most tests wait on real processes, so two
# share 2 cores well (a file's module-scoped stack stays in one process). TEST_WORKERS=0 runs them in one.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Quick runs of every benchmark, each ratio against xnai_tasks/bench/baseline.json (fails if one is >15% worse).
# Timings never go into `make test`.
bench: install
	$(VENV)/bin/xnai bench gate

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
