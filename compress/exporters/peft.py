"""``peft``: an adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``) whose
``base_model_name_or_path`` is the local base folder; with ``merge``, merged full weights that stock
transformers loads, and the adapter in ``adapter/``. This is what ``compress adapt`` writes.

An unmerged adapter folder has no ``config.json``; :meth:`PeftExporter.load` rebuilds it (base model
through :func:`compress.models.load_model`, then the adapter), so :func:`compress.load` reads it too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import CompressError
from compress.exporters.base import Exporter, register_exporter

ADAPTER_CONFIG = "adapter_config.json"


@register_exporter
class PeftExporter(Exporter):
    name = "peft"
    kind = "adapter"
    auto_priority = 10
    help = "peft adapter (base_model_name_or_path = the local base folder); merge: merged weights + adapter/."
    option_defaults = {"merge": False, "base": None}

    def holds(self, model: torch.nn.Module) -> bool:
        return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")

    def save(self, model, tokenizer, out, record, *, source=None, force=False, extra_files=None, options=None):
        options = dict(options or {})
        if options.get("base") is None and source is not None:  # the base the adapter was trained on
            options["base"] = source[-1] if isinstance(source, (list, tuple)) else source
        return super().save(model, tokenizer, out, record, source=source, force=force, extra_files=extra_files,
                            options=options)

    def output_bytes(self, model, options: dict) -> int:
        """The adapter's tensors (the trainable ones); with ``merge`` the merged model's too."""
        from compress.export import tensor_bytes

        adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return adapter + (tensor_bytes(model) if options.get("merge") else 0)

    def write(self, model, tokenizer, folder: Path, options: dict, record: dict) -> None:
        if options["base"] is not None:
            for config in model.peft_config.values():
                config.base_model_name_or_path = str(options["base"])
        adapter_dir = folder / "adapter" if options["merge"] else folder
        model.save_pretrained(adapter_dir, safe_serialization=True)
        if options["merge"]:
            merged = model.merge_and_unload()
            merged.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def load(self, folder: Path, dtype: torch.dtype, device: str) -> torch.nn.Module | None:
        folder = Path(folder)
        if (folder / "config.json").is_file() or not (folder / ADAPTER_CONFIG).is_file():
            return None  # merged weights: a plain checkpoint
        from peft import PeftModel

        from compress.models import load_model

        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base:
            raise CompressError(f"the adapter in {folder} does not name its base model (base_model_name_or_path)")
        try:
            model = load_model(base, dtype=dtype, device=device, tokenizer=False).model
        except CompressError as exc:
            raise CompressError(f"the adapter in {folder} needs its base model: {exc}") from None
        from compress.methods.bone.adapter import quiet_peft

        with quiet_peft():
            return PeftModel.from_pretrained(model, str(folder)).eval()
