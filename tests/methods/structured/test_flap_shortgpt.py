"""FLAP and ShortGPT against direct computations on tiny Llamas; SlimGPT's bias and global schedule."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import compress
from compress import arch
from compress.errors import CompressError
from compress.methods.flap.allocate import UnitScores, allocate, standardize
from compress.methods.shortgpt.method import block_influence
from compress.plugin import build_method
from compress.walk import walk
from tests.helpers import assert_one_line_error, make_tiny_llama, run_cli

TOKENS = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))


def _tiny(**overrides):
    # 6 query heads in 2 KV groups (GQA as SmolLM2), head_dim 8
    values = dict(num_hidden_layers=3, hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=128)
    return make_tiny_llama(**{**values, **overrides})


def _module_inputs(model, names):
    """Every decoder layer's inputs of ``names`` on TOKENS, (tokens, in) float64, by a plain forward."""
    seen = {}
    hooks = [arch.projection(layer, n).register_forward_pre_hook(
        lambda m, args, key=(i, n): seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for i, layer in enumerate(model.model.layers) for n in names]
    with torch.no_grad():
        model(input_ids=TOKENS, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_flap_scores_and_bias_match_a_direct_computation():
    model = _tiny()
    dense = copy.deepcopy(model)
    inputs = _module_inputs(dense, (arch.O, arch.DOWN))
    method = build_method("flap", {"ratio": 0.3})
    method.prepare(model)
    walk(model, TOKENS, [method], device="cpu", batch_size=3)
    for i, layer in enumerate(dense.model.layers):
        for kind, name in (("attention", arch.O), ("mlp", arch.DOWN)):
            x, w = inputs[(i, name)], arch.projection(layer, name).weight.double()
            direct = x.var(0, unbiased=False) * w.pow(2).sum(0)  # Var[x_j] · ‖W_:,j‖²
            if kind == "attention":
                direct = direct.reshape(6, 8).sum(1)  # per head
            torch.testing.assert_close(method.scores[i][kind], direct, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(method.scores[i][kind + ".mean"], x.mean(0), rtol=1e-5, atol=1e-7)
            # the pruned module on the kept inputs plus its bias has the dense module's mean output
            pruned = arch.projection(model.model.layers[i], name)
            kept = _kept_columns(layer, model.model.layers[i], kind)
            with torch.no_grad():
                before = (x @ w.T).mean(0)
                after = (x[:, kept] @ pruned.weight.double().T + pruned.bias.double()).mean(0)
            assert float((after - before).norm() / before.norm()) <= 1e-4
    assert any(w.ffn < 128 for w in arch.layout(model).layers)


def _kept_columns(dense_layer, pruned_layer, kind):
    """Which input columns of o_proj / down_proj survived (matched by the unchanged q / gate rows)."""
    name, rows = (arch.O, arch.Q) if kind == "attention" else (arch.DOWN, arch.GATE)
    old, new = arch.projection(dense_layer, rows).weight, arch.projection(pruned_layer, rows).weight
    # q rows ↔ o columns and gate rows ↔ down columns share their indices
    return torch.tensor([int((old - r).abs().sum(1).argmin()) for r in new])


def test_flap_global_threshold_meets_the_ratio_and_reloads(tmp_path):
    model = _tiny()
    before = arch.layout(model).parameters()
    compress.prune(model, method="flap", tokens=TOKENS, ratio=0.3, device="cpu")
    lay = arch.layout(model)
    unit = arch.projection_parameters(48, 8, 2, 0, 0)  # the largest unit: one query head per KV group
    assert abs((before - lay.parameters()) - 0.3 * before) <= unit / 2 + 1
    assert len({(w.heads, w.ffn) for w in lay.layers}) > 1  # adaptive: the layers differ
    assert all(w.kv_heads == 2 for w in lay.layers)  # query unit: KV heads kept
    out = tmp_path / "flap"
    compress.save(model, out)
    config = json.loads((out / "config.json").read_text())
    assert config["o_proj_bias"] and config["down_proj_bias"]
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = model(input_ids=TOKENS).logits
        again = compress.load(out).model(input_ids=TOKENS).logits
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)(input_ids=TOKENS).logits
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(remote, ref, rtol=0, atol=1e-5)


def test_allocate_removes_the_lowest_scores_and_refuses_to_empty_a_module():
    units = [UnitScores(0, "mlp", torch.tensor([-1.0, 0.0, 1.0]), 10),
             UnitScores(1, "mlp", torch.tensor([-2.0, -0.5, 2.0]), 10),
             UnitScores(1, "attention", torch.tensor([-0.7, 0.7]), 25)]
    # ascending: -2(L1) -1(L0) -0.7(L1 attn) -0.5(L1) 0(L0) ...; cumulative 10, 20, 45, 55, 65
    assert allocate(units, 50) == {(0, "mlp"): 1, (1, "mlp"): 1, (1, "attention"): 1}  # |45−50| = |55−50|: the first
    assert allocate(units, 64) == {(0, "mlp"): 2, (1, "mlp"): 2, (1, "attention"): 1}
    with pytest.raises(CompressError, match="every attention unit of layer 1"):
        allocate(units, 90)  # … 0 (65), 0.7 (90): both attention units of layer 1
    with pytest.raises(CompressError, match="every FFN channel of layer 0"):
        allocate(units, 100)
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert abs(float(z.mean())) < 1e-12 and abs(float(z.std()) - 1) < 1e-12


def test_block_influence_matches_a_direct_cosine():
    model = _tiny(num_hidden_layers=4)
    with torch.no_grad():
        hidden = model(input_ids=TOKENS, output_hidden_states=True).hidden_states
    method = build_method("shortgpt", {"layers": 1})
    method.prepare(model)
    walk(model, TOKENS, [method], device="cpu", batch_size=2)
    for i in range(3):  # hidden_states[i + 1] is layer i's output (the last one is after the final norm)
        x, y = hidden[i].double().reshape(-1, 48), hidden[i + 1].double().reshape(-1, 48)
        direct = 1 - float(((x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))).mean())
        assert abs(method.influence[i] - direct) <= 1e-6
    assert abs(block_influence([hidden[0]], [hidden[0]])) <= 1e-12  # a layer that changes nothing
    lowest = min(range(4), key=lambda i: method.influence[i])
    assert method.dropped == [lowest] and arch.layout(model).kept_layers == [i for i in range(4) if i != lowest]


def test_shortgpt_ratio_takes_the_fewest_layers_and_reloads(tmp_path):
    model = _tiny(num_hidden_layers=4)
    summary = compress.prune(model, method="shortgpt", tokens=TOKENS, ratio=0.3, device="cpu")
    assert arch.layout(model).depth == 2  # 1 layer is 25 % < 30 %: two go
    assert summary["dropped_layers"] == sorted(summary["dropped_layers"]) and len(summary["dropped_layers"]) == 2
    assert len(summary["block_influence"]) == 4
    out = tmp_path / "short"
    compress.save(model, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=TOKENS).logits,
                                   model(input_ids=TOKENS).logits, rtol=0, atol=1e-5)


def test_slimgpt_bias_keeps_the_mean_output_of_a_pruned_layer():
    model = _tiny(num_hidden_layers=1)
    dense = copy.deepcopy(model)
    x = _module_inputs(dense, (arch.DOWN,))[(0, arch.DOWN)]
    compress.prune(model, tokens=TOKENS, ratio=0.4, bias=True, prune_attention=False, device="cpu")
    kept = _kept_columns(dense.model.layers[0], model.model.layers[0], "mlp")
    w, pruned = arch.projection(dense.model.layers[0], arch.DOWN).weight.double(), model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        before = (x @ w.T).mean(0)
        after = (x[:, kept] @ pruned.weight.double().T + pruned.bias.double()).mean(0)
    assert len(kept) < 128 and float((after - before).norm() / before.norm()) <= 1e-4


def test_slimgpt_global_schedule_meets_the_ratio_with_per_layer_counts():
    model = _tiny(num_hidden_layers=4)
    before = arch.layout(model).parameters()
    summary = compress.prune(model, tokens=TOKENS, ratio=0.35, schedule="global", device="cpu")
    lay = arch.layout(model)
    assert abs((before - lay.parameters()) / before - 0.35) < 0.02
    assert [layer["ffn"] for layer in summary["layers"]] == lay.ffn


def test_cli_refuses_too_many_layers_and_an_emptying_ratio(tmp_path, tiny_model_folder):
    out = tmp_path / "out"
    result = run_cli("prune", tiny_model_folder, "--method", "shortgpt", "--layers", "2", "--out", out,
                     "--data", "generate", "--samples", "2", "--seqlen", "8")
    assert_one_line_error(result, "must be less than the model's depth (2 decoder layers)")
    result = run_cli("prune", tiny_model_folder, "--method", "flap", "--ratio", "0.99", "--out", out,
                     "--data", "generate", "--samples", "2", "--seqlen", "8")
    assert_one_line_error(result, "would empty a layer")
    result = run_cli("prune", tiny_model_folder, "--method", "slimgpt", "--layers", "1", "--out", out)
    assert_one_line_error(result, "--layers does not apply to method slimgpt")
    assert not out.exists()


@pytest.mark.parametrize("method, flags", [("flap", ["--ratio", "0.3"]), ("shortgpt", ["--layers", "1"])])
def test_cli_writes_a_model_that_reloads(tmp_path, tiny_model_folder, method, flags):
    out = tmp_path / method
    result = run_cli("prune", tiny_model_folder, "--method", method, *flags, "--out", out,
                     "--data", "generate", "--samples", "2", "--seqlen", "8")
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((out / "compress.json").read_text())
    assert record["method"] == method
    model = compress.load(out).model
    lay = arch.layout(model)
    if method == "shortgpt":
        assert lay.depth == 1 and len(record["dropped_layers"]) == 1 and "layers removed" in result.stdout
    else:
        assert model.model.layers[0].mlp.down_proj.bias is not None
        assert 0.25 < record["metrics"]["decoder_removed_fraction"] < 0.35


def test_flap_uniform_structure_takes_slimgpt_plan_widths():
    flap, slim = _tiny(), _tiny()
    compress.prune(flap, method="flap", tokens=TOKENS, ratio=0.3, structure="uniform", device="cpu")
    compress.prune(slim, tokens=TOKENS, ratio=0.3, schedule="uniform", device="cpu")
    assert arch.layout(flap).layers == arch.layout(slim).layers and len(set(arch.layout(flap).layers)) == 1
