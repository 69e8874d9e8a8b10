"""podscale's user-facing import name: the training API for your own model, loss and data.

``import podscale.torch as ps`` (torch-ddp, torch-xla) or ``import podscale.jax as ps`` (jax-pmap,
jax-sharded), then ``podscale run train.py --backend ... --devices N``. The implementation lives in
``scaling`` (``scaling.train_torch``, ``scaling.train_jax``); this package only names it, imports
nothing itself (so importing ``podscale`` loads no framework), and reaches the implementation only
by its full module names, which still resolve when a user's own ``scaling.py`` sits beside their
script (``scaling.script.unshadow``).
"""
