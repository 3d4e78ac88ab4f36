"""Experiments built on moe_jax: the small-scale reproduction study (python -m experiments.study)."""
