"""compress: make LLaMA-family language models smaller, faster or adapted.

The pieces: :mod:`compress.models` (loading), :mod:`compress.data` (calibration and evaluation
tokens), :mod:`compress.walk` (the layer walk), :mod:`compress.stats` (input statistics),
:mod:`compress.methods` (method plugins), :mod:`compress.export` (saving) and :mod:`compress.cli`.
"""

__version__ = "0.1.0"
