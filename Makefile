# The two commands: `make run` and `make test`. Both build what they need on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
XVENV   := .venv-xla
XPY     := $(XVENV)/bin/python
# torch==2.13.0 is a CPU build on this machine's disk; unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: run test venv venv-xla test-main test-xla bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(VPY) -m pip install $(PIP_QUIET) $(TORCH_PIN) -e '.[torch,jax,ray,dev]' 2>&1 | grep -v "is ignored" || true
	$(VPY) -c "import torch, jax, ray, scaling" && touch $@

venv: $(VENV)/.installed

run: venv
	$(VENV)/bin/podscale scale

test: venv
	$(VPY) -m pytest -q

bench: venv
	$(VPY) bench/overhead.py

clean:
	rm -rf $(VENV) $(XVENV)
