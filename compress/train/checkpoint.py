"""Training checkpoints without pickle (``step-NNNNNN/``): ``model.safetensors`` (the trainable
parameters, by name), ``optimizer.safetensors`` + ``optimizer.json`` (the optimizer's tensors; its step
counts and param-group hyper-parameters), ``scheduler.json``, ``train_state.json`` and ``DONE``. A
checkpoint is written into a temporary folder and renamed into place; only those files are ever read
(a ``*.pkl``, ``*.bin`` or ``*.pt`` file there is ignored), and a missing, corrupt or mismatched one is
a CompressError."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compress.errors import CompressError

log = logging.getLogger(__name__)
CHECKPOINT_PREFIX = "step-"
# the files of a checkpoint: nothing else in its folder is read
PARAMS_FILE, OPTIMIZER_TENSORS, OPTIMIZER_FILE = "model.safetensors", "optimizer.safetensors", "optimizer.json"
SCHEDULER_FILE, STATE_FILE, DONE_FILE = "scheduler.json", "train_state.json", "DONE"


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / "DONE").exists())
    return found[-1] if found else None


def save_checkpoint(accelerator, folder: Path, step: int, keep: int, objects) -> Path:
    """Write ``folder/step-NNNNNN`` (the main process; the others wait): ``objects`` = (model, optimizer,
    scheduler, TrainState), in safetensors and JSON only, into a temporary folder renamed into place
    with ``DONE`` inside; then only the ``keep`` newest checkpoints stay."""
    model, optimizer, scheduler, state = objects
    target = folder / f"{CHECKPOINT_PREFIX}{step:06d}"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_checkpoint(tmp, accelerator.unwrap_model(model), optimizer, scheduler, state)
        (tmp / DONE_FILE).write_text(str(step))
        if target.exists():  # a checkpoint of this step left by a killed run
            shutil.rmtree(target)
        os.replace(tmp, target)
        old = sorted(p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p != target)
        for stale in old[:max(len(old) - (keep - 1), 0)]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _json_value(value, where: str):
    """``value`` if JSON holds it exactly (numbers, strings, bools, None, lists/tuples and str-keyed dicts
    of them); anything else (a tensor, an object) is refused rather than pickled."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, where) for k, v in value.items()}
    raise TypeError(f"{where}: {type(value).__name__} cannot be written to a checkpoint as JSON")


def _write_json(path: Path, value, where: str) -> None:
    path.write_text(json.dumps(_json_value(value, where)))


def write_checkpoint(directory: Path, model, optimizer, scheduler, state) -> None:
    """The checkpoint files (see the module docstring) of ``model`` (unwrapped), ``optimizer``,
    ``scheduler`` and ``state`` in ``directory``."""
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}, str(directory / PARAMS_FILE))
    opt = optimizer.state_dict()
    tensors, values = {}, {}
    for pid, entries in opt["state"].items():
        values[str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                values[str(pid)][key] = value
    save_file(tensors, str(directory / OPTIMIZER_TENSORS))
    _write_json(directory / OPTIMIZER_FILE, {"param_groups": opt["param_groups"], "state": values}, "optimizer state")
    _write_json(directory / SCHEDULER_FILE, scheduler.state_dict(), "scheduler state")
    _write_json(directory / STATE_FILE, state.state_dict(), "train state")


def load_checkpoint(directory: Path, model, optimizer, scheduler, state) -> None:
    """Restore ``model`` (unwrapped), ``optimizer``, ``scheduler`` and ``state`` from the checkpoint
    files in ``directory``; nothing else there is read. A missing, corrupt or mismatched file is a
    CompressError."""
    def fail(why: str):
        why = " ".join(str(why).split())  # one line
        raise CompressError(f"checkpoint {directory} is incomplete or corrupt ({why}); remove it to resume from an "
                            "earlier one, or start over without --resume")

    def read_json(name: str):
        try:
            return json.loads((directory / name).read_text())
        except FileNotFoundError:
            fail(f"{name} is missing")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            fail(f"{name}: {exc}")

    def read_tensors(name: str) -> dict[str, torch.Tensor]:
        if not (directory / name).is_file():
            fail(f"{name} is missing")
        try:
            return load_file(str(directory / name))
        except Exception as exc:  # safetensors raises several types for a damaged file
            fail(f"{name}: {exc}")

    params = _trainable(model)
    saved = read_tensors(PARAMS_FILE)
    if set(saved) != set(params):
        fail(f"{PARAMS_FILE} holds {len(saved)} trainable tensors, the model has {len(params)}"
             + (f"; e.g. {sorted(set(params) ^ set(saved))[0]}" if set(saved) ^ set(params) else ""))
    for name, param in params.items():
        if saved[name].shape != param.shape:
            fail(f"{name} is {tuple(saved[name].shape)} in {PARAMS_FILE}, {tuple(param.shape)} in the model")

    opt_json, opt_tensors = read_json(OPTIMIZER_FILE), read_tensors(OPTIMIZER_TENSORS)
    current = optimizer.state_dict()
    try:
        groups = opt_json["param_groups"]
        if len(groups) != len(current["param_groups"]):
            fail(f"{OPTIMIZER_FILE} has {len(groups)} parameter groups, the optimizer {len(current['param_groups'])}")
        for group, now in zip(groups, current["param_groups"]):
            if set(group) != set(now) or group["params"] != now["params"]:
                fail(f"{OPTIMIZER_FILE}: a parameter group does not match the optimizer's")
            for key, value in now.items():  # JSON has lists where the optimizer keeps tuples (betas)
                if isinstance(value, tuple):
                    group[key] = tuple(group[key])
        ids = {pid for group in groups for pid in group["params"]}
        opt_state: dict[int, dict] = {int(pid): dict(values) for pid, values in opt_json["state"].items()}
        for key, tensor in opt_tensors.items():
            pid, _, name = key.partition(".")
            opt_state.setdefault(int(pid), {})[name] = tensor
        if not set(opt_state) <= ids:
            fail(f"{OPTIMIZER_FILE} has state for parameters the optimizer does not have")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        fail(f"{OPTIMIZER_FILE}: {type(exc).__name__} {exc}")

    scheduler_state = read_json(SCHEDULER_FILE)
    if not isinstance(scheduler_state, dict) or set(scheduler_state) != set(scheduler.state_dict()):
        fail(f"{SCHEDULER_FILE} does not hold this scheduler's state")
    train_state = read_json(STATE_FILE)
    check = type(state)()
    try:
        check.load_state_dict(train_state)
    except ValueError as exc:
        fail(f"{STATE_FILE}: {exc}")
    if not isinstance(check.step, int) or check.step < 0:
        fail(f"{STATE_FILE}: step {check.step!r}")

    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        fail(f"{OPTIMIZER_FILE}: {exc}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.dtype))
    scheduler.load_state_dict(scheduler_state)
    state.load_state_dict(train_state)
