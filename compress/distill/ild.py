"""Intermediate layer distillation (ILD), Zebra-Llama's first stage, as a layer method of the walk.

The walk runs it teacher-forced: layer i's cached inputs X are the teacher's own hidden states (the
walk propagates with the teacher layer, which this method never changes) and the targets are the
teacher layer's outputs Y on them. Per layer, for each replacement mixer M (MLA and Mamba2, each
initialised from the layer's attention by :func:`compress.hybrid.build.mla_from_attention` /
:func:`~compress.hybrid.build.mamba2_from_attention`):

    A  = the teacher attention's output on X (after the input norm, before the residual)
    L(M) = mean_t ‖layer_M(X)_t − Y_t‖₂ + mean_t ‖M(norm(X))_t − A_t‖₂

where layer_M is the teacher layer with M as its mixer (norms and MLP frozen) and t runs over the
tokens of a batch. The sum of per-token L2 distances of the paper, divided by the token count (the
public Zebra-Llama trainer's ``torch.norm(..., dim=-1).mean()``), so the learning rate does not depend
on the batch size. AdamW on M's parameters only, float32 (a copy of the layer in float32 whatever the
model's dtype), one step per cached batch, ``epochs`` passes, linear warm-up over 1% of the steps then
cosine decay to zero, gradients clipped at norm 1. A mixer whose distance training did not lower (an
MLA started at full rank is already nearly exact; a learning rate too high for it) keeps its start
(``kept: initial`` in the record), so ILD never leaves a layer further from the teacher than its
initialisation.

Each layer's trained mixers go to ``bank[layer][kind]`` (their state dicts on the host, in the model's
dtype); :meth:`layer_state` hands them to a resumable walk and :meth:`restore` puts them back, so a
killed walk resumes to the same bank. Everything is seeded per layer and mixer: the result does not
depend on where the walk stopped, nor on which process trained the layer (``rank``/``world`` split the
layers between processes: layer i is trained by process i mod world; the others only propagate).

Memory beyond the walk's (host): the teacher attention outputs, N·L·H values; on the device: a float32
copy of one layer, its two mixers and AdamW's state for one mixer at a time.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from compress.config import config_field
from compress.devices import layer_output, to_device
from compress.errors import ConfigError, CompressError
from compress.plugin import Group, LayerContext, LayerMethod

log = logging.getLogger(__name__)
MIXER_KINDS = ("mla", "mamba2")


@dataclass
class ILDConfig:
    q_rank: int = config_field(0, "MLA query rank r_q.")
    kv_rank: int = config_field(0, "MLA latent rank r_kv.")
    rope_dim: int = config_field(0, "MLA RoPE dims d_rope.")
    mixers: list = config_field(list(MIXER_KINDS), "Mixers trained per layer: mla and/or mamba2.")
    epochs: int = config_field(1, "Passes over the layer's cached batches per mixer (one AdamW step per batch).")
    lr: float = config_field(1e-3, "Peak learning rate (linear warm-up over 1% of the steps, then cosine to 0).")
    seed: int = config_field(0, "Seed of the fresh Mamba2 parameters and of the batch order.")
    rank: int = config_field(0, "This process trains layers i with i mod world == rank.")
    world: int = config_field(1, "Processes that share the layers.")

    def __post_init__(self):
        bad = [m for m in self.mixers if m not in MIXER_KINDS]
        if bad or not self.mixers:
            raise ConfigError(f"field 'mixers' must list mla and/or mamba2, got {self.mixers!r}")
        if self.epochs < 1 or not self.lr > 0 or not 0 <= self.rank < self.world:
            raise ConfigError(f"ILD needs epochs ≥ 1, lr > 0 and 0 ≤ rank < world, got {self.epochs}, {self.lr}, "
                              f"{self.rank}, {self.world}")


class LayerDistillation(LayerMethod):
    """ILD of both replacement mixers of every layer (module docstring); the teacher is left as it is."""

    name = "zebra-ild"
    help = "Zebra-Llama intermediate layer distillation of MLA and Mamba2 mixers, teacher-forced, layer by layer."
    Config = ILDConfig
    needs_inputs = needs_teacher = teacher_forced = True

    def __init__(self, config: ILDConfig | None = None):
        super().__init__(config)
        self.bank: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self.zconfig = None
        self.dtype = torch.float32

    def prepare(self, model: nn.Module) -> None:
        """The MLA/Mamba2 shapes from the teacher (a config with MLA ranks on every layer)."""
        from compress.hybrid.build import check_ranks, hybrid_config, parent_shape

        shape = parent_shape(model)
        c = self.config
        check_ranks(shape, c.q_rank, c.kv_rank, c.rope_dim)
        self.zconfig = hybrid_config(model.config, shape, ["mla"] * shape.layers, c.q_rank, c.kv_rank, c.rope_dim)
        self.dtype = next(model.parameters()).dtype

    def owns(self, index: int) -> bool:
        return index % self.config.world == self.config.rank

    def groups(self, layer, index):
        return [Group(["self_attn"], stats="none", name="mixers")]

    def apply(self, ctx: LayerContext) -> dict:
        if self.zconfig is None:
            raise RuntimeError("LayerDistillation.prepare(model) must run before the walk")
        if not self.owns(ctx.index):
            return {"process": ctx.index % self.config.world}
        started = time.perf_counter()
        batches = list(zip(ctx.inputs, ctx.kwargs, ctx.teacher_outputs, attention_outputs(ctx)))
        work = copy.deepcopy(ctx.layer).float().requires_grad_(False)
        record: dict = {}
        for kind in self.config.mixers:
            mixer = self.initial_mixer(ctx.layer.self_attn, ctx.index, kind)
            record[kind] = fit_mixer(work, mixer, batches, ctx.device, self.config, self._seed(ctx.index, kind),
                                     f"ILD layer {ctx.index} {kind}")
            self.bank.setdefault(ctx.index, {})[kind] = {
                k: v.detach().to("cpu", self.dtype).clone() for k, v in mixer.state_dict().items()}
            log.info("ILD layer %d %s: distance %.4f → %.4f", ctx.index, kind, record[kind]["before"],
                     record[kind]["after"])
        record["seconds"] = round(time.perf_counter() - started, 2)
        return record

    def _seed(self, index: int, kind: str) -> int:
        return self.config.seed * 1_000_003 + index * 31 + MIXER_KINDS.index(kind)

    def initial_mixer(self, attention: nn.Module, index: int, kind: str) -> nn.Module:
        """Layer ``index``'s ``kind`` mixer initialised from its attention, float32, seeded."""
        from compress.hybrid.build import mamba2_from_attention, mla_from_attention

        build = {"mla": mla_from_attention, "mamba2": mamba2_from_attention}[kind]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._seed(index, kind))
            return build(attention, self.zconfig, index).float()

    def layer_state(self, layer, index: int) -> dict[str, torch.Tensor]:
        return {f"{kind}.{name}": t for kind, tensors in self.bank.get(index, {}).items()
                for name, t in tensors.items()}

    def restore(self, layer, index: int, record: dict, state: dict[str, torch.Tensor]) -> None:
        if not self.owns(index):
            return
        kinds = unflatten(state)
        if sorted(kinds) != sorted(self.config.mixers):
            raise CompressError(f"resume state: the ILD mixers of layer {index} are missing ({sorted(kinds)}); "
                                "remove the state folder to start over")
        self.bank[index] = kinds


def unflatten(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"mla.q_a_proj.weight": t, ...}`` → ``{"mla": {"q_a_proj.weight": t}, ...}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        kind, _, name = key.partition(".")
        out.setdefault(kind, {})[name] = tensor
    return out


@torch.no_grad()
def attention_outputs(ctx: LayerContext) -> list[torch.Tensor]:
    """The teacher attention's output on every cached batch (host), captured inside the layer's forward."""
    captured: list[torch.Tensor] = []
    handle = ctx.layer.self_attn.register_forward_hook(lambda m, args, out: captured.append(out[0].detach().cpu()))
    try:
        for hidden, kwargs in zip(ctx.inputs, ctx.kwargs):
            ctx.layer(hidden.to(ctx.device), **to_device(kwargs, ctx.device))
    finally:
        handle.remove()
    return captured


def _token_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the L2 distance along the hidden width (float32; ε keeps √ differentiable at 0)."""
    return (a.float() - b.float()).square().sum(-1).add(1e-12).sqrt().mean()


def fit_mixer(work: nn.Module, mixer: nn.Module, batches: list, device, config: ILDConfig, seed: int,
              desc: str) -> dict:
    """Train ``mixer`` inside ``work`` (a float32 copy of the teacher layer) on ``batches`` of (input, kwargs,
    teacher layer output, teacher attention output); returns the distance before and after, and the steps."""
    from compress.progress import bar

    work.self_attn = mixer.to(device)
    captured: list[torch.Tensor] = []
    handle = mixer.register_forward_hook(lambda m, args, out: captured.append(out[0]))

    def loss_of(batch) -> torch.Tensor:
        hidden, kwargs, target, attn = batch
        captured.clear()
        out = layer_output(work(hidden.to(device).float(), **to_device(kwargs, device)))
        return _token_distance(out, target.to(device)) + _token_distance(captured[0], attn.to(device))

    @torch.no_grad()
    def distance() -> float:
        mixer.eval()
        tokens = [b[0].shape[0] * b[0].shape[1] for b in batches]
        return sum(float(loss_of(b)) * n for b, n in zip(batches, tokens)) / sum(tokens)

    try:
        before = distance()
        initial = {k: v.detach().clone() for k, v in mixer.state_dict().items()}
        params = [p for p in mixer.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        total = config.epochs * len(batches)
        warm = max(1, round(0.01 * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warm if s < warm else
                                                      0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
        generator = torch.Generator().manual_seed(seed)
        progress = bar(desc, total=total, unit="step")
        first = last = None
        mixer.train()
        with torch.enable_grad():
            for epoch in range(config.epochs):
                for i in torch.randperm(len(batches), generator=generator).tolist():
                    loss = loss_of(batches[i])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    scheduler.step()
                    last = float(loss.detach())
                    first = last if first is None else first
                    progress.update(1)
                    progress.set_postfix(loss=f"{last:.4f}")
        progress.close()
        if not math.isfinite(last):
            raise CompressError(f"{desc}: the ILD loss became {last}; lower the ILD learning rate")
        for p in params:
            p.requires_grad_(False)
        after, kept = distance(), "trained"
        if after > before:  # training moved away (a near-exact SVD start, too high a rate): keep the start
            mixer.load_state_dict(initial)
            after, kept = before, "initial"
    finally:
        handle.remove()
        mixer.eval()
    return {"before": before, "after": after, "kept": kept, "steps": total, "first_loss": first, "last_loss": last}
