"""Moving a decoder layer's inputs and outputs between the host and the compute device."""

from __future__ import annotations

import torch


def to_device(obj, device, non_blocking: bool = False):
    """``obj`` (a tensor, or tuples / lists / dicts of them, e.g. a layer's kwargs) on ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, non_blocking) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def to_host(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    """A detached host copy (no copy when already there), pinned for fast transfers when ``pin``."""
    tensor = tensor.detach().to("cpu")
    return tensor.pin_memory() if pin else tensor


def layer_output(result):
    """The hidden states a decoder layer returned (transformers 5: a tensor; older: a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result
