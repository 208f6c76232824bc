"""One canopy on a local Ray (``ray.init(num_cpus=2)``): the shards' merged result equals the single-process
run on every field, a bracket from budgeted shards contains the exact value, and a worker that dies has its
shard redone without changing the result."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import canopy_rs  # noqa: E402
import reference  # noqa: E402
from canopy_rs.drivers.ray_canopy import run_ray  # noqa: E402
from canopy_rs.drivers.shards import finish  # noqa: E402
from test_streaming_shards import assert_same_result  # noqa: E402

KW = dict(vocab_size=5, eos_token_ids=[0, 4], max_new_tokens=7, top_k=4, temperature=1.3)


@pytest.fixture(scope="module")
def local_ray():
    # The test modules are not importable on the workers: their models travel by value.
    ray.cloudpickle.register_pickle_by_value(reference)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


class DiesOnce:
    """A model whose worker process exits the first time it reaches a deep node (a flag file says so)."""

    def __init__(self, flag: str) -> None:
        self.model, self.flag = reference.RandomModel(5, 21), flag

    def __call__(self, prefixes):
        if any(len(p) == 5 for p in prefixes) and not os.path.exists(self.flag):
            Path(self.flag).write_text("died")
            os._exit(1)
        return self.model(prefixes)


def test_ray_canopy_equals_the_local_run(local_ray):
    model = reference.RandomModel(5, 21)
    one = canopy_rs.exact(model, **KW)
    seen = []
    res = canopy_rs.exact(model, executor="ray", progress=seen.append, **KW)
    assert_same_result(res, one)
    assert seen and all(b.ce_star_lower <= one.ce_star <= b.ce_star_upper for b in seen)


def test_ray_bracket_from_budgeted_shards(local_ray):
    model = reference.RandomModel(5, 21)
    one = canopy_rs.exact(model, **KW)
    merged, complete = run_ray(model, dict(KW), budget=200)
    b = finish(merged)
    assert complete and isinstance(b, canopy_rs.CanopyBounds)
    assert b.ce_star_lower <= one.ce_star <= b.ce_star_upper
    assert b.expected_length_lower <= one.expected_length <= b.expected_length_upper
    assert b.explored_mass + b.frontier_mass == pytest.approx(1.0)


def test_a_dead_worker_changes_nothing(local_ray, tmp_path):
    flag = str(tmp_path / "died")
    one = canopy_rs.exact(reference.RandomModel(5, 21), **KW)
    res = canopy_rs.exact(DiesOnce(flag), executor="ray", **KW)
    assert os.path.exists(flag)  # a worker did die
    assert_same_result(res, one)
    assert np.isfinite(res.ce_star)


def test_cli_exact_on_ray_equals_the_local_run(local_ray, tmp_path, capsys):
    import json

    from canopy_rs.cli import main
    from tiny_models import make_tiny_model

    tiny = str(make_tiny_model(tmp_path / "tiny"))
    argv = ["exact", "--model", tiny, "--prompt", "a b", "--max-new-tokens", "4", "--top-k", "3", "--format",
            "json", "-q"]
    assert main(argv) == 0
    local = json.loads(capsys.readouterr().out)["prompts"][0]["exact"]
    assert main(argv + ["--ray"]) == 0
    on_ray = json.loads(capsys.readouterr().out)["prompts"][0]["exact"]
    # A float32 model's logits depend on the batch they were computed in (the shards batch differently), so
    # the tolerance is test_transformers_backend's between orders and batch sizes, not the merge's 1e-12.
    for f in canopy_rs.CanopyResult.SCALAR_FIELDS:
        assert on_ray[f] == pytest.approx(local[f], rel=1e-6, abs=1e-6, nan_ok=True), f
    assert (on_ray["num_internal_nodes"], on_ray["num_leaves"]) == (local["num_internal_nodes"], local["num_leaves"])


def test_interrupt_returns_a_certified_bracket(local_ray):
    model = reference.RandomModel(5, 21)
    one = canopy_rs.exact(model, **KW)

    def stop(bounds):  # Ctrl-C as the first shard comes back
        raise KeyboardInterrupt

    with pytest.raises(canopy_rs.Interrupted) as e:
        canopy_rs.exact(model, executor="ray", progress=stop, **KW)
    b = e.value.bounds
    assert isinstance(b, canopy_rs.CanopyBounds) and b.stopped_by == "interrupt"
    assert b.frontier_mass > 0 and b.ce_star_lower <= one.ce_star <= b.ce_star_upper
    assert b.truncation_prob_lower <= one.truncation_prob <= b.truncation_prob_upper
