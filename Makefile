# Every target bootstraps .venv itself: `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned and installed first, the right build for the machine:
# - with an NVIDIA driver (nvidia-smi): PyPI's wheel, which is the CUDA build;
# - without: the CPU build (torch==X+cpu) from whatever pip is configured with (a local
#   wheel cache here), else from PyTorch's CPU index, never PyPI's multi-GB CUDA wheel.
# The project's own torch range then admits it and pip pulls nothing more.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install run test bench lint clean

install: $(VENV)/.installed

# docker-compose==1.29.2 is installed without its dependencies (they conflict with ours): only its
# copy of the Compose specification's JSON schema is used, by tests/test_docker.py.

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	else \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)+cpu" 2>/dev/null \
		|| $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)" --index-url "$(TORCH_CPU_INDEX)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "docker-compose==1.29.2"  # the Compose spec schema, see above
	touch $@

run: install
	$(VENV)/bin/worker start $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) bench/overhead.py
	$(PY) bench/averaging.py
	$(PY) bench/catchup.py
	$(PY) bench/newcomer.py
	$(PY) bench/convergence.py --plot docs/convergence.png
	$(PY) bench/utilization.py --plot docs/utilization.png

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
