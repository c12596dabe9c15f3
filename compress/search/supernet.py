"""Super-network training before the search (InstaTune-style, as LLaMA-NAS does).

Each step trains the shared (reordered) weights on two forwards of the same batch, both distilled from
the frozen parent's logits with the KL loss of the shared training loop: the full network and one
sub-network sampled uniformly from the space (per layer one option, then repaired to ``min_depth``).
The sampling draws from torch's generator, which the loop reseeds from the step, so a resumed or
repeated run samples the same sub-networks.
"""

from __future__ import annotations

import torch

from compress.search.space import SearchSpace
from compress.search.subnet import subnet
from compress.train.losses import KLDistillLoss, labelled_positions, kl_sum


class SupernetLoss(KLDistillLoss):
    def __init__(self, teacher, space: SearchSpace):
        super().__init__(teacher)
        self.space = space
        self.sampled: list[list[int]] = []

    def sample(self) -> list:
        low, high = self.space.bounds()
        genome = [int(torch.randint(int(lo), int(hi) + 1, ()).item()) for lo, hi in zip(low, high)]
        genome = self.space.repair(genome)
        self.sampled.append(genome)
        return self.space.decode(genome)

    def __call__(self, model, batch):
        keep = labelled_positions(batch)
        teacher = self.teacher_outputs(batch).logits[:, :-1][keep]
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        inner = getattr(model, "module", model)  # DDP wraps the model under accelerate launch
        with subnet(inner, self.space, self.sample()):
            sub = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][keep]
        return kl_sum(full, teacher) + kl_sum(sub, teacher), int(keep.sum())


def train_supernet(model, teacher, space: SearchSpace, tokens: torch.Tensor, steps: int, lr: float,
                   batch_size: int, seed: int, device: str = "auto") -> dict:
    """Train the decoder layers of ``model`` (reordered parent) in place; returns the loop's summary."""
    from compress.train.data import Example
    from compress.train.loop import TrainConfig, make_accelerator, train

    examples = [Example(row.tolist(), row.tolist()) for row in tokens]
    for name, p in model.named_parameters():
        p.requires_grad_(".layers." in name)
    loss = SupernetLoss(teacher, space)
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seed=seed, max_grad_norm=1.0)
    result = train(model, examples, [], config, pad_id=0, accelerator=make_accelerator(1, device), loss=loss)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"steps": result.steps, "lr": lr, "batch_size": batch_size, "tokens": int(tokens[:1].numel()) * batch_size * steps,
            "first_loss": result.train_losses[0][1], "last_loss": result.final_train_loss,
            "seconds_per_step": round(result.seconds_per_step, 3)}
