"""A training run's parts: setup, optimizer, precision, parallelism, measurement, evaluation."""
