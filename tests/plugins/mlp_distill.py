"""A third-party layer method as a package would ship it: each decoder layer's MLP becomes a narrower
GELU MLP, trained a few steps on the layer's cached inputs against the teacher layer's outputs.
Registered through the ``compress.methods`` entry-point group (``mlp-distill``)."""

from dataclasses import dataclass

import torch
from torch import nn

from compress.plugin import Applied, Group, LayerMethod, config_field


class SmallMLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc_in, self.fc_out = nn.Linear(hidden, width), nn.Linear(width, hidden)

    def forward(self, x):  # (b, L, hidden) → (b, L, hidden)
        return self.fc_out(nn.functional.gelu(self.fc_in(x)))


@dataclass
class MLPDistillConfig:
    width: int = config_field(16, "hidden width of the new MLP")
    steps: int = config_field(30, "Adam steps per layer")
    lr: float = config_field(3e-3, "learning rate")


class MLPDistill(LayerMethod):
    name, Config, output_format = "mlp-distill", MLPDistillConfig, "small-mlp"
    needs_inputs = needs_teacher = True

    def groups(self, layer, index):
        return [Group(["mlp"], stats="none")]

    def rebuild(self, layer, index, name, record):
        return SmallMLP(layer.input_layernorm.weight.numel(), self.config.width)  # (hidden → width → hidden)

    def apply(self, ctx):
        torch.manual_seed(ctx.index)  # deterministic: a resumed walk rebuilds the same layers
        old, new = ctx.layer.mlp, self.rebuild(ctx.layer, ctx.index, "mlp", {}).to(ctx.device)
        for p in ctx.layer.parameters():
            p.requires_grad_(False)
        ctx.layer.mlp = new
        optimizer = torch.optim.Adam(new.parameters(), lr=self.config.lr)
        losses = []
        with torch.enable_grad():
            for step in range(self.config.steps + 1):
                loss = sum(nn.functional.mse_loss(ctx.layer(x, **kw), y) for x, kw, y in ctx.batches())
                losses.append(loss.item())
                if step < self.config.steps:
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        ctx.layer.mlp = old  # the walk installs the replacement
        return Applied(record={"loss_first": losses[0], "loss_last": losses[-1]}, replace={"mlp": new.requires_grad_(False)})
