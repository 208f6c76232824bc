"""The prompt as token ids: a raw string, a chat-templated user turn, or ids used as they are."""

from __future__ import annotations

from typing import Any, Optional

import torch

from canopy_rs.errors import InvalidArgumentError

from .model_config import text_config

__all__ = ["render_prompt"]


def _wants_enable_thinking_false(model: Any, tokenizer: Any) -> bool:
    model_type = str(getattr(text_config(model), "model_type", "") or getattr(model.config, "model_type", ""))
    if model_type.startswith("qwen3"):
        return True
    template = getattr(tokenizer, "chat_template", None)
    return "enable_thinking" in str(template or "")


def render_prompt(
    model: Any,
    tokenizer: Any,
    prompt: Any,
    chat: bool,
    chat_template_kwargs: Optional[dict] = None,
) -> list[int]:
    """The prompt token ids (docs/backends.md#transformers-models): base models get the raw prompt (tokenised with the
    tokenizer's special tokens, e.g. BOS); ``chat=True`` renders ``[{"role": "user", "content": prompt}]``
    with the chat template and ``add_generation_prompt=True`` (Qwen3-style templates get
    ``enable_thinking=False``). A list of token ids is used as is."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidArgumentError("a string prompt needs a tokenizer; pass tokenizer=... or a list of token ids")
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise InvalidArgumentError("chat=True but the tokenizer has no chat_template: pass chat=False or a tokenizer with one")
            kwargs = dict(chat_template_kwargs or {})
            if "enable_thinking" not in kwargs and _wants_enable_thinking_false(model, tokenizer):
                kwargs["enable_thinking"] = False
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False, **kwargs
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
    else:
        if chat:
            raise InvalidArgumentError("chat=True needs a string prompt (token ids are used as is)")
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.flatten().tolist()
        ids = prompt
    ids = [int(t) for t in ids]
    if not ids:
        raise InvalidArgumentError("the prompt is empty: the model needs at least one token to predict the next one")
    return ids
