"""`compress VERB --help` from the help cache: the same page as one built from the registry, read back
only under the same fingerprint (sources, plugins, Python), rebuilt otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import REPO


def _help(cache, *verb) -> str:
    env = {**os.environ, "COMPRESS_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "compress", *verb, "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    return done.stdout


def test_a_verb_help_page_is_cached_and_rebuilt_when_the_sources_change(tmp_path):
    built = _help(tmp_path, "quantize")  # empty cache: imports the methods, stores the flags
    stored = json.loads((tmp_path / "help.json").read_text())
    assert "--clip-grid" in built and "One of: gptq, rtn" in " ".join(built.split())
    assert _help(tmp_path, "quantize") == built  # read back: the same page

    key = next(k for k in stored["entries"] if k.startswith("verb:quantize"))
    spec = dict(stored["entries"][key]["specs"][0], decls=["--only-in-cache", "only_in_cache"])
    stored["entries"][key]["specs"].append(spec)
    (tmp_path / "help.json").write_text(json.dumps(stored))
    assert "--only-in-cache" in _help(tmp_path, "quantize")  # the page really comes from the cache

    stored["fingerprint"] = "an older tree"
    (tmp_path / "help.json").write_text(json.dumps(stored))
    assert _help(tmp_path, "quantize") == built  # another fingerprint: rebuilt from the registry
    assert json.loads((tmp_path / "help.json").read_text())["fingerprint"] != "an older tree"
