"""The layer walk: an empty walk is exact, statistics match dense references, a killed walk resumes."""

from __future__ import annotations

import pytest
import torch

from compress.errors import CompressError
from compress.plugin import Group, LayerMethod, config_field
from compress.walk import capture_inputs, observe_group, walk, walk_memory_formula
from tests.helpers import make_tiny_llama


def logits_from_walk(model, tokens, **kwargs):
    result = walk(model, tokens, keep_hidden=True, **kwargs)
    hidden = torch.cat(result.hidden)  # (N, L, H), the last layer's outputs
    with torch.no_grad():
        return model.lm_head(model.model.norm(hidden))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_empty_walk_reproduces_logits_tiny_gqa(tiny_tokens, attn):
    model = make_tiny_llama(attn_implementation=attn)
    with torch.no_grad():
        reference = model(tiny_tokens).logits
    got = logits_from_walk(model, tiny_tokens, batch_size=4)  # 6 samples: batches of 4 and 2
    assert (got - reference).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_empty_walk_reproduces_logits_smollm2(smollm2):
    tokens = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = smollm2.model(tokens).logits
    got = logits_from_walk(smollm2.model, tokens, batch_size=1)
    assert (got - reference).abs().max().item() <= 1e-4


def test_observed_hessian_equals_dense_float64(tiny_llama, tiny_tokens):
    """The walk's Σxᵀx for q_proj equals X Xᵀ of the real normed layer-0 inputs, in float64."""
    inputs = capture_inputs(tiny_llama, tiny_tokens, torch.device("cpu"), batch_size=4)
    layer = tiny_llama.model.layers[0]
    stats = observe_group(layer, Group(["self_attn.q_proj", "mlp.down_proj"]), inputs, torch.device("cpu"))
    with torch.no_grad():
        x = layer.input_layernorm(torch.cat(inputs.hidden)).reshape(-1, 64).double()  # (N·L, H)
    dense = x.t() @ x
    acc = stats["self_attn.q_proj"]
    assert acc.count == tiny_tokens.numel()
    rel = (acc.xtx.double() - dense).norm() / dense.norm()
    assert rel.item() <= 1e-6
    assert torch.allclose(acc.channel_norms().double(), x.pow(2).sum(0).sqrt(), rtol=1e-6)
    assert stats["mlp.down_proj"].xtx.shape == (96, 96)


class _RoundToGrid(LayerMethod):
    """A deterministic test method whose result depends on the propagated inputs (via the Hessian)."""

    name = "round-to-grid-test"

    from dataclasses import dataclass

    @dataclass
    class Config:
        step: float = config_field(0.05, "grid step")

    def groups(self, layer, index):
        return [Group(["self_attn.q_proj", "self_attn.k_proj"]), Group(["mlp.down_proj"])]

    def apply(self, ctx):
        for name in ctx.group.modules:
            module = ctx.layer.get_submodule(name)
            scale = ctx.stats[name].channel_norms().clamp_min(1e-6)  # (in,)
            w = module.weight.data * scale
            module.weight.data = torch.round(w / self.config.step) * self.config.step / scale
        return {"rounded": len(ctx.group.modules)}


class _Kill(Exception):
    pass


def test_killed_walk_resumes_to_identical_weights(tmp_path, tiny_tokens):
    uninterrupted = make_tiny_llama()
    walk(uninterrupted, tiny_tokens, [_RoundToGrid()], batch_size=4)

    killed = make_tiny_llama()

    def kill_after_layer_1(index, layer):
        if index == 1:
            raise _Kill

    state = tmp_path / "state"
    with pytest.raises(_Kill):
        walk(killed, tiny_tokens, [_RoundToGrid()], batch_size=4, state_dir=state, on_layer_done=kill_after_layer_1)

    resumed = make_tiny_llama()  # a fresh process would reload the source model
    result = walk(resumed, tiny_tokens, [_RoundToGrid()], batch_size=4, state_dir=state)
    assert result.resumed_from == 2
    assert [r["layer"] for r in result.records] == [0, 1, 2]
    assert result.records[0]["round-to-grid-test"] == {"rounded": 1}
    original = make_tiny_llama().state_dict()
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    changed = [n for n, t in uninterrupted.state_dict().items() if not torch.equal(t, original[n])]
    assert len(changed) == 3 * 3  # q, k, down in each of 3 layers: the method did work


def test_resume_state_of_another_run_is_refused(tmp_path, tiny_tokens):
    state = tmp_path / "state"
    walk(make_tiny_llama(), tiny_tokens, [_RoundToGrid()], state_dir=state)
    other = tiny_tokens.flip(0)
    with pytest.raises(CompressError, match="another run"):
        walk(make_tiny_llama(), other, [_RoundToGrid()], state_dir=state)


def test_activation_cache_matches_memory_formula(tiny_llama, tiny_tokens):
    result = walk(tiny_llama, tiny_tokens, keep_hidden=True, batch_size=4)
    held = sum(t.numel() * t.element_size() for t in result.hidden)
    formula = walk_memory_formula(tiny_llama, *tiny_tokens.shape)
    assert held == formula["activation_bytes"] == 6 * 24 * 64 * 4


def test_walk_rejects_bad_tokens(tiny_llama):
    with pytest.raises(CompressError, match="non-empty"):
        walk(tiny_llama, torch.zeros(0, 0, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_walk_matches_cpu_and_holds_one_layer(tiny_tokens):
    model = make_tiny_llama()
    with torch.no_grad():
        reference = model(tiny_tokens).logits
    torch.cuda.reset_peak_memory_stats()
    got = logits_from_walk(model, tiny_tokens, device="cuda", batch_size=6)
    assert (got.cpu() - reference).abs().max().item() <= 1e-4
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    embed_bytes = model.model.embed_tokens.weight.numel() * 4
    assert torch.cuda.max_memory_allocated() < embed_bytes + 2 * layer_bytes + 64 * 6 * 24 * 96 * 4 * 4
