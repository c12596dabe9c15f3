"""Training: examples (``data``) and the accelerate training loop (``loop``)."""
