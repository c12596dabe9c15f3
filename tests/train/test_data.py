"""Training examples: chat-template pairs with the prompt masked, plain-text chunks, bad files."""

import pytest

from compress.errors import CompressError
from compress.train.data import IGNORE_INDEX, collate, load_examples, split_examples
from tests.helpers.adapt import smollm2_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def test_prompt_tokens_are_masked_and_the_response_is_learned(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Reverse 1234", "response": "4321"}])
    (example,) = load_examples(path, tok, 128)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Reverse 1234"}], add_generation_prompt=True,
                                     tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    learned = example.labels[n_prompt:]
    # The answer, the end-of-turn token and the template's newline; nothing else.
    assert learned == tok("4321<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert example.input_ids[n_prompt:] == learned


def test_alpaca_input_field_and_system_prompt(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Sum", "input": "2 3", "response": "5"}])
    (example,) = load_examples(path, tok, 128, system="Be terse.")
    text = tok.decode(example.input_ids)
    assert "Sum\n\n2 3" in text and "Be terse." in text and "SmolLM" not in text


def test_plain_text_is_chunked_with_every_token_learned(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    n_tokens = len(tok(path.read_text(), add_special_tokens=False)["input_ids"]) + 1  # + EOS
    examples = load_examples(path, tok, 16)
    assert [len(e.input_ids) for e in examples[:-1]] == [16] * (len(examples) - 1)
    assert sum(len(e.input_ids) for e in examples) == n_tokens
    assert all(e.labels == e.input_ids for e in examples)


def test_blank_lines_only_is_an_error(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n  \n")
    with pytest.raises(CompressError, match="no records"):
        load_examples(path, tok, 64)


def test_non_object_line_names_its_line_number(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(CompressError, match=r"d\.jsonl:2: expected a JSON object"):
        load_examples(path, tok, 64)


def test_split_is_seeded_and_disjoint():
    items = list(range(40))
    train_a, eval_a = split_examples(items, 0.25, seed=3)
    train_b, eval_b = split_examples(items, 0.25, seed=3)
    assert (train_a, eval_a) == (train_b, eval_b) and len(eval_a) == 10
    assert sorted(train_a + eval_a) == items


def test_collate_pads_right_and_masks_padding(tok):
    from compress.train.data import Example

    batch = collate([Example([5, 6, 7], [IGNORE_INDEX, 6, 7]), Example([8], [8])], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
