"""The layer walk: one pass through the decoder layers that every layer-wise method shares.

::

    capture layer-0 inputs ──► for each decoder layer:
        onload → for each method, for each group: observe (hooks) → apply
        → propagate (the compressed layer's outputs become the next layer's inputs) → offload

Only one decoder layer is on the compute device at a time; the activations live on the host
(pinned memory when the device is CUDA). Memory (float32 activations):

* host   ≈ model bytes + N·L·H·4 (one copy of the hidden states; each batch is replaced in place)
* device ≈ one layer + its statistics (in² · 4 bytes per observed input width) + one batch's
  intermediates (b·L·max(H, FFN)·4 plus the attention scores of one batch)

for N samples of L tokens and hidden size H; a method that runs staged (compress.staged: GPTQ, RTN,
SlimGPT) adds up to N·L·(H + FFN) activations on the host while a layer is in progress. With
``state_dir`` set the walk is resumable: after each layer it writes the compressed layers so far, the
next layer's inputs and the records, and a later call with the same arguments continues from there
and ends with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from compress.devices import layer_output, to_device, to_host
from compress.errors import CompressError
from compress.methods.base import Group, LayerMethod
from compress.models import decoder_layers
from compress.progress import bar
from compress.staged import StagedForward, check_layer, group_point
from compress.stats import HessianAccumulator

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the layer-0 pre-hook to stop the model forward once inputs are captured."""


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
    """Cached inputs of the current decoder layer: hidden states per batch and the shared kwargs."""

    hidden: list[torch.Tensor]  # each (b, L, H) on the host
    kwargs: list[dict]  # per batch: position_embeddings, attention_mask, position_ids, ...


@dataclass
class WalkResult:
    records: list[dict] = field(default_factory=list)  # per layer: {"layer": i, "<method>": {...}}
    seconds: float = 0.0
    resumed_from: int = 0
    hidden: list[torch.Tensor] | None = None  # the last layer's outputs per batch, when asked for


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int) -> LayerInputs:
    """Run the model up to layer 0 and keep that layer's real inputs (args and kwargs)."""
    layers = decoder_layers(model)
    base = model.model
    moved = [m for m in (base.embed_tokens, getattr(base, "rotary_emb", None)) if m is not None]
    for module in moved:
        module.to(device)
    hidden, kwargs_list = [], []
    pin = device.type == "cuda"

    def hook(module, args, kwargs):
        states = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(to_host(states, pin))
        kept = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
        kept["use_cache"] = False
        kwargs_list.append(to_device(kept, "cpu"))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            try:
                base(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
        for module in moved:
            module.to("cpu")
    return LayerInputs(hidden, kwargs_list)


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


@torch.no_grad()
def propagate(layer: torch.nn.Module, inputs: LayerInputs, device: torch.device) -> None:
    """Replace every cached batch by the layer's output on it (the next layer's input)."""
    pin = device.type == "cuda"
    for i, (states, kwargs) in enumerate(zip(inputs.hidden, inputs.kwargs)):
        out = layer_output(layer(states.to(device, non_blocking=True), **to_device(kwargs, device)))
        inputs.hidden[i] = to_host(out, pin)


def assign_layer_state(layer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved layer state whose shapes may differ (pruned layers), resizing Linear modules."""
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = layer.get_submodule(module_name) if module_name else layer
        current = getattr(module, attr)
        if isinstance(current, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(tensor.to(current.dtype).clone(), requires_grad=current.requires_grad))
        else:
            setattr(module, attr, tensor.clone())
        if isinstance(module, torch.nn.Linear) and attr == "weight":
            module.out_features, module.in_features = tensor.shape


class WalkState:
    """The on-disk state that lets a killed walk continue: see the module docstring."""

    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        meta_path = self.dir / "walk.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") != self.fingerprint:
            raise CompressError(f"resume state in {self.dir} belongs to another run (different model, tokens or "
                                "methods); remove it or choose another state folder")
        return meta

    def save(self, next_layer: int, layer: torch.nn.Module, inputs: LayerInputs, records: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        index = next_layer - 1
        state = {k: v.detach().cpu().contiguous() for k, v in layer.state_dict().items()}
        _atomic_save(state, self.dir / f"layer_{index:04d}.safetensors")
        hidden = {f"batch_{i:05d}": t.contiguous() for i, t in enumerate(inputs.hidden)}
        _atomic_save(hidden, self.dir / "inputs.safetensors")
        meta = {"fingerprint": self.fingerprint, "next_layer": next_layer, "records": records}
        tmp = self.dir / "walk.json.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self.dir / "walk.json")  # the commit point: written last

    def restore(self, model: torch.nn.Module, inputs: LayerInputs, next_layer: int) -> None:
        layers = decoder_layers(model)
        for index in range(next_layer):
            assign_layer_state(layers[index], load_file(str(self.dir / f"layer_{index:04d}.safetensors")))
        hidden = load_file(str(self.dir / "inputs.safetensors"))
        inputs.hidden[:] = [hidden[f"batch_{i:05d}"] for i in range(len(hidden))]


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def fingerprint(model: torch.nn.Module, tokens: torch.Tensor, methods: Sequence[LayerMethod], batch_size: int,
                staged: bool = True) -> str:
    """Identify a run: the tokens, the method configs, the batch split and the model's shape and weights."""
    digest = hashlib.sha256()
    digest.update(tokens.numpy().tobytes())
    digest.update(repr([(m.name, repr(m.config)) for m in methods]).encode())
    digest.update(str(batch_size).encode())
    digest.update(b"staged" if staged else b"plain")  # the two paths round differently
    digest.update(repr(model.config.to_dict()).encode())
    for p in list(model.parameters())[:4]:
        digest.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


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
    ``staged`` lets stageable methods (GPTQ, RTN) observe their groups with a staged forward that runs
    each part of a LLaMA-style layer once (compress.staged); off, every group re-runs the layer.
    ``on_layer_done(index, layer)`` is called after each layer is compressed, propagated and saved.
    ``keep_hidden`` keeps the last layer's outputs (before the final norm) in the result.
    """
    device = resolve_device(device)
    use_staged = staged
    staging = _StagingCheck()
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise CompressError(f"calibration tokens must be a non-empty (samples, seqlen) tensor, got {tuple(tokens.shape)}")
    start_time = time.perf_counter()
    model.to("cpu")
    use_cache = model.config.use_cache
    model.config.use_cache = False
    layers = decoder_layers(model)
    state = WalkState(Path(state_dir), fingerprint(model, tokens, methods, batch_size, staged)) if state_dir else None
    meta = state.load() if state else None
    inputs = capture_inputs(model, tokens, device, batch_size)
    result = WalkResult()
    first = 0
    if meta is not None:
        first = meta["next_layer"]
        result.records = meta["records"]
        result.resumed_from = first
        state.restore(model, inputs, first)
        log.info("resuming the walk at layer %d of %d from %s", first, len(layers), state.dir)
    progress = bar("walking layers", total=len(layers), unit="layer")
    progress.update(first)
    try:
        for index in range(first, len(layers)):
            layer = layers[index].to(device)
            record: dict = {"layer": index}
            staged = None  # the staged forward of the current method, while its groups allow one
            for method in methods:
                staged = None  # progress cached for another method's groups is stale now
                for group in method.groups(layer, index):
                    point = group_point(group) if (use_staged and method.stageable) else None
                    if staged is not None and (point is None or point < staged.point):
                        staged = None  # a group out of the chain's order: back to the plain path
                    if group.stats == "none":
                        stats = {}
                    else:
                        if staged is None and point is not None and staging.ok(layer, inputs, device):
                            staged = StagedForward(layer, inputs.hidden, inputs.kwargs, device)
                        if staged is not None:
                            stats = staged.observe(group, point, stats_dtype)
                        else:
                            stats = observe_group(layer, group, inputs, device, stats_dtype)
                    out = method.apply(layer, index, group, stats)
                    kept = method.kept_inputs() if method.stageable else None
                    if kept and staged is not None:
                        staged.select_inputs(point, kept[group.modules[0]])
                    if out:
                        record.setdefault(method.name, {}).update(out)
                    del stats
            if staged is not None:  # the last method ran staged: its last advance is the propagation
                inputs.hidden[:] = staged.finish()
            else:
                propagate(layer, inputs, device)
            del staged
            layers[index] = layer.to("cpu")
            result.records.append(record)
            if state:
                state.save(index + 1, layers[index], inputs, result.records)
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


def walk_memory_formula(model: torch.nn.Module, samples: int, seqlen: int) -> dict[str, int]:
    """The host-memory formula of the module docstring, in bytes."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = model.config.hidden_size
    return {"model_bytes": params, "activation_bytes": samples * seqlen * hidden * 4,
            "host_bytes": params + samples * seqlen * hidden * 4}
