"""``compress distill``: a Llama → a trained Zebra-Llama hybrid (ILD in the walk, SMART, end-to-end KD)."""

from __future__ import annotations

from pathlib import Path

import click

from compress.cli.common import device_option, print_table


@click.command("distill")
@click.argument("teacher")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@click.option("--mla-layers", default="auto", show_default=True,
              help="Layers that become MLA, the rest Mamba2: 'auto' (SMART chooses --n-mla) or indices (0,5,10,14).")
@click.option("--n-mla", type=int, default=None, help="MLA layers SMART chooses (default about 13% of the layers).")
@click.option("--q-rank", type=int, default=None,
              help="MLA query rank r_q (default ⅔ of min(heads·head_dim, hidden), a multiple of 32).")
@click.option("--kv-rank", type=int, default=None,
              help="MLA latent rank r_kv (default min(128, 2·kv_heads·head_dim)).")
@click.option("--rope-dim", type=int, default=None, help="MLA RoPE dims d_rope (default head_dim/2).")
@click.option("--data", default="wikitext2", show_default=True,
              help="Training text: wikitext2, c4, or a text/JSON-lines file or folder.")
@click.option("--ild-tokens", type=int, default=32768, show_default=True,
              help="Tokens each layer's mixers are distilled on (held in the walk).")
@click.option("--ild-epochs", type=int, default=1, show_default=True, help="Passes over the ILD tokens per mixer.")
@click.option("--ild-lr", type=float, default=1e-3, show_default=True, help="Peak learning rate of ILD.")
@click.option("--ild-batch-size", type=int, default=None, help="Windows per ILD step (default --batch-size).")
@click.option("--smart-tokens", type=int, default=4096, show_default=True,
              help="Held-out tokens for SMART's KL (also KD's evaluation set).")
@click.option("--kd-tokens", type=int, default=131072, show_default=True, help="Tokens of end-to-end KD (0: none).")
@click.option("--kd-teacher", default=None, help="KD teacher (default TEACHER): e.g. a larger model, same tokenizer.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per training window.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per batch (per process in KD).")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per KD step.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Peak learning rate of KD (AdamW).")
@click.option("--warmup-steps", type=int, default=0, show_default=True, help="KD linear warm-up steps.")
@click.option("--save-every", type=int, default=10, show_default=True, help="KD checkpoint every N steps (0: none).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the windows, Mamba2 init and data order.")
@click.option("--state-dir", default=None, help="Resume state folder (default: OUT.partial).")
@click.option("--resume", is_flag=True, help="Continue the run whose state is in the state folder (same flags).")
@click.option("--force", is_flag=True, help="Replace --out if it exists; discard an unfinished run's state.")
@device_option
def distill_command(teacher, out, resume, force, device, **settings):
    """Distil TEACHER (a LLaMA-family model) into a Zebra-Llama hybrid of MLA and Mamba2 layers.

    Layer-wise distillation of both mixers of every layer in the layer walk (teacher-forced), SMART
    layer choice with --mla-layers auto, then end-to-end KD (KL to the teacher's logits) on one process
    or under `accelerate launch`. The output reloads with compress.load or from_pretrained(...,
    trust_remote_code=True). Kill it and rerun with --resume to continue.
    """
    from compress.distill.config import DistillConfig
    from compress.distill.plan import data_inputs
    from compress.distill.run import Distillation
    from compress.export import check_output_path, check_separate
    from compress.exporters import get_exporter
    from compress.models import load_model
    from compress.train.loop import make_accelerator

    config = DistillConfig(**settings)  # every other flag is a setting of the distillation
    out_path = Path(out).expanduser().resolve()
    inputs = [teacher, *data_inputs(config)]
    check_output_path(out_path, inputs, force)
    state = (Path(config.state_dir).expanduser().resolve() if config.state_dir
             else out_path.with_name(out_path.name + ".partial"))
    check_separate(state, [*inputs, out_path], "state folder", "--state-dir")
    loaded = load_model(teacher)
    check_output_path(out_path, [loaded.path, *inputs], force)
    accelerator = make_accelerator(config.grad_accum, device)
    job = Distillation(loaded.model, loaded.tokenizer, config, out_path, source=str(teacher), accelerator=accelerator,
                       resume=resume, force=force, on_smart=_print_smart)
    job.prepare()  # every check before any work (one line and exit 2 on bad input, nothing written)
    result = job.run()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        get_exporter("hybrid").save(result.model, loaded.tokenizer, out_path, result.record,
                                    source=[loaded.path, *inputs], force=force)
        job.state.remove()
        _report(result.record, out_path)
    accelerator.wait_for_everyone()


def _print_smart(smart: dict) -> None:
    """SMART's result as soon as it is known (KD may take hours after it)."""
    print_table([(i, kl, s) for i, (kl, s) in enumerate(zip(smart["kl_with_mla"], smart["sensitivity"]))],
                ("layer", "KL with this layer MLA", "sensitivity"))
    click.echo(f"SMART: all-Mamba2 KL {smart['base_kl']:.4g}; MLA layers {smart['chosen']}\n")


def _report(record: dict, out: Path) -> None:
    smart = record.get("smart") or {}
    sens = smart.get("sensitivity")
    rows = []
    for entry, kind in zip(record["ild"]["layers"], record["layer_types"]):
        mla, mamba = entry.get("mla", {}), entry.get("mamba2", {})
        rows.append((entry["layer"], kind, mla.get("before"), mla.get("after"), mamba.get("before"), mamba.get("after"),
                     sens[entry["layer"]] if sens else "-"))
    print_table(rows, ("layer", "mixer", "ILD mla before", "after", "ILD mamba2 before", "after", "SMART sensitivity"))
    click.echo("")
    kd = record.get("kd") or {}
    eval_kl = kd.get("eval_kl") or []
    totals = [("MLA layers", ",".join(map(str, record["mla_layers"]))),
              ("KV cache (% of the teacher's)", f"{100 * record['kv_cache_fraction']:.2f}"),
              ("ILD tokens", record["ild"]["tokens"]), ("KD tokens", kd.get("tokens", 0)),
              ("KD steps", kd.get("steps", 0))]
    if eval_kl:
        totals += [("KL to the teacher, held out (before KD)", eval_kl[0][1]), ("after KD", eval_kl[-1][1])]
    totals += [("seconds", record["seconds"]), ("saved to", str(out))]
    print_table(totals, ("summary", "value"))


def register(group: click.Group) -> None:
    group.add_command(distill_command)
