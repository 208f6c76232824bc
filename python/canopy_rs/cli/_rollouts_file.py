"""``canopy-rs sample --rollouts FILE``: scoring rollouts made elsewhere (vLLM, generate, another machine).

``FILE`` is JSONL, one rollout per line::

    {"id": "q1", "tokens": [15, 7, 2], "entropies": [1.2, 0.4, 0.1], "logq": [-0.9, -0.2, -0.05], "eos": true}

(``id``, also ``prompt_id``/``prompt_index``, groups rollouts by prompt, in first-seen order; ``prompt`` is kept
as the prompt's text; ``logq`` is optional: without it the surprisal estimate is NaN; ``eos`` is optional when
``--eos-token-ids`` names the EOS ids; ``max_new_tokens`` may override ``--max-new-tokens`` per line), or the
rollout table canopy-rs writes itself (``rollouts.parquet`` or ``rollouts.csv``). That table keeps each
rollout's sums, not its steps: every estimate of the sums (CE*, SE, E[N], GenPPL, rates, correlations,
truncation) is exact, and the running entropy rate by position, which needs the steps, is NaN.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from canopy_rs.cli._context import RunContext
from canopy_rs.cli._format import estimate_table, multi_estimate_table
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.estimators import estimate, pool
from canopy_rs.runs import prompt_key, read_csv, rollout_rows
from canopy_rs.sampling import Rollouts

__all__ = ["MODEL_FLAGS", "check_args", "run_file"]

# Flags that name a model or prompts: meaningless when the rollouts come from a file.
MODEL_FLAGS = ("model", "gguf", "revision", "prompt", "prompts", "device", "trust_remote_code")
_ID_KEYS = ("id", "prompt_id", "prompt_index")


def check_args(args: Any) -> None:
    """Refuses model and prompt flags beside ``--rollouts`` (before anything loads), then drops the model
    arguments so that the run context resolves no model."""
    given = [f"--{k.replace('_', '-')}" for k in MODEL_FLAGS if getattr(args, k, None)]
    if given:
        raise InvalidArgumentError(f"--rollouts scores rollouts from a file: {', '.join(given)} do not apply "
                                   "(the file holds the tokens and step entropies)")
    for k in MODEL_FLAGS:
        if hasattr(args, k):
            delattr(args, k)


def _read(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """The file's rows and whether they hold the steps (JSONL) or only canopy-rs's per-rollout sums."""
    if not path.is_file():
        raise InvalidArgumentError(f"--rollouts {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from canopy_rs import parquet  # imports pyarrow: only for a Parquet file

        return parquet.read(path), False
    if suffix == ".csv":
        return read_csv(path), False
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("tokens", obj.get("token_ids")), list):
            raise InvalidArgumentError(f"{path}:{n}: expected an object with tokens (a list of token ids) and "
                                       "entropies (one per token)")
        if not isinstance(obj.get("entropies"), list):
            raise InvalidArgumentError(f"{path}:{n}: no entropies (the policy's entropy at each step, nats)")
        obj["_line"] = n
        rows.append(obj)
    if not rows:
        raise InvalidArgumentError(f"--rollouts {path}: no rollouts")
    return rows, True


def _group(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = next((str(r[k]) for k in _ID_KEYS if r.get(k) not in (None, "")), None)
        if key is None:
            key = str(r["prompt"]) if isinstance(r.get("prompt"), str) else "rollouts"
        groups.setdefault(key, []).append(r)
    return list(groups.items())


def _flag(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("true", "1", "yes")


def _rollouts(rows: list[dict[str, Any]], steps: bool, max_new_tokens: int, eos_ids: list[int]) -> Rollouts:
    if steps:
        tokens = [[int(t) for t in r.get("tokens", r.get("token_ids"))] for r in rows]
        ents = [[float(h) for h in r["entropies"]] for r in rows]
        logq = [[float(x) for x in r["logq"]] for r in rows] if all(isinstance(r.get("logq"), list) for r in rows) else None
        caps = {int(r["max_new_tokens"]) for r in rows if r.get("max_new_tokens") is not None}
        if len(caps) > 1:
            raise InvalidArgumentError(f"one prompt's rollouts name several max_new_tokens: {sorted(caps)}")
        cap = caps.pop() if caps else max_new_tokens
    else:  # canopy-rs's table: per-rollout sums, spread evenly over the steps (their sums are what is estimated)
        tokens = [[int(t) for t in str(r["tokens"]).split()] for r in rows]
        ents, logq = [], []
        for r, t in zip(rows, tokens):
            n = len(t)
            ents.append([float(r["entropy_sum"]) / n] * n)
            logq.append([-float(r["surprisal_sum"]) / n] * n)
        if any(math.isnan(x[0]) for x in logq if x):
            logq = None
        cap = max_new_tokens
    eos = [_flag(r["eos"]) for r in rows] if all(r.get("eos") not in (None, "") for r in rows) else None
    if eos is None and not eos_ids:
        raise InvalidArgumentError("the rollouts carry no eos flags: name the EOS ids with --eos-token-ids")
    return Rollouts.from_ragged(tokens, ents, logq, eos_token_ids=eos_ids, max_new_tokens=cap, eos=eos)


def run_file(ctx: RunContext, figures: Callable[[dict, str], list[Path]]) -> int:
    """Estimates for each prompt's rollouts in ``--rollouts FILE``, pooled over prompts, written like a
    ``sample`` run (result.json, prompts and rollouts tables, and ``figures(record, stem)`` as plots)."""
    a = ctx.args
    path = Path(a.rollouts)
    rows, steps = _read(path)
    records = []
    for index, (pid, group) in enumerate(_group(rows)):
        try:
            ro = _rollouts(group, steps, a.max_new_tokens, list(a.eos_token_ids or []))
        except InvalidArgumentError as e:
            raise InvalidArgumentError(
                f"--rollouts {path}, prompt {pid!r}: {e} (--max-new-tokens must be the cap the rollouts were drawn "
                "with, --eos-token-ids their EOS ids)") from None
        est = estimate(ro)
        if not steps:
            nan = np.full_like(est.trajectory_rate, np.nan)
            est = replace(est, trajectory_rate=nan, trajectory_rate_sum=nan.copy())
        prompt = next((r["prompt"] for r in group if isinstance(r.get("prompt"), str)), "")
        key = prompt_key(prompt, {"command": "sample --rollouts", "file": str(path.resolve()), "id": pid,
                                  "max_new_tokens": ro.max_new_tokens})
        rec = {"key": key, "index": index, "id": pid, "prompt": prompt, "source": str(path),
               "eos_token_ids": list(ro.eos_token_ids), "max_new_tokens": ro.max_new_tokens,
               "steps_recorded": steps, "estimate": est.to_dict(),
               "rollouts": {"lengths": ro.lengths.tolist(), "entropy_rates": ro.entropy_rates.tolist()}}
        if ctx.out is not None:
            ctx.out.save(key, rec, rollouts=rollout_rows(ro, index))
        records.append(rec)
    pooled = pool([r["estimate"] for r in records]).to_dict() if len(records) > 1 else None
    head = (f"rollouts from {path}: {len(records)} prompt(s), {sum(len(r['rollouts']['lengths']) for r in records)} "
            f"rollouts" + ("" if steps else " (per-rollout sums: the running rate by position is not available)"))
    body = estimate_table(records[0]["estimate"]) if pooled is None else multi_estimate_table(records, pooled)
    result = {
        "command": "sample", "argv": ctx.argv, "source": str(path),
        "config": {k: v for k, v in vars(a).items() if not callable(v)},
        "num_prompts": len(records), "prompts": records, "pooled": {"estimate": pooled} if pooled else None,
    }

    def plots() -> list[Path]:
        return [f for r in records[:8] for f in figures(r, ctx.plot_stem(r, len(records)))]

    return ctx.finish(records, result, head + "\n\n" + body, plots)
