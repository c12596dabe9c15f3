"""``compress search`` on a tiny Llama: the front, resume, two processes, export, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from compress.search.run import FRONT_FILE, SEARCH_FILE
from tests.helpers import REPO, assert_one_line_error, run_cli
from tests.helpers.search import CONFIG, small_search, tiny_search_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tokenizer):
    return tiny_search_folder(tmp_path_factory.mktemp("parent") / "tiny", smollm2_tokenizer)


@pytest.fixture(scope="module")
def searched(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    return out, small_search(tiny, out)


def _front(record):
    return [(tuple(r["genome"]), r["kl"], r["params"]) for r in record["front"]]


def test_front_is_non_dominated_and_within_the_budgets(searched):
    out, record = searched
    front, candidates = record["front"], record["candidates"]
    assert len(front) >= 3 and len(candidates) > len(front)
    low, high = record["window"]
    for r in front:
        assert low - 1e-12 <= r["params"] <= high + 1e-12
        assert not any(o["kl"] <= r["kl"] and o["params"] <= r["params"] and (o["kl"], o["params"]) != (r["kl"], r["params"])
                       for o in candidates if low <= o["params"] <= high)
    assert [r["params"] for r in front] == sorted(r["params"] for r in front)
    assert record["parent"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the parent against itself
    refined = [c for c in candidates if c.get("refined_for") is not None]  # stage 3: per budget, within it
    assert refined and all(c["params"] <= c["refined_for"] + 1e-12 for c in refined)
    assert all(sum(c["refined_for"] == b for c in refined) <= CONFIG["refine"] for b in CONFIG["budgets"])
    assert record["generations_done"] > CONFIG["generations"]
    seeded = [c for c in candidates if c["milp_budget"] in CONFIG["budgets"]]
    assert len(seeded) == 3 and all(c["params"] <= c["milp_budget"] + 1e-12 for c in seeded)
    on_disk = json.loads((out / FRONT_FILE).read_text())
    assert [r["genome"] for r in on_disk] == [r["genome"] for r in front]
    import numpy as np
    from PIL import Image

    assert np.asarray(Image.open(out / "front.png").convert("L"), dtype=float).std() > 10  # a plot, not blank
    assert json.loads((out / "compress.json").read_text())["command"] == "search"


def test_candidate_costs_are_exact(searched):
    from compress.search.space import SearchSpace

    _, record = searched
    space = SearchSpace(**record["space"])
    for r in record["candidates"][:5]:
        choice = space.decode(r["genome"])
        assert r["parameters"] == space.parameters(choice)
        assert r["params"] == pytest.approx(space.parameters(choice) / space.parent_parameters, abs=1e-12)
        assert r["proxy"] >= 0


@pytest.mark.parametrize("killed_at", [2, CONFIG["generations"] + 2], ids=["nsga", "refine"])
def test_killed_search_resumes_to_the_same_front(tiny, searched, tmp_path, killed_at):
    _, straight = searched
    out = tmp_path / "killed"

    class Killed(Exception):
        pass

    def kill(generation):
        if generation == killed_at:
            raise Killed()

    with pytest.raises(Killed):
        small_search(tiny, out, on_generation=kill)
    partial = json.loads((out / SEARCH_FILE).read_text())
    assert partial["generations_done"] == killed_at and not (out / FRONT_FILE).exists()
    resumed = small_search(tiny, out, resume=True)
    # the same sub-networks; their KL equal up to float summation order (the module's run had other threads)
    assert [g for g, _, _ in _front(resumed)] == [g for g, _, _ in _front(straight)]
    assert [k for _, k, _ in _front(resumed)] == pytest.approx([k for _, k, _ in _front(straight)], rel=1e-5)
    assert len(resumed["candidates"]) == len(straight["candidates"])
    assert resumed["seconds"] > partial["seconds"]  # the wall time adds up over the runs that searched
    replayed = small_search(tiny, out, resume=True)  # a finished search, resumed: replayed, not re-timed
    assert replayed["seconds"] == resumed["seconds"]
    assert [g for g, _, _ in _front(replayed)] == [g for g, _, _ in _front(resumed)]


def test_two_processes_give_the_front_of_one(tiny, searched, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMPRESS_PROGRESS": "0", "PYTHONPATH": str(REPO)}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "helpers" / "dist_search_worker.py"), str(tiny), str(out)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / SEARCH_FILE).read_text())
    assert record["processes"] == 2
    _, straight = searched
    assert [tuple(r["genome"]) for r in record["front"]] == [g for g, _, _ in _front(straight)]
    assert [r["kl"] for r in record["front"]] == pytest.approx([k for _, k, _ in _front(straight)], rel=1e-5, abs=1e-9)


def test_export_reloads_with_the_searched_widths_and_logits(searched, tmp_path):
    """The default export is the candidate as the search scored it (OBS-refit): its KL to the parent on the
    search's calibration tokens is the recorded one; --compensate none is the plain slice (the view)."""
    import compress
    from compress.arch import layout
    from compress.data import calibration_tokens
    from compress.models import load_model
    from compress.search.objectives import Evaluator
    from compress.search.space import SearchSpace
    from compress.search.subnet import reorder, subnet

    out, record = searched
    member = record["front"][1]
    result = run_cli("search", "export", out, "--pick", 1, "--out", tmp_path / "sub")
    assert result.exit_code == 0, result.output
    sliced = run_cli("search", "export", out, "--pick", 1, "--compensate", "none", "--out", tmp_path / "slice")
    assert sliced.exit_code == 0, sliced.output
    exported, plain = compress.load(tmp_path / "sub").model, compress.load(tmp_path / "slice").model
    space = SearchSpace(**record["space"])
    choice = space.decode(member["genome"])
    for built in (exported, plain):
        assert [tuple(w) for w in layout(built).layers] == [space.widths(o) for o in choice if o != (0, 0)]
    loaded = load_model(record["model"])
    parent = loaded.model
    c = record["calibration"]
    tokens = calibration_tokens(parent, loaded.tokenizer, c["data"], c["samples"], c["seqlen"], c["seed"])
    scored = Evaluator(parent, space, tokens, record["config"]["batch_size"]).reference_point(exported)
    assert scored["kl"] == pytest.approx(member["kl"], rel=1e-4, abs=1e-7)
    profile = json.loads((out / "profile.json").read_text())
    reorder(parent, space, {int(k): v for k, v in profile["heads"].items()},
            {int(k): v for k, v in profile["channels"].items()})
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), subnet(parent, space, choice):
        viewed = parent(input_ids=ids).logits
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - viewed).abs().max() <= 1e-5
        assert (exported(input_ids=ids).logits - viewed).abs().max() > 1e-4  # the refit is not the slice
    saved = json.loads((tmp_path / "sub" / "compress.json").read_text())
    assert saved["search"]["genome"] == member["genome"] and saved["compensate"] == "obs"
    assert json.loads((tmp_path / "slice" / "compress.json").read_text())["compensate"] == "none"


def test_export_compensated_and_distilled(searched, tmp_path):
    """--compensate slimgpt gives the same widths with other (OBS-updated) weights and a KL to the parent
    no worse than the plain slice on the calibration tokens; --distill trains it from the parent."""
    import compress
    from compress.arch import layout

    out, record = searched
    result = run_cli("search", "export", out, "--budget", "0.7", "--out", tmp_path / "plain")
    assert result.exit_code == 0, result.output
    result = run_cli("search", "export", out, "--budget", "0.7", "--compensate", "slimgpt", "--distill", "2",
                     "--out", tmp_path / "comp")
    assert result.exit_code == 0, result.output
    plain, comp = (compress.load(tmp_path / n).model for n in ("plain", "comp"))
    assert layout(plain).layers == layout(comp).layers
    saved = json.loads((tmp_path / "comp" / "compress.json").read_text())
    assert saved["compensate"] == "slimgpt" and saved["distill"]["steps"] == 2
    assert saved["search"]["objectives"]["params"] <= 0.7
    differs = any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), comp.state_dict().values()))
    assert differs


def test_export_compensated_with_bias_reloads_with_its_biases(tiny, searched, tmp_path):
    """--compensate slimgpt-bias: the same widths as slimgpt, an o_proj / down_proj bias on every kept layer
    (non-zero where the layer lost columns), and the folder reloads through transformers with the same logits."""
    import compress
    from compress.arch import layout
    from transformers import AutoModelForCausalLM

    out, _ = searched
    for name, mode in (("comp", "slimgpt"), ("bias", "slimgpt-bias")):
        result = run_cli("search", "export", out, "--budget", "0.7", "--compensate", mode, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    comp, biased = (compress.load(tmp_path / n).model.eval() for n in ("comp", "bias"))
    assert layout(comp).layers == layout(biased).layers
    assert json.loads((tmp_path / "bias" / "compress.json").read_text())["compensate"] == "slimgpt-bias"
    parent = layout(compress.load(tiny).model).layers[0]
    narrowed = 0
    for got, kept in zip(biased.model.layers, layout(biased).layers):
        for module, name, full, width in ((got.self_attn, "o_proj", parent.heads, kept.heads),
                                          (got.mlp, "down_proj", parent.ffn, kept.ffn)):
            if width == 0:  # removed whole before the walk
                continue
            linear = getattr(module, name)
            assert linear.bias is not None and linear.bias.shape == (linear.out_features,)
            if 0 < width < full:
                narrowed += 1
                assert float(linear.bias.detach().abs().max()) > 0  # the mean of the removed inputs' output
    assert narrowed > 0
    ids = torch.randint(0, biased.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "bias", trust_remote_code=True).eval()
    with torch.no_grad():
        assert (stock(input_ids=ids).logits - biased(input_ids=ids).logits).abs().max() < 1e-5


def test_supernet_steps_train_the_shared_weights_and_export_uses_them(tiny, tmp_path):
    import compress
    from safetensors.torch import load_file

    out = tmp_path / "super"
    record = small_search(tiny, out, supernet_steps=2, generations=1)
    assert record["supernet"]["steps"] == 2 and record["supernet"]["last_loss"] >= 0
    trained = load_file(out / "supernet.safetensors")
    parent = compress.load(tiny).model.state_dict()
    moved = max(float((trained[k] - parent[k]).abs().max()) for k in trained if k.endswith("up_proj.weight")
                and trained[k].shape == parent[k].shape)
    assert moved > 0
    result = run_cli("search", "export", out, "--pick", 0, "--out", tmp_path / "sub")
    assert result.exit_code == 0, result.output


# --- bad input: one line, exit 2, nothing written --------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (["--budget", "0.01"], "below what the space can reach"),
    (["--objectives", "kl,size"], "unknown objective 'size'"),
    (["--population", "3"], "--population must be at least 4"),
    (["--budget", "1.5"], "fraction in (0, 1]"),
    (["--refine", "-1"], "--refine must be ≥ 0"),
])
def test_bad_search_settings(tiny, tmp_path, args, match):
    out = tmp_path / "out"
    result = run_cli("search", tiny, "--out", out, "--samples", 4, "--seqlen", 32, "--ffn-step", 32, *args)
    assert_one_line_error(result, match)
    assert not out.exists()


def test_resume_or_export_with_another_model_is_refused(searched, tmp_path, smollm2_tokenizer):
    out, _ = searched
    other = tiny_search_folder(tmp_path / "other", smollm2_tokenizer, seed=7)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    c = CONFIG
    result = run_cli("search", other, "--out", out, "--resume", "--population", c["population"], "--generations",
                     c["generations"], "--refine", c["refine"], "--ffn-step", c["ffn_step"], "--samples", c["samples"], "--seqlen",
                     c["seqlen"], "--min-depth", c["min_depth"], "--batch-size", c["batch_size"], "--obs-samples",
                     c["obs_samples"], "--obs-seqlen", c["obs_seqlen"])
    assert_one_line_error(result, "was searched on another model")
    result = run_cli("search", "export", out, "--pick", 0, "--model", other, "--out", tmp_path / "x")
    assert_one_line_error(result, "was searched on another model")
    assert not (tmp_path / "x").exists()
    result = run_cli("search", other, "--out", out)
    assert_one_line_error(result, "already exists and is not empty")
    result = run_cli("search", other, "--out", out, "--resume", "--population", 8)
    assert_one_line_error(result, "searched with other settings")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_export_bad_picks(searched, tmp_path):
    out, record = searched
    result = run_cli("search", "export", out, "--pick", len(record["front"]), "--out", tmp_path / "x")
    assert_one_line_error(result, "is not on the front")
    result = run_cli("search", "export", out, "--budget", "0.05", "--out", tmp_path / "x")
    assert_one_line_error(result, "no front member costs at most 0.05")
    result = run_cli("search", "export", tmp_path, "--pick", 0, "--out", tmp_path / "x")
    assert_one_line_error(result, "is not a finished search folder")
    assert not (tmp_path / "x").exists()


def test_recipe_stage_searches_and_keeps_the_pick_within_the_budget(tiny, tmp_path):
    """A recipe's ``nas`` stage: the search folder is kept beside the output, the kept sub-network is the
    best front member within the budget, and the output reloads with its widths."""
    import yaml

    import compress
    from compress.arch import layout
    from compress.search.space import SearchSpace

    c = CONFIG
    recipe = {"model": str(tiny), "device": "cpu", "out": str(tmp_path / "nas"),
              "stages": [{"method": "nas", "options": {
                  "budget": 0.7, "budgets": c["budgets"], "population": c["population"],
                  "generations": c["generations"], "ffn_step": c["ffn_step"], "samples": c["samples"],
                  "seqlen": c["seqlen"], "min_depth": c["min_depth"]}}]}
    path = tmp_path / "nas.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", path)
    assert result.exit_code == 0, (result.output, result.exception)
    front = json.loads((tmp_path / "nas.search" / FRONT_FILE).read_text())
    best = min((r for r in front if r["params"] <= 0.7), key=lambda r: r["kl"])
    stage = json.loads((tmp_path / "nas" / "compress.json").read_text())["stages"][0]
    assert stage["method"] == "nas" and stage["result"]["genome"] == best["genome"]
    space = SearchSpace(**json.loads((tmp_path / "nas.search" / SEARCH_FILE).read_text())["space"])
    expected = [space.widths(o) for o in space.decode(best["genome"]) if o != (0, 0)]
    assert [tuple(w) for w in layout(compress.load(tmp_path / "nas").model).layers] == expected


def test_compare_points_are_scored_on_the_same_tokens(tiny, tmp_path):
    """--compare: another compressed model's KL to the parent on the search's calibration tokens, against
    a direct float64 computation, and its parameter fraction against the space's count of the parent."""
    import compress
    from compress.data import calibration_tokens

    pruned = tmp_path / "slim"
    result = run_cli("prune", tiny, "--ratio", 0.3, "--data", "wikitext2", "--samples", 4, "--seqlen", 32,
                     "--out", pruned, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = small_search(tiny, tmp_path / "run", generations=1, compare=[pruned])
    point = record["compare"][0]
    assert point["label"] == "slim"
    parent, other = compress.load(tiny), compress.load(pruned).model
    tokens = calibration_tokens(parent.model, parent.tokenizer, "wikitext2", CONFIG["samples"], CONFIG["seqlen"], 0)
    with torch.no_grad():
        log_p = torch.log_softmax(parent.model(input_ids=tokens).logits.double(), -1)
        log_q = torch.log_softmax(other(input_ids=tokens).logits.double(), -1)
    direct = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    assert point["kl"] == pytest.approx(direct, abs=1e-7)  # float32 log-softmax over 49152 logits vs float64
    decoder = sum(p.numel() for layer in other.model.layers for p in layer.parameters())
    assert point["parameters"] == decoder
    assert point["params"] == pytest.approx(0.7, abs=0.03)


def test_latency_objective_sums_the_measured_table(tiny, tmp_path):
    """--objectives kl,latency: every candidate's latency is the table's sum for its options, as a fraction
    of the parent's predicted time (budgets the tiny model can reach: its lm_head dominates)."""
    from compress.search.latency import predicted_seconds
    from compress.search.space import SearchSpace

    record = small_search(tiny, tmp_path / "lat", objectives=["kl", "latency"], generations=1, budgets=[0.97, 0.99, 1.0])
    table = json.loads((tmp_path / "lat" / "profile.json").read_text())["latency"]
    assert len(table["attention"]) == 3 and len(table["ffn"]) == 4 and table["fixed"] > 0
    space = SearchSpace(**record["space"])
    parent = predicted_seconds(table, space, space.full_choice())
    for r in record["candidates"]:
        seconds = predicted_seconds(table, space, space.decode(r["genome"]))
        assert r["latency_seconds"] == pytest.approx(seconds, rel=1e-12)
        assert r["latency"] == pytest.approx(seconds / parent, rel=1e-12)
    assert len(record["candidates"]) >= CONFIG["population"]


def test_latency_budget_below_the_fixed_part_is_refused(tiny, tmp_path):
    """On the tiny model the embedding and the 49152-wide lm_head take most of a forward, so no sub-network
    reaches half the parent's latency: refused once the table is measured, before any file is written."""
    result = run_cli("search", tiny, "--out", tmp_path / "lat", "--objectives", "kl,latency", "--budget", "0.3,0.5",
                     "--samples", 4, "--seqlen", 32, "--ffn-step", 32, "--min-depth", 2)
    assert_one_line_error(result, "below what the space can reach")
    assert not (tmp_path / "lat").exists()
