"""`compress.evaluate` (compress.metrics) returns what `compress eval --json` prints, to the last digit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import compress
from compress.errors import CompressError
from compress.metrics import evaluate
from tests.helpers import REPO, WIKI_TEST, make_tiny_llama

TIMING_KEYS = {"seconds", "prefill_tokens_per_s", "decode_tokens_per_s"}  # differ from run to run
PERPLEXITY_KEYS = {"perplexity", "seqlen", "stride", "windows", "tokens", "seconds", "model", "data"}
FIDELITY_KEYS = {"kl_divergence", "top1_agreement", "positions"}
COST_KEYS = {"parameters", "parameter_bytes", "bytes_on_disk", "kv_cache_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"}


def cli_json(*args) -> dict:
    """`compress eval ... --json` in its own process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "compress", "--quiet", "eval", *map(str, args), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_same_numbers(api: dict, cli: dict) -> None:
    assert set(api) == set(cli)
    for key in sorted(set(api) - TIMING_KEYS):
        assert type(api[key]) is type(cli[key]) and api[key] == cli[key], (key, api[key], cli[key])


@pytest.fixture
def reference_folder(tmp_path, tiny_model_folder):
    """Another tiny random Llama of the same shape (another seed), so KL > 0 and agreement < 1."""
    folder = tmp_path / "reference"
    make_tiny_llama(seed=1, vocab_size=49152, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2).save_pretrained(folder)
    return folder


def test_evaluate_equals_cli_json_with_reference_and_cost(tiny_model_folder, reference_folder):
    api = compress.evaluate(compress.load(str(tiny_model_folder)), data=WIKI_TEST, seqlen=64, windows=3,
                            batch_size=2, reference=str(reference_folder), cost=True)
    cli = cli_json(tiny_model_folder, "--data", WIKI_TEST, "--seqlen", 64, "--windows", 3, "--batch-size", 2,
                   "--reference", reference_folder, "--cost")
    assert set(api) == PERPLEXITY_KEYS | FIDELITY_KEYS | COST_KEYS
    assert_same_numbers(api, cli)
    assert api["model"] == str(tiny_model_folder) and api["data"] == str(WIKI_TEST)
    assert api["windows"] == 3 and api["tokens"] == 3 * 63 and api["positions"] == 3 * 64
    assert api["kl_divergence"] > 0 and 0 <= api["top1_agreement"] < 1
    assert api["bytes_on_disk"] == (tiny_model_folder / "model.safetensors").stat().st_size


def test_reference_as_loaded_model_or_module_gives_the_same_numbers(tiny_model_folder, reference_folder):
    loaded = compress.load(str(tiny_model_folder))
    by_path = evaluate(loaded, data=WIKI_TEST, seqlen=64, windows=2, reference=str(reference_folder))
    ref = compress.load(str(reference_folder))
    for reference in (ref, ref.model):
        again = evaluate(loaded, data=WIKI_TEST, seqlen=64, windows=2, reference=reference)
        assert {k: again[k] for k in set(again) - TIMING_KEYS} == {k: by_path[k] for k in set(by_path) - TIMING_KEYS}


def test_bare_module_with_tokenizer(tiny_model_folder):
    loaded = compress.load(str(tiny_model_folder))
    with_loaded = evaluate(loaded, data=WIKI_TEST, seqlen=64, windows=2, cost=True)
    bare = evaluate(loaded.model, data=WIKI_TEST, seqlen=64, windows=2, cost=True, tokenizer=loaded.tokenizer)
    assert "bytes_on_disk" not in bare and set(bare) == set(with_loaded) - {"bytes_on_disk"}
    for key in ("perplexity", "tokens", "parameters", "kv_cache_bytes_per_token"):
        assert bare[key] == with_loaded[key]


def test_bare_module_without_tokenizer_is_an_error():
    with pytest.raises(CompressError, match="tokenizer="):
        evaluate(make_tiny_llama(), data=WIKI_TEST, seqlen=8, windows=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(seqlen=0), "--seqlen must be a positive"), (dict(seqlen=-5), "--seqlen must be a positive"),
    (dict(seqlen=8, windows=0), "--windows must be positive"), (dict(seqlen=8, stride=0), "--stride"),
    (dict(seqlen=8, stride=9), "--stride"), (dict(seqlen=8, batch_size=0), "--batch-size"),
    (dict(seqlen="512"), "--seqlen must be an integer"), (dict(seqlen=8, windows=1.5), "--windows must be an integer"),
])
def test_bad_values_are_errors_before_anything_is_loaded(tmp_path, kwargs, match):
    with pytest.raises(CompressError, match=match):  # not "model not found": checked before loading
        evaluate(str(tmp_path / "no-model"), data=WIKI_TEST, **kwargs)


def test_windows_are_checked_before_the_reference_is_loaded(tiny_model_folder, tmp_path):
    with pytest.raises(CompressError, match="the text has only"):
        evaluate(compress.load(str(tiny_model_folder)), data=WIKI_TEST, seqlen=64, windows=10**6,
                 reference=str(tmp_path / "no-reference"))


def test_not_a_model_is_an_error():
    with pytest.raises(CompressError, match="LoadedModel"):
        evaluate(42, data=WIKI_TEST, seqlen=8)
    with pytest.raises(CompressError, match="reference must be"):
        evaluate(make_tiny_llama(), data=WIKI_TEST, seqlen=8, reference=3.5)  # before the tokenizer check


def test_compress_evaluate_is_the_metrics_function():
    assert compress.evaluate is evaluate


@pytest.mark.slow
def test_smollm2_evaluate_equals_cli_json():
    api = compress.evaluate(compress.load("smollm2-135m"), data=WIKI_TEST, seqlen=512, windows=16)
    cli = cli_json("smollm2-135m", "--data", WIKI_TEST, "--seqlen", 512, "--windows", 16)
    assert set(api) == PERPLEXITY_KEYS
    assert_same_numbers(api, cli)
    assert api["windows"] == 16 and api["tokens"] == 16 * 511 and torch.isfinite(torch.tensor(api["perplexity"]))
