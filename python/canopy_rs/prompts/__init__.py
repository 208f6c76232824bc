"""Four small prompt sets shipped with canopy_rs, in the spirit of the paper's tasks.

They were written for this project (not taken from any dataset) and are **illustrative**: 25 prompts each,
enough to run the study pipeline end to end, not a benchmark. The paper's own tasks (BigCodeBench-style
completions, GSM8K, stories, HellaSwag stems; 100 prompts each) are the user's to bring as JSONL files.

==============  ==============================================================================
``code``        Python function stubs (signature + docstring) to complete
``math``        arithmetic word problems
``stories``     open-ended creative solutions and short-story prompts
``completion``  everyday scene descriptions that stop mid-sentence
==============  ==============================================================================

Each file is JSONL with ``{"id": ..., "prompt": ...}`` per line::

    from canopy_rs.prompts import load_prompt_set
    load_prompt_set("math")[0]   # {"id": "math-01", "prompt": "A baker makes 48 rolls ..."}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from canopy_rs.errors import InvalidArgumentError

__all__ = ["PROMPT_SETS", "prompt_set_path", "load_prompt_set", "read_prompts", "parse_prompts"]

PROMPT_SETS = ("code", "math", "stories", "completion")


def prompt_set_path(name: str) -> Path:
    """The JSONL file of the shipped prompt set ``name`` (one of :data:`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {', '.join(PROMPT_SETS)}, got {name!r}")
    return Path(__file__).with_name(f"{name}.jsonl")


def load_prompt_set(name: str) -> list[dict[str, Any]]:
    """``[{"id", "prompt"}]`` of the shipped prompt set ``name``."""
    return read_prompts(prompt_set_path(name))


_PROMPT_KEYS = ("prompt", "text", "question", "input", "instruction", "content")


def read_prompts(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """Prompts from a file: JSONL (one JSON object or string per line; the prompt is the first of the keys
    ``prompt, text, question, input, instruction, content``; an ``id`` key is kept) or plain text (one prompt
    per non-empty line). Returns ``[{"id": ..., "prompt": ...}]``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(
            f"prompts file {p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    return parse_prompts(text, str(p), json_lines=p.suffix.lower() in (".jsonl", ".json", ".ndjson") or None)


def parse_prompts(text: str, source: str = "<stdin>", json_lines: Optional[bool] = None) -> list[dict[str, Any]]:
    """Prompts from ``text`` laid out as a prompts file (see :func:`read_prompts`; ``source`` names it in
    errors). ``json_lines`` None: JSONL when the first line starts with ``{`` or ``"``."""
    p = source
    lines = [ln for ln in text.splitlines() if ln.strip()]
    is_json = bool(json_lines) or (bool(lines) and lines[0].lstrip()[:1] in ("{", '"'))
    out: list[dict[str, Any]] = []
    for i, ln in enumerate(lines):
        if not is_json:
            out.append({"id": str(i), "prompt": ln})
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{p}:{i + 1}: not valid JSON ({e.msg}); use one JSON object per line") from None
        if isinstance(obj, str):
            out.append({"id": str(i), "prompt": obj})
            continue
        if not isinstance(obj, Mapping):
            raise InvalidArgumentError(f"{p}:{i + 1}: expected a JSON object or string, got {type(obj).__name__}")
        for k in _PROMPT_KEYS:
            if isinstance(obj.get(k), str):
                out.append({"id": str(obj.get("id", obj.get("prompt_id", i))), "prompt": obj[k]})
                break
        else:
            raise InvalidArgumentError(f"{p}:{i + 1}: no prompt field (one of {', '.join(_PROMPT_KEYS)})")
    if not out:
        raise InvalidArgumentError(f"{p}: no prompts")
    return out
