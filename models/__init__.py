"""Model descriptions (framework-free specs) and their PyTorch and Flax implementations.

The zoo's specs add themselves to ``models.spec.SPECS`` when imported. Python runs this file before
any module of the package, so importing them here makes ``SPECS`` complete wherever ``models.spec``
is used, without ``models.spec`` importing the modules that import it.
"""

from models import cnn_spec, gpt_spec  # noqa: F401  (registers the CNNs and gpt-tiny)
