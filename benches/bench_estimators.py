"""Estimator study on real canopies: RMSE vs cost of every CE*_max estimator against the exact value.

Canopies:

* ``smollm2``: the embedded SmolLM2-135M-Instruct (chat template) on chat prompts, depths 6, 8 and 10, two
  policies: top-k 4, and top-k 4 followed by top-p 0.9. (Plain top-p 0.9 is not enumerable on SmolLM2 at
  these depths: 3,000 best-first nodes cover 1-25% of the mass at depth 6-8.) Depth 6 and 8 are exact;
  depth 10 (top-k 4 + top-p 0.9 only) uses the exact canopy when it has at most ``--max-exact`` internal
  nodes, else a certified bracket from ``canopy_rs.bounded`` as the reference, and every row says whether that
  bracket is narrow enough to judge it (``judged``).
* ``callable``: ``random_logits_fn(vocab 8, scale 2, EOS id 0)``, depth 8, no cache (a row costs its prefix);
* ``synthetic_bushy`` / ``synthetic_peaked``: ``random_logits_fn(vocab 6)`` near-uniform with a rare EOS, or
  peaked, top-k 4, depth 8;
* ``tiny_llama``: a random-init tiny Llama (vocab 16, 2 layers) through ``TransformersModel``, top-k 4, depth 8.

Cost model: every estimate's cost is ``model_tokens``, the model tokens (prompt excluded) it would forward
on a fresh backend (its cost record's own value; through the ``CachedModel`` one token per evaluated row). The expensive part runs once: each prompt's backend is wrapped in a ``CachedModel`` (prefix ->
policy support, per policy), the exact canopy fills the table, and the repeats are table lookups. This is
statistically valid because the model is deterministic: a repeat sees the same distributions whether they
are recomputed or looked up.

Writes ``benches/results/estimators_<case>.{csv,json,png}``, ``estimators_summary.{json,md}`` (the RMSE
ratio to plain Rao-Blackwellised Monte Carlo at equal measured tokens, per estimator x budget x depth) and
``estimators_rmse_vs_cost.png`` (all SmolLM2 canopies, log-log), and derives the table ``best_estimator`` ships
(``python/canopy_rs/estimators/_best_table.py``, ``canopy_rs.estimators.best.derive_best_table``).

    python benches/bench_estimators.py            # the full study (~15 min at 200 repeats on a 2-core CPU shared with other jobs, --table-cache warm)
    python benches/bench_estimators.py --only sky --skip-existing   # some cases; --summarise rebuilds the summary
    python benches/bench_estimators.py --quick    # one prompt, depth 6, 20 repeats
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

import canopy_rs
from canopy_rs.backends.cached import CachedModel
from canopy_rs.backends.callable import CallableModel
from canopy_rs.estimators.best import derive_best_table
from canopy_rs.estimators.comparison import compare
from canopy_rs.testing import random_logits_fn
from canopy_rs.results import to_plain

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = ["mc_rb", "mc_surprisal", "mc_rb_stratified", "sbs", "hybrid", "hybrid_tree"]
REFERENCE = "mc_rb"
PROMPTS = [("haiku", "Write a haiku about the sea."), ("sky", "Is the sky blue? Answer yes or no.")]
POLICIES = [("k4", dict(top_k=4)), ("k4p0.9", dict(top_k=4, top_p=0.9))]
DEPTH10_PROMPTS = ("sky",)  # the bushy haiku canopy at depth 10 (~350k nodes) is out of reach on 2 cores


class KVCostedCallable:
    """A synthetic canopy's callable costed as a model with a KV cache: the CachedModel around it reports one
    token per row below the root, not the whole prefix a stateless callable recomputes (the random callable
    case keeps that cost: it stands for a backend without a cache)."""

    def __init__(self, fn, vocab_size, eos_token_ids):
        self.inner = CallableModel(fn, vocab_size, eos_token_ids)
        self.vocab_size, self.eos_token_ids = self.inner.vocab_size, self.inner.eos_token_ids

    def reset(self):
        self.inner.reset()

    def expand(self, batch, policy):
        return self.inner.expand(batch, policy)

    def release(self, node_ids):
        self.inner.release(node_ids)

    def counters(self):
        return {**self.inner.counters(), "tokens_forwarded": self.inner.counters()["rows_evaluated"]}


def tiny_cases():
    fn = random_logits_fn(8, seed=0, scale=2.0)
    # A numpy callable is cheaper to recompute than to look up: no cache.
    yield "callable", "random callable: vocab 8, depth 8, scale 2", fn, dict(vocab_size=8, eos_token_ids=[0],
                                                                          max_new_tokens=8, cache=False), 8
    # Synthetic depth-8 canopies of known shape (vocab 6, top-k 4, EOS id 0), costed as models with a KV
    # cache: near-uniform rows with a rare EOS (bushy, ~1.3 nats per token, 21,845 internal nodes), and
    # peaked rows (~0.7 nats per token).
    for name, desc, scale, eos_bias in (("synthetic_bushy", "near-uniform (scale 0.5, EOS bias -3)", 0.5, -3.0),
                                        ("synthetic_peaked", "peaked (scale 3)", 3.0, 0.0)):
        yield (name, f"synthetic {desc}: vocab 6, top-k 4, depth 8",
               KVCostedCallable(random_logits_fn(6, seed=0, scale=scale, eos_bias=eos_bias), 6, [0]),
               dict(max_new_tokens=8, top_k=4), 8)
    try:
        import torch
        import transformers

        from canopy_rs.backends.transformers import TransformersModel
    except ImportError as exc:  # the other backend may not be installed
        print(f"[tiny_llama] skipped: the transformers backend is unavailable ({exc})", file=sys.stderr)
        return
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=[2], bos_token_id=1,
        initializer_range=0.3,
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    backend = TransformersModel(model, prompt=[1, 5, 9, 3, 7])
    yield "tiny_llama", "tiny Llama (vocab 16, 2 layers), top-k 4, depth 8", backend, dict(max_new_tokens=8,
                                                                                          top_k=4), 8


def ratio_rows(study):
    """Per row: RMSE / (plain RB MC's RMSE at the same measured tokens, from MC's log-log fit)."""
    return {(r["estimator"], r["budget"]): r for r in study.equal_cost_ratios(REFERENCE)}


def run_case(name, desc, model, kw, depth, budgets, repeats, seed, out, exact_result=None):
    t0 = time.perf_counter()
    study = compare(model, estimators=ESTIMATORS, budgets=budgets, repeats=repeats, seed=seed,
                    exact_result=exact_result, **kw)
    secs = time.perf_counter() - t0
    study.settings.update(wall_seconds=secs, case=name, description=desc, depth=depth)
    kw.pop("cache", None)
    study.to_csv(out / f"estimators_{name}.csv")
    study.to_json(out / f"estimators_{name}.json")
    study.plot(out / f"estimators_{name}.png", title=f"{desc}\nCE* = {study.exact_ce_star:.4f} nats")
    print(f"\n== {name}: {desc} ({secs:.1f} s)", flush=True)
    print(study.format_table(), flush=True)
    return study


def wanted(args, name):
    """--only filters case names; --skip-existing skips cases whose JSON is already in --out."""
    if args.only and not any(o in name for o in args.only.split(",")):
        return False
    return not (args.skip_existing and (args.out / f"estimators_{name}.json").exists())


def smollm2_cases(args, budgets, out):
    import torch

    from canopy_rs.backends.transformers import TransformersModel
    from canopy_rs.errors import TreeTooLargeError
    from canopy_rs.hf_models import load_model

    torch.set_num_threads(1)
    hf, tok = load_model(quiet=True)
    prompts = PROMPTS[:1] if args.quick else PROMPTS
    depths = [6] if args.quick else [8, 6]  # 8 first: the depth-6 canopy is then all table hits
    for pname, prompt in prompts:
        cm = CachedModel(TransformersModel(hf, tok, prompt=prompt, chat=True))
        cache_file = args.table_cache / f"{pname}.pkl" if args.table_cache else None
        if cache_file is not None and cache_file.exists():
            cm.load_tables(cache_file)
        cases = [(pol_name, pol, depth) for pol_name, pol in POLICIES for depth in depths]
        if not args.quick and pname in DEPTH10_PROMPTS:
            # Top-k 4 alone at depth 10 (~350k nodes) only gets a 2,000-node bracket far too wide to judge any
            # cell, while its off-table rollouts cost real forwards (> 10 min): left out.
            cases += [(pol_name, pol, 10) for pol_name, pol in POLICIES if "top_p" in pol]
        for pol_name, pol, depth in cases:
            kw = dict(max_new_tokens=depth, **pol)
            name = f"smollm2_{pname}_{pol_name}_d{depth}"
            if not wanted(args, name):
                continue
            desc = f"SmolLM2-135M-Instruct, {prompt!r}, {pol_name}, depth {depth}"
            ref, case_budgets = None, budgets
            if depth == 10:
                t = time.perf_counter()
                try:  # depth-first enumeration keeps few nodes alive: the fast way when it fits
                    if "top_p" not in pol:  # top-k 4 alone: ~4^10 / 3 nodes, never fits
                        raise TreeTooLargeError("skip")
                    ref = canopy_rs.exact(cm, max_nodes=args.max_exact, **kw)
                    kind = f"exact ({ref.num_internal_nodes} internal nodes)"
                except TreeTooLargeError:
                    ref = canopy_rs.bounded(cm, budget=args.bracket_nodes, **kw)
                    kind = f"bracket [{ref.ce_star_lower:.4f}, {ref.ce_star_upper:.4f}] from {args.bracket_nodes} nodes"
                    # Off-table nodes cost real forwards: keep the judged-by-bracket cells small.
                    case_budgets = [b for b in budgets if b <= 256]
                print(f"[{name}] reference: {kind} ({time.perf_counter() - t:.0f} s)", flush=True)
            yield run_case(name, desc, cm, kw, depth, case_budgets, args.repeats, args.seed, out, exact_result=ref)
            if cache_file is not None:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                cm.save_tables(cache_file)


def _cell(st, est, b):
    row = next((r for r in st.rows if r["estimator"] == est and r["budget"] == b), None)
    if row is None:
        return "-"  # budget not run
    if not row["judged"]:
        return "wide"  # the reference bracket is too wide to judge this cell
    tok = f" ({row['model_tokens']:.0f})"
    if row["rmse"] == 0.0:
        return "exact" + tok  # the estimator enumerated the canopy within the budget
    rr = ratio_rows(st).get((est, b))
    return (f"{rr['ratio']:.3g}" if rr is not None and math.isfinite(rr["ratio"]) else "-") + tok


def summary_table(studies, budgets):
    """Markdown, per depth: RMSE / plain RB MC's RMSE at equal measured tokens (its fitted line), per canopy
    and estimator, with the mean measured model tokens of each cell."""
    by_depth = {}
    for st in studies:
        by_depth.setdefault(st.settings["depth"], []).append(st)
    lines = []
    for depth in sorted(by_depth):
        lines += [f"**depth {depth}**: RMSE / plain RB Monte Carlo's RMSE at the measured model tokens (read off "
                  "its fitted RMSE-vs-tokens line), and in brackets the mean measured model tokens (`exact`: the "
                  "estimator enumerated the canopy; `wide`: the reference bracket is too wide to judge; `-`: not run)",
                  "", "| canopy | CE* | estimator | " + " | ".join(str(b) for b in budgets) + " |",
                  "|---|---:|---|" + "---:|" * len(budgets)]
        for st in by_depth[depth]:
            ex = st.exact
            ref = (f"{st.exact_ce_star:.3f}" if ex["ce_star_lower"] == ex["ce_star_upper"]
                   else f"[{ex['ce_star_lower']:.3f}, {ex['ce_star_upper']:.3f}]")
            case = st.settings["case"]
            for i, est in enumerate(ESTIMATORS):
                head = f"{case[8:] if case.startswith('smollm2_') else case} | {ref}" if i == 0 else " | "
                lines.append(f"| {head} | {est} | " + " | ".join(_cell(st, est, b) for b in budgets) + " |")
        lines.append("")
    return lines


def per_case_lines(st):
    s = st.settings
    ex = st.exact
    ref = (f"exact CE*_max = {st.exact_ce_star:.4f}" if ex["ce_star_lower"] == ex["ce_star_upper"] else
           f"bracket [{ex['ce_star_lower']:.4f}, {ex['ce_star_upper']:.4f}]")
    out = [f"### {s['case']}: {s['description']}", "",
           f"{ref} nats, {ex['num_internal_nodes']} internal nodes, E[N] = {ex['expected_length']:.3f}; "
           f"{s['repeats']} repeats per cell; {s['wall_seconds']:.0f} s.", "",
           "| estimator | budget | model_tokens | bias | SD | RMSE | mean SE | coverage | RMSE / MC@model_tokens | judged |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ratios = ratio_rows(st)
    for r in st.rows:
        rr = ratios.get((r["estimator"], r["budget"]), {}).get("ratio", math.nan)
        out.append(f"| {r['estimator']} | {r['budget']} | {r['model_tokens']:.0f} | {r['bias']:+.4f} | {r['sd']:.4f} | "
                   f"{r['rmse']:.4f} | {r['mean_se']:.4f} | {r['coverage']:.2f} | {rr:.3f} | "
                   f"{'yes' if r['judged'] else 'no'} |")
    out.append("")
    return out


def plot_all(studies, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm = [st for st in studies if st.settings["case"].startswith("smollm2")]
    if not sm:
        return None
    cols = min(4, len(sm))
    rows = math.ceil(len(sm) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    for ax, st in zip(axes.flat, sm):
        for i, est in enumerate(ESTIMATORS):
            x, y = st._curve(est)
            if x.shape[0]:
                ax.loglog(x, y, marker="osD^v<>"[i % 7], ms=3.5, lw=1.2, label=est)
        ax.set_title(st.settings["case"].replace("smollm2_", ""), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(sm):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, frameon=False)
    fig.supxlabel("model tokens per estimate", fontsize=9)
    fig.supylabel("RMSE vs reference (nats)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


BEST_TABLE_PY = Path(__file__).resolve().parents[1] / "python" / "canopy_rs" / "estimators" / "_best_table.py"


def write_best_table(summary, path=BEST_TABLE_PY):
    """The recommendation table best_estimator ships, derived from the summary (derive_best_table)."""
    table = derive_best_table(summary)
    lines = ['"""Generated by benches/bench_estimators.py (--summarise) from benches/results/estimators_summary.json',
             "with canopy_rs.estimators.best.derive_best_table: do not edit by hand.",
             "",
             "{shape: ((budget in model tokens, estimator, its worst RMSE ratio to the best candidate of a measured",
             'canopy of that shape, that canopy), ...)}"""', "",
             "BEST_TABLE: dict[str, tuple[tuple[int, str, float, str], ...]] = {"]
    for key, entries in table.items():
        lines.append(f"    {key!r}: (")
        lines += [f"        {tuple(e)!r}," for e in entries]
        lines.append("    ),")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one prompt, depth 6, budgets 64-1024, 20 repeats")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--max-exact", type=int, default=60_000,
                    help="depth-10 canopies with more nodes are judged against a bracket")
    ap.add_argument("--bracket-nodes", type=int, default=2_000, help="best-first nodes for a depth-10 bracket")
    ap.add_argument("--table-cache", type=Path, default=None,
                    help="keep each prompt's prefix -> support table here between runs (pickle)")
    ap.add_argument("--no-smollm2", action="store_true", help="only the tiny models")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the cases whose name has one")
    ap.add_argument("--skip-existing", action="store_true", help="skip cases whose JSON is already in --out")
    ap.add_argument("--summarise", action="store_true",
                    help="only rebuild the summary, the combined plot and best_estimator's table "
                         "(python/canopy_rs/estimators/_best_table.py) from the JSON files in --out")
    args = ap.parse_args(argv)
    budgets = [64, 256, 1024] if args.quick else [64, 256, 1024, 4096]
    args.repeats = args.repeats or (20 if args.quick else 50)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    studies = []
    if args.summarise:
        from canopy_rs.estimators.comparison import ComparisonResult

        # Files written before the cost column was named model_tokens call it "tokens" (rows evaluated, the
        # root row included): ComparisonResult reads them with canopy_rs.estimators.comparison.upgrade_rows
        # (model_tokens = their tokens_forwarded, the same number through the CachedModel every stored case
        # ran on; tokens -> rows_evaluated). The summary is then written with today's names.
        for f in sorted(args.out.glob("estimators_*.json")):
            d = json.loads(f.read_text())
            if "rows" in d and "settings" in d and "case" in d["settings"]:
                studies.append(ComparisonResult(d["exact_ce_star"], d["exact"], d["rows"], [], d["settings"]))
        order = {n: i for i, n in enumerate(["smollm2", "callable", "synthetic", "tiny_llama"])}
        studies.sort(key=lambda st: (order.get(st.settings["case"].split("_")[0], 9), st.settings["case"]))
        budgets = sorted({r["budget"] for st in studies for r in st.rows})
        args.repeats = max((st.settings["repeats"] for st in studies), default=0)
    elif not args.no_smollm2:
        try:
            studies.extend(smollm2_cases(args, budgets, args.out))
        except Exception as exc:  # the embedded model is an optional extra
            from canopy_rs.models import ModelNotFoundError

            if not isinstance(exc, (ImportError, ModelNotFoundError)):
                raise
            print(f"[smollm2] skipped: {exc}", file=sys.stderr)
    for name, desc, model, kw, depth in ([] if args.summarise else tiny_cases()):
        if not wanted(args, name):
            continue
        studies.append(run_case(name, desc, model, kw, depth, budgets, args.repeats, args.seed, args.out))

    plot = plot_all(studies, args.out / "estimators_rmse_vs_cost.png")
    md = ["# Estimator study (bench_estimators.py)", "",
          f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; canopy_rs "
          f"{canopy_rs.__version__}; {args.repeats} repeats per cell"
          + ("." if args.summarise else f"; total {time.perf_counter() - t_all:.0f} s."),
          "", "## RMSE relative to plain RB Monte Carlo", ""]
    md += summary_table(studies, budgets)
    if plot is not None:
        md += [f"![RMSE vs cost]({plot.name})", ""]
    md += ["## Every canopy", ""]
    for st in studies:
        md += per_case_lines(st)
    (args.out / "estimators_summary.md").write_text("\n".join(md))
    summary = [{"case": st.settings["case"], "description": st.settings["description"], "exact": st.exact,
                "rows": st.rows, "ratios": st.equal_cost_ratios(REFERENCE), "wall_seconds": st.settings["wall_seconds"]}
               for st in studies]
    (args.out / "estimators_summary.json").write_text(json.dumps(to_plain(summary), indent=2,
                                                                 allow_nan=True))
    if any(st.settings["case"].startswith("smollm2") for st in studies):
        table = write_best_table(to_plain(summary))
        print(f"best_estimator table ({BEST_TABLE_PY.name}): {table}")
    print("\n".join(summary_table(studies, budgets)))
    print(f"\nwrote {args.out}/estimators_*.{{csv,json,png}}, estimators_summary.{{json,md}} "
          f"({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
