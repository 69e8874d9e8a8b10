# The two commands: `make run` and `make test`. Both build what they need on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
XVENV   := .venv-xla
XPY     := $(XVENV)/bin/python
# torch==2.13.0 is a CPU build on this machine's disk; unpinned torch pulls a multi-GB CUDA build.
# No torchvision: PyPI's 0.28.0 (the one that pairs with torch 2.13) is a CUDA build whose ops fail
# to load beside the CPU torch, and transformers then fails to import too (examples/hf_gpt2.py).
TORCH_PIN := torch==2.13.0
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: run test venv venv-xla test-main test-xla bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(VPY) -m pip install $(PIP_QUIET) $(TORCH_PIN) -e '.[torch,jax,ray,dev,examples]' 2>&1 | grep -v "is ignored" || true
	$(VPY) -c "import torch, jax, ray, transformers, scaling, podscale" && touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/podscale scale

# venv-xla first: the main suite's scaling sweep then includes torch-xla, as `make run` does
test: venv venv-xla
	$(VPY) -m pytest -q
	PJRT_DEVICE=CPU $(XPY) -m pytest -q tests/xla

test-main: venv
	$(VPY) -m pytest -q

# torch-xla lives in its own venv: torch_xla 2.9 needs torch 2.9.x, the main venv has 2.13.
# Packages come pinned by constraints-xla.txt; podscale goes in without deps so nothing moves torch.
XLA_PKGS := torch torch_xla jax jaxlib flax optax numpy rich matplotlib tensorboard pyyaml \
	pytest pytest-timeout tbparse nbclient ipykernel packaging scikit-learn

$(XVENV)/.installed: constraints-xla.txt pyproject.toml
	test -x $(XPY) || $(PY) -m venv $(XVENV)
	$(XPY) -m pip install $(PIP_QUIET) -c constraints-xla.txt $(XLA_PKGS) 2>&1 | grep -v "is ignored" || true
	$(XPY) -m pip install $(PIP_QUIET) --no-deps -e . 2>&1 | grep -v "is ignored" || true
	$(XPY) -c "import torch, torch_xla, jax, flax, scaling" && touch $@

venv-xla: $(XVENV)/.installed

test-xla: venv-xla
	PJRT_DEVICE=CPU $(XPY) -m pytest -q tests/xla

bench: venv
	$(VPY) bench/overhead.py

clean:
	rm -rf $(VENV) $(XVENV)
