"""Argument groups and value types shared by the commands. Every value is checked here, while parsing, so a
bad argument ends the run before anything (the model above all) is loaded."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Optional

DEMO_PROMPT = "Is the sky blue? Answer yes or no."
DEFAULT_MAX_NEW_TOKENS = 5
DEFAULT_TOP_K = 4
DEFAULT_ROLLOUTS = 100


def int_list(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def str_list(s: str) -> list[str]:
    return [x for x in s.replace(" ", "").split(",") if x]


def _int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def int_at_least(lo: int, hint: str = "") -> Callable[[str], int]:
    def parse(s: str) -> int:
        v = _int(s)
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}{hint}")
        return v

    return parse


positive_int = int_at_least(1)


def positive_float(s: str) -> float:
    v = _float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {s}")
    return v


def unit_interval(s: str) -> float:
    """A probability in (0, 1]."""
    v = _float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s}")
    return v


def positive_int_list(s: str) -> list[int]:
    vals = int_list(s)
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return vals


def eos_ids(s: str) -> list[int]:
    """EOS token ids: at least one, each >= 0 (the model's vocabulary is checked before it loads)."""
    vals = int_list(s)
    if not vals:
        raise argparse.ArgumentTypeError(f"expected at least one token id, got {s!r}")
    if min(vals) < 0:
        raise argparse.ArgumentTypeError(f"token ids are >= 0, got {s!r}")
    return vals


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (default: the embedded SmolLM2-135M-Instruct gguf, no network)")
    g.add_argument("--model", metavar="PATH|ID",
                   help="a local transformers model directory (save_pretrained) or .gguf file, or a Hugging Face "
                        "hub id (org/name): from the hub cache, else downloaded unless --offline")
    g.add_argument("--gguf", metavar="FILE", help="a gguf file (with --model: the file inside that directory or "
                                                  "hub repository)")
    g.add_argument("--revision", metavar="REV", help="with a hub id: a branch, tag or commit (default: main); the "
                                                     "run records the commit it resolved to")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model whose architecture is code shipped with it (runs that code; off by default)")
    g.add_argument("--offline", action="store_true",
                   help="never contact the hub: a hub id must already be in the cache (as with HF_HUB_OFFLINE=1)")
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="model dtype (auto: float32 on CPU, else the checkpoint's dtype)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: when the tokenizer has one)")
    g.add_argument("--strategy", choices=["auto", "cascade", "tree", "per-row"], default="auto",
                   help="how the transformers backend reuses the KV cache (default: auto, the cheapest that runs)")
    g.add_argument("--eos-token-ids", type=eos_ids, metavar="IDS",
                   help="comma-separated EOS ids (default: the model's generation config)")
    g.add_argument("--context-length", type=positive_int, metavar="N",
                   help="the context window prompt + --max-new-tokens must fit (default: the model config's "
                        "max_position_embeddings; raise it only if the model's position scaling allows more)")


def add_prompt_args(p: argparse.ArgumentParser, default_prompt: Optional[str] = None) -> None:
    g = p.add_argument_group("prompts")
    help_default = f' (default: "{default_prompt}")' if default_prompt else ""
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt; repeat for several" + help_default)
    g.add_argument("--prompts", metavar="FILE",
                   help="prompts file: JSONL (field prompt/text/question/input) or one prompt per line; - reads "
                        "standard input")
    g.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N prompts")


def add_policy_args(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    top_k: Optional[int] = DEFAULT_TOP_K) -> None:
    g = p.add_argument_group("decoding policy (named as in transformers' generate)")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens,
                   help=f"the cap T_max on generated tokens, EOS included (default: {max_new_tokens})")
    g.add_argument("--temperature", type=positive_float, default=1.0, help="> 0 (default: 1.0)")
    g.add_argument("--top-k", type=int_at_least(0, " (0 turns top-k off)"), default=top_k,
                   help=f"0 disables (default: {top_k})")
    g.add_argument("--top-p", type=unit_interval, default=1.0, help="in (0, 1] (default: 1.0)")
    g.add_argument("--batch-size", type=positive_int, help="rows per model call (default: the library's)")


def add_run_args(p: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
    """What every model-running command takes: the model, the prompts and the decoding policy."""
    add_model_args(p)
    add_prompt_args(p, DEMO_PROMPT)
    add_policy_args(p, max_new_tokens=max_new_tokens)


def add_ray_arg(p: argparse.ArgumentParser, what: str, shards: bool = False) -> None:
    """``--ray [ADDRESS]``: run on Ray workers, each loading the model once (``what``: how the command
    splits its work). Without ADDRESS, the Ray of RAY_ADDRESS or a new local one. ``shards``: the command
    splits a single prompt's canopy into shards; otherwise a single prompt runs on one worker (where a
    cluster's GPUs are), never silently here."""
    p.set_defaults(ray_shards=shards)
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help=f"run on Ray workers (one per GPU, else per CPU; each loads the model once): {what}; "
                        "ADDRESS picks the cluster (auto, ray://head:10001, ...; default: a new local Ray)")


def add_output_args(p: argparse.ArgumentParser, out_default: Optional[str] = None, seed: bool = True,
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
        g.add_argument("--seed", type=int_at_least(0), default=0, help="random seed; prompt i uses seed + i (default: 0)")
    if plots:
        g.add_argument("--no-plots", action="store_true", help="do not write plots")


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(s: str) -> int:
    """A size in bytes: an integer with an optional K, M, G or T suffix (powers of 1024; a trailing B or
    iB is allowed: 512M, 4GiB). Every memory flag (``exact --max-memory``, ``bound --budget-memory``)
    takes this syntax."""
    t = s.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _SIZE_UNITS else ""
    try:
        v = float(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 1000000, got {s!r}") from None
    if not math.isfinite(v) or v < 1:
        raise argparse.ArgumentTypeError(f"expected a size >= 1 byte, got {s!r}")
    return int(v)
