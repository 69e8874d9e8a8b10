"""Model descriptions (framework-free specs) and their PyTorch and Flax implementations."""
