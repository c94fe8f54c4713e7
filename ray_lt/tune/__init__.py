"""Tuning with Ray Tune and Optuna: ``search`` (the trials, each a pipeline of its own on the
shared baseline, and the result table and best config) and ``plots``."""
