"""The throughput model: what a step *should* take, beside what it took.

One module per concern, so each part of the model has one obvious place:

- ``catalog``: chips, boards, nodes, pods (``hardware_catalog.toml``, every figure sourced);
- ``host``: the machine podscale runs on (cores, fingerprint, measured peak, the cache directory);
- ``flops``: exact FLOP counts from the model specs, cross-checked by the frameworks' counters;
- ``compute``: execution units (fp32 cores, TF32/16-bit tensor cores, MXUs) and the fractions of
  their peaks, of memory bandwidth and of links that training work attains, each with its source;
- ``roofline``: the per-layer roofline of one device's step and the bucketed all-reduce behind it;
- ``collectives``: all-reduce time by algorithm and topology (node rings, TPU torus, multislice);
- ``estimate``: a step's predicted time, throughput, MFU and scaling efficiency;
- ``validation``: the public calibration set (``published_runs.toml``) against the predictor;
- ``calibration`` (modelling) and ``measure`` (measuring): this host's measured terms, read and
  written — a prediction reads the file and never starts a process.

Arrows inside the wing: ``validation → estimate → roofline, calibration, collectives, compute, catalog``;
``measure → calibration → catalog → host``. Nothing here imports ``launchers``.
"""
