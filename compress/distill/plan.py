"""Everything a distillation decides before any work, checked against the teacher and the data.

:func:`make_plan` resolves the ranks, the MLA layers (or SMART's K), the KD teacher (same tokenizer and
vocabulary as the student) and the token windows: the training text is tokenized once, cut into
disjoint windows of ``seqlen`` tokens, and a seeded permutation of them gives, in this order, the ILD
windows, SMART's held-out windows (also KD's evaluation set) and the KD windows, so no window is used
twice. A budget the text cannot hold is an error, never a smaller run. Nothing is written here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compress.distill.config import DistillConfig
from compress.distill.smart import check_k, default_k
from compress.errors import CompressError


@dataclass
class DistillPlan:
    layers: int
    ranks: tuple[int, int, int]  # q_rank, kv_rank, rope_dim
    mla_layers: list[int] | None  # None: SMART chooses n_mla of them
    n_mla: int
    ild_tokens: torch.Tensor  # (N_ild, L)
    smart_tokens: torch.Tensor  # (N_smart, L)
    kd_tokens: torch.Tensor  # (N_kd, L), N_kd = kd_steps × global batch
    kd_steps: int
    global_batch: int
    world: int
    data_path: str
    data_tokens: int
    kd_teacher: str | None
    fingerprint: str = ""

    def summary(self) -> dict:
        return {"data": self.data_path, "data_tokens": self.data_tokens, "seqlen": int(self.ild_tokens.shape[1]),
                "ild_windows": int(self.ild_tokens.shape[0]), "smart_windows": int(self.smart_tokens.shape[0]),
                "kd_windows": int(self.kd_tokens.shape[0]), "kd_steps": self.kd_steps,
                "global_batch": self.global_batch, "processes": self.world}


def make_plan(teacher: torch.nn.Module, tokenizer, config: DistillConfig, world: int = 1) -> DistillPlan:
    """The checked plan of a distillation of ``teacher`` on ``world`` processes (module docstring)."""
    from compress.hybrid.build import check_ranks, parent_shape, parse_layers

    shape = parent_shape(teacher)  # LLaMA-like, the same heads in every layer, no q/k/v biases
    dq, dkv, drope = shape.default_ranks()
    ranks = (dq if config.q_rank is None else config.q_rank, dkv if config.kv_rank is None else config.kv_rank,
             drope if config.rope_dim is None else config.rope_dim)
    check_ranks(shape, *ranks)
    n = shape.layers
    if config.auto:
        mla, k = None, check_k(default_k(n) if config.n_mla is None else config.n_mla, n)
    else:
        mla = parse_layers(config.mla_layers, n, "--mla-layers")
        if not mla:
            raise CompressError("--mla-layers lists no layer; give indices such as 0,5,10 or 'auto'")
        if config.n_mla is not None and config.n_mla != len(mla):
            raise CompressError(f"--n-mla {config.n_mla} does not match the {len(mla)} layers of --mla-layers")
        k = len(mla)
    if config.kd_teacher is not None and config.kd_tokens > 0:
        check_same_tokenizer(tokenizer, teacher, config.kd_teacher)
    windows, data_path, data_tokens = split_windows(tokenizer, config, world)
    ild, smart, kd, steps = windows
    plan = DistillPlan(n, ranks, mla, k, ild, smart, kd, steps, config.batch_size * config.grad_accum * world, world,
                       data_path, data_tokens, config.kd_teacher)
    plan.fingerprint = fingerprint(teacher, config, plan)
    return plan


def split_windows(tokenizer, config: DistillConfig, world: int):
    """((ILD, SMART, KD windows, KD steps), data path, data tokens) from the training text."""
    from compress.data import read_text, resolve_data, tokenize_text

    if tokenizer is None:
        raise CompressError("the model has no tokenizer; distillation needs one to read --data")
    path = resolve_data(config.data, split="train")
    stream = tokenize_text(tokenizer, read_text(path))
    length = config.seqlen
    slots = stream.numel() // length
    global_batch = config.batch_size * config.grad_accum * world
    steps = config.kd_tokens // (length * global_batch)
    if config.kd_tokens > 0 and steps == 0:
        raise CompressError(f"--kd-tokens {config.kd_tokens} is less than one KD step (seqlen {length} × global "
                            f"batch {global_batch} = {length * global_batch} tokens)")
    counts = (config.ild_tokens // length, config.smart_tokens // length, steps * global_batch)
    if sum(counts) > slots:
        raise CompressError(f"the token budgets need {sum(counts)} windows of {length} tokens ({counts[0]} ILD, "
                            f"{counts[1]} SMART/eval, {counts[2]} KD = {sum(counts) * length} tokens), but {path} "
                            f"has {stream.numel()} tokens ({slots} windows); lower --ild-tokens / --kd-tokens / "
                            "--smart-tokens or give more --data")
    order = torch.randperm(slots, generator=torch.Generator().manual_seed(config.seed)).tolist()
    picked, start = [], 0
    for count in counts:
        chosen = sorted(order[start:start + count])
        start += count
        picked.append(torch.stack([stream[i * length:(i + 1) * length] for i in chosen]) if chosen
                      else torch.zeros(0, length, dtype=torch.long))
    return (*picked, steps), str(path), int(stream.numel())


def check_same_tokenizer(tokenizer, teacher: torch.nn.Module, kd_teacher: str) -> None:
    """The KD teacher must read and write the student's tokens: the same vocabulary and logits width."""
    from transformers import AutoConfig, AutoTokenizer

    from compress.models import _has_tokenizer, resolve_model_path

    path = resolve_model_path(kd_teacher)
    if not _has_tokenizer(path):
        raise CompressError(f"--kd-teacher {kd_teacher} has no tokenizer to compare with the student's")
    try:
        other = AutoTokenizer.from_pretrained(str(path))
        width = AutoConfig.from_pretrained(str(path)).vocab_size
    except Exception as exc:
        raise CompressError(f"cannot read --kd-teacher {kd_teacher}: {str(exc).splitlines()[0]}") from None
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine != theirs:
        differ = sorted(set(mine.items()) ^ set(theirs.items()), key=str)
        raise CompressError(f"--kd-teacher {kd_teacher} has a different tokenizer from the student's ({len(theirs)} "
                            f"vs {len(mine)} tokens; e.g. {differ[0][0]!r}); KD needs the same tokenizer")
    if width != teacher.config.vocab_size:
        raise CompressError(f"--kd-teacher {kd_teacher} has {width} output tokens, the student "
                            f"{teacher.config.vocab_size}; KD needs the same vocabulary")


def fingerprint(teacher: torch.nn.Module, config: DistillConfig, plan: DistillPlan) -> str:
    """Identifies a run (teacher, settings, windows, processes): a state folder of another run is refused."""
    digest = hashlib.sha256()
    settings = {k: v for k, v in asdict(config).items() if k != "state_dir"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(repr((plan.ranks, plan.mla_layers, plan.n_mla, plan.world, plan.global_batch)).encode())
    from compress.hybrid.build import MLA_INIT

    digest.update(MLA_INIT.encode())
    for tokens in (plan.ild_tokens, plan.smart_tokens, plan.kd_tokens):
        digest.update(tokens.numpy().tobytes())
    digest.update(repr(teacher.config.to_dict()).encode())
    for p in list(teacher.parameters())[:4]:
        digest.update(p.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def data_inputs(config: DistillConfig) -> list[str]:
    """Paths the distillation reads besides the teacher (never overwritten by an output)."""
    paths = [config.kd_teacher] if config.kd_teacher else []
    if config.data not in ("wikitext2", "c4"):
        paths.append(str(Path(config.data).expanduser()))
    return paths
