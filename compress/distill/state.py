"""The resume state of a distillation: one folder (default ``<out>.partial``) beside the output.

::

    .compress-distill          marker: compress wrote this folder (only such a folder is ever removed)
    run.json                   the run's fingerprint (teacher, settings, windows, processes)
    walk-R-of-W/               process R's resumable ILD walk (compress.walk_state), removed when done
    ild-R-of-W.safetensors     process R's ILD'd mixers (its layers), ``<layer>.<kind>.<tensor name>``
    ild-R-of-W.json            their per-layer records
    smart.json                 SMART's measurement and choice
    kd/step-NNNNNN/            the KD loop's checkpoints (compress.train.checkpoint)

Every file is written under a temporary name and renamed into place, so a killed run leaves either
the previous state or the next one. ``--resume`` continues the run the folder belongs to; a folder of
another run, or one compress did not write, is an error and is left as it is.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError

log = logging.getLogger(__name__)
MARKER = ".compress-distill"
RUN_FILE = "run.json"


class DistillState:
    """See the module docstring."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.dir = Path(folder).expanduser().resolve()
        self.fingerprint = fingerprint

    # ------------------------------------------------------------ opening
    def ours(self) -> bool:
        return (self.dir / MARKER).is_file()

    def check(self, resume: bool, force: bool) -> bool:
        """Read-only checks before any work; True when the run continues this folder's state."""
        if not self.dir.exists():
            if resume:
                log.warning("--resume: no state in %s, starting from the beginning", self.dir)
            return False
        if not self.dir.is_dir() or not self.ours():
            raise CompressError(f"state folder {self.dir} exists and compress distill did not write it; remove it or "
                                "choose another state folder")
        if not resume:
            if force:
                return False
            raise CompressError(f"{self.dir} holds a distillation that did not finish; pass --resume to continue it "
                                "or --force to start over")
        try:
            saved = json.loads((self.dir / RUN_FILE).read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved != self.fingerprint:
            raise CompressError(f"state folder {self.dir} belongs to another run (a different teacher, settings, data "
                                "or number of processes); rerun with the same settings, or remove it")
        return True

    def open(self, continuing: bool) -> None:
        """Create the folder (the main process), or keep it when ``continuing``."""
        if self.dir.exists() and not continuing:
            self.remove()
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).write_text("written by compress distill; removed when the distillation is exported\n")
        _write_json(self.dir / RUN_FILE, {"fingerprint": self.fingerprint})

    def remove(self) -> None:
        if self.ours():
            shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ ILD
    def walk_dir(self, rank: int, world: int) -> Path:
        return self.dir / f"walk-{rank}-of-{world}"

    def _shard(self, rank: int, world: int) -> Path:
        return self.dir / f"ild-{rank}-of-{world}"

    def has_shard(self, rank: int, world: int) -> bool:
        base = self._shard(rank, world)
        return base.with_suffix(".json").is_file() and base.with_suffix(".safetensors").is_file()

    def save_shard(self, rank: int, world: int, bank: dict, records: dict[int, dict]) -> None:
        """Process ``rank``'s ILD'd mixers and records (the json is written last: it commits the shard)."""
        base = self._shard(rank, world)
        tmp = base.with_suffix(".safetensors.tmp")
        save_file(flatten_bank(bank), str(tmp))
        os.replace(tmp, base.with_suffix(".safetensors"))
        _write_json(base.with_suffix(".json"), {str(k): v for k, v in records.items()})

    def load_shards(self, world: int, layers: int) -> tuple[dict, list[dict]]:
        """The whole bank and the per-layer ILD records, from every process's shard."""
        bank: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        records: dict[int, dict] = {}
        for rank in range(world):
            base = self._shard(rank, world)
            try:
                tensors = load_file(str(base.with_suffix(".safetensors")))
                part = json.loads(base.with_suffix(".json").read_text())
            except Exception as exc:  # safetensors raises several types for a damaged file
                raise CompressError(f"state folder {self.dir}: {base.name} is missing or corrupt "
                                    f"({' '.join(str(exc).split())}); remove the folder to start over") from None
            records.update({int(k): v for k, v in part.items()})
            bank.update(unflatten_bank(tensors))
        missing = [i for i in range(layers) if i not in records or i not in bank]
        if missing:
            raise CompressError(f"state folder {self.dir}: layer {missing[0]} has no ILD result; remove the folder "
                                "to start over")
        return bank, [records[i] for i in range(layers)]

    # ------------------------------------------------------------ SMART and KD
    def read_json(self, name: str) -> dict | None:
        path = self.dir / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CompressError(f"state folder {self.dir}: {name} is corrupt ({exc}); remove the folder to start "
                                "over") from None

    def write_json(self, name: str, value: dict) -> None:
        _write_json(self.dir / name, value)

    @property
    def kd_dir(self) -> Path:
        return self.dir / "kd"


def flatten_bank(bank: dict) -> dict[str, torch.Tensor]:
    """An ILD bank (``bank[layer][kind][tensor name]``) as safetensors' flat ``<layer>.<kind>.<name>`` dict."""
    return {f"{index}.{kind}.{name}": t.contiguous() for index, kinds in bank.items()
            for kind, state in kinds.items() for name, t in state.items()}


def unflatten_bank(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    """The inverse of :func:`flatten_bank`."""
    bank: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        index, kind, name = key.split(".", 2)
        bank.setdefault(int(index), {}).setdefault(kind, {})[name] = tensor
    return bank


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    os.replace(tmp, path)
