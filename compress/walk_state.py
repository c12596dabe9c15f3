"""The on-disk state that lets a killed walk continue where it stopped, with the same result.

After each decoder layer the walk writes, in this order:

1. ``layer_NNNN.safetensors``: the finished layer's parameters and buffers, and the tensors each
   method keeps on its modules besides them (:meth:`LayerMethod.layer_state`, under
   ``method_state/<position>.<method name>/<key>``);
2. ``inputs_NNNN.safetensors``: the next layer's inputs, named by the next layer's index;
3. ``walk.json``: the commit point, written last by an atomic rename; it names the inputs file of
   its step, so a crash between 2 and 3 leaves the previous commit, whose own inputs file is still
   there, in force (older inputs files are removed only after the commit).

A layer whose modules a method replaced (``Applied.replace``) is rebuilt on resume by that method's
``rebuild`` before its tensors are loaded, and every method's ``restore`` runs afterwards with its
saved ``layer_state`` tensors, so the restored layer is the same object graph, with the same
attributes, as the one the uninterrupted walk had. A missing or unreadable file named by the commit
is one CompressError.
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
METHOD_STATE = "method_state/"  # prefix of the methods' own tensors in a layer file (never a state_dict key)


def method_key(position: int, method: LayerMethod) -> str:
    """The prefix of one method's tensors in a layer file: its position in the walk and its name."""
    return f"{METHOD_STATE}{position}.{method.name}/"


def assign_layer_state(layer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved layer state whose shapes may differ (pruned layers), resizing Linear modules."""
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = layer.get_submodule(module_name) if module_name else layer
        current = getattr(module, attr)
        if current is None and attr in module._parameters:  # e.g. a bias that pruning added to o_proj
            setattr(module, attr, torch.nn.Parameter(tensor.clone(), requires_grad=False))
        elif isinstance(current, torch.nn.Parameter):
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
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CompressError(f"resume state in {self.dir}: walk.json is corrupt ({_line(exc)}); remove the "
                                "folder to start over") from None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.fingerprint:
            raise CompressError(f"resume state in {self.dir} belongs to another run (different model, tokens or "
                                "methods); remove it or choose another state folder")
        next_layer, records = meta.get("next_layer"), meta.get("records")
        if not (isinstance(next_layer, int) and next_layer >= 1 and isinstance(records, list)
                and len(records) == next_layer and all(isinstance(r, dict) for r in records)
                and meta.get("inputs") == f"inputs_{next_layer:04d}.safetensors"):
            raise CompressError(f"resume state in {self.dir}: walk.json is corrupt (its layer count, records or "
                                "inputs file do not agree); remove the folder to start over")
        return meta

    def save(self, next_layer: int, layer: torch.nn.Module, hidden: list[torch.Tensor], records: list[dict],
             methods: Sequence[LayerMethod] = ()) -> None:
        """Write the finished layer ``next_layer - 1``, the next layer's inputs, then the commit."""
        self.dir.mkdir(parents=True, exist_ok=True)
        index = next_layer - 1
        state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        for position, method in enumerate(methods):
            prefix = method_key(position, method)
            for key, tensor in method.layer_state(layer, index).items():
                state[prefix + key] = tensor.detach().cpu().contiguous()
        _atomic_save(state, self.dir / f"layer_{index:04d}.safetensors")
        inputs_name = f"inputs_{next_layer:04d}.safetensors"
        _atomic_save({f"batch_{i:05d}": t.contiguous() for i, t in enumerate(hidden)}, self.dir / inputs_name)
        _commit(self.dir, {"fingerprint": self.fingerprint, "next_layer": next_layer, "inputs": inputs_name,
                           "records": records})
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
            saved = self._read(f"layer_{index:04d}.safetensors")
            own = {k: v for k, v in saved.items() if not k.startswith(METHOD_STATE)}
            try:
                assign_layer_state(layers[index], own)
            except (AttributeError, RuntimeError, ValueError) as exc:
                raise CompressError(f"resume state in {self.dir}: layer_{index:04d}.safetensors does not fit "
                                    f"layer {index} ({_line(exc)}); remove the folder to start over") from None
            for position, method in enumerate(methods):
                prefix = method_key(position, method)
                mine = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
                method.restore(layers[index], index, record, mine)
        saved = self._read(meta["inputs"])
        if sorted(saved) != [f"batch_{i:05d}" for i in range(len(hidden))]:
            raise CompressError(f"resume state in {self.dir}: {meta['inputs']} holds {len(saved)} batches, the "
                                f"walk has {len(hidden)}; remove the folder to start over")
        hidden[:] = [saved[f"batch_{i:05d}"] for i in range(len(saved))]

    def _read(self, name: str) -> dict[str, torch.Tensor]:
        path = self.dir / name
        if not path.is_file():
            raise CompressError(f"resume state in {self.dir} is incomplete: {name} is missing; remove the folder "
                                "to start over")
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise CompressError(f"resume state in {self.dir}: {name} is corrupt ({_line(exc)}); remove the "
                                "folder to start over") from None


def _line(exc: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _atomic_save(tensors: dict, path: Path) -> None:
    """Write a safetensors file under a temporary name, then rename it into place."""
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def _commit(directory: Path, meta: dict) -> None:
    """The commit point: ``walk.json`` written to a temporary file, then renamed into place."""
    tmp = directory / "walk.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, directory / "walk.json")


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
