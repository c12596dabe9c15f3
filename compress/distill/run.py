"""One Zebra-Llama distillation, start to finish (what ``compress distill`` and the ``zebra-distill``
recipe stage both run)::

    plan (checks, windows) ──► ILD in the layer walk (both mixers of every layer, teacher-forced)
        ──► SMART (with --mla-layers auto) ──► assemble the hybrid ──► end-to-end KD
        ──► (the caller exports)

Every stage leaves its result in the state folder (:mod:`compress.distill.state`) and a rerun with
``resume`` skips what is done: the ILD walk continues at its next layer, KD at its latest checkpoint.
Under several processes (``accelerate launch``) ILD splits the layers (layer i on process i mod P, each
walking the teacher on its own device; the mixers are gathered through the state folder), SMART runs
on the main process, and KD is data-parallel.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from compress.distill.config import DistillConfig
from compress.distill.plan import DistillPlan, make_plan
from compress.distill.state import DistillState

log = logging.getLogger(__name__)
SMART_FILE = "smart.json"


@dataclass
class DistillResult:
    model: torch.nn.Module  # the hybrid (on the training device)
    record: dict  # for compress.json
    plan: DistillPlan


class Distillation:
    """Distil ``teacher`` (a loaded LLaMA-like model and its tokenizer) into a Zebra-Llama hybrid.

    ``out`` names the default state folder (``<out>.partial``); ``resume`` continues a state of the same
    run, ``force`` discards one of an unfinished run. ``on_smart(result)`` sees SMART's measurement and
    choice as soon as they are known (the CLI prints them before KD starts); ``on_layer_done(index,
    layer)`` (ILD walk) and ``on_kd_step(step, state)`` (KD) are test hooks."""

    def __init__(self, teacher: torch.nn.Module, tokenizer, config: DistillConfig, out: Path | None, *,
                 source: str = "model", accelerator=None, device: str = "auto", resume: bool = False,
                 force: bool = False, on_smart: Callable | None = None, on_layer_done: Callable | None = None,
                 on_kd_step: Callable | None = None):
        from compress.train.loop import make_accelerator

        self.teacher, self.tokenizer, self.config, self.source = teacher, tokenizer, config, source
        self.accelerator = accelerator or make_accelerator(config.grad_accum, device)
        self.resume, self.force = resume, force
        self.on_smart, self.on_layer_done, self.on_kd_step = on_smart, on_layer_done, on_kd_step
        if config.state_dir is None and out is None:
            from compress.errors import CompressError

            raise CompressError("distillation needs an output folder or a state folder for its resume state")
        self.state_path = Path(config.state_dir) if config.state_dir else Path(f"{Path(out)}.partial")
        self.plan: DistillPlan | None = None
        self.state: DistillState | None = None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self) -> DistillPlan:
        """Every check, before any work; nothing is written."""
        if self.plan is None:
            self.plan = make_plan(self.teacher, self.tokenizer, self.config, self.accelerator.num_processes)
            self.state = DistillState(self.state_path, self.plan.fingerprint)
            self.continuing = self.state.check(self.resume, self.force)
        return self.plan

    def run(self) -> DistillResult:
        plan = self.prepare()
        acc = self.accelerator
        acc.wait_for_everyone()  # every process checked the state before the main one touches it
        if self.main:
            self.state.open(self.continuing)
        acc.wait_for_everyone()
        started = time.perf_counter()
        bank, ild = self.layer_distillation()
        layer_types, smart = self.layer_types(bank)
        from compress.distill.kd import assemble

        student = assemble(self.teacher, bank, layer_types, plan.ranks, self.config.seed)
        del bank
        kd = self.knowledge_distillation(student)
        record = self.record(student, layer_types, ild, smart, kd, time.perf_counter() - started)
        return DistillResult(student, record, plan)

    # ------------------------------------------------------------ ILD
    def layer_distillation(self) -> tuple[dict, dict]:
        from compress.distill.ild import MIXER_KINDS, ILDConfig, LayerDistillation
        from compress.walk import walk

        c, plan, acc = self.config, self.plan, self.accelerator
        rank, world = acc.process_index, acc.num_processes
        started = time.perf_counter()
        if not self.state.has_shard(rank, world):
            q, kv, rope = plan.ranks
            method = LayerDistillation(ILDConfig(q_rank=q, kv_rank=kv, rope_dim=rope, mixers=list(MIXER_KINDS),
                                                 epochs=c.ild_epochs, lr=c.ild_lr, seed=c.seed, rank=rank, world=world))
            method.prepare(self.teacher)
            walk_dir = self.state.walk_dir(rank, world)
            result = walk(self.teacher, plan.ild_tokens, [method], device=acc.device,
                          batch_size=c.ild_batch_size or c.batch_size,
                          state_dir=walk_dir, on_layer_done=self.on_layer_done)
            mine = [i for i in range(plan.layers) if method.owns(i)]
            records = {i: result.records[i].get(method.name, {}) for i in mine}
            self.state.save_shard(rank, world, {i: method.bank[i] for i in mine}, records)
            shutil.rmtree(walk_dir, ignore_errors=True)
            del method, result
        acc.wait_for_everyone()
        bank, records = self.state.load_shards(world, plan.layers)
        return bank, {"tokens": int(plan.ild_tokens.numel()), "epochs": c.ild_epochs, "lr": c.ild_lr,
                      "loss": "mean_t ‖layer_out − teacher_out‖₂ + mean_t ‖mixer_out − teacher_attn_out‖₂",
                      "seconds": round(time.perf_counter() - started, 1),
                      "layers": [{"layer": i, **r} for i, r in enumerate(records)]}

    # ------------------------------------------------------------ SMART
    def layer_types(self, bank: dict) -> tuple[list[str], dict | None]:
        plan = self.plan
        if plan.mla_layers is not None:
            return ["mla" if i in plan.mla_layers else "mamba2" for i in range(plan.layers)], None
        if self.main and self.state.read_json(SMART_FILE) is None:
            self.state.write_json(SMART_FILE, self.smart(bank))
        self.accelerator.wait_for_everyone()
        smart = self.state.read_json(SMART_FILE)
        if self.on_smart is not None and self.main:
            self.on_smart(smart)
        chosen = smart["chosen"]
        return ["mla" if i in chosen else "mamba2" for i in range(plan.layers)], smart

    def smart(self, bank: dict) -> dict:
        """SMART's measurement on the ILD'd all-Mamba2 student, then its rule (compress.distill.smart)."""
        from compress.distill.kd import assemble, load_mixer
        from compress.distill.smart import choose_layers, measure_sensitivities, rule_bounds
        from compress.hybrid.build import build_mixer, hybrid_config, parent_shape

        plan, teacher = self.plan, self.teacher
        started = time.perf_counter()
        student = assemble(teacher, bank, ["mamba2"] * plan.layers, plan.ranks, self.config.seed)
        mla_config = hybrid_config(teacher.config, parent_shape(teacher), ["mla"] * plan.layers, *plan.ranks)
        dtype = next(teacher.parameters()).dtype

        def mla_mixer(index: int):
            return load_mixer(build_mixer(mla_config, index, "mla").to(dtype), bank[index]["mla"])

        measured = measure_sensitivities(student, teacher, mla_mixer, plan.smart_tokens, self.config.batch_size,
                                         self.accelerator.device)
        teacher.to("cpu")
        chosen = choose_layers(measured["sensitivity"], plan.n_mla)
        lo, hi, last = rule_bounds(plan.layers, plan.n_mla)
        log.info("SMART chose MLA layers %s (sensitivities %s)", chosen,
                 ", ".join(f"{s:.4f}" for s in measured["sensitivity"]))
        return {"n_mla": plan.n_mla, **measured, "chosen": chosen, "tokens": int(plan.smart_tokens.numel()),
                "rule": {"first": 0, "gap_min": lo, "gap_max": hi, "last_min": last},
                "seconds": round(time.perf_counter() - started, 1)}

    # ------------------------------------------------------------ KD
    def knowledge_distillation(self, student: torch.nn.Module) -> dict | None:
        from compress.distill.kd import train_kd
        from compress.train.loop import TrainConfig

        c, plan = self.config, self.plan
        if plan.kd_steps == 0:
            return None
        teacher = self.teacher
        if c.kd_teacher is not None:
            from compress.models import load_model

            teacher = load_model(c.kd_teacher, dtype=next(self.teacher.parameters()).dtype, tokenizer=False).model
        train_config = TrainConfig(steps=plan.kd_steps, lr=c.lr, batch_size=c.batch_size, grad_accum=c.grad_accum,
                                   warmup_steps=c.warmup_steps, save_every=c.save_every, seed=c.seed)
        dtype = next(student.parameters()).dtype
        student.float()  # float32 weights for AdamW (the loop autocasts to bf16 on CUDA); back to dtype after
        result = train_kd(student, teacher, plan.kd_tokens, plan.smart_tokens, train_config, self.accelerator,
                          self.state.kd_dir, on_step=self.on_kd_step)
        teacher.to("cpu")
        student.to("cpu", dtype)
        return {"teacher": c.kd_teacher or self.source, "tokens": int(plan.kd_tokens.numel()),
                "steps": result.steps, "lr": c.lr, "global_batch": plan.global_batch, "processes": result.processes,
                "train_losses": result.train_losses, "eval_kl": result.eval_losses,
                "final_train_kl": result.final_train_loss, "final_eval_kl": result.final_eval_loss,
                "seconds_per_step": result.seconds_per_step, "tokens_per_second": result.tokens_per_second}

    # ------------------------------------------------------------ the record
    def record(self, student, layer_types: list[str], ild: dict, smart: dict | None, kd: dict | None,
               seconds: float) -> dict:
        from compress.metrics.cost import kv_cache_fraction, ssm_state_bytes

        config = student.config
        return {"command": "distill", "source": self.source, "layer_types": layer_types,
                "mla_layers": [i for i, t in enumerate(layer_types) if t == "mla"],
                "ranks": {"q_lora_rank": config.q_lora_rank, "kv_lora_rank": config.kv_lora_rank,
                          "qk_rope_head_dim": config.qk_rope_head_dim},
                "kv_cache_fraction": kv_cache_fraction(student), "ssm_state_bytes": ssm_state_bytes(student),
                "settings": dataclasses.asdict(self.config), "windows": self.plan.summary(),
                "ild": ild, "smart": smart, "kd": kd, "seconds": round(seconds, 1)}
