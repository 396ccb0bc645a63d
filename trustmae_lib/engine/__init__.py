"""Engine: a run's inputs, the training loop, checkpoints, distributed set-up, run folders and evaluation.

Imports ``data`` and ``model`` (and the top-level modules).
"""
