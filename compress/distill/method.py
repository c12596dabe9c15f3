"""``zebra-distill``: the whole Zebra-Llama distillation as a whole-model method, for recipe stages.

A recipe stage ``{method: zebra-distill, options: {...}}`` (the fields of
:class:`compress.distill.config.DistillConfig`, the same settings as the ``compress distill`` flags)
turns the job's model into a distilled hybrid, which the ``hybrid`` exporter writes. Its resume state
sits in ``state_dir`` (default ``<out>.partial``); a rerun of the same recipe continues it (as a
``nas`` stage continues its search), and it is removed once the hybrid is built.
"""

from __future__ import annotations

from compress.distill.config import DistillConfig
from compress.plugin import ModelMethod, RunContext, register


@register
class ZebraDistill(ModelMethod):
    name = "zebra-distill"
    help = ("Zebra-Llama: layer-wise distillation of MLA and Mamba2 mixers, SMART layer choice, end-to-end KD; "
            "writes a hybrid.")
    Config = DistillConfig
    output_format = "hybrid"

    def input_paths(self) -> list[str]:
        from compress.distill.plan import data_inputs

        return data_inputs(self.config)

    def run(self, ctx: RunContext) -> dict:
        from compress.distill.run import Distillation

        job = Distillation(ctx.model, ctx.tokenizer, self.config, ctx.out, source=ctx.source or "model",
                           device=ctx.device.type, resume=True)
        result = job.run()
        if job.main:
            job.state.remove()
        self.chosen = {"mla_layers": result.record["mla_layers"],
                       "kv_cache_fraction": result.record["kv_cache_fraction"]}
        return {"model": result.model, **result.record}

    def summary(self) -> dict:
        return getattr(self, "chosen", {})
