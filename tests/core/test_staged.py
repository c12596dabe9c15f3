"""The staged forward: the same statistics and outputs as re-running the layer, each part run once."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from compress.plugin import Group, LayerMethod, build_method
from compress.methods.quantize.config import SEQUENTIAL_GROUPS
from compress.staged import StagedForward, check_layer
from compress.walk import capture_inputs, walk
from tests.helpers import make_tiny_llama


@dataclass
class _Config:
    pass


class Recorder(LayerMethod):
    """Observes the four LLaMA groups in order and scales each group's weights by a fixed pattern
    after seeing its Hessian, so every later group's statistics depend on the earlier changes."""

    name = "recorder"
    Config = _Config
    stageable = True

    def __init__(self, order=SEQUENTIAL_GROUPS, stageable=True):
        super().__init__()
        self.order = order
        self.stageable = stageable
        self.hessians: dict[tuple[int, str], torch.Tensor] = {}

    def groups(self, layer, index):
        return [Group(list(g), name="+".join(g)) for g in self.order]

    def apply(self, ctx):
        for name in ctx.group.modules:
            self.hessians[(ctx.index, name)] = ctx.stats[name].hessian().clone()
            weight = ctx.layer.get_submodule(name).weight
            pattern = torch.linspace(0.5, 1.5, weight.shape[1])  # deterministic, shape-preserving
            weight.data.mul_(pattern)
        return {}


def _walk(model, tokens, method, staged):
    result = walk(model, tokens, [method], batch_size=4, staged=staged, keep_hidden=True)
    return torch.cat(result.hidden)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_staged_walk_matches_plain_walk_and_the_model(tiny_tokens, attn):
    plain_model, staged_model = make_tiny_llama(attn_implementation=attn), make_tiny_llama(attn_implementation=attn)
    plain, staged = Recorder(), Recorder()
    plain_out = _walk(plain_model, tiny_tokens, plain, staged=False)
    staged_out = _walk(staged_model, tiny_tokens, staged, staged=True)
    assert plain.hessians.keys() == staged.hessians.keys() and len(staged.hessians) == 3 * 7
    for key, reference in plain.hessians.items():
        rel = (staged.hessians[key] - reference).norm() / reference.norm()
        assert rel.item() <= 1e-5, key
    assert (staged_out - plain_out).abs().max().item() <= 1e-5
    # the staged walk's propagated outputs are those of the changed model's own forward
    with torch.no_grad():
        reference = staged_model(tiny_tokens).logits
        got = staged_model.lm_head(staged_model.model.norm(staged_out))
    assert (got - reference).abs().max().item() <= 1e-4


def test_staged_walk_runs_each_part_once(tiny_tokens):
    """With the four groups staged, o_proj and down_proj run once per batch and layer (the plain path
    re-runs o_proj for the gate/up and down groups and for the propagation), plus the check's."""
    counts = {}
    for staged in (False, True):
        model = make_tiny_llama()
        calls = {"o": 0, "down": 0}
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(lambda *a: calls.__setitem__("o", calls["o"] + 1))
            layer.mlp.down_proj.register_forward_hook(lambda *a: calls.__setitem__("down", calls["down"] + 1))
        walk(model, tiny_tokens, [Recorder()], batch_size=4, staged=staged)
        counts[staged] = calls
    batches, layers, check = 2, 3, 2  # the once-per-walk check runs one batch staged and one plain
    assert counts[True] == {"o": batches * layers + check, "down": batches * layers + check}
    assert counts[False] == {"o": 3 * batches * layers, "down": batches * layers}


@pytest.mark.parametrize("order,stageable", [(tuple(reversed(SEQUENTIAL_GROUPS)), True), (SEQUENTIAL_GROUPS, False)])
def test_out_of_order_or_unstageable_groups_take_the_plain_path(tiny_tokens, order, stageable):
    plain, staged = Recorder(order, stageable), Recorder(order, stageable)
    plain_out = _walk(make_tiny_llama(), tiny_tokens, plain, staged=False)
    staged_out = _walk(make_tiny_llama(), tiny_tokens, staged, staged=True)
    for key, reference in plain.hessians.items():
        assert torch.allclose(staged.hessians[key], reference, rtol=1e-5, atol=1e-6), key
    assert (staged_out - plain_out).abs().max().item() <= 1e-5


def test_check_layer_rejects_a_different_layer_structure(tiny_tokens):
    model = make_tiny_llama()
    inputs = capture_inputs(model, tiny_tokens, torch.device("cpu"), batch_size=6)
    layer = model.model.layers[0]
    ok, reason = check_layer(layer, inputs.hidden[0], inputs.kwargs[0], torch.device("cpu"))
    assert ok and reason == ""

    layer.forward = _parallel_of(layer)
    ok, reason = check_layer(layer, inputs.hidden[0], inputs.kwargs[0], torch.device("cpu"))
    assert not ok and "differs" in reason
    # and the walk falls back to the plain path on such a model: identical statistics
    plain, staged = Recorder(), Recorder()
    walk(model, tiny_tokens, [staged], batch_size=6, staged=True)
    other = make_tiny_llama()
    other.model.layers[0].forward = _parallel_of(other.model.layers[0])
    walk(other, tiny_tokens, [plain], batch_size=6, staged=False)
    for key, reference in plain.hessians.items():
        assert torch.allclose(staged.hessians[key], reference, rtol=1e-5, atol=1e-6), key


def _parallel_of(layer):
    """A parallel attention + MLP block (as GPT-J has) in place of the LLaMA chain."""
    def parallel(hidden_states, **kwargs):
        h = layer.input_layernorm(hidden_states)
        attn, _ = layer.self_attn(hidden_states=h, **kwargs)
        return hidden_states + attn + layer.mlp(h)
    return parallel


def test_staged_forward_refuses_to_go_back(tiny_tokens):
    model = make_tiny_llama()
    inputs = capture_inputs(model, tiny_tokens, torch.device("cpu"), batch_size=6)
    staged = StagedForward(model.model.layers[0], inputs.hidden, inputs.kwargs, torch.device("cpu"))
    staged.observe(Group(["mlp.down_proj"]), 3)
    with pytest.raises(ValueError, match="past"):
        staged.observe(Group(["self_attn.o_proj"]), 1)


@pytest.mark.parametrize("gqa_unit", ["query", "kv"])
def test_slimgpt_staged_prunes_as_the_plain_path(tiny_tokens, gqa_unit):
    """SlimGPT cuts o_proj's and down_proj's inputs (and q/k/v, gate/up rows) and reports the kept
    columns; the staged walk cuts its cached context / activation alike and ends with the same pruned
    model as re-running the layer, whose own forward gives the walk's outputs."""
    results = {}
    for staged in (False, True):
        model = make_tiny_llama()
        calls = [0]
        for layer in model.model.layers:
            layer.self_attn.o_proj.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
        method = build_method("slimgpt", {"ratio": 0.4, "schedule": "uniform", "gqa_unit": gqa_unit})
        method.prepare(model)
        result = walk(model, tiny_tokens, [method], batch_size=4, staged=staged, keep_hidden=True)
        results[staged] = (model, torch.cat(result.hidden), result.records)
        # 2 batches × 3 layers: o_proj runs once per batch and layer staged (+2 for the check), twice plain
        assert calls[0] == (2 * 3 + 2 if staged else 2 * 2 * 3)
    (plain, plain_out, plain_rec), (model, staged_out, staged_rec) = results[False], results[True]
    for a, b in zip(plain_rec, staged_rec):
        assert a["slimgpt"]["heads_kept"] == b["slimgpt"]["heads_kept"]
        assert a["slimgpt"]["ffn_kept"] == b["slimgpt"]["ffn_kept"]
    plain_state, state = plain.state_dict(), model.state_dict()
    assert plain_state.keys() == state.keys()
    for key, value in plain_state.items():
        assert value.shape == state[key].shape, key
        assert torch.allclose(state[key], value, rtol=1e-4, atol=1e-5), key
    assert (staged_out - plain_out).abs().max().item() <= 1e-4
    with torch.no_grad():
        reference = model(tiny_tokens).logits
        got = model.lm_head(model.model.norm(staged_out))
    assert (got - reference).abs().max().item() <= 1e-4
