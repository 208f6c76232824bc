"""Many prompts of one named model, in this process or spread over Ray workers: the Python side of
``canopy-rs exact|bound|sample|compare --prompts FILE [--ray]``.

    from functools import partial
    results = map_prompts(partial(canopy_rs.exact, max_new_tokens=8, top_k=4), prompts,
                          model="HuggingFaceTB/SmolLM2-135M-Instruct", executor="ray")

The model is named (a local folder, a gguf file or a hub id, as :func:`canopy_rs.load_model` takes it), never
passed loaded: it is resolved once here, so that a missing model or one needing remote code is refused before
any work, and each worker loads it once from that resolution (the same weights, the hub commit included). A
prompt's result does not depend on where it ran, so the Ray run gives the local run's results.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union

from canopy_rs.backends.transformers import TransformersModel
from canopy_rs.drivers.progress import ProgressBar
from canopy_rs.errors import ArgumentTypeError, InvalidArgumentError
from canopy_rs.hf_models import check_remote_code, load_model
from canopy_rs.models import ModelSpec, resolve_model

__all__ = ["map_prompts", "EXECUTORS"]

EXECUTORS = ("local", "ray")

Prompt = Union[str, Sequence[int]]
# What each worker holds: the loaded model and tokenizer, and how a prompt becomes a backend.
_State = tuple[Any, Any, bool, dict[str, Any]]


def _load(spec: ModelSpec, device: Optional[str], dtype: Optional[str], trust_remote_code: bool, chat: bool,
          backend_options: dict[str, Any]) -> _State:
    hf_model, tokenizer = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return hf_model, tokenizer, chat, backend_options


def _run_prompt(fn: Callable[[Any], Any], state: _State, job: tuple[int, Prompt]) -> Any:
    hf_model, tokenizer, chat, options = state
    return fn(TransformersModel(hf_model, tokenizer, prompt=job[1], chat=chat, **options))


def _check_prompts(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ArgumentTypeError(f"prompts must be a list of prompts (strings or token-id lists), got "
                                f"{type(prompts).__name__}; one prompt: [prompt]")
    out: list[Prompt] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise ArgumentTypeError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
    return out


def map_prompts(
    fn: Callable[[Any], Any],
    prompts: Sequence[Prompt],
    *,
    model: Union[str, ModelSpec, None] = None,
    gguf: Optional[str] = None,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    offline: Optional[bool] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    chat: bool = False,
    backend_options: Optional[dict[str, Any]] = None,
    executor: str = "local",
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
    on_result: Optional[Callable[[int, Any], None]] = None,
    progress: bool = False,
) -> list[Any]:
    """``[fn(backend) for each prompt]``, where ``backend`` is the prompt's
    :class:`~canopy_rs.TransformersModel` on ``model`` (``model``, ``gguf``, ``revision``,
    ``trust_remote_code``, ``offline``, ``device``, ``dtype``: as :func:`canopy_rs.load_model`; neither
    ``model`` nor ``gguf``: the embedded SmolLM2), built with ``chat`` and ``backend_options`` (other
    ``TransformersModel`` keywords, e.g. ``strategy``). ``fn`` is e.g. ``functools.partial(canopy_rs.exact,
    max_new_tokens=8, top_k=4)``, or ``canopy_rs.sample`` / ``bounded`` / ``compare`` with their keywords.

    ``executor="local"`` loads the model once here and runs the prompts in order. ``executor="ray"`` runs
    one prompt per task on Ray workers (``num_workers``, default one per GPU of the cluster, else per CPU,
    at most one per prompt), each loading the model once; ``ray_address`` picks the cluster (default: the
    Ray running in this process, else a new local one). ``fn`` then travels to the workers, so Ray's
    cloudpickle must serialise it (a function, ``functools.partial``, lambda or closure; not one holding a
    lock, an open file or a generator), and a worker that dies has its prompt redone.

    ``on_result(index, result)`` is called as each prompt finishes (in completion order on Ray), so a caller
    can checkpoint: Ctrl-C raises ``KeyboardInterrupt`` after the results handed over so far. ``progress``
    shows a bar over the prompts. Returns the results in prompt order."""
    if not callable(fn):
        raise ArgumentTypeError(f"fn must be a callable fn(backend) -> result, got {type(fn).__name__}")
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "local" and (ray_address is not None or num_workers is not None):
        raise InvalidArgumentError("ray_address and num_workers apply to executor='ray'; pass executor='ray' "
                                   "or leave them out")
    if backend_options is not None and not isinstance(backend_options, dict):
        raise ArgumentTypeError(f"backend_options must be a dict of TransformersModel keywords, got "
                                f"{type(backend_options).__name__}")
    options = dict(backend_options or {})
    for key in ("prompt", "chat", "model", "tokenizer"):
        if key in options:
            raise InvalidArgumentError(f"backend_options may not set {key!r}: map_prompts sets it "
                                       + ("(pass chat=)" if key == "chat" else ""))
    todo = _check_prompts(prompts)
    if executor == "ray":
        # Ray sends fn with its own serialiser (cloudpickle), which takes lambdas and closures: checked with
        # that one, so that what Ray could send is not refused.
        from canopy_rs.drivers.ray_pool import ray  # imports ray: only for executor="ray"

        try:
            ray.cloudpickle.dumps(fn)
        except Exception as e:  # noqa: BLE001 - any serialisation failure means the same fix
            raise ArgumentTypeError(f"executor='ray' sends fn to the workers, but Ray cannot serialise it ({e}); "
                                    "pass an fn that holds no lock, open file or generator (create those "
                                    "inside fn), or use executor='local'") from None
    # Resolved here, before any work: a missing model, an uncached hub id offline or remote code not
    # allowed is refused now, and every worker loads the same resolution.
    spec = model if isinstance(model, ModelSpec) else resolve_model(model, gguf, revision=revision, offline=offline)
    check_remote_code(spec, trust_remote_code)
    make_state = functools.partial(_load, spec, device, dtype, trust_remote_code, chat, options)
    task = functools.partial(_run_prompt, fn)
    jobs = list(enumerate(todo))
    results: dict[int, Any] = {}
    bar = ProgressBar(progress, desc="prompts", unit="prompt", total=len(jobs))
    try:
        if executor == "local":
            state = make_state()
            for job in jobs:
                results[job[0]] = task(state, job)
                if on_result is not None:
                    on_result(job[0], results[job[0]])
                bar.update(1)
        elif jobs:
            from canopy_rs.drivers.ray_pool import WorkerPool  # imports ray: only for executor="ray"

            with WorkerPool(make_state, num_workers=num_workers, max_workers=len(jobs),
                            ray_address=ray_address) as pool:
                for (i, _), result, _worker in pool.imap(task, jobs):
                    results[i] = result
                    if on_result is not None:
                        on_result(i, result)
                    bar.update(1)
    finally:
        bar.close()
    return [results[i] for i in range(len(jobs))]
