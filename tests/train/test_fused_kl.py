"""The chunked KL of KD (compress/train/fused_kl.py): loss and gradients equal a float64 computation on
the full logits, for tied and untied heads, a bias, a temperature and chunks that do not divide the
positions; KLDistillLoss takes the chunked path for a plain head and keeps the full-logits one
otherwise."""

import pytest
import torch
from torch import nn

from compress.train.data import collate
from compress.train.fused_kl import linear_kl, student_hidden
from compress.train.losses import KLDistillLoss, labelled_positions
from tests.helpers import make_tiny_llama
from tests.helpers.losses import peaked_teacher, random_examples

pytestmark = pytest.mark.usefixtures("one_thread")


def float64_reference(hidden, weight, bias, teacher_logits, t):
    """T² Σ KL(softmax(z_t/T) ‖ softmax(z_s/T)) and its gradients, by autograd in float64."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    z = nn.functional.linear(h, w, b)
    log_q = torch.log_softmax(z / t, dim=-1)
    log_p = torch.log_softmax(teacher_logits.double() / t, dim=-1)
    loss = (log_p.exp() * (log_p - log_q)).sum() * t * t
    loss.backward()
    return loss.item(), h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("bias,chunk,t", [(False, 7, 1.0), (True, 5, 2.5), (False, None, 1.0)])
def test_loss_and_gradients_equal_a_float64_computation(bias, chunk, t):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g).requires_grad_(True)  # 23 rows: chunks of 7 or 5 leave a rest
    head = nn.Linear(16, 40, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(40, 16, generator=g) * 0.8)
        if bias:
            head.bias.copy_(torch.randn(40, generator=g))
    hidden_t, head_t = torch.randn(23, 16, generator=g), nn.Linear(16, 40, bias=True)
    teacher_logits = head_t(hidden_t).detach()
    expected, gh, gw, gb = float64_reference(hidden, head.weight, head.bias, teacher_logits, t)
    for teacher in ((hidden_t, head_t), teacher_logits):  # the teacher's head applied here, or its logits
        hidden.grad, head.weight.grad = None, None
        if bias:
            head.bias.grad = None
        loss = linear_kl(hidden, head, teacher, t, chunk=chunk)
        (loss * 3.0).backward()  # an upstream gradient (the loop's 1 / global count) scales every gradient
        assert loss.dtype == torch.float32 and expected > 0.1
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert torch.allclose(hidden.grad.double(), 3 * gh, atol=1e-6, rtol=1e-5)
        assert torch.allclose(head.weight.grad.double(), 3 * gw, atol=1e-6, rtol=1e-5)
        if bias:
            assert torch.allclose(head.bias.grad.double(), 3 * gb, atol=1e-6, rtol=1e-5)
    assert head_t.weight.grad is None  # the teacher's head is not trained


@pytest.mark.parametrize("tie", [False, True])
def test_the_kd_loss_takes_the_chunked_path_with_the_dense_gradients(tie):
    batch = collate(random_examples(4, seed=1), pad_id=0)  # padding and masked prompts
    teacher = peaked_teacher()
    student = make_tiny_llama(seed=1, tie_word_embeddings=tie)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tie
    hidden, head = student_hidden(student, batch)
    assert head is student.lm_head and hidden.shape[-1] == student.config.hidden_size  # the head's inputs
    assert isinstance(student.lm_head, nn.Linear)  # the head is back after the forward
    loss, count = KLDistillLoss(teacher, 2.0)(student, batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    keep = labelled_positions(batch)  # the plain computation on full logits, in float64
    z = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep].double()
    with torch.no_grad():
        z_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
    log_q, log_p = torch.log_softmax(z / 2, dim=-1), torch.log_softmax(z_t.double() / 2, dim=-1)
    dense = (log_p.exp() * (log_p - log_q)).sum() * 4
    dense.backward()
    assert count == int(keep.sum()) and loss.item() == pytest.approx(dense.item(), rel=1e-6)
    for name, p in student.named_parameters():
        assert torch.allclose(fused[name].double(), p.grad.double(), atol=1e-6, rtol=1e-4), name


def test_a_head_that_is_not_plain_keeps_the_full_logits_path():
    batch = collate(random_examples(2, seed=2), pad_id=0)
    teacher, student = peaked_teacher(), make_tiny_llama(seed=1)
    expected = KLDistillLoss(teacher)(student, batch)[0].item()
    student.lm_head = nn.Sequential(student.lm_head)  # the same logits, not an nn.Linear
    assert student_hidden(student, batch) is None
    assert KLDistillLoss(teacher)(student, batch)[0].item() == pytest.approx(expected, rel=1e-6)
