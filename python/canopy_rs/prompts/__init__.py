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

from pathlib import Path
from typing import Any

__all__ = ["PROMPT_SETS", "prompt_set_path", "load_prompt_set"]

PROMPT_SETS = ("code", "math", "stories", "completion")


def prompt_set_path(name: str) -> Path:
    """The JSONL file of the shipped prompt set ``name`` (one of :data:`PROMPT_SETS`)."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {', '.join(PROMPT_SETS)}, got {name!r}")
    return Path(__file__).with_name(f"{name}.jsonl")


def load_prompt_set(name: str) -> list[dict[str, Any]]:
    """``[{"id", "prompt"}]`` of the shipped prompt set ``name``."""
    from canopy_rs.io import read_prompts

    return read_prompts(prompt_set_path(name))
