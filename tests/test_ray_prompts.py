"""Several prompts spread over Ray workers (``ray.init(num_cpus=2)``), from Python (``map_prompts``) and from
the command line (``exact|bound|sample|compare --prompts FILE --ray``): the same numbers as the local run, the
same resume keys in both directions, and the refusals before any work."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
ray = pytest.importorskip("ray")

import canopy_rs  # noqa: E402
from canopy_rs.cli import main  # noqa: E402
from canopy_rs.errors import ArgumentTypeError, InvalidArgumentError, ModelNotFoundError  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402

PROMPTS = ["a b c", "d e", "f g h i"]
EXACT = functools.partial(canopy_rs.exact, max_new_tokens=3, top_k=3)
REL = 1e-6  # float32 model rows: another process may sum them in another order


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def local_ray():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _close(a: Any, b: Any, path: str = "") -> None:
    """Every number of two records within REL (strings, ints and flags equal; timings and where-it-ran skipped)."""
    if isinstance(a, dict):
        skip = {"seconds", "model_seconds", "resumed", "key", "elapsed", "wall_seconds", "nodes_per_second"}
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            if k not in skip and "seconds" not in k:
                _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=REL, abs=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


# --- map_prompts ----------------------------------------------------------------------------------


def test_map_prompts_refuses_before_any_work(tiny: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="executor"):
        canopy_rs.map_prompts(EXACT, PROMPTS, model=tiny, executor="dask")
    with pytest.raises(InvalidArgumentError, match="executor='ray'"):
        canopy_rs.map_prompts(EXACT, PROMPTS, model=tiny, num_workers=2)
    with pytest.raises(ArgumentTypeError, match=r"\[prompt\]"):
        canopy_rs.map_prompts(EXACT, "a b c", model=tiny)
    with pytest.raises(ArgumentTypeError, match=r"prompts\[1\]"):
        canopy_rs.map_prompts(EXACT, ["a", 3.5], model=tiny)
    # An fn that even Ray's cloudpickle cannot send (it holds a lock) is refused before the model is looked up.
    lock = threading.Lock()
    with pytest.raises(ArgumentTypeError, match=r"sends fn .*cannot serialise.*holds no lock"):
        canopy_rs.map_prompts(lambda m: (lock, canopy_rs.exact(m)), PROMPTS, model=str(tmp_path / "missing"),
                              executor="ray")
    with pytest.raises(InvalidArgumentError, match="chat="):
        canopy_rs.map_prompts(EXACT, PROMPTS, model=tiny, backend_options={"chat": True})
    with pytest.raises(ModelNotFoundError):
        canopy_rs.map_prompts(EXACT, PROMPTS, model=str(tmp_path / "missing"))


def test_map_prompts_local_is_one_backend_per_prompt(tiny: str) -> None:
    from canopy_rs.hf_models import load_model

    seen: list[int] = []
    got = canopy_rs.map_prompts(EXACT, PROMPTS, model=tiny, on_result=lambda i, r: seen.append(i))
    assert seen == [0, 1, 2]
    hf, tok = load_model(tiny)
    for p, r in zip(PROMPTS, got):
        ref = EXACT(canopy_rs.TransformersModel(hf, tok, prompt=p))
        assert r.ce_star == ref.ce_star and r.expected_length == ref.expected_length
    assert len({r.ce_star for r in got}) == 3  # three prompts, three canopies


def test_map_prompts_on_ray_equals_local(tiny: str, local_ray: None) -> None:
    local = canopy_rs.map_prompts(EXACT, PROMPTS, model=tiny)
    seen: list[int] = []
    on_ray = canopy_rs.map_prompts(EXACT, PROMPTS, model=tiny, executor="ray", num_workers=2,
                                   on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1, 2]
    for a, b in zip(on_ray, local):
        _close(a.to_dict(), b.to_dict())
    # Rollouts with a seed are drawn the same wherever they run.
    draw = functools.partial(canopy_rs.sample, num_rollouts=12, max_new_tokens=3, top_k=3, seed=5)
    for a, b in zip(canopy_rs.map_prompts(draw, PROMPTS[:2], model=tiny, executor="ray"),
                    canopy_rs.map_prompts(draw, PROMPTS[:2], model=tiny)):
        assert [list(t) for t in a.tokens] == [list(t) for t in b.tokens]
        assert list(a.lengths) == list(b.lengths)
        _close(a.entropies.tolist(), b.entropies.tolist())


def test_map_prompts_on_ray_takes_a_lambda_closure(tiny: str, local_ray: None) -> None:
    # Ray sends fn with cloudpickle, so a lambda closing over a local runs there, as it does locally.
    top_k = 3
    fn = lambda m: canopy_rs.exact(m, max_new_tokens=2, top_k=top_k)  # noqa: E731
    on_ray = canopy_rs.map_prompts(fn, PROMPTS[:2], model=tiny, executor="ray")
    for a, b in zip(on_ray, canopy_rs.map_prompts(fn, PROMPTS[:2], model=tiny), strict=True):
        _close(a.to_dict(), b.to_dict())


# --- the command line -----------------------------------------------------------------------------


def _prompts_file(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return f


COMMANDS = {
    "exact": ["--max-new-tokens", "3", "--top-k", "3"],
    "bound": ["--max-new-tokens", "5", "--top-k", "3", "--budget", "20"],
    "sample": ["--max-new-tokens", "3", "--top-k", "3", "--num-rollouts", "10", "--seed", "3"],
    "compare": ["--max-new-tokens", "3", "--top-k", "3", "--estimators", "mc_rb,sbs", "--budgets", "8,16",
                "--repeats", "2", "--seed", "3"],
}


def _records(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "result.json").read_text())["prompts"]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_ray_spreads_prompts_with_the_local_numbers_and_keys(command: str, tiny: str, tmp_path: Path,
                                                                  local_ray: None,
                                                                  capsys: pytest.CaptureFixture) -> None:
    base = [command, "--model", tiny, "--prompts", str(_prompts_file(tmp_path)), *COMMANDS[command], "-q"]
    local_out, ray_out = tmp_path / "local", tmp_path / "ray"
    assert main([*base, "--out", str(local_out)]) == 0, capsys.readouterr().err
    assert main([*base, "--out", str(ray_out), "--ray"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    local, on_ray = _records(local_out), _records(ray_out)
    assert [r["id"] for r in on_ray] == ["p0", "p1", "p2"]
    for a, b in zip(on_ray, local):
        assert a["key"] == b["key"]  # the same resume keys
        _close({k: v for k, v in a.items() if k != "model"}, {k: v for k, v in b.items() if k != "model"})
        assert a["model"]["path"] == b["model"]["path"]
    # Each folder resumes the other's run: nothing is recomputed, locally or on Ray.
    for out, extra in ((local_out, ["--ray"]), (ray_out, [])):
        assert main([*base[:-1], "--out", str(out), *extra]) == 0
        err = capsys.readouterr().err
        assert err.count("already done") == 3 and "ray:" not in err, err


def test_cli_ray_resumes_what_is_missing(tiny: str, tmp_path: Path, local_ray: None,
                                         capsys: pytest.CaptureFixture) -> None:
    prompts = _prompts_file(tmp_path)
    first = tmp_path / "first.jsonl"
    first.write_text(prompts.read_text().splitlines()[0] + "\n")
    out = tmp_path / "out"
    base = ["exact", "--model", tiny, *COMMANDS["exact"], "--out", str(out)]
    assert main([*base, "--prompts", str(first), "-q"]) == 0
    capsys.readouterr()
    assert main([*base, "--prompts", str(prompts), "--ray"]) == 0
    err = capsys.readouterr().err
    # The first prompt resumed; only the other two went to the workers.
    assert err.count("already done") == 1 and "ray: 2 prompt(s)" in err, err
    assert [r.get("resumed", False) for r in _records(out)] == [True, False, False]


def test_cli_ray_one_prompt_without_shards_runs_on_a_worker(tiny: str, tmp_path: Path, local_ray: None,
                                                            capsys: pytest.CaptureFixture) -> None:
    base = ["sample", "--model", tiny, "--prompt", "a b c", *COMMANDS["sample"]]
    assert main([*base, "--out", str(tmp_path / "local"), "-q"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "ray"), "--ray"]) == 0
    err = capsys.readouterr().err
    assert "ray: 1 prompt(s)" in err, err
    (a,), (b,) = _records(tmp_path / "ray"), _records(tmp_path / "local")
    _close({k: v for k, v in a.items() if k != "model"}, {k: v for k, v in b.items() if k != "model"})


def test_cli_ray_refusals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text(json.dumps({"tokens": [1, 0], "entropies": [0.5, 0.1]}) + "\n")
    rc = main(["sample", "--rollouts", str(rollouts), "--ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "drop --ray" in err and "Traceback" not in err
