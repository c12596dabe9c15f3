"""The loss hook of the training loop: cross-entropy unchanged, KL distillation and hidden-state
distances against direct float64 computations, and training with the KL loss moving a perturbed
student towards its teacher."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.train.data import IGNORE_INDEX, collate
from compress.train.loop import TrainConfig, evaluate_loss, make_accelerator, train
from compress.train.losses import CrossEntropyLoss, HiddenStateLoss, KLDistillLoss, kl_sum
from tests.helpers import make_tiny_llama
from tests.helpers.losses import peaked_teacher, random_examples
from tests.helpers.transfer import perturbed


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def batch():
    return collate(random_examples(4, seed=1), pad_id=0)  # ragged: padding and masked prompts


def old_token_loss_sum(model, batch):
    """The loop's loss before the hook, verbatim."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shifted != IGNORE_INDEX).sum())


def test_cross_entropy_through_the_hook_is_the_old_loss_bit_for_bit(batch):
    model = make_tiny_llama(seed=0)
    loss, count = CrossEntropyLoss()(model, batch)
    old_loss, old_count = old_token_loss_sum(model, batch)
    assert torch.equal(loss, old_loss) and count == old_count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_training_with_the_default_and_the_explicit_cross_entropy_is_identical():
    examples = random_examples(12, seed=2)
    config = TrainConfig(steps=2, lr=1e-3, batch_size=2, grad_accum=2, seed=3)
    states, losses = [], []
    for loss in (None, CrossEntropyLoss()):
        model = make_tiny_llama(seed=0)
        result = train(model, examples[:8], examples[8:], config, pad_id=0, accelerator=make_accelerator(2, "cpu"),
                       loss=loss)
        states.append({n: p.detach().clone() for n, p in model.named_parameters()})
        losses.append((result.train_losses, result.eval_losses))
    assert losses[0] == losses[1]
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[0])


def float64_kl(student, teacher, batch, temperature):
    with torch.no_grad():
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        zs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        zt = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        log_q = torch.log_softmax(zs.double() / temperature, dim=-1)
        log_p = torch.log_softmax(zt.double() / temperature, dim=-1)
        return float((log_p.exp() * (log_p - log_q)).sum() * temperature ** 2), int(keep.sum())


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_loss_equals_a_float64_computation(batch, temperature):
    teacher = peaked_teacher()
    student = perturbed(teacher, 0.3, seed=1)
    loss, count = KLDistillLoss(teacher, temperature)(student, batch)
    expected, expected_count = float64_kl(student, teacher, batch, temperature)
    assert count == expected_count and expected > 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)


def test_kl_loss_is_zero_when_the_student_is_the_teacher(batch):
    teacher = peaked_teacher()
    loss, count = KLDistillLoss(teacher, 2.0)(teacher, batch)
    assert count > 0 and abs(float(loss.detach())) < 1e-6


def test_kl_with_a_temperature_on_hand_made_logits():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]])
    t = 2.0

    def softmax(row):
        e = [math.exp(x / t) for x in row]
        return [x / sum(e) for x in e]

    expected = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist()):
        p, q = softmax(zt), softmax(zs)
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))
    expected *= t * t
    assert float(kl_sum(student, teacher, t)) == pytest.approx(expected, rel=1e-6)
    assert float(kl_sum(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-7)


def test_training_with_the_kl_loss_moves_a_perturbed_student_to_its_teacher():
    teacher = peaked_teacher()
    student = perturbed(teacher, 0.5, seed=1)
    examples = random_examples(16, seed=4)
    kl = KLDistillLoss(teacher, temperature=1.0)
    config = TrainConfig(steps=8, lr=1e-3, batch_size=8, seed=5)
    result = train(student, examples, examples, config, pad_id=0, accelerator=make_accelerator(1, "cpu"), loss=kl)
    before, after = result.eval_losses[0][1], result.eval_losses[-1][1]  # KL per position on the examples
    assert after <= 0.8 * before, (before, after)  # about 1.52 -> 0.46 nats
    assert after == pytest.approx(evaluate_loss(student, examples, 8, 0, make_accelerator(1, "cpu"), kl), rel=1e-6)
    assert teacher.training is False and all(p.grad is None for p in teacher.parameters())


def test_kl_normalisation_is_exact_across_micro_batches():
    """One micro-batch of 4 and two of 2 take the same steps: each micro-batch's KL sum is divided by the
    count of the global batch (equal up to float32 round-off, which Adam's first step can amplify to
    about lr × 1e-2; the tolerance of tests/test_train_distributed.py)."""
    teacher = peaked_teacher()
    examples = random_examples(12, seed=6)
    states, losses = [], []
    for batch_size, accum in ((4, 1), (2, 2)):
        student = perturbed(teacher, 0.5, seed=1)
        config = TrainConfig(steps=2, lr=1e-3, batch_size=batch_size, grad_accum=accum, seed=7)
        result = train(student, examples, [], config, pad_id=0, accelerator=make_accelerator(accum, "cpu"),
                       loss=KLDistillLoss(teacher))
        states.append({n: p.detach().clone() for n, p in student.named_parameters()})
        losses.append([loss for _, loss in result.train_losses])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in states[0]:
        assert torch.allclose(states[0][name], states[1][name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("distance", ["mse", "l2"])
def test_hidden_state_loss_equals_a_direct_computation(batch, distance):
    teacher = make_tiny_llama(seed=0)
    student = make_tiny_llama(seed=0, num_hidden_layers=2)
    with torch.no_grad():  # share the embeddings so that hidden state 0 agrees and others do not
        student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
    layers = [0, (1, 2), -1]
    loss, count = HiddenStateLoss(teacher, layers, distance)(student, batch)
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    with torch.no_grad():
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        hs, ht = student(**kwargs).hidden_states, teacher(**kwargs).hidden_states
    expected = 0.0
    for s, t in [(0, 0), (1, 2), (-1, -1)]:
        diff = hs[s][:, :-1][keep].double() - ht[t][:, :-1][keep].double()
        per_token = diff.pow(2).mean(-1) if distance == "mse" else diff.pow(2).sum(-1).sqrt()
        expected += float(per_token.sum())
    assert count == int(keep.sum()) and expected > 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    same, _ = HiddenStateLoss(teacher, layers=[(1, 1)], distance=distance)(teacher, batch)
    assert float(same.detach()) == 0.0
    # the embeddings are shared: layer 0 contributes nothing
    zero, _ = HiddenStateLoss(teacher, layers=[0], distance=distance)(student, batch)
    assert float(zero.detach()) == 0.0


def test_a_loss_that_miscounts_stops_the_loop():
    def bad(model, batch):
        loss, count = old_token_loss_sum(model, batch)
        return loss, count + 1

    with pytest.raises(RuntimeError, match="scored"):
        train(make_tiny_llama(seed=0), random_examples(4), [], TrainConfig(steps=1, batch_size=2), pad_id=0,
              accelerator=make_accelerator(1, "cpu"), loss=bad)


def test_the_loop_trains_on_hidden_state_distances():
    teacher = make_tiny_llama(seed=0)
    student = perturbed(teacher, 0.5, seed=1)
    examples = random_examples(8, seed=8)
    loss = HiddenStateLoss(teacher, layers=[1, -1], distance="l2")
    result = train(student, examples, examples, TrainConfig(steps=4, lr=1e-3, batch_size=4, seed=1), pad_id=0,
                   accelerator=make_accelerator(1, "cpu"), loss=loss)
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
