"""The on-disk state that lets a killed walk continue where it stopped, with the same result.

After each decoder layer the walk writes, in this order:

1. ``layer_NNNN.safetensors``: the finished layer's tensors;
2. ``inputs_NNNN.safetensors``: the next layer's inputs, named by the next layer's index;
3. ``walk.json``: the commit point, written last by an atomic rename; it names the inputs file of
   its step, so a crash between 2 and 3 leaves the previous commit, whose own inputs file is still
   there, in force (older inputs files are removed only after the commit).

A layer whose modules a method replaced (``Applied.replace``) is rebuilt on resume by that method's
``rebuild`` before its tensors are loaded, and every method's ``restore`` runs afterwards, so the
restored layer is the same object graph as the one the uninterrupted walk had.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError
from compress.plugin import LayerMethod

REPLACED = "replaced"  # key of a layer record: {module name in the layer: method name}


def assign_layer_state(layer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved layer state whose shapes may differ (pruned layers), resizing Linear modules."""
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = layer.get_submodule(module_name) if module_name else layer
        current = getattr(module, attr)
        if isinstance(current, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(tensor.to(current.dtype).clone(), requires_grad=current.requires_grad))
        else:
            setattr(module, attr, tensor.clone())
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            module.out_features, module.in_features = tensor.shape


def install(layers: torch.nn.ModuleList, index: int, name: str, module: torch.nn.Module) -> torch.nn.Module:
    """Put ``module`` at ``name`` inside decoder layer ``index`` ("" replaces the layer); returns the layer."""
    if not name:
        layers[index] = module
        return module
    layer = layers[index]
    parent_name, _, attr = name.rpartition(".")
    setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, module)
    return layer


class WalkState:
    """See the module docstring."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        meta_path = self.dir / "walk.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            raise CompressError(f"resume state in {self.dir} belongs to another run (different model, tokens or "
                                "methods); remove it or choose another state folder")
        return meta

    def save(self, next_layer: int, layer: torch.nn.Module, hidden: list[torch.Tensor], records: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        _atomic_save(state, self.dir / f"layer_{next_layer - 1:04d}.safetensors")
        inputs_name = f"inputs_{next_layer:04d}.safetensors"
        _atomic_save({f"batch_{i:05d}": t.contiguous() for i, t in enumerate(hidden)}, self.dir / inputs_name)
        meta = {"fingerprint": self.fingerprint, "next_layer": next_layer, "inputs": inputs_name, "records": records}
        tmp = self.dir / "walk.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.dir / "walk.json")  # the commit point: written last
        for old in self.dir.glob("inputs_*.safetensors"):
            if old.name != inputs_name:
                old.unlink(missing_ok=True)

    def restore(self, layers: torch.nn.ModuleList, hidden: list[torch.Tensor], meta: dict,
                methods: Sequence[LayerMethod]) -> None:
        """Rebuild and reload the finished layers and the next layer's inputs (``hidden`` in place)."""
        by_name = {m.name: m for m in methods}
        for index, record in zip(range(meta["next_layer"]), meta["records"]):
            for name, method_name in sorted(record.get(REPLACED, {}).items(), key=lambda item: len(item[0])):
                if method_name not in by_name:
                    raise CompressError(f"resume state in {self.dir}: layer {index} was changed by method "
                                        f"'{method_name}', which this walk does not run")
                install(layers, index, name, by_name[method_name].rebuild(layers[index], index, name, record))
            assign_layer_state(layers[index], load_file(str(self.dir / f"layer_{index:04d}.safetensors")))
            for method in methods:
                method.restore(layers[index], index, record)
        saved = load_file(str(self.dir / meta["inputs"]))
        hidden[:] = [saved[f"batch_{i:05d}"] for i in range(len(saved))]


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def fingerprint(model: torch.nn.Module, tokens: torch.Tensor, methods: Sequence[LayerMethod], batch_size: int,
                staged: bool = True) -> str:
    """Identify a run: the tokens, the method configs, the batch split and the model's shape and weights."""
    digest = hashlib.sha256()
    digest.update(tokens.numpy().tobytes())
    digest.update(repr([(m.name, repr(m.config)) for m in methods]).encode())
    digest.update(str(batch_size).encode())
    digest.update(b"staged" if staged else b"plain")  # the two paths round differently
    digest.update(repr(model.config.to_dict()).encode())
    for p in list(model.parameters())[:4]:
        digest.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()
