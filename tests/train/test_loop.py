"""The training loop: data order, loss normalisation, kill-and-resume to the same weights."""

import pytest
import torch

from compress.methods.bone.adapter import attach_adapter
from compress.train.data import IGNORE_INDEX, collate
from compress.train.loop import TrainConfig, global_positions, latest_checkpoint, make_accelerator, train
from tests.helpers.adapt import reverse_task, smollm2_tokenizer, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


@pytest.fixture(scope="module")
def examples():
    from compress.train.data import pair_example

    tok = smollm2_tokenizer()
    return [pair_example(tok, r["instruction"], r["response"], 64, "") for r in reverse_task(24, seed=3)]


def adapter_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Killed(Exception):
    pass


def run(examples, method, config, ckpt=None, resume=False, kill_at=None):
    model = attach_adapter(tiny_llama(seed=1), method, 8, seed=config.seed)

    def on_step(step, state):
        if kill_at is not None and step == kill_at:
            raise Killed(f"killed after step {step}")

    result = train(model, examples[:20], examples[20:], config, pad_id=2, accelerator=make_accelerator(config.grad_accum),
                   checkpoint_dir=ckpt, resume=resume, on_step=on_step)
    return model, result


def test_data_order_is_a_seeded_function_of_the_step():
    first = [global_positions(s, 10, 4, seed=5) for s in range(5)]  # 20 positions: two epochs
    assert first == [global_positions(s, 10, 4, seed=5) for s in range(5)]
    flat = sum(first, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # each epoch reshuffled


@pytest.mark.parametrize("method", ["bat", "lora"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, examples, method):
    config = TrainConfig(steps=6, lr=5e-3, batch_size=3, grad_accum=2, save_every=2, seed=4, warmup_steps=2)
    straight, straight_result = run(examples, method, config)
    with pytest.raises(Killed):
        run(examples, method, config, ckpt=tmp_path, kill_at=5)  # dies after step 5; last checkpoint: step 4
    assert latest_checkpoint(tmp_path).name == "step-000004"
    resumed, resumed_result = run(examples, method, config, ckpt=tmp_path, resume=True)
    a, b = adapter_state(straight), adapter_state(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    # Same data order, same RNG, same optimizer/scheduler state: identical on CPU up to float32 round-off.
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-7, rtol=0), name
    assert any(float(v.abs().max()) > 1e-4 for v in a.values())  # the adapter did move
    assert resumed_result.steps == 6
    straight_losses = [l for _, l in straight_result.train_losses]
    resumed_losses = [l for _, l in resumed_result.train_losses]
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-6)
    assert resumed_result.final_eval_loss == pytest.approx(straight_result.final_eval_loss, abs=1e-6)


def test_step_loss_is_the_token_mean_over_the_global_batch(examples):
    """The logged loss of step 1 equals a direct token-mean cross-entropy on the untrained model."""
    config = TrainConfig(steps=1, lr=1e-9, batch_size=2, grad_accum=3, seed=2)
    model = attach_adapter(tiny_llama(seed=1), "bone", 8)
    idx = global_positions(0, 20, 6, seed=2)
    with torch.no_grad():
        batch = collate([examples[i] for i in idx], pad_id=2)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE_INDEX
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        expected = float(-logp[keep].gather(-1, labels[keep].unsqueeze(-1)).mean())
    result = train(model, examples[:20], [], config, pad_id=2, accelerator=make_accelerator(3))
    assert result.train_losses[0][1] == pytest.approx(expected, abs=1e-5)
