"""A latency table measured once on the run's device, summed per candidate.

Every layer of the parent has the same shapes, so each attention option (a units) and each FFN option
(f steps) is timed once, on layer 0 of the reordered parent, for one prefill of ``seqlen`` tokens
(batch 1): the median of ``reps`` runs after a warm-up. The rest of a forward (the embedding, the final
norm, the lm_head, and each kept layer's two norms and residual adds) is timed alike. A candidate's
predicted prefill time is the fixed part plus, per kept layer, its norms, attention and FFN entries;
the benchmark checks the prediction against whole-model timings of the exported front.
"""

from __future__ import annotations

import statistics
import time

import torch

from compress.search.space import Option, SearchSpace
from compress.search.subnet import subnet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_table(model, space: SearchSpace, seqlen: int, device: torch.device | str = "cpu", reps: int = 3) -> dict:
    """{"attention": [seconds per a], "ffn": [seconds per f], "layer_fixed": s, "fixed": s, "seqlen": L}."""
    device = torch.device(device)
    model.to(device).eval()
    base = model.model
    x = torch.randn(1, seqlen, space.hidden, device=device, generator=torch.Generator(device).manual_seed(0))
    positions = torch.arange(seqlen, device=device)[None]
    rope = base.rotary_emb(x, positions)
    attention, ffn = [0.0], [0.0]
    drop = [Option(0, 0)] * (space.depth - 1)
    for a in range(1, space.attention_units + 1):
        with subnet(model, space, [Option(a, space.ffn_options)] + drop):
            attn = base.layers[0].self_attn
            attention.append(_time(lambda: attn(hidden_states=x, position_embeddings=rope, attention_mask=None),
                                   device, reps))
    for f in range(1, space.ffn_options + 1):
        with subnet(model, space, [Option(space.attention_units, f)] + drop):
            mlp = base.layers[0].mlp
            ffn.append(_time(lambda: mlp(x), device, reps))
    layer = base.layers[0]
    layer_fixed = _time(lambda: layer.post_attention_layernorm(layer.input_layernorm(x) + x) + x, device, reps)
    ids = torch.zeros(1, seqlen, dtype=torch.long, device=device)
    fixed = _time(lambda: model.lm_head(base.norm(base.embed_tokens(ids))), device, reps)
    return {"attention": attention, "ffn": ffn, "layer_fixed": layer_fixed, "fixed": fixed, "seqlen": seqlen,
            "device": str(device)}


def predicted_seconds(table: dict, space: SearchSpace, choice: list[Option]) -> float:
    total = table["fixed"]
    for option in choice:
        if option != (0, 0):
            total += table["layer_fixed"] + table["attention"][option.a] + table["ffn"][option.f]
    return total
