"""Text reading (the wikitext protocol), calibration windows and data-free generation."""

from __future__ import annotations

import json

import pytest
import torch

from compress.data import calibration_tokens, generate_tokens, read_text, sample_windows
from compress.errors import CompressError
from tests.helpers import WIKI_TEST, make_tiny_llama


def test_raw_text_rows_follow_the_datasets_library(tmp_path):
    # datasets' wikitext builder: a row is a line with its newline; a blank line is "".
    file = tmp_path / "wiki.raw"
    file.write_text("\n = Title = \n\n Body line .\n")
    assert read_text(file) == "" + "\n\n" + " = Title = \n" + "\n\n" + "" + "\n\n" + " Body line .\n"


def test_jsonl_text_field_and_malformed_line(tmp_path):
    good = tmp_path / "c4.jsonl"
    good.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b", "url": "x"}) + "\n")
    assert read_text(good) == "a\n\nb"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a"}) + "\n{oops\n")
    with pytest.raises(CompressError, match="bad.jsonl:2"):
        read_text(bad)


def test_folder_of_text_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    assert read_text(tmp_path) == "first\n\n\nsecond\n"


def test_windows_are_seeded_disjoint_and_deterministic():
    stream = torch.arange(1000)
    a = sample_windows(stream, samples=7, seqlen=100, seed=3)
    b = sample_windows(stream, samples=7, seqlen=100, seed=3)
    c = sample_windows(stream, samples=7, seqlen=100, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (7, 100)
    starts = a[:, 0]
    assert bool((starts % 100 == 0).all()) and len(set(starts.tolist())) == 7
    assert torch.equal(a, starts[:, None] + torch.arange(100))  # contiguous windows


def test_text_too_short_is_an_error_not_a_smaller_set():
    with pytest.raises(CompressError, match="too short: 1000 tokens give 10 windows of 100, 11 were asked"):
        sample_windows(torch.arange(1000), samples=11, seqlen=100, seed=0)


@pytest.mark.parametrize("samples,seqlen", [(0, 10), (4, 0), (4, -1)])
def test_bad_sizes(samples, seqlen):
    with pytest.raises(CompressError):
        sample_windows(torch.arange(100), samples, seqlen, seed=0)


def test_generated_calibration_is_seeded():
    model = make_tiny_llama()
    a = generate_tokens(model, None, samples=3, seqlen=12, seed=5, batch_size=2)
    b = generate_tokens(model, None, samples=3, seqlen=12, seed=5, batch_size=2)
    c = generate_tokens(model, None, samples=3, seqlen=12, seed=6, batch_size=2)
    assert a.shape == (3, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < 128 and int(a.min()) >= 0


def test_calibration_from_a_text_file(smollm2_tokenizer):
    tokens = calibration_tokens(None, smollm2_tokenizer, str(WIKI_TEST), samples=4, seqlen=64, seed=0)
    assert tokens.shape == (4, 64)
    text = smollm2_tokenizer.decode(tokens[0])
    assert len(text) > 100
