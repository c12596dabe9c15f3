"""``compress hybridize``: turn a Llama into an (untrained) Zebra-Llama hybrid of MLA and Mamba2 layers."""

from __future__ import annotations

import click

from compress.cli.common import device_option, print_table


@click.command("hybridize")
@click.argument("model")
@click.option("--mla-layers", default="", help="Comma-separated layer indices that become MLA (e.g. 0,10,20,28).")
@click.option("--mamba-layers", default="rest", show_default=True,
              help="Layers that become Mamba2: 'rest' (every layer not in --mla-layers) or comma-separated indices "
                   "(then unlisted layers keep attention).")
@click.option("--q-rank", type=int, default=None,
              help="MLA query rank r_q (default ⅔ of min(heads·head_dim, hidden), a multiple of 32; 384 for smollm2-135m).")
@click.option("--kv-rank", type=int, default=None,
              help="MLA latent rank r_kv, cached per token (default min(128, 2·kv_heads·head_dim, hidden); 128 for "
                   "smollm2-135m).")
@click.option("--rope-dim", type=int, default=None,
              help="MLA RoPE dims d_rope per head, shared key cached per token (default head_dim/2; 32 for smollm2-135m).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the fresh Mamba2 parameters.")
@click.option("--out", required=True, help="Output folder (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@device_option
def hybridize_command(model, mla_layers, mamba_layers, q_rank, kv_rank, rope_dim, seed, out, force, device):
    """Replace the attention of MODEL's layers by MLA (SVD of the attention weights) or Mamba2 (x, B, C,
    out from W_v, W_k, W_q, W_o) and save the initialised hybrid to --out.

    MODEL is a Hugging Face folder, a GGUF file or the alias smollm2-135m (a LLaMA-family model). The
    output reloads with compress.load or from_pretrained(..., trust_remote_code=True); it is untrained:
    distil it before use.
    """
    from compress.export import check_output_path
    from compress.exporters import get_exporter
    from compress.hybrid.build import hybridize
    from compress.metrics.cost import kv_cache_fraction, ssm_state_bytes
    from compress.models import load_model
    from compress.walk import resolve_device

    check_output_path(out, [model], force)
    loaded = load_model(model, device=str(resolve_device(device)))
    hybrid = hybridize(loaded.model, mla_layers=mla_layers, mamba_layers=mamba_layers, q_rank=q_rank,
                       kv_rank=kv_rank, rope_dim=rope_dim, seed=seed)
    config = hybrid.config
    types = list(config.layer_types)
    summary = {"kv_cache_fraction": kv_cache_fraction(hybrid), "ssm_state_bytes": ssm_state_bytes(hybrid),
               "layers": {kind: [i for i, t in enumerate(types) if t == kind] for kind in ("attention", "mla", "mamba2")}}
    record = {"command": "hybridize", "source": str(model), "layer_types": types, "seed": seed,
              "ranks": {"q_lora_rank": config.q_lora_rank, "kv_lora_rank": config.kv_lora_rank,
                        "qk_rope_head_dim": config.qk_rope_head_dim}, **summary}
    get_exporter("hybrid").save(hybrid, loaded.tokenizer, out, record, source=[loaded.path, model], force=force)
    rows = [(kind, len(idx), ",".join(map(str, idx)) or "-") for kind, idx in summary["layers"].items()]
    print_table(rows, ("mixer", "layers", "indices"))
    click.echo(f"KV cache: {100 * summary['kv_cache_fraction']:.2f}% of the parent's; SSM state "
               f"{summary['ssm_state_bytes']} bytes per sequence")
    click.echo(f"wrote {out}")


def register(group: click.Group) -> None:
    group.add_command(hybridize_command)
