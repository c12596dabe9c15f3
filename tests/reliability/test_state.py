"""Fault injection on what compress keeps between runs and reads from disk (issue 17, items 5-9).

Each test reproduces one reported failure (its docstring says which) and fails on the code before
the fix: a planted pickle that runs on ``adapt --resume``, pickle weights read when a safetensors
file sits beside them, a walk killed at each of its commit points, method state lost on resume
(GPTQ/RTN grids, SlimGPT's ``num_key_value_groups``) and recipe checks that ``--dry-run`` skipped.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import compress.walk_state
from compress.errors import CompressError
from compress.exporters import get_exporter
from compress.plugin import build_method
from compress.walk import walk
from tests.helpers import WIKI_TRAIN, assert_one_line_error, make_tiny_llama, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU

TOKENS = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(7))
GPTQ = {"bits": 4, "group_size": 16, "sym": True, "act_order": True}
# 4 query heads in 2 KV groups → 2 (one per group): num_key_value_groups 2 → 1; FFN 96 → 48
SLIM = {"ratio": 0.5, "schedule": "uniform", "gqa_unit": "query", "ffn_multiple": 16}


class Killed(Exception):
    """Stands for the process dying at an injected point."""


class Evil:
    """Unpickled (``weights_only=False``), it creates ``marker``: proof that the pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker) -> None:
    torch.save({"state": Evil(marker)}, str(path))


# ---------------------------------------------------------------------------------------------- 5


def _train_run(examples, ckpt=None, resume=False, kill_at=None):
    from compress.methods.bone.adapter import attach_adapter
    from compress.train.loop import TrainConfig, make_accelerator, train
    from tests.helpers.adapt import tiny_llama

    config = TrainConfig(steps=4, lr=5e-3, batch_size=2, save_every=2, seed=3, warmup_steps=2)
    model = attach_adapter(tiny_llama(seed=1), "lora", 4, seed=0)

    def on_step(step, state):
        if step == kill_at:
            raise Killed

    train(model, examples[:12], examples[12:], config, pad_id=2, accelerator=make_accelerator(1),
          checkpoint_dir=ckpt, resume=resume, on_step=on_step)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def examples():
    from compress.train.data import pair_example
    from tests.helpers.adapt import reverse_task, smollm2_tokenizer

    tok = smollm2_tokenizer()
    return [pair_example(tok, r["instruction"], r["response"], 48, "") for r in reverse_task(14, seed=2)]


# what accelerate's save_state wrote (and load_state read, custom objects with weights_only=False)
PICKLE_NAMES = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                "scheduler.bin", "pytorch_model.bin", "model.pt"]


def test_5_adapter_checkpoint_holds_no_pickle_and_a_planted_one_never_runs(tmp_path, examples):
    """#17.5: ``compress adapt --resume`` read accelerate's ``custom_checkpoint_*.pkl`` with
    ``weights_only=False``, so a crafted pickle in the checkpoint folder ran its code. Checkpoints are
    now safetensors + JSON only; pickles planted under every name accelerate used are never read, and
    the resumed run ends with the uninterrupted run's weights."""
    straight = _train_run(examples)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _train_run(examples, ckpt, kill_at=3)  # dies after step 3; the last checkpoint is step 2
    latest = ckpt / "step-000002"
    written = sorted(p.name for p in latest.iterdir())
    marker = tmp_path / "pwned"
    for name in PICKLE_NAMES:  # every name accelerate used (its custom objects' files replaced)
        if name.startswith("custom_checkpoint") or not (latest / name).exists():
            plant(latest / name, marker)
    try:
        resumed = _train_run(examples, ckpt, resume=True)
    finally:
        assert not marker.exists(), "a pickle in the checkpoint folder was executed"
    assert straight.keys() == resumed.keys() and straight
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-7, rtol=0), name
    assert written == ["DONE", "model.safetensors", "optimizer.json", "optimizer.safetensors", "scheduler.json",
                       "train_state.json"]


@pytest.mark.parametrize("damage", ["truncated-params", "missing-optimizer", "garbage-json", "old-format",
                                    "wrong-shape"])
def test_5_corrupt_adapter_checkpoint_is_one_error(tmp_path, examples, damage):
    """#17.5: a corrupt or incomplete checkpoint (or one in accelerate's pickle format) is one
    CompressError naming the checkpoint, never a traceback and never a pickle load."""
    ckpt = tmp_path / "ckpt"
    with pytest.raises(Killed):
        _train_run(examples, ckpt, kill_at=2)
    latest = ckpt / "step-000002"
    if damage == "truncated-params":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "missing-optimizer":
        (latest / "optimizer.json").unlink()
    elif damage == "garbage-json":
        (latest / "scheduler.json").write_text("{not json")
    elif damage == "old-format":
        for path in latest.iterdir():
            if path.name != "DONE":
                path.unlink()
        for name in PICKLE_NAMES:
            plant(latest / name, tmp_path / "pwned")
    else:
        params = load_file(str(latest / "model.safetensors"))
        name = sorted(params)[0]
        params[name] = torch.zeros(3, 3)
        save_file(params, str(latest / "model.safetensors"))
    with pytest.raises(CompressError) as info:
        _train_run(examples, ckpt, resume=True)
    message = str(info.value)
    assert "step-000002" in message and "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_5_adapt_resume_from_a_damaged_checkpoint_is_one_error_line(tmp_path, tiny_model_folder):
    """#17.5 through the CLI: ``compress adapt --resume`` on a checkpoint whose weights file is damaged
    (and beside it planted pickles) prints one error line, runs no pickle and writes no output."""
    from tests.helpers.adapt import reverse_task, write_jsonl

    data = write_jsonl(tmp_path / "task.jsonl", reverse_task(12, seed=1))
    latest = tmp_path / "ckpt" / "step-000002"
    latest.mkdir(parents=True)
    (latest / "DONE").write_text("2")
    (latest / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    for name in PICKLE_NAMES:
        plant(latest / name, tmp_path / "pwned")
    result = run_cli("adapt", tiny_model_folder, "--method", "lora", "--r", "4", "--data", data, "--out",
                     tmp_path / "out", "--steps", "4", "--batch-size", "2", "--seqlen", "48", "--save-every", "2",
                     "--checkpoint-dir", tmp_path / "ckpt", "--resume", "--device", "cpu")
    assert_one_line_error(result, "step-000002")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- 6


@pytest.fixture
def torch_loads(monkeypatch):
    """Every torch.load call (transformers reads .bin weights with it)."""
    calls = []
    real = torch.load

    def recording(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    return calls


def test_6_pickle_weights_beside_safetensors_are_never_read(tmp_path, torch_loads):
    """#17.6: the rule "pickle weights are refused" only checked that some ``*.safetensors`` file
    existed; with a stray one beside ``pytorch_model.bin`` transformers read the ``.bin``. Now only
    ``model.safetensors`` (or the safetensors shards of its index) is read, whatever lies beside it."""
    from compress.models import load_model

    model = make_tiny_llama()
    marker = tmp_path / "pwned"
    # a proper folder plus a malicious pytorch_model.bin: the safetensors weights are loaded
    good = tmp_path / "good"
    model.save_pretrained(good)
    plant(good / "pytorch_model.bin", marker)
    loaded = load_model(good, tokenizer=False).model
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # a stray safetensors file (not the model's weights) beside the .bin: refused in one line
    stray = tmp_path / "stray"
    model.config.save_pretrained(stray)
    save_file({"note": torch.zeros(1)}, str(stray / "extra.safetensors"))
    plant(stray / "pytorch_model.bin", marker)
    with pytest.raises(CompressError, match="no model.safetensors") as info:
        load_model(stray, tokenizer=False)
    assert "\n" not in str(info.value)
    # an index that names a pickle shard: refused
    indexed = tmp_path / "indexed"
    model.config.save_pretrained(indexed)
    save_file({"note": torch.zeros(1)}, str(indexed / "model-00001-of-00001.safetensors"))
    plant(indexed / "pytorch_model.bin", marker)
    weight_map = {name: "pytorch_model.bin" for name in model.state_dict()}
    (indexed / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CompressError, match="only .safetensors files"):
        load_model(indexed, tokenizer=False)
    assert not marker.exists() and torch_loads == []


# ---------------------------------------------------------------------------------------------- 7


def _methods(names):
    return [build_method(n, SLIM if n == "slimgpt" else GPTQ) for n in names]


def _walk(names, state=None, **kwargs):
    model = make_tiny_llama()
    methods = _methods(names)
    for method in methods:
        method.prepare(model)
    result = walk(model, TOKENS, methods, device="cpu", batch_size=4, state_dir=state, **kwargs)
    return model, result


def _export(model, folder) -> dict[str, torch.Tensor]:
    out = get_exporter("compressed-tensors").save(model, None, folder, {"test": True})
    return load_file(str(out / "model.safetensors"))


KILL_POINTS = ["after-layer-file", "after-inputs-file", "before-walk-json", "after-walk-json"]
KILLED_LAYER = 1  # of 3: layer 0 is restored from its file on resume, layer 2 is walked


def inject_kill(monkeypatch, point: str) -> None:
    """Make the walk die at ``point`` while it saves layer KILLED_LAYER (compress.walk_state writes the
    layer file, then the inputs file, then walk.json)."""
    real_save, real_commit = compress.walk_state._atomic_save, compress.walk_state._commit
    target = {"after-layer-file": f"layer_{KILLED_LAYER:04d}.safetensors",
              "after-inputs-file": f"inputs_{KILLED_LAYER + 1:04d}.safetensors"}.get(point)

    def atomic_save(tensors, path):
        real_save(tensors, path)
        if path.name == target:
            raise Killed(point)

    def commit(directory, meta):
        if meta["next_layer"] == KILLED_LAYER + 1:
            if point == "before-walk-json":
                (directory / "walk.json.tmp").write_text('{"fingerprint": "half-writ')  # died mid-write
                raise Killed(point)
            real_commit(directory, meta)
            if point == "after-walk-json":
                raise Killed(point)
            return
        real_commit(directory, meta)

    monkeypatch.setattr(compress.walk_state, "_atomic_save", atomic_save)
    monkeypatch.setattr(compress.walk_state, "_commit", commit)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Per method list: the uninterrupted walk's state dict and compressed-tensors export."""
    done = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (one_thread): the thread count changes float summation order
    try:
        for names in (("gptq",), ("slimgpt", "gptq")):
            model, _ = _walk(names)
            done[names] = (model.state_dict(), _export(model, tmp_path_factory.mktemp("straight") / "out"))
    finally:
        torch.set_num_threads(threads)
    return done


@pytest.mark.parametrize("names", [("gptq",), ("slimgpt", "gptq")], ids="+".join)
@pytest.mark.parametrize("point", KILL_POINTS)
def test_7_walk_killed_at_every_commit_point_resumes_to_the_same_export(tmp_path, monkeypatch, uninterrupted,
                                                                         point, names):
    """#17.7: after a resumed GPTQ walk the layers restored from the state folder had lost their grids
    and were exported in float, without a warning. Killed at each commit point of the walk state
    (after the layer file, after the inputs file, before and after walk.json), the resumed walk ends
    with the same weights and writes byte-identical compressed-tensors tensors."""
    state = tmp_path / "state"
    with monkeypatch.context() as patch:
        inject_kill(patch, point)
        with pytest.raises(Killed):
            _walk(names, state=state)
    resumed, result = _walk(names, state=state)
    resumed_from = KILLED_LAYER + 1 if point == "after-walk-json" else KILLED_LAYER
    assert result.resumed_from == resumed_from
    weights, tensors = uninterrupted[names]
    for name, value in weights.items():
        assert torch.equal(resumed.state_dict()[name], value), name
    got = _export(resumed, tmp_path / "out")
    assert sorted(got) == sorted(tensors)  # every quantized module packed, none left in float
    assert not any(k.startswith("model.layers.") and k.endswith("proj.weight") for k in got)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].numpy().tobytes() == value.numpy().tobytes(), name


@pytest.mark.parametrize("damage", ["truncated-layer", "missing-inputs", "garbage-walk-json"])
def test_7_damaged_walk_state_is_one_error(tmp_path, damage):
    """#17.7: a state folder whose files are damaged or missing is one CompressError, not a traceback."""
    state = tmp_path / "state"
    _walk(("gptq",), state=state)
    meta = json.loads((state / "walk.json").read_text())
    if damage == "truncated-layer":
        data = (state / "layer_0001.safetensors").read_bytes()
        (state / "layer_0001.safetensors").write_bytes(data[: len(data) // 3])
    elif damage == "missing-inputs":
        (state / meta["inputs"]).unlink()
    else:
        (state / "walk.json").write_text('{"fingerprint": ')
    with pytest.raises(CompressError, match="resume state") as info:
        _walk(("gptq",), state=state)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- 8


def _kill_after(index):
    def on_layer_done(i, layer):
        if i == index:
            raise Killed

    return on_layer_done


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_8_quantization_grids_survive_resume(tmp_path, method):
    """#17.8: GPTQ/RTN keep each quantized Linear's grid in ``module.quant_params``; a resumed walk
    restored the weights of the finished layers but not their grids (35 of 210 modules lost theirs on
    smollm2). Now every grid is saved with its layer (``LayerMethod.layer_state``) and put back by
    ``restore``: the same codes, scales, zero points and group indices as the uninterrupted walk."""
    from compress.methods.quantize.export import quantized_linears

    def run(state=None, **kwargs):
        model = make_tiny_llama()
        walk(model, TOKENS, [build_method(method, GPTQ if method == "gptq" else {"bits": 4, "group_size": 16})],
             device="cpu", batch_size=4, state_dir=state, **kwargs)
        return model

    straight = quantized_linears(run())
    state = tmp_path / "state"
    with pytest.raises(Killed):
        run(state, on_layer_done=_kill_after(1))
    resumed = quantized_linears(run(state))
    assert sorted(resumed) == sorted(straight) and len(straight) == 3 * 7
    for name, (_, want) in straight.items():
        got = resumed[name][1]
        assert (got.bits, got.group_size, got.sym) == (want.bits, want.group_size, want.sym), name
        for field in ("codes", "scale", "zero", "g_idx"):
            a, b = getattr(got, field), getattr(want, field)
            assert a.dtype == b.dtype and torch.equal(a, b), (name, field)


def test_8_resumed_slimgpt_model_runs_under_eager_attention(tmp_path):
    """#17.8: after a resumed SlimGPT walk the restored layers kept the unpruned
    ``num_key_value_groups`` (and ``intermediate_size``), and eager attention crashed on them. Now
    ``SlimGPT.restore`` sets them from the loaded widths: the resumed model's logits under eager
    attention equal the uninterrupted one's."""
    def run(state=None, **kwargs):
        model = make_tiny_llama(attn_implementation="eager")
        method = build_method("slimgpt", SLIM)
        method.prepare(model)
        walk(model, TOKENS, [method], device="cpu", batch_size=4, state_dir=state, **kwargs)
        return model

    straight = run()
    groups = [layer.self_attn.num_key_value_groups for layer in straight.model.layers]
    assert groups == [1, 1, 1]  # the pruning did change the attribute (4 heads / 2 KV heads → 2 / 2)
    state = tmp_path / "state"
    with pytest.raises(Killed):
        run(state, on_layer_done=_kill_after(1))
    resumed = run(state)
    for a, b in zip(straight.model.layers, resumed.model.layers):
        assert a.self_attn.num_key_value_groups == b.self_attn.num_key_value_groups
        assert a.mlp.intermediate_size == b.mlp.intermediate_size
    with torch.no_grad():
        want = straight(TOKENS).logits
        got = resumed(TOKENS).logits
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- 9


def _recipe(tmp_path, model, stages, **extra) -> str:
    recipe = {"model": str(model), "out": str(tmp_path / "out"), "device": "cpu", "batch_size": 2,
              "data": {"source": str(WIKI_TRAIN), "samples": 2, "seqlen": 16}, "stages": stages}
    recipe.update(extra)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def no_work(monkeypatch):
    """A dry run loads no weights and makes no calibration text."""
    import compress.data
    import compress.models

    monkeypatch.setattr(compress.models, "load_model", lambda *a, **k: pytest.fail("loaded the weights"))
    monkeypatch.setattr(compress.data, "calibration_tokens", lambda *a, **k: pytest.fail("made calibration text"))


@pytest.mark.parametrize("stages, export, match", [
    ([{"method": "gptq", "options": {"bits": 4, "group_size": 24}}], "compressed-tensors",
     "does not divide the input width 32"),
    ([{"method": "rtn", "options": {"bits": 4, "group_size": 16}}], "safetensors",
     "export format 'safetensors' writes float weights"),
    ([{"method": "gptq", "options": {"bits": 3, "group_size": 16}}], "gptq", "--format gptq packs 3-bit codes"),
    ([{"method": "slimgpt", "options": {"ratio": 0.99, "schedule": "uniform"}}], "auto", "would be emptied"),
], ids=["group-size", "format-kind", "gptq-packing", "slimgpt-plan"])
def test_9_dry_run_runs_every_check_that_needs_no_data(tmp_path, tiny_model_folder, no_work, stages, export, match):
    """#17.9: ``compress run RECIPE --dry-run`` passed a group size that does not divide a width and
    an export format that cannot hold the result; a real run found them only after calibration (or
    after the walk). The dry run now builds the model's skeleton (no weights) and runs each layer
    method's ``prepare`` and the exporter's ``check_plan``: one error line, nothing written."""
    path = _recipe(tmp_path, tiny_model_folder, stages, export={"format": export})
    assert_one_line_error(run_cli("run", path, "--dry-run"), match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "tiny"]


def test_9_dry_run_of_a_valid_recipe_names_the_format(tmp_path, tiny_model_folder, no_work):
    """The dry run of a good recipe passes on the skeleton and prints the format it checked."""
    path = _recipe(tmp_path, tiny_model_folder, [{"method": "slimgpt", "options": {"ratio": 0.3, "ffn_multiple": 16}},
                                                 {"method": "gptq", "options": {"bits": 4, "group_size": 16}}])
    result = run_cli("run", path, "--dry-run")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "export   auto (compressed-tensors)" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "tiny"]


def test_9_data_free_rtn_makes_no_calibration_text(tmp_path, tiny_model_folder, monkeypatch):
    """A data-free method (RTN, ``needs_data = False``) never generates calibration text (this was
    already so; the test keeps it so): calibration_tokens fails if called, the run succeeds."""
    import compress.data

    monkeypatch.setattr(compress.data, "calibration_tokens", lambda *a, **k: pytest.fail("made calibration text"))
    path = _recipe(tmp_path, tiny_model_folder, [{"method": "rtn", "options": {"bits": 4, "group_size": 16}}],
                   data={"source": "generate", "samples": 64, "seqlen": 512})
    result = run_cli("run", path)
    assert result.exit_code == 0, (result.output, result.exception)
    record = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert record["calibration"] is None and record["format"] == "compressed-tensors"


def test_evil_pickle_really_runs_when_unpickled(tmp_path):
    """The fixture the tests above rely on: the planted file does create the marker when loaded as
    pickle with weights_only=False (what accelerate's load_state did for custom objects)."""
    marker = tmp_path / "pwned"
    plant(tmp_path / "x.pkl", marker)
    torch.load(str(tmp_path / "x.pkl"), weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(str(tmp_path / "x.pkl"), weights_only=True)
    assert not marker.exists()
