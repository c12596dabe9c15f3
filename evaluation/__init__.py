"""Evaluation: perplexity, fidelity against a reference model, cost; and the benchmarks."""
