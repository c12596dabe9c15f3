"""Small pieces of a search's record: the parent's fingerprint, settings as JSON, atomic JSON files."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from compress.search.space import Option


def model_fingerprint(model) -> dict:
    """What identifies the parent: its layout and a digest of a few of its weights."""
    from compress.arch import decoder_layers, layout

    digest = hashlib.sha256()
    for tensor in (model.model.embed_tokens.weight, decoder_layers(model)[0].self_attn.q_proj.weight,
                   decoder_layers(model)[-1].mlp.down_proj.weight):
        digest.update(tensor.detach().float().reshape(-1)[:4096].numpy().tobytes())
    return {"layout": layout(model).as_dict(), "vocab": int(model.config.vocab_size), "weights": digest.hexdigest()}


def write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def read_profile(stored: dict) -> dict:
    """profile.json's content with int layer keys and Option keys (JSON has only strings)."""
    return {"heads": {int(k): v for k, v in stored["heads"].items()},
            "channels": {int(k): v for k, v in stored["channels"].items()},
            "scores": [{option(k): v for k, v in layer.items()} for layer in stored["scores"]],
            "latency": stored.get("latency"), "seconds": stored.get("seconds")}


def option(key: str) -> Option:
    """The option a profile.json key (\"a,f\") names."""
    a, f = key.split(",")
    return Option(int(a), int(f))


def config_record(config) -> dict:
    """A SearchConfig as plain JSON values (what --resume compares)."""
    return json.loads(json.dumps(asdict(config)))


def differences(a: dict, b: dict) -> str:
    """The first settings that differ, for an error line."""
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in keys[:3]) or "unknown"
