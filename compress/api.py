"""The Python API: the CLI verbs' operations on in-memory models (see :mod:`compress`)."""

from __future__ import annotations

import os

import torch

from compress.models import LoadedModel, load_model


def load(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load an alias, a Hugging Face folder, a GGUF file or a compress output folder."""
    return load_model(model, dtype=dtype, device=device)
