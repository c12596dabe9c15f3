"""The layer walk: one pass through the decoder layers that every layer-wise method shares.

::

    capture layer-0 inputs and every layer's kwargs ──► for each decoder layer:
        onload → [teacher outputs] → for each method, for each group: observe (hooks) → apply
        (LayerContext in; weights changed in place, or modules / the layer replaced)
        → propagate (the compressed layer's outputs, or the teacher's when a method is teacher-forced,
          become the next layer's inputs) → offload

Only one decoder layer is on the compute device at a time; the activations live on the host
(pinned memory when the device is CUDA). Memory (float32 activations):

* host   ≈ model bytes + N·L·H·4 (one copy of the hidden states; each batch is replaced in place)
* device ≈ one layer + its statistics (in² · 4 bytes per observed input width) + one batch's
  intermediates (b·L·max(H, FFN)·4 plus the attention scores of one batch)

for N samples of L tokens and hidden size H; a method that runs staged (compress.staged: GPTQ, RTN,
SlimGPT) adds up to N·L·(H + FFN) activations on the host while a layer is in progress, and a method
that asks for the teacher layer's outputs (layer-wise distillation) adds N·L·H. Each layer's own call
kwargs are captured once, before the walk, with the layers run as identity stubs (a hybrid's layers may
take different ones); tensors shared by all layers (rotary tables, the mask) are held once. With
``state_dir`` set the walk is resumable: after each layer it writes the compressed layers so far, the
next layer's inputs and the records, and a later call with the same arguments continues from there
and ends with the same weights.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from compress.devices import layer_output, to_device, to_host
from compress.errors import CompressError
from compress.models import decoder_layers
from compress.plugin import Applied, Group, LayerContext, LayerMethod
from compress.progress import bar
from compress.staged import StagedForward, check_layer, group_point
from compress.stats import HessianAccumulator
from compress.walk_state import REPLACED, WalkState, fingerprint, install

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the last layer's capture stub to stop the model forward once inputs are captured."""


class _StopLayer(Exception):
    """Raised once every observed module of a group has seen its input (rest of layer not needed)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but no CUDA device is available")
    return device


@dataclass
class LayerInputs:
    """Cached inputs of the current decoder layer: hidden states per batch and each layer's own kwargs."""

    hidden: list[torch.Tensor]  # each (b, L, H) on the host
    per_layer: list[list[dict]]  # [layer][batch]: position_embeddings, attention_mask, position_ids, ...
    layer: int = 0  # the decoder layer these inputs are for

    @property
    def kwargs(self) -> list[dict]:
        """The current layer's call kwargs, per batch."""
        return self.per_layer[self.layer]


@dataclass
class WalkResult:
    records: list[dict] = field(default_factory=list)  # per layer: {"layer": i, "<method>": {...}}
    seconds: float = 0.0
    resumed_from: int = 0
    hidden: list[torch.Tensor] | None = None  # the last layer's outputs per batch, when asked for


def _host_kwargs(kwargs: dict, memo: dict) -> dict:
    """A layer's kwargs on the host; a tensor shared by several layers (the rotary tables, the mask)
    is copied once (``memo``: id → host copy), so per-layer kwargs cost no more than one layer's."""
    def host(obj):
        if torch.is_tensor(obj):
            if id(obj) not in memo:
                memo[id(obj)] = (obj, obj.detach().to("cpu"))  # keep obj alive so its id stays unique
            return memo[id(obj)][1]
        if isinstance(obj, (tuple, list)):
            return type(obj)(host(o) for o in obj)
        if isinstance(obj, dict):
            return {k: host(v) for k, v in obj.items()}
        return obj

    kept = {k: host(v) for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "cache")}
    kept["use_cache"] = False
    return kept


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int) -> LayerInputs:
    """Keep layer 0's real inputs and every decoder layer's own call kwargs (a hybrid's layers may take
    different ones). The layers run as identity stubs while capturing: only the embedding and the
    model-level preparation (rotary tables, masks) are computed."""
    layers = decoder_layers(model)
    base = model.model
    moved = [m for m in (base.embed_tokens, getattr(base, "rotary_emb", None)) if m is not None]
    for module in moved:
        module.to(device)
    hidden: list[torch.Tensor] = []
    per_layer: list[list[dict]] = [[] for _ in layers]
    pin = device.type == "cuda"
    memo: dict = {}

    def stub(index):
        def forward(*args, **kwargs):
            states = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                hidden.append(to_host(states, pin))
            per_layer[index].append(_host_kwargs(kwargs, memo))
            if index == len(layers) - 1:
                raise _Captured
            return states
        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward (hooks) to restore
    for index, layer in enumerate(layers):
        layer.forward = stub(index)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            memo.clear()
            try:
                base(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward  # back to the class's forward
            else:
                layer.forward = forward
        for module in moved:
            module.to("cpu")
    missing = [i for i, kw in enumerate(per_layer) if len(kw) != len(hidden)]
    if missing:
        raise CompressError(f"decoder layer {missing[0]} was not called by the model's forward")
    return LayerInputs(hidden, per_layer)


@torch.no_grad()
def layer_outputs(layer: torch.nn.Module, inputs: LayerInputs, device: torch.device) -> list[torch.Tensor]:
    """The layer's output on every cached batch (host), the inputs left as they are."""
    pin = device.type == "cuda"
    return [to_host(layer_output(layer(states.to(device, non_blocking=True), **to_device(kwargs, device))), pin)
            for states, kwargs in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def observe_group(layer: torch.nn.Module, group: Group, inputs: LayerInputs, device: torch.device,
                  stats_dtype: torch.dtype = torch.float32) -> dict[str, HessianAccumulator]:
    """Run the layer over every batch and accumulate the input statistics of ``group``'s modules.

    The forward stops as soon as all the group's modules have seen their input: later parts of the
    layer are not needed for these statistics. Modules fed the very same input tensor (q/k/v, gate/up)
    share one accumulator, so their Σxᵀx is computed once: treat the statistics as read-only.
    """
    modules = {name: layer.get_submodule(name) for name in group.modules}
    stats = {name: HessianAccumulator(m.in_features, device, stats_dtype, gram=group.stats == "hessian")
             for name, m in modules.items()}
    seen: set[str] = set()
    batch_inputs: dict[str, torch.Tensor] = {}  # this batch's input of each module seen so far
    shared: dict[str, str] = {}  # module → the module whose accumulator it shares (decided on batch 0)

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            owner = shared.get(name)
            if owner is None and first_batch[0]:
                owner = next((n for n, t in batch_inputs.items() if t is x and n not in shared), None)
                if owner is not None:
                    shared[name] = owner
                    stats[name] = stats[owner]
            if owner is None:
                stats[name].add_batch(x)
            batch_inputs[name] = x
            seen.add(name)
            if len(seen) == len(modules):
                raise _StopLayer
        return hook

    first_batch = [True]

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        for states, kwargs in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            try:
                layer(states.to(device, non_blocking=True), **to_device(kwargs, device))
            except _StopLayer:
                pass
            first_batch[0] = False
            batch_inputs.clear()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def propagate(layer: torch.nn.Module, inputs: LayerInputs, device: torch.device) -> None:
    """Replace every cached batch by the layer's output on it (the next layer's input), batch by batch
    (one copy of the activations at a time)."""
    pin = device.type == "cuda"
    for i, (states, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        out = layer_output(layer(states.to(device, non_blocking=True), **to_device(kwargs, device)))
        inputs.hidden[i] = to_host(out, pin)


class _StagingCheck:
    """Checks once per walk and layer class (hybrid models mix them), on the first such layer that asks,
    that the staged forward matches the layer's own."""

    def __init__(self):
        self.results: dict[type, bool] = {}

    def ok(self, layer: torch.nn.Module, inputs: LayerInputs, device: torch.device) -> bool:
        kind = type(layer)
        if kind not in self.results:
            self.results[kind], reason = check_layer(layer, inputs.hidden[0], inputs.kwargs[0], device)
            if not self.results[kind]:
                log.info("staged forward not used for %s (%s); every group re-runs the layer", kind.__name__, reason)
        return self.results[kind]


def walk(model: torch.nn.Module, tokens: torch.Tensor, methods: Sequence[LayerMethod] = (), *,
         device: str | torch.device = "auto", batch_size: int = 8, state_dir: str | os.PathLike | None = None,
         stats_dtype: torch.dtype = torch.float32,
         on_layer_done: Callable[[int, torch.nn.Module], None] | None = None,
         keep_hidden: bool = False, staged: bool = True) -> WalkResult:
    """Walk ``model``'s decoder layers over ``tokens`` (N, L), applying ``methods`` in order.

    The model stays on the host; each layer visits ``device`` in turn. Returns per-layer records.
    ``staged`` lets stageable methods (GPTQ, RTN, SlimGPT) observe their groups with a staged forward
    that runs each part of a LLaMA-style layer once (compress.staged); off, every group re-runs the layer.
    When a method asks for the teacher layer's outputs (``needs_teacher``) they are computed with the
    layer as it is before any method of this walk changes it; when one is ``teacher_forced`` the next
    layer's inputs are those outputs. ``on_layer_done(index, layer)`` is called after each layer is
    compressed, propagated and saved. ``keep_hidden`` keeps the last layer's outputs (before the final
    norm) in the result.
    """
    device = resolve_device(device)
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise CompressError(f"calibration tokens must be a non-empty (samples, seqlen) tensor, got {tuple(tokens.shape)}")
    start_time = time.perf_counter()
    model.to("cpu")
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = decoder_layers(model)
    state = WalkState(state_dir, fingerprint(model, tokens, methods, batch_size, staged)) if state_dir else None
    meta = state.load() if state else None
    inputs = capture_inputs(model, tokens, device, batch_size)
    result = WalkResult()
    first = 0
    if meta is not None:
        first = result.resumed_from = meta["next_layer"]
        result.records = meta["records"]
        state.restore(layers, inputs.hidden, meta, methods)
        log.info("resuming the walk at layer %d of %d from %s", first, len(layers), state.dir)
    step = _LayerStep(methods, device, stats_dtype, staged)
    progress = bar("walking layers", total=len(layers), unit="layer")
    progress.update(first)
    try:
        for index in range(first, len(layers)):
            inputs.layer = index
            record = step.run(layers, index, inputs)
            result.records.append(record)
            if state:
                state.save(index + 1, layers[index], inputs.hidden, result.records, methods)
            if on_layer_done:
                on_layer_done(index, layers[index])
            progress.update(1)
        for method in methods:
            method.finish(model)
    finally:
        progress.close()
        model.config.use_cache = use_cache
    result.seconds = time.perf_counter() - start_time
    if keep_hidden:
        result.hidden = inputs.hidden
    return result


class _LayerStep:
    """One walk step: onload a layer, run every method's groups on it, propagate, offload."""

    def __init__(self, methods: Sequence[LayerMethod], device: torch.device, stats_dtype: torch.dtype, staged: bool):
        self.methods = methods
        self.device = device
        self.stats_dtype = stats_dtype
        self.use_staged = staged
        self.staging = _StagingCheck()
        self.needs_teacher = any(m.needs_teacher or m.teacher_forced for m in methods)
        self.teacher_forced = any(m.teacher_forced for m in methods)

    def run(self, layers: torch.nn.ModuleList, index: int, inputs: LayerInputs) -> dict:
        device = self.device
        layer = layers[index] = layers[index].to(device)
        record: dict = {"layer": index}
        teacher = layer_outputs(layer, inputs, device) if self.needs_teacher else None
        staged = None  # the staged forward of the current method, while its groups allow one
        for method in self.methods:
            staged = None  # progress cached for another method's groups is stale now
            for group in method.groups(layer, index):
                point = group_point(group) if (self.use_staged and method.stageable) else None
                if staged is not None and (point is None or point < staged.point):
                    staged = None  # a group out of the chain's order: back to the plain path
                stats, staged = self._observe(layer, group, point, staged, inputs)
                ctx = LayerContext(layer, index, group, stats, device, inputs.hidden, inputs.kwargs, teacher)
                applied = method.apply(ctx)
                del ctx, stats
                if not isinstance(applied, Applied):
                    applied = Applied(record=applied or {})
                kept = method.kept_inputs() if method.stageable else None
                if kept and staged is not None:
                    staged.select_inputs(point, kept[group.modules[0]])
                if applied.record:
                    record.setdefault(method.name, {}).update(applied.record)
                for name, module in sorted(applied.replace.items(), key=lambda item: len(item[0])):
                    layer = install(layers, index, name, module.to(device))
                    record.setdefault(REPLACED, {})[name] = method.name
                    staged = None  # the staged chain holds the replaced modules
        if self.teacher_forced:
            inputs.hidden[:] = teacher  # the next layer sees the original model's hidden states
        elif staged is not None:  # the last method ran staged: its last advance is the propagation
            inputs.hidden[:] = staged.finish()
        else:
            propagate(layer, inputs, device)
        layers[index] = layer.to("cpu")
        return record

    def _observe(self, layer, group: Group, point: int | None, staged, inputs: LayerInputs):
        """The group's input statistics, through the staged forward when the group allows one."""
        if group.stats == "none":
            return {}, staged
        if staged is None and point is not None and self.staging.ok(layer, inputs, self.device):
            staged = StagedForward(layer, inputs.hidden, inputs.kwargs, self.device)
        if staged is not None:
            return staged.observe(group, point, self.stats_dtype), staged
        return observe_group(layer, group, inputs, self.device, self.stats_dtype), staged


def walk_memory_formula(model: torch.nn.Module, samples: int, seqlen: int) -> dict[str, int]:
    """The host-memory formula of the module docstring, in bytes."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = model.config.hidden_size
    return {"model_bytes": params, "activation_bytes": samples * seqlen * hidden * 4,
            "host_bytes": params + samples * seqlen * hidden * 4}
