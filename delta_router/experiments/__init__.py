"""Experiments: the paper's ablations, selection-vs-random comparisons and the demo (pull in matplotlib)."""
