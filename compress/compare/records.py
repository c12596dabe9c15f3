"""Reading an output folder's compress.json: what was done, its size, and the metrics with their protocols."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import CompressError

RECORD_FILE = "compress.json"  # as compress.export.RECORD_FILE (not imported: it would import torch)
# config fields always shown when a stage has them (the others only when they differ from the default)
HEADLINE = ("ratio", "schedule", "layers", "bits", "group_size", "r", "scale", "rank")


@dataclass(frozen=True)
class Protocol:
    """How a metric was measured; two values are comparable only under equal protocols."""

    kind: str  # "perplexity" or "fidelity"
    data: str
    seqlen: int
    windows: int | None = None  # perplexity: windows scored
    stride: int | None = None  # perplexity: window stride (seqlen when non-overlapping)
    reference: str | None = None  # fidelity: the reference model
    positions: int | None = None  # fidelity: positions compared

    def label(self) -> str:
        data = Path(self.data).name if ("/" in self.data or os.sep in self.data) else self.data
        if self.kind == "perplexity":
            text = f"{data} @{self.seqlen}"
            text += f" x{self.windows}" if self.windows is not None else " all windows"
            if self.stride is not None and self.stride != self.seqlen:
                text += f" stride {self.stride}"
            return text
        reference = Path(self.reference).name if self.reference and "/" in self.reference else self.reference
        positions = f", {self.positions} positions" if self.positions is not None else ""
        return f"vs {reference}, {data} @{self.seqlen}{positions}"

    def as_dict(self) -> dict:
        keys = ("data", "seqlen", "windows", "stride") if self.kind == "perplexity" else \
            ("reference", "data", "seqlen", "positions")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Perplexity:
    protocol: Protocol
    value: float


@dataclass
class Fidelity:
    protocol: Protocol
    kl_divergence: float
    top1_agreement: float


@dataclass
class Output:
    """One output folder as its compress.json describes it (or as :func:`measure` measured it)."""

    folder: Path
    name: str
    method: str
    options: str
    source: str | None
    format: str | None
    parameters: int | None
    bytes_on_disk: int
    perplexities: list[Perplexity] = field(default_factory=list)
    fidelities: list[Fidelity] = field(default_factory=list)
    measured: bool = False  # the metrics come from measure(), not from the record


def read_output(folder: str | os.PathLike, name: str | None = None) -> Output:
    """What ``folder``'s compress.json says; a missing folder or record, or a record that is not a JSON
    object, is a CompressError naming the folder."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise CompressError(f"output folder not found: {folder}")
    if not path.is_dir():
        raise CompressError(f"{folder} is a file, not an output folder of compress")
    record_file = path / RECORD_FILE
    if not record_file.is_file():
        raise CompressError(f"{folder} has no {RECORD_FILE}: compare reads the record that compress writes into "
                            f"every output folder (prune, quantize, run, transfer, adapt, hybridize)")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompressError(f"{record_file} is not valid JSON: {' '.join(str(exc).split())}") from None
    if not isinstance(record, dict):
        raise CompressError(f"{record_file} is not a compress record (a JSON object), got {type(record).__name__}")
    metrics = record.get("metrics") if isinstance(record.get("metrics"), dict) else {}
    return Output(folder=path, name=name or path.name, method=_methods(record), options=_options(record),
                  source=_source(record), format=record.get("format"), parameters=_parameters(record),
                  bytes_on_disk=folder_bytes(path), perplexities=_perplexities(metrics),
                  fidelities=_fidelities(metrics))


def read_outputs(folders: list) -> list[Output]:
    """Every folder's record, all checked before anything else happens; each named by its folder's name
    (its path where two names clash)."""
    if not folders:
        raise CompressError("give at least one output folder to compare")
    names = [Path(f).expanduser().name for f in folders]
    clashes = {n for n, c in Counter(names).items() if c > 1}
    return [read_output(f, str(f) if n in clashes else n) for f, n in zip(folders, names)]


def folder_bytes(folder: Path) -> int:
    """Bytes of the folder's safetensors files (as compress.metrics.cost.bytes_on_disk)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _stages(record: dict) -> list[dict]:
    stages = record.get("stages")
    return [s for s in stages if isinstance(s, dict) and s.get("method")] if isinstance(stages, list) else []


def _methods(record: dict) -> str:
    stages = _stages(record)
    if stages:
        return "+".join(str(s["method"]) for s in stages)
    return str(record.get("method") or record.get("command") or "?")


def _options(record: dict) -> str:
    """The stages' notable options: the HEADLINE fields they have and every field off its default."""
    stages = _stages(record) or [{"method": record.get("method"), "config": record.get("config")}]
    if record.get("command") == "adapt" and isinstance(record.get("adapter"), dict):
        stages = [{"method": record.get("method"), "config": record["adapter"]}]
    parts = []
    for stage in stages:
        config = stage.get("config")
        if not isinstance(config, dict):
            continue
        defaults = _defaults(str(stage.get("method")))
        for key, value in config.items():
            if key in HEADLINE and value is not None or (defaults and key in defaults and value != defaults[key]):
                parts.append(f"{key}={_short(value)}")
    return " ".join(dict.fromkeys(parts))


def _defaults(method: str) -> dict:
    """The registered method's Config defaults as JSON values ({} for a method not registered here)."""
    import dataclasses

    try:
        from compress.plugin import get_method

        cls = get_method(method)
        config = cls.Config()
    except Exception:  # an unknown or third-party method not installed: show the headline fields only
        return {}
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _source(record: dict) -> str | None:
    source = record.get("source") or record.get("source_model")
    if isinstance(source, dict):  # transfer: {"source base": ..., "source fine-tuned model": ..., "target base": ...}
        source = source.get("target base") or next(iter(source.values()), None)
    return None if source is None else str(source)


def _parameters(record: dict) -> int | None:
    """The parameter count after the work: the pipeline's ``parameters.after``, else the last stage's."""
    params = record.get("parameters")
    if isinstance(params, dict) and isinstance(params.get("after"), int):
        return params["after"]
    for stage in reversed(_stages(record)):
        result = stage.get("result")
        if isinstance(result, dict) and isinstance(result.get("parameters"), dict):
            after = result["parameters"].get("after")
            if isinstance(after, int):
                return after
    return None


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _perplexities(metrics: dict) -> list[Perplexity]:
    """The record's perplexities with their protocols (the pipeline writes a list of them; a single
    object is read too). The legacy ``perplexity_after`` of ``compress prune --eval`` is the same number
    as the list's and is not read twice."""
    items = metrics.get("perplexity")
    items = [items] if isinstance(items, dict) else items if isinstance(items, list) else []
    out = []
    for item in items:
        if not (isinstance(item, dict) and _number(item.get("perplexity")) and isinstance(item.get("seqlen"), int)):
            continue
        protocol = Protocol("perplexity", str(item.get("data", "?")), item["seqlen"], windows=item.get("windows"),
                            stride=item.get("stride", item["seqlen"]))
        out.append(Perplexity(protocol, float(item["perplexity"])))
    if not out and _number(metrics.get("perplexity_after")) and isinstance(metrics.get("eval_seqlen"), int):
        seqlen = metrics["eval_seqlen"]
        out.append(Perplexity(Protocol("perplexity", "wikitext2", seqlen, windows=metrics.get("eval_windows"),
                                       stride=seqlen), float(metrics["perplexity_after"])))
    return out


def _fidelities(metrics: dict) -> list[Fidelity]:
    item = metrics.get("fidelity")
    items = [item] if isinstance(item, dict) else item if isinstance(item, list) else []
    out = []
    for item in items:
        if not (isinstance(item, dict) and _number(item.get("kl_divergence")) and _number(item.get("top1_agreement"))):
            continue
        protocol = Protocol("fidelity", str(item.get("data", "?")), int(item.get("seqlen", 0)),
                            reference=None if item.get("reference") is None else str(item["reference"]),
                            positions=item.get("positions"))
        out.append(Fidelity(protocol, float(item["kl_divergence"]), float(item["top1_agreement"])))
    return out
