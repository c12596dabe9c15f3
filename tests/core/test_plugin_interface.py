"""The plugin interface of the core (compress.plugin): a third-party method found through the
``compress.methods`` entry-point group replaces each layer's MLP by a new module class trained on the
walk's cached inputs against the teacher layer's outputs; it resumes after a kill to the same
weights, and its own exporter (``compress.exporters`` group) saves and reloads the model."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
import torch

import compress
import compress.exporters.base as exporters
import compress.plugin as plugin
from compress.walk import walk
from tests.helpers import isolate_registry, make_tiny_llama
from tests.plugins.mlp_distill import SmallMLP

TOKENS = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture
def registered(monkeypatch):
    """The plugin and its exporter as an installed package declares them (real EntryPoint objects)."""
    isolate_registry(monkeypatch, plugin, [EntryPoint("mlp-distill", "tests.plugins.mlp_distill:MLPDistill",
                                                      plugin.ENTRY_POINT_GROUP)])
    isolate_registry(monkeypatch, exporters, [EntryPoint("small-mlp", "tests.plugins.small_mlp_export:SmallMLPExporter",
                                                         exporters.ENTRY_POINT_GROUP)])


def _method(steps=30):
    return plugin.build_method("mlp-distill", {"width": 16, "steps": steps})


class _Kill(Exception):
    pass


def _teacher_outputs(model):
    """Each layer's output when its input is the original model's hidden state (a direct forward)."""
    with torch.no_grad():
        hidden = model(input_ids=TOKENS, output_hidden_states=True).hidden_states
    return hidden


def test_entry_point_method_replaces_and_trains_every_mlp(registered):
    model = make_tiny_llama()
    result = walk(model, TOKENS, [_method()], device="cpu", batch_size=3)
    for index, (layer, record) in enumerate(zip(model.model.layers, result.records)):
        assert isinstance(layer.mlp, SmallMLP) and layer.mlp.fc_in.out_features == 16
        assert record["replaced"] == {"mlp": "mlp-distill"}
        losses = record["mlp-distill"]
        assert losses["loss_last"] < 0.5 * losses["loss_first"], (index, losses)  # training on the targets works
    assert torch.isfinite(model(input_ids=TOKENS).logits).all()


def test_the_targets_are_the_teacher_layer_outputs(registered, monkeypatch):
    """What apply() sees: inputs = the walk's cached inputs, targets = the unchanged layer's outputs on
    them; for layer 0 both equal a direct forward of the original model (≤ 1e-6)."""
    model = make_tiny_llama()
    hidden = _teacher_outputs(model)
    seen = {}
    method = _method(steps=0)
    original_apply = type(method).apply

    def spy(self, ctx):
        seen[ctx.index] = (torch.cat(ctx.inputs), torch.cat(ctx.teacher_outputs))
        return original_apply(self, ctx)

    monkeypatch.setattr(type(method), "apply", spy)
    walk(model, TOKENS, [method], device="cpu", batch_size=3)
    inputs, targets = seen[0]
    assert (inputs - hidden[0]).abs().max().item() <= 1e-6
    assert (targets - hidden[1]).abs().max().item() <= 1e-5


def test_killed_walk_resumes_to_the_same_weights(registered, tmp_path):
    reference = make_tiny_llama()
    walk(reference, TOKENS, [_method()], device="cpu", batch_size=3)

    model = make_tiny_llama()

    def kill_after_layer_1(index, layer):
        if index == 1:
            raise _Kill

    with pytest.raises(_Kill):
        walk(model, TOKENS, [_method()], device="cpu", batch_size=3, state_dir=tmp_path / "state",
             on_layer_done=kill_after_layer_1)
    resumed = make_tiny_llama()  # a fresh process: the original module classes
    result = walk(resumed, TOKENS, [_method()], device="cpu", batch_size=3, state_dir=tmp_path / "state")
    assert result.resumed_from == 2
    assert all(isinstance(layer.mlp, SmallMLP) for layer in resumed.model.layers)
    want, got = reference.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_exports_and_reloads_through_the_registry(registered, tmp_path):
    model = make_tiny_llama()
    compress.compress(model, "mlp-distill", tokens=TOKENS, device="cpu", batch_size=3, width=16, steps=5)
    folder = compress.save(model, tmp_path / "out")
    import json

    assert json.loads((folder / "compress.json").read_text())["format"] == "small-mlp"  # the method's exporter
    reloaded = compress.load(folder).model
    assert all(isinstance(layer.mlp, SmallMLP) for layer in reloaded.model.layers)
    with torch.no_grad():
        diff = (reloaded(input_ids=TOKENS).logits - model(input_ids=TOKENS).logits).abs().max().item()
    assert diff <= 1e-6


def test_the_readme_example_is_this_plugin():
    """The README's "Write your own method" code is this tested file, not a copy that can drift."""
    from tests.helpers import REPO

    code = (REPO / "tests" / "plugins" / "mlp_distill.py").read_text().split('"""', 2)[2].lstrip()
    assert code in (REPO / "README.md").read_text()
