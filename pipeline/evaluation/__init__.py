"""Evaluation: the linear and 1-NN probe next to the random-init twin (probe.py), and studies of variants
side by side (study.py)."""
