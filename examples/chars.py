"""Character-level language-modelling data from a public-domain book in ``examples/data/``.

Shared by ``hf_gpt2.py`` (torch) and ``flax_lm.py`` (JAX): the text as byte ids, cut into
fixed windows of ``seq_len + 1`` bytes (input = the first ``seq_len``, target = the next byte at
every position), and the text's unigram entropy, the loss a model that ignores context reaches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TEXT = Path(__file__).with_name("data") / "alice_in_wonderland.txt"
VOCAB = 256  # bytes


def load_bytes(path: Path = TEXT) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.int32)


def windows(seq_len: int, path: Path = TEXT) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping (inputs, targets) windows of the whole text, each (n, seq_len)."""
    ids = load_bytes(path)
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    return x, y


def unigram_entropy(path: Path = TEXT) -> float:
    """Entropy in nats of the text's byte frequencies (the cross-entropy of the best context-free model)."""
    counts = np.bincount(load_bytes(path), minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
