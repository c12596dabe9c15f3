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


GENERATE_KV_BUDGET = 768 << 20  # bytes of KV cache one generation batch may hold
GENERATE_MAX_BATCH = 64


def generation_batch(model, samples: int, seqlen: int) -> int:
    """Samples generated together: as many as fit ``GENERATE_KV_BUDGET`` of KV cache at ``seqlen``
    (decoding reads every weight once per step, so wider batches are cheaper per token), at most 64."""
    from compress.metrics.cost import kv_cache_bytes_per_token

    per_sample = max(1, kv_cache_bytes_per_token(model) * seqlen)
    return max(1, min(samples, GENERATE_MAX_BATCH, GENERATE_KV_BUDGET // per_sample))


def sample_seeds(samples: int, seed: int) -> list[int]:
    """One generator seed per sample, drawn from ``seed``: sample i's tokens do not depend on the batch."""
    drawn = torch.randint(0, 2**62, (samples,), generator=torch.Generator().manual_seed(seed))
    return [int(x) for x in drawn]


def _top_k_pick(logits: torch.Tensor, generators: list, temperature: float, top_k: int) -> torch.Tensor:
    """One token per row of ``logits`` (b, V): top-k sampling by inverse CDF with each row's generator."""
    top = torch.topk(logits.float() / temperature, min(top_k, logits.shape[-1]), dim=-1)
    cdf = torch.softmax(top.values, dim=-1).cumsum(dim=-1).cpu()  # (b, k)
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float32) for g in generators])  # (b,)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)  # (b, 1)
    return top.indices.cpu().gather(1, pick)


@torch.no_grad()
def generate_tokens(model, tokenizer, samples: int, seqlen: int, seed: int, batch_size: int | None = None,
                    temperature: float = 1.0, top_k: int = 50) -> torch.Tensor:
    """Data-free calibration: text the model samples itself, seeded (LLM-QAT style).

    Each sample starts from BOS (or token 0) and a first token drawn uniformly from the vocabulary,
    then continues with top-k sampling at ``temperature``. Sample i draws from its own generator
    (:func:`sample_seeds`), so the tokens are the same whatever ``batch_size`` (default:
    :func:`generation_batch`). Batches decode with a KV cache, one token per step and only the last
    position's logits. Returns (samples, seqlen).
    """
    check_sizes(samples, seqlen)
    import inspect

    from compress.progress import bar

    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    bos = model.config.bos_token_id if bos is None else bos
    batch_size = batch_size or generation_batch(model, samples, seqlen)
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    seeds = sample_seeds(samples, seed)
    out = torch.empty((samples, seqlen), dtype=torch.long)
    progress = bar("generating calibration text", total=samples * seqlen, unit="tok")
    for start in range(0, samples, batch_size):
        generators = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        ids = out[start:start + len(generators)]  # a view: written in place
        ids[:, 0] = bos if bos is not None else 0
        if seqlen > 1:
            ids[:, 1] = torch.cat([torch.randint(0, vocab, (1,), generator=g) for g in generators])
        cache, step_input, position = None, ids[:, :2], 0
        while position + step_input.shape[1] < seqlen:
            result = model(input_ids=step_input.to(device), cache=cache, use_cache=True, **keep_last)
            cache, position = result.cache, position + step_input.shape[1]
            ids[:, position:position + 1] = _top_k_pick(result.logits[:, -1], generators, temperature, top_k)
            step_input = ids[:, position:position + 1]
            progress.update(len(generators))
        del cache
    progress.close()
    return out


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
