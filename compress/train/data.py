"""Training examples: JSONL instruction/response pairs or plain text, tokenized once.

A JSONL file (``.jsonl``/``.json``) holds one object per line, either an instruction pair
(``{"instruction": ..., "response": ...}``, an optional ``"input"`` appended to the instruction as in
Alpaca) or a ``{"text": ...}`` row. Instruction pairs go through the tokenizer's chat template; the
prompt tokens get the label -100 so only the response is learned. Plain text (any other file, or
``text`` rows) is cut into ``seqlen``-token chunks, every token learned. A malformed line is an error
that names its line number; an empty file is an error.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.errors import CompressError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # the label torch's cross-entropy skips
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"  # when the tokenizer has no chat template


@dataclass
class Example:
    """One training sequence: token ids and labels of the same length (-100 where not learned)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def label_count(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def read_records(path: Path) -> list[dict]:
    """Parse a JSONL file into records, checking every line; errors name the line number."""
    records = []
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise CompressError(f"cannot read data file {path}: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise CompressError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                    f"{exc.start + 1}); is it a binary file?") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CompressError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            except RecursionError:
                raise CompressError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
            records.append(_check_record(record, path, number))
    return records


def _check_record(record, path: Path, number: int) -> dict:
    where = f"{path}:{number}"
    if not isinstance(record, dict):
        raise CompressError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "text" in record and "instruction" not in record:
        if not isinstance(record["text"], str):
            raise CompressError(f"{where}: field 'text' must be a string")
        return {"text": record["text"]}
    missing = [k for k in ("instruction", "response") if k not in record]
    if missing:
        raise CompressError(f"{where}: missing field '{missing[0]}' (each line needs 'instruction' and "
                            f"'response', or 'text')")
    for key in ("instruction", "response", "input"):
        if key in record and not isinstance(record[key], str):
            raise CompressError(f"{where}: field '{key}' must be a string")
    instruction = record["instruction"]
    if record.get("input"):
        instruction = f"{instruction}\n\n{record['input']}"
    return {"instruction": instruction, "response": record["response"]}


def prompt_and_full(tokenizer, instruction: str, response: str, system: str | None) -> tuple[str, str]:
    """The prompt text (up to the assistant's turn) and the full text with the response."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system is not None else [])
        messages.append({"role": "user", "content": instruction})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if full.startswith(prompt):
            return prompt, full
        # A template whose assistant turn does not extend the generation prompt: learn the response only.
        return prompt, prompt + response + (tokenizer.eos_token or "")
    prompt = PLAIN_PROMPT.format(instruction=instruction)
    return prompt, prompt + response + (tokenizer.eos_token or "")


def pair_example(tokenizer, instruction: str, response: str, seqlen: int, system: str | None) -> Example:
    """Tokenize one pair; the prompt's tokens are masked from the loss (label -100)."""
    prompt, full = prompt_and_full(tokenizer, instruction, response, system)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    # Tokenizing the concatenation can merge tokens across the boundary; the prompt is a prefix in
    # every chat template we know, and masking len(prompt_ids) tokens is right for those.
    n_prompt = len(prompt_ids)
    labels = [IGNORE_INDEX] * n_prompt + full_ids[n_prompt:]
    return Example(full_ids[:seqlen], labels[:seqlen])


def text_examples(tokenizer, texts: list[str], seqlen: int) -> list[Example]:
    """Plain text: the texts joined and cut into chunks of ``seqlen`` tokens, all tokens learned."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
    chunks = [stream[i:i + seqlen] for i in range(0, len(stream), seqlen)]
    return [Example(c, list(c)) for c in chunks if len(c) >= 2]


def load_examples(path: str | Path, tokenizer, seqlen: int, system: str | None = None) -> list[Example]:
    """Read and tokenize a training file (see the module docstring for the formats)."""
    if tokenizer is None:
        raise CompressError("this model has no tokenizer; adapter training needs one")
    if seqlen < 2:
        raise CompressError(f"--seqlen must be at least 2 tokens, got {seqlen}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CompressError(f"data file not found: {path}")
    if path.stat().st_size == 0:
        raise CompressError(f"data file {path} is empty")
    if path.suffix.lower() in (".jsonl", ".json"):
        records = read_records(path)
        if not records:
            raise CompressError(f"data file {path} has no records (only blank lines)")
        texts = [r["text"] for r in records if "text" in r]
        examples = text_examples(tokenizer, texts, seqlen) if texts else []
        for r in records:
            if "instruction" in r:
                examples.append(pair_example(tokenizer, r["instruction"], r["response"], seqlen, system))
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CompressError(f"{path} is not UTF-8 text") from None
        if not text.strip():
            raise CompressError(f"data file {path} is empty (only whitespace)")
        examples = text_examples(tokenizer, [text], seqlen)
    kept = [e for e in examples if e.label_count > 0]
    if len(kept) < len(examples):
        log.warning("%d of %d examples have no response token within --seqlen %d and are skipped",
                    len(examples) - len(kept), len(examples), seqlen)
    if not kept:
        raise CompressError(f"no trainable tokens in {path} at --seqlen {seqlen} (prompts fill the window?)")
    return kept


def split_examples(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded held-out split: (train, eval). ``eval_fraction`` 0 gives no eval set."""
    if not 0.0 <= eval_fraction < 1.0:
        raise CompressError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n_eval = int(round(len(examples) * eval_fraction))
    if eval_fraction > 0 and n_eval == 0 and len(examples) > 1:
        n_eval = 1
    if n_eval >= len(examples):
        raise CompressError(f"{len(examples)} examples are too few to hold out {eval_fraction:.0%} for evaluation")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask, labels, each (batch, longest)."""
    longest = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
