"""compress: make LLaMA-family language models smaller, faster or adapted.

The Python API (the same operations as the CLI verbs, on in-memory models)::

    import compress
    m = compress.load("smollm2-135m")                      # a LoadedModel: .model, .tokenizer
    compress.prune(m, method="slimgpt", data="wikitext2", ratio=0.2, samples=32, seqlen=256)
    compress.quantize(m, method="gptq", bits=4, group_size=64)
    compress.evaluate(m, data="wikitext2", seqlen=512, windows=16)   # the keys of `compress eval --json`
    compress.save(m, "out-folder")

The pieces: :mod:`compress.plugin` (the method interface and registry), :mod:`compress.arch` (the
layout map), :mod:`compress.walk` (the layer walk), :mod:`compress.pipeline` (load → calibrate →
stages → export → evaluate), :mod:`compress.exporters`, :mod:`compress.metrics`, :mod:`compress.cli`.
"""

__version__ = "0.1.0"

_API = {"load": "compress.api", "prune": "compress.api", "quantize": "compress.api", "save": "compress.api",
        "compress": "compress.api", "evaluate": "compress.metrics"}


def __getattr__(name):  # imported lazily: `import compress` stays cheap (the CLI's --help)
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
