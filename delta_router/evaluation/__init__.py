"""Evaluation: lm-eval integration (shared-context scoring), answer log-likelihood scoring and
clustering metrics."""
