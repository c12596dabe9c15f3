"""The exporter that ships with the ``mlp-distill`` plugin (``compress.exporters`` entry point
``small-mlp``): safetensors weights plus the base config and the MLP width, and a ``load`` that
rebuilds the module classes, so ``compress.load(folder)`` reloads the model through the registry."""

import json

from safetensors.torch import load_file, save_file

from compress.exporters import Exporter
from tests.plugins.mlp_distill import SmallMLP

SPEC = "small_mlp.json"


class SmallMLPExporter(Exporter):
    name, kind = "small-mlp", "small-mlp"

    def holds(self, model):
        return all(isinstance(layer.mlp, SmallMLP) for layer in model.model.layers)

    def write(self, model, tokenizer, folder, options, record):
        model.config.save_pretrained(folder)
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / SPEC).write_text(json.dumps({"width": model.model.layers[0].mlp.fc_in.out_features}))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    def load(self, folder, dtype, device):
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder)), dtype=dtype)
        width = json.loads((folder / SPEC).read_text())["width"]
        for layer in model.model.layers:
            layer.mlp = SmallMLP(model.config.hidden_size, width).to(dtype)
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model.to(device).eval()
