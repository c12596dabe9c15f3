"""Text sources and token sets: calibration samples and evaluation streams.

Sources: ``generate`` (text the model writes itself, the data-free default), a WikiText-2 raw
file (one row per line, joined with blank lines as the datasets library does), C4-style JSON lines
(a ``text`` field per line), or any text file or folder of ``.txt`` files. The aliases
``wikitext2`` and ``c4`` name local files (``$COMPRESS_DATA`` or ``../shared/data``); nothing is
downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch

from compress.errors import CompressError

WIKITEXT2_TRAIN = "wikitext-2-raw/wiki.train.first1MB-noblank.txt"
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"


def data_root() -> Path:
    env = os.environ.get("COMPRESS_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for candidate in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "data"):
        if candidate.is_dir():
            return candidate
    return here.parent / "shared" / "data"


def resolve_data(source: str, split: str = "train") -> Path:
    """Map ``wikitext2``/``c4`` to local files; return other paths after checking they exist."""
    if source == "wikitext2":
        path = data_root() / (WIKITEXT2_TRAIN if split == "train" else WIKITEXT2_TEST)
    elif source == "c4":
        path = data_root() / "c4"
        if not path.exists():
            raise CompressError(f"no local C4 sample at {path}; give a JSON-lines file with --data PATH")
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise CompressError(f"data not found: {path}")
    return path


def read_text(path: Path) -> str:
    """Read a text source as one string.

    ``.jsonl``/``.json``(``.gz``): the ``text`` field of each line, joined with blank lines.
    A folder: its ``.txt``/``.raw``/``.jsonl`` files in name order. Any other file: raw lines as rows
    joined with ``"\\n\\n"`` (the datasets library's wikitext-2-raw-v1 rows, blank lines as empty rows).
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".raw", ".jsonl", ".json", ".gz"})
        if not files:
            raise CompressError(f"no .txt, .raw or .jsonl files in folder {path}")
        return "\n\n".join(read_text(p) for p in files)
    name = path.name.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "\n\n".join(_read_jsonl(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CompressError(f"{path} is not UTF-8 text") from None
    # As the datasets library's wikitext builder: a row is a line with its newline, a blank line "".
    rows = [line if line.strip() else "" for line in text.splitlines(keepends=True)]
    return "\n\n".join(rows)


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CompressError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
    return texts


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once into a 1-D LongTensor (no special tokens added)."""
    if tokenizer is None:
        raise CompressError("this model has no tokenizer; text data needs one")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def check_sizes(samples: int, seqlen: int) -> None:
    if seqlen <= 0:
        raise CompressError(f"--seqlen must be a positive number of tokens, got {seqlen}")
    if samples <= 0:
        raise CompressError(f"--samples must be positive, got {samples}")


def sample_windows(stream: torch.Tensor, samples: int, seqlen: int, seed: int, what: str = "text") -> torch.Tensor:
    """Pick ``samples`` non-overlapping windows of ``seqlen`` tokens at seeded random slots.

    Returns (samples, seqlen). A stream too short for that many disjoint windows is an error, never a
    silently smaller set.
    """
    check_sizes(samples, seqlen)
    slots = stream.numel() // seqlen
    if slots < samples:
        raise CompressError(f"{what} is too short: {stream.numel()} tokens give {slots} windows of {seqlen}, "
                            f"{samples} were asked for ({samples * seqlen} tokens)")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(slots, generator=generator)[:samples].sort().values
    return torch.stack([stream[i * seqlen:(i + 1) * seqlen] for i in chosen.tolist()])


@torch.no_grad()
def generate_tokens(model, tokenizer, samples: int, seqlen: int, seed: int, batch_size: int = 16,
                    temperature: float = 1.0, top_k: int = 50) -> torch.Tensor:
    """Data-free calibration: text the model samples itself, seeded (LLM-QAT style).

    Each sample starts from BOS (or token 0) and a first token drawn uniformly from the vocabulary,
    then continues with top-k sampling at ``temperature``. Returns (samples, seqlen).
    """
    check_sizes(samples, seqlen)
    from compress.progress import bar

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    bos = model.config.bos_token_id if bos is None else bos
    generator = torch.Generator().manual_seed(seed)
    out = []
    progress = bar("generating calibration text", total=samples * seqlen, unit="tok")
    for start in range(0, samples, batch_size):
        b = min(batch_size, samples - start)
        first = torch.randint(0, vocab, (b, 1), generator=generator)
        ids = torch.cat([torch.full((b, 1), bos if bos is not None else 0), first], dim=1)[:, :seqlen]
        cache = None
        step_input = ids
        while ids.shape[1] < seqlen:
            result = model(input_ids=step_input.to(device), cache=cache, use_cache=True)
            cache = result.cache
            logits = result.logits[:, -1].float().cpu() / temperature
            top = torch.topk(logits, top_k, dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            pick = torch.multinomial(probs, 1, generator=generator)
            step_input = top.indices.gather(1, pick)
            ids = torch.cat([ids, step_input], dim=1)
            progress.update(b)
        out.append(ids)
    progress.close()
    return torch.cat(out)


def calibration_tokens(model, tokenizer, source: str = "generate", samples: int = 128, seqlen: int = 512,
                       seed: int = 0) -> torch.Tensor:
    """Calibration token ids (samples, seqlen), deterministic for a given seed."""
    check_sizes(samples, seqlen)
    if source == "generate":
        return generate_tokens(model, tokenizer, samples, seqlen, seed)
    path = resolve_data(source, split="train")
    stream = tokenize_text(tokenizer, read_text(path))
    return sample_windows(stream, samples, seqlen, seed, what=f"calibration text {path}")


def evaluation_stream(tokenizer, source: str) -> torch.Tensor:
    """The whole evaluation text tokenized once (the standard perplexity protocol)."""
    path = resolve_data(source, split="test")
    return tokenize_text(tokenizer, read_text(path))
