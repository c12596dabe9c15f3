"""Staged forward of a LLaMA-style decoder layer: observe each group where its input is, once.

A sequential method (GPTQ: q/k/v, then o, then gate/up, then down, each observed on the already
compressed inputs) would otherwise run the layer from its start for every group and once more to
propagate: about 2.4 forwards of the layer for the four groups plus one. The layer is a chain of four
observation points::

    x ─► norm ─►[0: q/k/v in]─► attention ─►[1: o in]─► r = x + o(·) ─► norm ─►[2: gate/up in]
      ─► act(gate)·up ─►[3: down in]─► out = r + down(·)

:class:`StagedForward` keeps every batch's progress along that chain (the attention context, the
residual stream, the FFN activation) and advances it only as far as the next group needs, with the
weights as they are at that moment. Every part of the layer then runs once, and the last advance
yields the layer's output, which replaces the separate propagate forward.

This is only correct for a method whose ``apply`` changes nothing but the weights of the group it was
given (``LayerMethod.stageable``): the progress already cached lies upstream of those modules. A
pruning method that cuts input columns of o_proj or down_proj (and the q/k/v or gate/up rows that
feed them: SlimGPT) reports the kept columns (``LayerMethod.kept_inputs``) and the cached attention
context or FFN activation is cut alike; a removed head or channel does not change the kept ones. A layer whose structure differs from the chain above (extra
norms, parallel attention/MLP) is detected by :func:`check_layer`, which compares the staged result
with the layer's own forward on one batch, and the walk falls back to the plain path.

Host memory on top of the walk's: the residual stream (N·L·H) and, at the last point, the FFN
activation (N·L·FFN), in the activations' dtype.
"""

from __future__ import annotations

import logging

import torch

from compress import arch
from compress.devices import layer_output, to_device, to_host
from compress.plugin import Group
from compress.stats import HessianAccumulator

log = logging.getLogger(__name__)

# the observation point of each module of a LLaMA decoder layer (see the module docstring)
POINTS = {name: arch.point(name) for name in arch.PROJECTIONS}
END = 4
_PARTS = arch.LAYER_PARTS  # input norm, attention, post-attention norm, MLP


class _Stop(Exception):
    pass


def has_structure(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` has the named parts of the chain (necessary, not sufficient: see check_layer)."""
    present = {name for name, _ in layer.named_modules()}
    return all(p in present for p in _PARTS) and arch.O in present and arch.DOWN in present


def group_point(group: Group) -> int | None:
    """The observation point of all the group's modules, or None when they are not on one point."""
    points = {POINTS.get(name) for name in group.modules}
    return points.pop() if len(points) == 1 and None not in points else None


def _input_of(module: torch.nn.Module, run) -> torch.Tensor:
    """Run ``run()`` until ``module`` is called and return the module's input (the rest is skipped)."""
    seen = []

    def hook(_module, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"{type(module).__name__} was not called")
    return seen[0]


class StagedForward:
    """The progress of every cached batch through one decoder layer (see the module docstring)."""

    def __init__(self, layer: torch.nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
                 device: torch.device):
        self.layer = layer
        self.hidden = hidden  # the layer inputs x per batch (host); never modified
        self.kwargs = kwargs
        self.device = device
        self.pin = device.type == "cuda"
        self.point = 0  # every batch is at this point (0 needs nothing cached: norm(x) is recomputed)
        self.carry: list[dict] = [{} for _ in hidden]  # per batch: "ctx" | "r", "m" | "out" (host)

    def _step(self, i: int, target: int, collect: HessianAccumulator | None) -> None:
        """Advance batch ``i`` to ``target``, adding that point's input to ``collect`` on the way."""
        layer, device = self.layer, self.device
        norm1, attn, norm2, mlp = (getattr(layer, part) for part in _PARTS)
        o_proj, down_proj = arch.projection(layer, arch.O), arch.projection(layer, arch.DOWN)
        carry = self.carry[i]
        x = self.hidden[i].to(device, non_blocking=True) if self.point <= 1 else None
        kwargs = to_device(self.kwargs[i], device, non_blocking=True) if self.point == 0 else None
        point = self.point
        if point == 0:
            value = norm1(x)
        elif point == 1:
            value = carry.pop("ctx").to(device, non_blocking=True)
        elif point == 2:
            value = norm2(carry["r"].to(device, non_blocking=True))
        elif point == 3:
            value = carry.pop("m").to(device, non_blocking=True)
        while True:
            if point == target:
                if collect is not None:
                    collect.add_batch(value)
                break
            if point == 0:
                value = _input_of(o_proj, lambda: attn(hidden_states=value, **kwargs))
            elif point == 1:
                r = x + o_proj(value)
                carry["r"] = to_host(r, self.pin)  # the residual stream, needed again at the end
                value = norm2(r)
            elif point == 2:
                value = _input_of(down_proj, lambda: mlp(value))
            elif point == 3:
                r = carry.pop("r").to(device, non_blocking=True)
                carry["out"] = to_host(r + down_proj(value), self.pin)
                point = END
                break
            point += 1
        if point == 1:
            carry["ctx"] = to_host(value, self.pin)
        elif point == 3:
            carry["m"] = to_host(value, self.pin)

    @torch.no_grad()
    def observe(self, group: Group, point: int, stats_dtype: torch.dtype = torch.float32) -> dict:
        """Advance every batch to ``point`` and return the statistics of the group's inputs there.

        The group's modules all see the same input, so they share one accumulator (read-only).
        """
        if point < self.point:
            raise ValueError(f"the staged forward is at point {self.point}, past {point}")
        first = self.layer.get_submodule(group.modules[0])
        stats = HessianAccumulator(first.in_features, self.device, stats_dtype, gram=group.stats == "hessian")
        for i in range(len(self.hidden)):
            self._step(i, point, stats)
        self.point = point
        return {name: stats for name in group.modules}

    def select_inputs(self, point: int, index: torch.Tensor) -> None:
        """Keep only the input columns ``index`` at ``point`` (a method cut o's or down's inputs)."""
        if point != self.point or point not in (1, 3):
            raise ValueError(f"inputs can only be cut at the current point of o_proj or down_proj (1 or 3), "
                             f"not at {point} (the forward is at {self.point})")
        key = "ctx" if point == 1 else "m"
        for carry in self.carry:
            carry[key] = carry[key].index_select(-1, index.to(carry[key].device))

    @torch.no_grad()
    def finish(self) -> list[torch.Tensor]:
        """Advance every batch to the end with the current weights; returns the outputs (host)."""
        outputs = []
        for i in range(len(self.hidden)):
            self._step(i, END, None)
            outputs.append(self.carry[i].pop("out"))
        self.point = END
        return outputs


@torch.no_grad()
def check_layer(layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, device: torch.device,
                tolerance: float = 1e-4) -> tuple[bool, str]:
    """Whether the staged chain reproduces ``layer``'s own forward on one batch (max abs difference
    ≤ tolerance · (1 + max |output|)). Returns (ok, reason)."""
    if not has_structure(layer):
        return False, "the layer lacks input_layernorm/self_attn.o_proj/post_attention_layernorm/mlp.down_proj"
    try:
        staged = StagedForward(layer, [hidden], [kwargs], device)
        got = staged.finish()[0].float()
        want = layer_output(layer(hidden.to(device), **to_device(kwargs, device))).float().cpu()
    except Exception as exc:  # any mismatch of structure: the plain path will do
        return False, f"the staged forward failed ({type(exc).__name__}: {exc})"
    diff = (got - want).abs().max().item()
    bound = tolerance * (1.0 + want.abs().max().item())
    if not diff <= bound:
        return False, f"the staged forward differs from the layer's by {diff:.3g} (> {bound:.3g})"
    return True, ""
