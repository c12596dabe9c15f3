"""Reading and writing safetensors checkpoints one tensor (or one block of rows) at a time.

The safetensors layout is simple: 8 bytes of header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian data. Reading a block of rows is a seek and
a ``readinto`` into a fresh buffer, and writing is the header first (all shapes are known from the
plan) and then the data in header order. No file is memory-mapped, so the resident memory of a
transfer is the blocks it holds, not the pages of the checkpoints it has touched (a 70B transfer
stays within a laptop's memory).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and byte range inside the data section."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.shape else ()

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def read_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data section starts."""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or length > 100_000_000:
                raise ValueError(f"implausible header length {length}")
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        raise CompressError(f"corrupt safetensors file {file}: {exc}") from None
    return header, 8 + length


class Checkpoint:
    """The tensors of a Hugging Face folder (one file or shards with an index), read lazily."""

    def __init__(self, folder: str | os.PathLike, label: str = "model"):
        self.folder = Path(folder)
        self.label = label
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._files():
            header, data_start = read_header(file)
            size = file.stat().st_size
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in DTYPES:
                    raise CompressError(f"{label}: tensor {name} has unsupported dtype {entry['dtype']}")
                begin, end = entry["data_offsets"]
                if data_start + end > size:
                    raise CompressError(f"corrupt safetensors file {file}: truncated at tensor {name}")
                self.tensors[name] = TensorInfo(name, file, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                                data_start + begin, end - begin)

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CompressError(f"{self.label}: shard {missing[0]} listed in {INDEX_FILE} is missing")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise CompressError(f"{self.label}: no safetensors weights in {self.folder}")
        return files

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise CompressError(f"{self.label}: {self.folder} has no config.json")
        return json.loads(path.read_text())

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (the whole tensor by default), in its stored dtype."""
        info = self.tensors[name]
        stop = info.rows if stop is None else stop
        count = stop - start
        buffer = torch.empty(count * info.row_bytes, dtype=torch.uint8)
        with open(info.file, "rb") as handle:
            handle.seek(info.start + start * info.row_bytes)
            got = handle.readinto(memoryview(buffer.numpy()))
        if got != buffer.numel():
            raise CompressError(f"{self.label}: {info.file} ended while reading tensor {name}")
        shape = (count, *info.row_shape) if info.shape else ()
        return buffer.view(info.dtype).reshape(shape)


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class ShardedWriter:
    """Write tensors, whose names, dtypes and shapes are declared up front, into safetensors shards.

    Shards hold at most ``max_shard_bytes`` each (a tensor larger than that gets a shard of its
    own); with more than one shard an index ``model.safetensors.index.json`` is written, as
    ``save_pretrained`` does. Data must then be written in declaration order, block by block.
    """

    def __init__(self, folder: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 5 * 10**9, prefix: str = "model", metadata: dict | None = None):
        self.folder = folder
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for entry in entries:
            nbytes = tensor_bytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        count = len(shards)
        names = [f"{prefix}.safetensors"] if count == 1 else \
            [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shards = list(zip(names, shards))
        self.order = [(entry[0], tensor_bytes(entry[1], entry[2])) for _, shard in self.shards for entry in shard]
        self._position = 0  # index into self.order of the tensor being written
        self._written = 0  # bytes of it written so far
        self._shard = -1
        self._handle = None
        self._shard_ends = []
        n = 0
        for _, shard in self.shards:
            n += len(shard)
            self._shard_ends.append(n)
        if count > 1:
            total = sum(nbytes for _, nbytes in self.order)
            weight_map = {entry[0]: name for name, shard in self.shards for entry in shard}
            (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard += 1
        name, shard = self.shards[self._shard]
        header, offset = {"__metadata__": self.metadata}, 0
        for tensor_name, dtype, shape in shard:
            nbytes = tensor_bytes(dtype, shape)
            header[tensor_name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                   "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
        self._handle = open(self.folder / name, "wb")
        self._handle.write(len(text).to_bytes(8, "little"))
        self._handle.write(text)

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append the next block of rows of tensor ``name`` (the blocks of a tensor in row order)."""
        expected, nbytes = self.order[self._position]
        if name != expected:
            raise RuntimeError(f"writer expected tensor {expected}, got {name}")
        if self._written == 0 and (self._shard < 0 or self._position >= self._shard_ends[self._shard]):
            self._open_next_shard()
        data = block.detach().contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))
        self._written += data.numel()
        if self._written > nbytes:
            raise RuntimeError(f"tensor {name}: wrote {self._written} bytes, declared {nbytes}")
        if self._written == nbytes:
            self._position += 1
            self._written = 0

    def close(self) -> None:
        if self._position != len(self.order):
            missing = self.order[self._position][0]
            raise RuntimeError(f"writer closed before tensor {missing} was written")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
