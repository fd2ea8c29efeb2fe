# The README's two commands:  `make demo`  and  `make test`.  Each builds .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_VERSION   ?= 2.13.0
# On a Linux laptop, `make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` fetches the
# small CPU build of torch instead of PyPI's CUDA one. Left empty, pip's own configuration decides.
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=

.PHONY: install demo test lab bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import sys; assert sys.version_info >= (3, 10), 'minimegatron needs Python >= 3.10'"
	@# torch first, and only if absent, so that pip never swaps in another build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)" \
		$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q --upgrade "setuptools>=64" wheel
	@# no build isolation: DeepSpeed's sdist builds against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,notebooks]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m minimegatron.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lab: install
	$(VENV)/bin/jupyter lab notebooks/

bench: install
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) demo_out .pytest_cache
