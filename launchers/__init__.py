"""How a run's world is started: the CLI, local processes, Ray clusters, Colab notebooks."""
