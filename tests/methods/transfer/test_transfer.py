"""compress.methods.transfer against direct float64 computations on tiny random Llama checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compress.methods.transfer import TransferOptions, apply, extract, transfer
from compress.methods.transfer.lowrank import truncated_svd
from tests.helpers.transfer import add_vocab_rows, save, three_versions, weights


def reference(target, base, ft, scale):
    """θ_target + λ(θ_ft − θ_base) in float64, rounded once to the target's dtype."""
    return (target.double() + scale * (ft.double() - base.double())).to(target.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_target_equal_to_source_base_gives_the_finetuned_model_bitwise(tmp_path, dtype):
    base, ft, _ = three_versions(tmp_path, dtype)
    transfer(base, ft, base, tmp_path / "out", TransferOptions(block_bytes=4096))
    out, expected = weights(tmp_path / "out"), weights(ft)
    assert out.keys() == expected.keys()
    for name, tensor in expected.items():
        assert out[name].dtype == dtype and torch.equal(out[name], tensor), name


def test_scale_zero_gives_the_target_bitwise(tmp_path):
    base, ft, target = three_versions(tmp_path)
    transfer(base, ft, target, tmp_path / "out", TransferOptions(scale=0.0))
    out, expected = weights(tmp_path / "out"), weights(target)
    assert all(torch.equal(out[n], expected[n]) for n in expected)


def test_transfer_equals_the_float64_formula_in_blocks_and_shards(tmp_path):
    base, ft, target = three_versions(tmp_path)
    sharded = save(__import__("transformers").LlamaForCausalLM.from_pretrained(target), tmp_path / "sharded",
                   max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    options = TransferOptions(scale=0.7, block_bytes=3000, max_shard_bytes=30_000)
    transfer(base, ft, sharded, tmp_path / "out", options)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    out, b, f, t = weights(tmp_path / "out"), weights(base), weights(ft), weights(target)
    for name in t:
        assert torch.equal(out[name], reference(t[name], b[name], f[name], 0.7)), name
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out")  # the stock loader reads the shards
    assert torch.equal(reloaded.model.norm.weight, out["model.norm.weight"])


def test_config_from_target_tokenizer_and_chat_template_from_finetuned(tmp_path):
    base, ft, target = three_versions(tmp_path)
    config = json.loads((target / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    (target / "config.json").write_text(json.dumps(config))
    (ft / "chat_template.jinja").write_text("{{ messages }}")
    (ft / "tokenizer_config.json").write_text('{"from": "finetuned"}')
    (target / "tokenizer_config.json").write_text('{"from": "target"}')
    transfer(base, ft, target, tmp_path / "out")
    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["rope_parameters"]["rope_theta"] == 500000.0
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()) == {"from": "finetuned"}
    record = json.loads((tmp_path / "out" / "compress.json").read_text())
    assert record["method"] == "transfer" and record["config"]["scale"] == 1.0
    assert record["config"]["vocab"] == "pad"  # the checkpoint default, resolved


def test_added_tokens_are_padded_with_the_finetuned_rows(tmp_path):
    base, ft, target = three_versions(tmp_path)
    add_vocab_rows(ft, 3)
    transfer(base, ft, target, tmp_path / "out", TransferOptions(vocab="pad", block_bytes=2048))
    out, b, f, t = weights(tmp_path / "out"), weights(base), weights(ft), weights(target)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (131, 64)
        assert torch.equal(out[name][:128], reference(t[name], b[name], f[name][:128], 1.0))
        assert torch.equal(out[name][128:], f[name][128:])  # the new rows equal the fine-tuned rows
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 131
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.from_pretrained(tmp_path / "out").model.embed_tokens.weight.shape == (131, 64)


def test_truncate_cuts_every_vocabulary_matrix_to_the_smallest(tmp_path):
    base, ft, target = three_versions(tmp_path)
    add_vocab_rows(ft, 3)
    transfer(base, ft, target, tmp_path / "out", TransferOptions(vocab="truncate"))
    out, b, f, t = weights(tmp_path / "out"), weights(base), weights(ft), weights(target)
    name = "lm_head.weight"
    assert out[name].shape == (128, 64)
    assert torch.equal(out[name], reference(t[name], b[name], f[name][:128], 1.0))


def test_include_and_exclude_select_the_tensors_that_get_the_diff(tmp_path):
    base, ft, target = three_versions(tmp_path)
    transfer(base, ft, target, tmp_path / "out", TransferOptions(include=r"\.mlp\.", exclude=r"down_proj"))
    out, b, f, t = weights(tmp_path / "out"), weights(base), weights(ft), weights(target)
    for name in t:
        moved = ".mlp." in name and "down_proj" not in name
        expected = reference(t[name], b[name], f[name], 1.0) if moved else t[name]
        assert torch.equal(out[name], expected), name
    assert sum(".mlp." in n and "down_proj" not in n for n in t) == 6  # 3 layers × gate, up


def test_report_numbers_equal_a_direct_computation(tmp_path):
    base, ft, target = three_versions(tmp_path)
    report = transfer(base, ft, target, None, TransferOptions(block_bytes=1000))  # report only
    assert not (tmp_path / "out").exists()
    b, f, t = weights(base), weights(ft), weights(target)
    rows = {r["tensor"]: r for r in report.rows()}
    assert rows.keys() == t.keys()
    for name in t:
        bd, fd, td = b[name].double(), f[name].double(), t[name].double()
        assert rows[name]["delta_rel"] == pytest.approx(float((fd - bd).norm() / bd.norm()), rel=1e-10)
        assert rows[name]["drift_rel"] == pytest.approx(float((td - bd).norm() / bd.norm()), rel=1e-10)
        cos = float((td * bd).sum() / (td.norm() * bd.norm()))
        assert rows[name]["cosine"] == pytest.approx(cos, rel=1e-10)
    flat = lambda d: torch.cat([d[n].double().flatten() for n in t])  # noqa: E731
    total = report.total()
    assert total["drift_rel"] == pytest.approx(float((flat(t) - flat(b)).norm() / flat(b).norm()), rel=1e-10)
    drifts = sorted(float((t[n].double() - b[n].double()).norm() / b[n].double().norm()) for n in t)
    assert report.median()["drift_rel"] == pytest.approx(float(torch.tensor(drifts, dtype=torch.float64).median()), rel=1e-10)
    assert report.warnings() == []  # a 20% drift: related versions


def test_unrelated_versions_raise_the_warning(tmp_path):
    from tests.helpers import make_tiny_llama

    base, ft, _ = three_versions(tmp_path)
    stranger = save(make_tiny_llama(seed=42), tmp_path / "stranger")  # same shapes, another initialization
    report = transfer(base, ft, stranger, None)
    assert report.median()["drift_rel"] == pytest.approx(math.sqrt(2), rel=0.1)  # independent tensors
    assert len(report.warnings()) == 1 and "does not look like a version" in report.warnings()[0]


def test_full_rank_diff_gives_the_full_transfer(tmp_path):
    base, ft, target = three_versions(tmp_path)
    transfer(base, ft, target, tmp_path / "full")
    transfer(base, ft, target, tmp_path / "lowrank", TransferOptions(rank=64))  # 64 = min(m, n) everywhere
    full, low = weights(tmp_path / "full"), weights(tmp_path / "lowrank")
    worst = max(float((full[n] - low[n]).abs().max()) for n in full)
    # The float64 SVD reproduces Δ to ~1e-15; after rounding to float32 at most one ulp differs.
    assert worst <= 1e-6
    assert sum(not torch.equal(full[n], low[n]) for n in full) <= len(full)


@pytest.mark.parametrize("rank", [1, 5, 20])
def test_truncated_svd_error_is_the_dropped_energy(rank):
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 32, generator=generator, dtype=torch.float64)
    low = truncated_svd(delta, rank)
    sigma = np.linalg.svd(delta.numpy(), compute_uv=False)  # independent reference
    error = float((delta - low.u @ low.v).square().sum())
    assert error == pytest.approx(float((sigma[rank:] ** 2).sum()), rel=1e-9)
    assert low.kept_energy == pytest.approx(float((sigma[:rank] ** 2).sum() / (sigma ** 2).sum()), rel=1e-9)
    assert low.u.shape == (48, rank) and low.v.shape == (rank, 32)


def test_extract_and_apply_round_trip(tmp_path):
    base, ft, target = three_versions(tmp_path)
    add_vocab_rows(ft, 2)
    extract(base, ft, tmp_path / "diff", dtype="float64")
    apply(tmp_path / "diff", base, tmp_path / "back")
    out, f = weights(tmp_path / "back"), weights(ft)
    assert all(torch.equal(out[n], f[n]) for n in f)  # float64 Δ: exact, added rows included
    transfer(base, ft, target, tmp_path / "direct")
    apply(tmp_path / "diff", target, tmp_path / "applied", scale=1.0)
    direct, applied = weights(tmp_path / "direct"), weights(tmp_path / "applied")
    assert all(torch.equal(direct[n], applied[n]) for n in direct)


def test_low_rank_artifact_is_small_and_reports_kept_energy(tmp_path):
    base, ft, target = three_versions(tmp_path)
    description = extract(base, ft, tmp_path / "diff", rank=4)
    size = (tmp_path / "diff" / "diff.safetensors").stat().st_size
    assert size < 0.25 * (base / "model.safetensors").stat().st_size
    b, f = weights(base), weights(ft)
    name = "model.layers.0.mlp.up_proj.weight"
    sigma = np.linalg.svd((f[name].double() - b[name].double()).numpy(), compute_uv=False)
    kept = float((sigma[:4] ** 2).sum() / (sigma ** 2).sum())
    assert description["tensors"][name]["kept_energy"] == pytest.approx(kept, rel=1e-9)
    report = apply(tmp_path / "diff", target, tmp_path / "out")
    assert math.isnan(report.total()["drift_rel"])  # an artifact does not know the source base


def test_registered_method_transfers_into_an_in_memory_model(tmp_path):
    from transformers import LlamaForCausalLM

    from compress.plugin import build_method
    from compress.plugin import RunContext

    base, ft, target = three_versions(tmp_path)
    transfer(base, ft, target, tmp_path / "out", TransferOptions(scale=0.5))
    model = LlamaForCausalLM.from_pretrained(target)
    method = build_method("transfer", {"source_base": str(base), "source_ft": str(ft), "scale": 0.5})
    result = method.run(RunContext(model=model, source=str(target)))
    expected = weights(tmp_path / "out")
    state = model.state_dict()
    assert all(torch.equal(state[n], expected[n]) for n in expected)
    assert result["report"]["total"]["drift_rel"] > 0


def test_the_llama3_recipe_builds_a_valid_transfer_config():
    import yaml

    from compress.plugin import build_method
    from tests.helpers import REPO

    recipe = yaml.safe_load((REPO / "recipes" / "transfer-llama3.yaml").read_text())
    (stage,) = recipe["stages"]
    method = build_method(stage["method"], stage["options"])
    assert method.config.scale == 1.0 and method.config.source_ft.endswith("Meta-Llama-3-8B-Instruct")


def test_one_options_type_for_the_method_the_functions_and_the_command(tmp_path):
    """TransferOptions is the method's Config; its vocab default resolves per destination (pad for a
    checkpoint, error in memory); the command's flags take their defaults from its fields."""
    from click.testing import CliRunner
    from transformers import LlamaForCausalLM

    from compress.cli import main
    from compress.errors import CompressError, ConfigError
    from compress.plugin import build_method, get_method
    from compress.plugin import RunContext

    assert get_method("transfer").Config is TransferOptions
    assert TransferOptions().resolved_vocab(in_memory=False) == "pad"
    base, ft, target = three_versions(tmp_path)
    method = build_method("transfer", {"source_base": str(base), "source_ft": str(ft)})
    assert method.config.vocab == "error" and method.config.scale == TransferOptions().scale
    with pytest.raises(ConfigError, match="method transfer: field 'max_shard_bytes' only applies"):
        build_method("transfer", {"source_base": "a", "source_ft": "b", "max_shard_bytes": 10})
    with pytest.raises(ConfigError, match="method transfer: field 'rank' must be a positive integer"):
        build_method("transfer", {"source_base": "a", "source_ft": "b", "rank": 0})
    add_vocab_rows(ft, 2)
    with pytest.raises(CompressError, match="vocabulary mismatch in "):  # the in-memory default: error
        method.run(RunContext(model=LlamaForCausalLM.from_pretrained(target)))
    help_text = CliRunner().invoke(main, ["transfer", "--help"]).output
    assert f"[default: {TransferOptions().scale}]" in help_text
    assert "Default: pad when a checkpoint is written" in " ".join(help_text.split())
