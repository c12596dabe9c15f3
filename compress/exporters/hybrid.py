"""``hybrid``: a Zebra-Llama hybrid (attention / MLA / Mamba2 layers) with the files that reload it.

The folder holds ``model.safetensors``, ``config.json`` (model type ``zebra_llama``, ``layer_types``
and the DeepSeek-style MLA names, an ``auto_map``), the tokenizer, and the self-contained modeling
files of :mod:`compress.hybrid` (they import only torch and transformers). It reloads through
:func:`compress.load` (this exporter's :meth:`load`, no remote code) and through
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compress.exporters.base import Exporter, register_exporter


@register_exporter
class HybridExporter(Exporter):
    name = "hybrid"
    kind = "hybrid"
    auto_priority = 20  # a hybrid is never written as a plain checkpoint by ``auto``
    help = "Zebra-Llama hybrid (attention / MLA / Mamba2 layers): safetensors, config and modeling files."

    def holds(self, model: torch.nn.Module) -> bool:
        from compress.hybrid import is_hybrid

        return is_hybrid(model)

    def write(self, model, tokenizer, folder: Path, options: dict, record: dict) -> None:
        import compress.hybrid as hybrid

        config = model.config
        config.architectures = ["ZebraLlamaForCausalLM"]
        config.auto_map = {"AutoConfig": "configuration_zebra_llama.ZebraLlamaConfig",
                           "AutoModelForCausalLM": "modeling_zebra_llama.ZebraLlamaForCausalLM"}
        model.save_pretrained(folder, safe_serialization=True)
        source = Path(hybrid.__file__).parent
        for name in hybrid.MODELING_FILES:
            (folder / name).write_text((source / name).read_text())
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def load(self, folder: Path, dtype: torch.dtype, device: str) -> torch.nn.Module:
        from compress.hybrid import ZebraLlamaForCausalLM, register_auto_classes
        from compress.models import model_weight_files

        register_auto_classes()
        model_weight_files(folder)  # safetensors only
        return ZebraLlamaForCausalLM.from_pretrained(str(folder), dtype=dtype, use_safetensors=True)
