"""LLaMA-NAS: sub-networks of a pretrained LLaMA, a two-stage search for their Pareto front, and export.

:mod:`.space` (what a sub-network may be), :mod:`.profile` (importance orders and per-layer option
scores from one read-only layer walk), :mod:`.subnet` (weight-sharing views, materialization),
:mod:`.objectives` / :mod:`.latency` (whole-model quality and costs), :mod:`.milp` (stage 1),
:mod:`.run` (stage 2, NSGA-II, the run folder), :mod:`.supernet` (InstaTune-style training) and
:mod:`.export` (a front member as a model that loads, optionally compensated and distilled).
"""
