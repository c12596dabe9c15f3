"""Training: examples (``data``), losses (``losses``) and the accelerate training loop (``loop``)."""
