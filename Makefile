# The README's two commands:  `make demo`  and  `make test`.  Each builds its venv on first use.
#
# Two software stacks, both tested in CI (.ci/run):
#   STACK=default  .venv        torch 2.13 (the CPU build on disk) + the newest DeepSpeed
#   STACK=gaudi    .venv-gaudi  Intel Gaudi software 1.22/1.23's versions, reproduced from PyPI:
#                               torch 2.7.1 without triton + DeepSpeed 0.14.4 built against it.
#                               Inside Habana's container the torch and DeepSpeed already there
#                               are kept (nothing is installed over them):
#                               `make test STACK=gaudi VENV_ARGS=--system-site-packages`
PYTHON ?= python3
STACK  ?= default
ifeq ($(STACK),default)
VENV   ?= .venv
else ifeq ($(STACK),gaudi)
VENV   ?= .venv-gaudi
else
$(error STACK=$(STACK) is not a stack this Makefile knows: use STACK=default or STACK=gaudi)
endif
PY      = $(VENV)/bin/python
VENV_ARGS ?=
TORCH_VERSION          ?= 2.13.0
GAUDI_TORCH_VERSION    ?= 2.7.1
GAUDI_DEEPSPEED_VERSION ?= 0.14.4
# On a Linux laptop, `make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu` fetches the
# small CPU build of torch instead of PyPI's CUDA one. Left empty, pip's own configuration decides.
TORCH_INDEX_URL ?=
PYTEST_ARGS ?=
# What the project needs besides torch and DeepSpeed (pyproject's dependencies and its dev and
# notebooks extras; tests/test_packaging.py keeps this list equal to pyproject's).
LIGHT_DEPS = numpy sentencepiece safetensors matplotlib tqdm jupyterlab ipykernel \
             pytest pytest-timeout nbclient nbformat pyyaml "transformers>=4.45"

.PHONY: install demo test lab bench clean student-edition

$(VENV)/.installed-default: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@$(PY) -c "import sys; assert sys.version_info >= (3, 10), 'minimegatron needs Python >= 3.10'"
	@# torch first, and only if absent, so that pip never swaps in another build
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)" \
		$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q --upgrade "setuptools>=64" wheel
	@# no build isolation: DeepSpeed's sdist builds against the torch installed above
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,notebooks]"
	@touch $@

# Gaudi's stack. This is the README's Gaudi install: keep torch and DeepSpeed if present (Habana's
# builds), else install the versions Gaudi software 1.22/1.23 ships; then the project with --no-deps
# and its light dependencies, constrained to the torch and DeepSpeed found, so pip cannot swap them.
# Habana's torch has no triton; PyPI's pulls it in, and DeepSpeed 0.14 fails to import with a triton
# that finds no GPU driver, so it is removed last (after anything that could reinstall it).
$(VENV)/.installed-gaudi: pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	@$(PY) -c "import sys; assert sys.version_info >= (3, 10), 'minimegatron needs Python >= 3.10'"
	@$(PY) -m pip show -q torch 2>/dev/null || $(PY) -m pip install "torch==$(GAUDI_TORCH_VERSION)" \
		$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -q --upgrade "setuptools>=64" wheel
	@$(PY) -m pip show -q deepspeed 2>/dev/null || \
		$(PY) -m pip install -q --no-build-isolation "deepspeed==$(GAUDI_DEEPSPEED_VERSION)"
	$(PY) -c "import importlib.metadata as m; print(*(f'{p}=={m.version(p)}' for p in ('torch', 'deepspeed')), sep='\n')" > $(VENV)/constraints.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q -c $(VENV)/constraints.txt $(LIGHT_DEPS)
	$(PY) -m pip uninstall -q -y triton 2>/dev/null || true
	@touch $@

# Hugging Face's own Megatron -> GPT-2 converter (convert_megatron_gpt2_checkpoint.py) left the
# transformers wheels after 4.46; tests/checkpoint/test_megatron.py runs it, taken from this pinned
# wheel (downloaded once, no dependencies installed: the script runs on the venv's transformers).
HF_MEGATRON_WHEEL_VERSION ?= 4.46.3
HF_MEGATRON_WHEEL = .cache/wheels/transformers-$(HF_MEGATRON_WHEEL_VERSION)-py3-none-any.whl
$(HF_MEGATRON_WHEEL):
	$(PY) -m pip download -q --no-deps "transformers==$(HF_MEGATRON_WHEEL_VERSION)" -d .cache/wheels

install: $(VENV)/.installed-$(STACK) $(HF_MEGATRON_WHEEL)

demo: install
	$(PY) -m minimegatron.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lab: install
	$(VENV)/bin/jupyter lab notebooks/

bench: install
	$(PY) -m benchmarks.run_all

# Instructor mode: $(STUDENT_OUT)/student (stubs, no references or solutions) + $(STUDENT_OUT)/grader
STUDENT_OUT ?= student_edition
student-edition: install
	$(PY) -m exercises.student_edition $(STUDENT_OUT)

clean:
	rm -rf .venv .venv-gaudi demo_out .pytest_cache .cache/wheels
