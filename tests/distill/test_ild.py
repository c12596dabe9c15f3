"""ILD in the layer walk on a tiny Llama: teacher-forced inputs are the teacher's own hidden states, each
layer's mixers end closer to the teacher layer, the teacher is untouched, a killed walk resumes to the
same mixers, and splitting the layers between processes changes nothing."""

from __future__ import annotations

import pytest
import torch

from compress.distill.ild import ILDConfig, LayerDistillation
from compress.walk import walk
from tests.helpers import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
# hidden 64, 4 heads of 16, 2 KV heads: full ranks would be 64; these are well below, so ILD has work to do
SETTINGS = dict(q_rank=32, kv_rank=16, rope_dim=8, epochs=5, lr=3e-3, seed=0)


class Killed(Exception):
    pass


class Recording(LayerDistillation):
    """ILD that also keeps the inputs the walk handed to each layer."""

    def __init__(self, config):
        super().__init__(config)
        self.seen = {}

    def apply(self, ctx):
        self.seen[ctx.index] = torch.cat(ctx.inputs)
        return super().apply(ctx)


def ild(teacher, cls=LayerDistillation, **overrides):
    method = cls(ILDConfig(**{**SETTINGS, **overrides}))
    method.prepare(teacher)
    return method


@pytest.fixture(scope="module")
def straight():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    teacher = make_tiny_llama(num_hidden_layers=3)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = ild(teacher, Recording)
    result = walk(teacher, TOKENS, [method], device="cpu", batch_size=4)
    torch.set_num_threads(threads)
    return teacher, before, method, result


def test_teacher_forced_inputs_are_the_teachers_hidden_states(straight):
    teacher, _, method, _ = straight
    with torch.no_grad():
        states = teacher(input_ids=TOKENS, output_hidden_states=True, use_cache=False).hidden_states
    for index in range(3):  # hidden_states[i] is decoder layer i's input
        assert (method.seen[index] - states[index]).abs().max() <= 1e-6, index


def test_ild_lowers_every_layers_distance_to_the_teacher_layer(straight):
    _, _, method, result = straight
    for record in result.records:
        for kind in ("mla", "mamba2"):
            entry = record[method.name][kind]
            assert entry["kept"] == "trained" and entry["steps"] == 10
            assert entry["after"] < 0.9 * entry["before"], (record["layer"], kind, entry)
    assert sorted(method.bank) == [0, 1, 2] and all(sorted(m) == ["mamba2", "mla"] for m in method.bank.values())


def test_the_teacher_is_not_changed(straight):
    teacher, before, _, _ = straight
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_killed_walk_resumes_to_the_same_mixers(straight, tmp_path):
    _, _, reference, _ = straight
    teacher = make_tiny_llama(num_hidden_layers=3)

    def kill_after_layer_1(index, layer):
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        walk(teacher, TOKENS, [ild(teacher)], device="cpu", batch_size=4, state_dir=tmp_path,
             on_layer_done=kill_after_layer_1)
    resumed = ild(teacher)
    result = walk(teacher, TOKENS, [resumed], device="cpu", batch_size=4, state_dir=tmp_path)
    assert result.resumed_from == 2
    assert_same_bank(resumed.bank, reference.bank)


def test_layers_split_between_processes_give_the_same_mixers(straight):
    _, _, reference, _ = straight
    teacher = make_tiny_llama(num_hidden_layers=3)
    parts = [ild(teacher, rank=rank, world=2) for rank in (0, 1)]
    for part in parts:
        walk(teacher, TOKENS, [part], device="cpu", batch_size=4)
    assert sorted(parts[0].bank) == [0, 2] and sorted(parts[1].bank) == [1]
    assert_same_bank({**parts[0].bank, **parts[1].bank}, reference.bank)


def assert_same_bank(a, b):
    assert sorted(a) == sorted(b)
    for index in a:
        assert sorted(a[index]) == sorted(b[index])
        for kind in a[index]:
            for name, tensor in b[index][kind].items():
                assert torch.equal(a[index][kind][name], tensor), (index, kind, name)
