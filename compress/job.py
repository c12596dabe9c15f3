"""What a job asks for: the model, the stages of methods, calibration, export and evaluation.

A :class:`Job` is what ``compress run RECIPE`` parses from YAML (:mod:`compress.recipe`), what every
CLI verb builds from its flags (a one-stage job) and what the Python API runs; the pipeline
(:mod:`compress.pipeline`) carries it out. Every section is a typed dataclass checked by
:func:`compress.config.make_config`, so a bad value names its field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compress.config import config_field
from compress.errors import CompressError
from compress.plugin import LayerMethod, Method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DataSection:
    source: str = config_field("generate", "Calibration text: generate, wikitext2, c4 or a local path.")
    samples: int = config_field(128, "Calibration samples.")
    seqlen: int = config_field(512, "Tokens per calibration sample.")
    seed: int = config_field(0, "Seed of the calibration windows.")

    def __post_init__(self):
        if self.samples <= 0 or self.seqlen <= 0:
            raise CompressError(f"samples and seqlen must be positive, got {self.samples} × {self.seqlen}")


@dataclass
class ExportSection:
    format: str = config_field("auto", "auto (the format the stages' results need, else safetensors), or an "
                                       "exporter's name: safetensors, compressed-tensors, gptq, ...")

    def __post_init__(self):
        from compress.exporters import exporter_names

        names = ("auto", *exporter_names())
        if self.format not in names:
            raise CompressError(f"field 'format' must be one of {', '.join(names)}, got {self.format!r}")


def _check_windows(section) -> None:
    if section.seqlen <= 0 or (section.windows is not None and section.windows <= 0) or section.batch_size <= 0:
        raise CompressError("seqlen, windows and batch_size must be positive")


@dataclass
class PerplexitySection:
    data: str = config_field("wikitext2", "Evaluation text.")
    seqlen: int = config_field(2048, "Tokens per window.")
    windows: int | None = config_field(None, "Score only the first K windows.")
    stride: int | None = config_field(None, "Window stride (default: seqlen).")
    batch_size: int = config_field(1, "Windows per forward.")

    def __post_init__(self):
        _check_windows(self)


@dataclass
class FidelitySection:
    reference: str | None = config_field(None, "Reference model (default: the recipe's model).")
    data: str = config_field("wikitext2", "Evaluation text.")
    seqlen: int = config_field(2048, "Tokens per window.")
    windows: int | None = config_field(None, "Score only the first K windows.")
    batch_size: int = config_field(1, "Windows per forward.")

    def __post_init__(self):
        _check_windows(self)


@dataclass
class Stage:
    method: Method
    options: dict

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def layerwise(self) -> bool:
        return isinstance(self.method, LayerMethod)


@dataclass
class Job:
    """One whole job. ``eval_before`` also measures the perplexity sections on the input model."""

    model: str
    stages: list[Stage]
    out: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    batch_size: int = 8
    data: DataSection = field(default_factory=DataSection)
    export: ExportSection = field(default_factory=ExportSection)
    perplexity: list[PerplexitySection] = field(default_factory=list)
    fidelity: FidelitySection | None = None
    eval_before: bool = False
    state_dir: str | None = None  # resumable walks: one sub-folder per walk
    command: str = "run"
    recipe_text: str | None = None  # written beside the output as recipe.yaml
    recipe: dict | None = None  # the parsed recipe, kept in compress.json
    path: str = "<job>"  # where the job came from (a recipe file), for messages

    def steps(self) -> list[list[Stage]]:
        """Stages grouped into steps: a run of consecutive layer-wise stages is one walk."""
        steps: list[list[Stage]] = []
        for stage in self.stages:
            if stage.layerwise and steps and steps[-1][0].layerwise:
                steps[-1].append(stage)
            else:
                steps.append([stage])
        return steps

    @property
    def needs_calibration(self) -> bool:
        """Whether some layer-wise stage observes its inputs (a data-free one, RTN, needs no text)."""
        return any(s.layerwise and s.method.needs_data for s in self.stages)

    @property
    def methods(self) -> list[Method]:
        return [s.method for s in self.stages]
