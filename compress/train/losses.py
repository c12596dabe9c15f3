"""Training losses for :func:`compress.train.loop.train`: cross-entropy, distillation to a teacher's
logits (KL), and distances between hidden states.

A loss is any object (or function) with ``loss(model, batch) -> (summed loss, count)`` (the
:class:`TrainLoss` protocol): ``batch`` is a collated micro-batch (``input_ids``, ``attention_mask``,
``labels``, see :func:`compress.train.data.collate`), the loss is a scalar tensor summed (not
averaged) over the positions it scores, and ``count`` is how many positions those are. The loop
divides every micro-batch's sum by the count of the whole global batch (all micro-batches of all
processes), which it knows before the step from the examples through ``loss.example_count(example)``;
so the gradient of a step is exactly that of (sum over the global batch) / (global count), whatever
the split into processes and micro-batches. A loss without ``example_count`` counts like the ones here.

Every loss here scores the same positions, the *labelled positions*: position ``t`` of a sequence
whose next token ``t + 1`` has a label (``labels[:, 1:] != -100``), i.e. the positions where
next-token cross-entropy is defined (prompt tokens masked, padding excluded). So the count, and the
normalisation, are those of cross-entropy for all three.

Teachers are run under ``torch.no_grad`` on the same batch, inside the loop's autocast (bf16 on
GPU), moved to the batch's device on first use and put in eval mode; their parameters are not
touched otherwise (a teacher may share weights with the student).
"""

from __future__ import annotations

from typing import Iterable, Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from compress.errors import CompressError
from compress.train.data import IGNORE_INDEX, Example


@runtime_checkable
class TrainLoss(Protocol):
    """What the loop calls on each micro-batch: ``(summed loss, count)`` of the positions scored."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]: ...


def labelled_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(batch, T-1) bool: position t is scored when token t+1 has a label."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def example_label_count(example: Example) -> int:
    """Labelled positions of one example (a label at position 0 is never predicted, hence [1:])."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over the labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = batch["labels"][:, 1:]
    # (batch, T-1, vocab) against (batch, T-1); float32 so bf16 logits do not lose the loss.
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shifted != IGNORE_INDEX).sum())


class TokenLoss:
    """Base of the losses here: a sum over the labelled positions, counted by :func:`example_label_count`."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def example_count(self, example: Example) -> int:
        """How many positions of ``example`` the loss scores (the loop's global denominator)."""
        return example_label_count(example)


class CrossEntropyLoss(TokenLoss):
    """Next-token cross-entropy (the loop's default): Σ −log softmax(z_t)[y_{t+1}] over labelled positions,
    float32 log-softmax of the full vocabulary (exactly :func:`token_loss_sum`)."""

    def __call__(self, model, batch):
        return token_loss_sum(model, batch)


class _Teacher:
    def __init__(self, teacher: torch.nn.Module):
        self.teacher = teacher.eval()

    def _on_batch_device(self, batch: dict[str, torch.Tensor]) -> None:
        device = batch["input_ids"].device
        first = next(self.teacher.parameters(), None)
        if first is not None and first.device != device:
            self.teacher.to(device)

    @torch.no_grad()
    def teacher_outputs(self, batch: dict[str, torch.Tensor], **kwargs):
        self._on_batch_device(batch)
        return self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


class KLDistillLoss(_Teacher, TokenLoss):
    """Knowledge distillation to a teacher's logits (Hinton et al., 2015), per labelled position:

        T² · KL(p_T ‖ q_T) = T² · Σ_v p_T(v) (log p_T(v) − log q_T(v)),
        p_T = softmax(z_teacher / T),  q_T = softmax(z_student / T),

    summed over the labelled positions, over the full vocabulary, with float32 log-softmax of both.
    The T² factor (our choice, as in Hinton et al.) keeps the gradient's size about independent of
    the temperature, so a learning rate found at T = 1 still fits; at T = 1 it is the plain KL.
    Teacher and student must share the vocabulary (the same logits width). When the student's logits
    are a plain linear head on its last hidden state (the LLaMA family, the hybrids), the head and the
    KL run one chunk of positions at a time (:mod:`compress.train.fused_kl`): the same loss and
    gradients without a batch's full logits.
    """

    def __init__(self, teacher: torch.nn.Module, temperature: float = 1.0):
        if not temperature > 0:
            raise CompressError(f"the distillation temperature must be positive, got {temperature}")
        super().__init__(teacher)
        self.temperature = float(temperature)

    def __call__(self, model, batch):
        from compress.train.fused_kl import linear_kl, student_hidden

        keep = labelled_positions(batch)
        fused = student_hidden(model, batch)  # a plain head: the KL chunk by chunk (compress.train.fused_kl)
        if fused is None:
            student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
            teacher = self.teacher_outputs(batch).logits[:, :-1][keep]
            self._check_vocab(student.shape[-1], teacher.shape[-1])
            return kl_sum(student, teacher, self.temperature), int(keep.sum())
        hidden, head = fused
        teacher = self.teacher_source(batch, keep)
        self._check_vocab(head.weight.shape[0],
                          teacher[1].weight.shape[0] if isinstance(teacher, tuple) else teacher.shape[-1])
        return linear_kl(hidden[:, :-1][keep], head, teacher, self.temperature), int(keep.sum())

    @torch.no_grad()
    def teacher_source(self, batch: dict[str, torch.Tensor], keep: torch.Tensor):
        """The teacher at the kept positions: (last hidden states, head) when its logits are a plain head on
        them, else its logits."""
        from compress.metrics.logits import plain_head

        plain = plain_head(self.teacher)
        if plain is None:
            return self.teacher_outputs(batch).logits[:, :-1][keep]
        decoder, head = plain
        self._on_batch_device(batch)
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return hidden.last_hidden_state[:, :-1][keep], head

    @staticmethod
    def _check_vocab(student: int, teacher: int) -> None:
        if teacher != student:
            raise CompressError(f"teacher and student vocabularies differ ({teacher} vs {student} logits)")


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · Σ_rows KL(softmax(teacher/T) ‖ softmax(student/T)) over (rows, vocab) logits, in float32."""
    t = temperature
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_q, log_p, reduction="sum", log_target=True) * (t * t)


class HiddenStateLoss(_Teacher, TokenLoss):
    """Distance between chosen student and teacher hidden states, per labelled position:

        Σ_(s, t) in layers Σ_positions d(h_student[s], h_teacher[t]),

    with ``distance`` ``"mse"`` (d = mean over the hidden width of the squared difference) or ``"l2"``
    (d = the Euclidean norm of the difference), in float32. ``layers`` are indices into the models'
    ``hidden_states`` (``output_hidden_states=True``: 0 is the embeddings' output, i the output of
    decoder layer i, -1 the last entry as transformers returns it), each an int (the same index in
    both) or a (student, teacher) pair (a student with fewer layers). The count is the number of
    labelled positions, not multiplied by the number of layers.
    """

    def __init__(self, teacher: torch.nn.Module, layers: Iterable[int | tuple[int, int]] = (-1,),
                 distance: Literal["mse", "l2"] = "mse"):
        if distance not in ("mse", "l2"):
            raise CompressError(f"hidden-state distance must be 'mse' or 'l2', got {distance!r}")
        super().__init__(teacher)
        self.pairs = [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in layers]
        if not self.pairs:
            raise CompressError("choose at least one hidden state to match")
        self.distance = distance

    def __call__(self, model, batch):
        keep = labelled_positions(batch)
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states
        teacher = self.teacher_outputs(batch, output_hidden_states=True).hidden_states
        total = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
        for s, t in self.pairs:
            hs, ht = student[s][:, :-1][keep].float(), teacher[t][:, :-1][keep].float()
            if hs.shape[-1] != ht.shape[-1]:
                raise CompressError(f"hidden state {s} of the student ({hs.shape[-1]} wide) and {t} of the "
                                    f"teacher ({ht.shape[-1]} wide) differ in width")
            diff = hs - ht
            if self.distance == "mse":
                total = total + diff.square().mean(dim=-1).sum()
            else:
                total = total + torch.linalg.vector_norm(diff, dim=-1).sum()
        return total, int(keep.sum())
