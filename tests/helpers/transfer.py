"""Tiny checkpoint folders for the transfer tests: a base, its fine-tune, and a later version."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers import make_tiny_llama


def perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with every tensor moved by ``scale`` × its own RMS × N(0, 1) noise."""
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.add_((scale * p.float().pow(2).mean().sqrt() * noise).to(p.dtype))
    return out


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def three_versions(tmp_path: Path, dtype=torch.float32, **config) -> tuple[Path, Path, Path]:
    """(source base, source fine-tuned, target base) folders of a tiny Llama in ``dtype``."""
    base = make_tiny_llama(seed=0, **config).to(dtype)
    folders = (save(base, tmp_path / "base"),
               save(perturbed(base, 0.05, seed=1), tmp_path / "ft"),
               save(perturbed(base, 0.2, seed=2), tmp_path / "target"))
    return folders


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder (single file or shards)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def drop_tensor(folder: Path, name: str) -> None:
    """Rewrite a single-file checkpoint without tensor ``name``."""
    file = folder / "model.safetensors"
    tensors = load_file(file)
    del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})


def add_vocab_rows(folder: Path, rows: int, seed: int = 5) -> None:
    """Give a single-file checkpoint ``rows`` extra embedding/lm_head rows (added tokens)."""
    import json

    file = folder / "model.safetensors"
    tensors = load_file(file)
    generator = torch.Generator().manual_seed(seed)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t = tensors[name]
        extra = torch.randn((rows, t.shape[1]), generator=generator).to(t.dtype)
        tensors[name] = torch.cat([t, extra])
    save_file(tensors, file, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += rows
    (folder / "config.json").write_text(json.dumps(config))
