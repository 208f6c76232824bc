"""``bounded(..., executor="ray")`` and ``canopy-rs bound --ray`` on a local Ray (``ray.init(num_cpus=2)``):
the shards' summed bracket contains the exact value, equals the exact result on every field once every
shard fits its share, and survives Ctrl-C; an enumerated shard far larger than its share is split again
without changing the result; the progress bar over the mass covered reaches its total."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import canopy_rs  # noqa: E402
import reference  # noqa: E402
from canopy_rs.drivers.progress import MASS_STEPS, MassProgress  # noqa: E402
from canopy_rs.drivers.ray_canopy import run_ray  # noqa: E402
from canopy_rs.drivers.shards import finish  # noqa: E402
from canopy_rs.errors import InvalidArgumentError  # noqa: E402
from test_streaming_shards import assert_same_result  # noqa: E402

KW = dict(vocab_size=5, eos_token_ids=[0, 4], max_new_tokens=7, top_k=4, temperature=1.3)


@pytest.fixture(scope="module")
def local_ray():
    # The test modules are not importable on the workers: their models travel by value.
    ray.cloudpickle.register_pickle_by_value(reference)
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one():
    return canopy_rs.exact(reference.RandomModel(5, 21), **KW)


def assert_contains(b, r):
    assert isinstance(b, canopy_rs.CanopyBounds)
    assert b.ce_star_lower <= r.ce_star <= b.ce_star_upper
    assert b.expected_length_lower <= r.expected_length <= b.expected_length_upper
    assert b.truncation_prob_lower <= r.truncation_prob <= b.truncation_prob_upper
    assert b.explored_mass + b.frontier_mass == pytest.approx(1.0)


def test_refused_before_ray_starts():
    model = reference.RandomModel(5, 21)
    with pytest.raises(InvalidArgumentError, match="order"):
        canopy_rs.bounded(model, budget=50, executor="ray", order="beam", beam_width=2, **KW)
    with pytest.raises(InvalidArgumentError, match="ray_address"):
        canopy_rs.bounded(model, budget=50, ray_address="auto", **KW)
    with pytest.raises(InvalidArgumentError, match="num_workers"):
        canopy_rs.exact(model, num_workers=2, **KW)
    with pytest.raises(InvalidArgumentError, match="order"):
        canopy_rs.exact(model, executor="ray", order="breadth-first", **KW)
    with pytest.raises(InvalidArgumentError, match="executor"):
        canopy_rs.bounded(model, budget=50, executor="dask", **KW)
    assert not ray.is_initialized()


@pytest.mark.parametrize("budget,order", [(60, "best-first"),
                                          (canopy_rs.Budget(tokens=300, seconds=30), "depth-first")])
def test_bracket_contains_the_exact_value(local_ray, one, budget, order):
    b = canopy_rs.bounded(reference.RandomModel(5, 21), budget=budget, executor="ray", order=order, **KW)
    assert_contains(b, one)
    assert b.stopped_by in ("nodes", "tokens") and b.frontier_size > 0
    # And the brute-force enumeration's CE*, not only the engine's.
    model = reference.RandomModel(5, 21)
    _, brute, _ = reference.enumerate_canopy(model.row, KW["eos_token_ids"], KW["max_new_tokens"],
                                             temperature=KW["temperature"], top_k=KW["top_k"])
    assert b.ce_star_lower <= brute <= b.ce_star_upper


def test_a_budget_every_shard_fits_gives_the_exact_result(local_ray, one):
    res = canopy_rs.bounded(reference.RandomModel(5, 21), budget=10**6, executor="ray", num_workers=2, **KW)
    assert isinstance(res, canopy_rs.CanopyResult) and res.is_exact
    assert_same_result(res, one)


def test_interrupt_returns_a_certified_bracket(local_ray, one):
    calls = []

    def stop(bounds):  # Ctrl-C as the first shard comes back (the first report is the head's)
        calls.append(bounds)
        if len(calls) == 2:
            raise KeyboardInterrupt

    b = canopy_rs.bounded(reference.RandomModel(5, 21), budget=100, executor="ray", progress=stop, **KW)
    assert b.stopped_by == "interrupt" and b.frontier_mass > 0
    assert_contains(b, one)
    assert all(c.ce_star_lower <= one.ce_star <= c.ce_star_upper for c in calls)


def test_a_shard_larger_than_its_share_is_split_again(local_ray, one):
    seen = []
    merged, complete = run_ray(reference.RandomModel(5, 21), dict(KW), num_workers=2, resplit_nodes=4,
                               progress=seen.append)
    assert complete
    # One report after the head and one per shard: far more than the 2 x 4 shards the head made.
    assert len(seen) > 1 + 2 * 4
    assert_same_result(finish(merged), one)
    assert all(s.ce_star_lower <= one.ce_star <= s.ce_star_upper for s in seen)


def test_progress_over_the_mass_reaches_its_total(local_ray, one):
    out = io.StringIO()
    bar = MassProgress(True, file=out)
    try:
        res = canopy_rs.exact(reference.RandomModel(5, 21), executor="ray", progress=bar, **KW)
    finally:
        bar.close()
    assert_same_result(res, one)
    assert bar.n == MASS_STEPS and f"{MASS_STEPS}/{MASS_STEPS}" in out.getvalue()
    # A bracket's bar covers the mass its shards explored.
    bar = MassProgress(False)
    b = canopy_rs.bounded(reference.RandomModel(5, 21), budget=60, executor="ray", progress=bar, **KW)
    assert 0 < bar.n == int(b.explored_mass * MASS_STEPS + 1e-6) < MASS_STEPS


def test_cli_bound_on_ray(local_ray, tmp_path, capsys):
    from canopy_rs.cli import main
    from tiny_models import make_tiny_model

    tiny = str(make_tiny_model(tmp_path / "tiny"))
    base = ["--model", tiny, "--prompt", "a b", "--max-new-tokens", "5", "--top-k", "3", "--format", "json", "-q"]
    assert main(["exact", *base]) == 0
    local = json.loads(capsys.readouterr().out)["prompts"][0]["exact"]
    assert main(["bound", *base, "--budget", "10", "--ray"]) == 0
    b = json.loads(capsys.readouterr().out)["prompts"][0]["bounds"]
    assert local["num_internal_nodes"] > 10 and not b["is_exact"]
    assert b["ce_star_lower"] - 1e-6 <= local["ce_star"] <= b["ce_star_upper"] + 1e-6
    assert main(["bound", *base, "--budget", "100000", "--ray"]) == 0
    rec = json.loads(capsys.readouterr().out)["prompts"][0]
    # float32 logits depend on the batch (see test_ray_canopy's CLI test): not the merge's 1e-12.
    for f in canopy_rs.CanopyResult.SCALAR_FIELDS:
        assert rec["exact"][f] == pytest.approx(local[f], rel=1e-6, abs=1e-6, nan_ok=True), f
    rc = main(["bound", *base, "--order", "beam", "--beam-width", "2", "--ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "--order beam" in err and "--ray" in err and "Traceback" not in err


def test_resplit_threshold():
    from canopy_rs.drivers.ray_canopy import (DEFAULT_RESPLIT_NODES, MIN_RESPLIT_NODES, RESPLIT_FACTOR,
                                              resplit_threshold)

    assert resplit_threshold(None, 8) == DEFAULT_RESPLIT_NODES
    assert resplit_threshold(100.0, 8) == MIN_RESPLIT_NODES
    assert resplit_threshold(1e9, 8) == RESPLIT_FACTOR * 1e9 / 8


def test_bundles_balance_reach_mass():
    from canopy_rs.drivers.ray_canopy import bundle
    from canopy_rs.drivers.shards import Shard

    shards = [Shard((i,), float(np.log(w)), 0.0) for i, w in enumerate([0.4, 0.2, 0.15, 0.1, 0.1, 0.05])]
    b = bundle(shards, 3)
    assert sorted(s.prefix for x in b for s in x) == [(i,) for i in range(6)]
    masses = [sum(s.reach for s in x) for x in b]
    assert len(b) == 3 and masses == sorted(masses, reverse=True) and masses[0] == pytest.approx(0.4)
    assert bundle(shards, 10) == [(s,) for s in shards] and bundle([], 4) == []
