"""Running the model: the forward call as the installed transformers expects it, and a reduced-precision
model's final norm and LM head in float32."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Optional, Sequence

import torch

from canopy_rs.errors import CacheLayoutUnsupported

__all__ = ["ModelRunner", "Float32Head"]


class ModelRunner:
    """Calls a transformers causal LM the way the installed transformers version expects.

    transformers 5.x names the cache argument ``cache`` (``past_key_values`` is a deprecated alias, removed in
    5.40); 4.x names it ``past_key_values``. The name is read from the forward signature once; ``cache_kw`` is
    ``None`` for a model whose forward takes neither (it keeps its recurrent state elsewhere, e.g. RWKV's
    ``state``), which no strategy that hands it a cache can drive.
    """

    def __init__(self, model: Any, *, float32_head: bool = True):
        self.model = model
        self.head = Float32Head(model) if float32_head else None
        params = inspect.signature(model.forward).parameters
        self.cache_kw: Optional[str] = next((k for k in ("cache", "past_key_values") if k in params), None)
        if "logits_to_keep" in params:
            self.keep_kw: Optional[str] = "logits_to_keep"
        elif "num_logits_to_keep" in params:
            self.keep_kw = "num_logits_to_keep"
        else:
            self.keep_kw = None
        self.tokens_forwarded = 0
        self.model_calls = 0

    @property
    def config(self) -> Any:
        return self.model.config

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        last_only: bool = False,
        count: bool = True,
        extra: Optional[dict] = None,
    ) -> torch.Tensor:
        """Forward ``input_ids`` ``[B, q]`` on top of ``cache`` (updated in place; ``None``: no cache, the
        attention function keeps the state); returns the logits ``[B, q or 1, V]``. ``extra`` keyword
        arguments travel through the forward to the attention functions."""
        if cache is not None and self.cache_kw is None:
            raise CacheLayoutUnsupported(
                f"{type(self.model).__name__}.forward takes no cache argument: its state lives outside transformers' "
                "Cache, so canopy_rs cannot branch it"
            )
        kwargs: dict[str, Any] = {self.cache_kw: cache, "use_cache": True} if cache is not None else {"use_cache": False}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if last_only and self.keep_kw is not None:
            kwargs[self.keep_kw] = 1
        if extra:
            kwargs.update(extra)
        with self.head_context():
            out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits
        if last_only:
            logits = logits[:, -1:, :]
        if count:
            self.tokens_forwarded += int(input_ids.numel())
            self.model_calls += 1
        return logits

    def full_logits(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """Next-token logits of one full sequence with no cache (the reference path): ``[V]``."""
        return self.full_logits_batch([ids], device)[0]

    def full_logits_batch(self, seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        """Next-token logits of sequences of one length, each recomputed in full with no cache: ``[B, V]``."""
        t = torch.tensor([list(s) for s in seqs], dtype=torch.long, device=device)
        with self.head_context():
            out = self.model(input_ids=t, use_cache=False)
        return out.logits[:, -1, :]

    def head_context(self) -> Any:
        return self.head if self.head is not None and self.head.active else contextlib.nullcontext()


_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


class _Float32(torch.nn.Module):
    """A float32 copy of a module, applied to its input cast to float32."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(module).float()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.inner(x.float(), *args, **kwargs)


def _owner(root: torch.nn.Module, target: torch.nn.Module) -> Optional[tuple[torch.nn.Module, str]]:
    for name, mod in root.named_modules():
        for child_name, child in mod.named_children():
            if child is target:
                return mod, child_name
    return None


class Float32Head:
    """Runs a reduced-precision model's final norm and LM head in float32 (a context manager swapping in
    float32 copies for the duration of a forward): the logits, hence the top-k sets and the policy support,
    then carry float32 rounding only, whatever the model's dtype. Inactive for float32/float64 models.
    ``covers`` names what runs in float32 (``"final norm + LM head"``, or ``"LM head"`` when no final norm
    is recognised)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.swaps: list[tuple[torch.nn.Module, str, torch.nn.Module, torch.nn.Module]] = []
        try:
            dtype = next(model.parameters()).dtype
        except StopIteration:  # pragma: no cover
            dtype = torch.float32
        self.active = dtype in (torch.float16, torch.bfloat16)
        self.covers = ""
        if not self.active:
            return
        parts = []
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if get_decoder is not None else None
        if decoder is not None:
            for name in _FINAL_NORM_NAMES:
                norm = getattr(decoder, name, None)
                if isinstance(norm, torch.nn.Module) and not list(norm.children()):
                    self.swaps.append((decoder, name, norm, _Float32(norm)))
                    parts.append("final norm")
                    break
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        owner = _owner(model, head) if isinstance(head, torch.nn.Module) else None
        if owner is not None:
            self.swaps.append((owner[0], owner[1], head, _Float32(head)))
            parts.append("LM head")
        self.covers = " + ".join(parts)
        self.active = bool(self.swaps)

    def __enter__(self) -> None:
        for parent, name, _, f32 in self.swaps:
            setattr(parent, name, f32)

    def __exit__(self, *exc: Any) -> None:
        for parent, name, orig, _ in self.swaps:
            setattr(parent, name, orig)
