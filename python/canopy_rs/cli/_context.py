"""The run context of one ``canopy-rs`` invocation: arguments, the output directory, the lazily loaded
model, the per-prompt loop with its checkpoints, and the final result."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from canopy_rs.cli._args import DEMO_PROMPT
from canopy_rs.cli._format import header, short
from canopy_rs.drivers.progress import MassProgress, ProgressBar
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.models import library_versions, resolve_model
from canopy_rs.prompts import parse_prompts, read_prompts
from canopy_rs.runs import RECORD_SCHEMA, RESULT_JSON, RunDir, dumps, flatten, model_record, prompt_key

MAX_PLOTTED_PROMPTS = 8

# What a transformers model folder holds (config.json, weights and a tokenizer): checked before loading.
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def check_model_files(spec: Any) -> Optional[dict[str, Any]]:
    """That ``spec`` (:func:`canopy_rs.models.resolve_model`) names a model that can load, checked from its
    files alone (nothing is imported or loaded): a folder with ``config.json``, weights and a tokenizer, or a
    file that starts like a gguf. Returns the folder's ``config.json`` (a dict) when there is one; raises
    :class:`InvalidArgumentError` naming what is missing and what a loadable model holds."""
    if spec.kind == "embedded":
        return None  # the pinned file, checked by its SHA-256 when fetched
    base = Path(spec.path)
    if spec.gguf_file is not None:
        f = base / spec.gguf_file
        try:
            with open(f, "rb") as fh:
                magic = fh.read(4)
        except OSError as e:
            raise InvalidArgumentError(f"gguf file {f}: cannot be read ({e.strerror or e})") from None
        if magic != b"GGUF":
            raise InvalidArgumentError(f"gguf file {f}: not a gguf file (it does not start with GGUF); give a "
                                       "llama.cpp .gguf model, or --model DIR for a transformers model folder")
        cfg_path = base / "config.json"
        return _read_config(cfg_path) if cfg_path.is_file() and spec.kind == "directory" else None
    if not base.is_dir():
        return None  # nothing on disk to look at yet
    what = f"--model {spec.path}"
    holds = ("a transformers model folder (save_pretrained) holds config.json, its weights (*.safetensors or "
             "*.bin) and its tokenizer files; for a llama.cpp model give the .gguf file (--model FILE.gguf or --gguf)")
    ggufs = sorted(x.name for x in base.glob("*.gguf"))
    if not (base / "config.json").is_file():
        if ggufs:
            raise InvalidArgumentError(f"{what}: no config.json, but {ggufs[0]} is there: use --gguf {ggufs[0]}")
        listing = "empty" if not any(base.iterdir()) else "no config.json"
        raise InvalidArgumentError(f"{what}: {listing}, not a loadable model; {holds}")
    cfg = _read_config(base / "config.json")
    if not any(any(base.glob(pat)) for pat in WEIGHT_FILES):
        raise InvalidArgumentError(f"{what}: config.json but no weights (*.safetensors, *.bin); {holds}")
    if not any((base / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidArgumentError(f"{what}: no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
                                   f"{holds}")
    return cfg


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"{path}: not readable JSON ({e}); a model's config.json must be") from None
    if not isinstance(cfg, dict):
        raise InvalidArgumentError(f"{path}: holds {type(cfg).__name__}, not a JSON object")
    return cfg


def config_vocab_size(cfg: Optional[dict[str, Any]]) -> Optional[int]:
    """The vocabulary size a model's config.json declares (its text config's for multimodal models)."""
    if not cfg:
        return None
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


@dataclass(frozen=True)
class PromptJob:
    """One prompt to compute: its position, id and text, its seed (``--seed`` + index) and its backend."""

    index: int
    id: str
    prompt: str
    seed: Optional[int]
    backend: Any


# A command's per-prompt work, ``fn(ctx, job)``: the record to checkpoint and its tables (``{"rollouts": rows,
# "nodes": rows}``). A module-level function, so that --ray can run it on a worker.
PromptFn = Callable[["RunContext", PromptJob], tuple[dict, dict]]
# Extra keyword arguments of a prompt's backend, ``backend_options(ctx, hf_model)`` (module-level too).
BackendOptions = Callable[["RunContext", Any], dict]


def tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class BracketProgress:
    """A ``progress=`` callback for :func:`canopy_rs.exact` / :func:`canopy_rs.bounded`: a tqdm bar (unless
    ``quiet``) with a total and an ETA, and, with ``record``, each snapshot kept (for the bracket-vs-budget
    plot). With ``total_nodes`` (a node budget) the bar counts nodes expanded towards it; otherwise, the
    number of nodes being unknown until the end, it counts the probability mass covered towards 1 (the
    canopy is done when all of it is), with the nodes expanded beside it."""

    def __init__(self, quiet: bool, desc: str, record: bool = False, total_nodes: Optional[int] = None) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.record = record
        self.t0 = time.perf_counter()
        self.total_nodes = total_nodes
        # Without a node budget: the one bar over the mass covered (drivers.progress.MassProgress).
        self.bar: Any = (ProgressBar(not quiet, desc=desc, unit="node", total=total_nodes, file=sys.stderr)
                         if total_nodes is not None else MassProgress(not quiet, desc=desc, file=sys.stderr))

    def __call__(self, b: Any) -> None:
        if self.record:
            self.snapshots.append({
                "num_expanded": int(b.num_expanded), "ce_star_lower": float(b.ce_star_lower),
                "ce_star_upper": float(b.ce_star_upper), "explored_mass": float(b.explored_mass),
                "model_tokens": int(b.info.model_tokens), "seconds": time.perf_counter() - self.t0,
            })
        if self.total_nodes is None:
            self.bar(b)
        else:
            self.bar.show(min(int(b.num_expanded), self.total_nodes),
                          {"mass": f"{b.explored_mass:.4f}", "width": f"{b.ce_star_upper - b.ce_star_lower:.2e}"})

    def close(self) -> None:
        self.bar.close()


class RunContext:
    """One CLI invocation: arguments, output directory, lazily loaded model, status output."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str], extra: Sequence[str] = ()) -> None:
        self.args = args
        self.argv = list(argv)
        self.extra = list(extra)  # what followed `--` (passed on to bench scripts)
        self.command: str = args.command
        self.quiet = bool(getattr(args, "quiet", False))
        # Progress bars: not when quiet, and not without tqdm.
        self.show_progress = not self.quiet and tqdm_available()
        self.t_start = time.time()
        self.out: Any = None  # the RunDir, once open()
        self._prompts: Optional[list[dict[str, Any]]] = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._spec: Any = None
        self._saved_model_info: Optional[dict[str, Any]] = None
        self._first_backend: Optional[Any] = None
        self.model_seconds = 0.0
        self.files: list[str] = []
        self.on_worker = False  # a Ray worker's context (--ray): computes prompts, writes nothing

    # --- before and after the command ------------------------------------------------------------------
    def open(self) -> None:
        """Everything that can fail without the model, checked before it loads: the model's location and
        files (a loadable model: config.json, weights and a tokenizer, or a gguf file), ``--eos-token-ids``
        against the vocabulary config.json declares, the prompts, the device, and the output directory
        (created and locked; with ``--fresh``, cleared of what the tool wrote there)."""
        a = self.args
        if hasattr(a, "model"):
            cfg = check_model_files(self.spec)
            self.check_eos_flag(config_vocab_size(cfg), "vocab_size in config.json")
            self.prompts()
            if a.device:
                from canopy_rs.hf_models import check_device  # imports torch: only to check a given device

                check_device(a.device)
        if getattr(a, "out", None):
            self.out = RunDir(a.out)
            if getattr(a, "fresh", False):
                removed = self.out.clear()
                if removed:
                    self.say(f"--fresh: removed {len(removed)} file(s) and checkpoint(s) an earlier run wrote in "
                             f"{self.out.path}")

    def check_eos_flag(self, vocab: Optional[int], where: str) -> None:
        """``--eos-token-ids`` against the model's vocabulary (``vocab`` ids, read from ``where``), in the
        flag's words."""
        ids = getattr(self.args, "eos_token_ids", None)
        if not ids or vocab is None:
            return
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise InvalidArgumentError(
                f"--eos-token-ids {','.join(map(str, ids))}: {', '.join(map(str, bad))} "
                f"{'is' if len(bad) == 1 else 'are'} outside the model's vocabulary (token ids 0 to {vocab - 1}, "
                f"{where}); give EOS ids below {vocab} or leave the flag out (the model's generation config)")

    def close(self, ok: bool) -> None:
        """Releases --out; after a failure, removes what this run created there and left empty."""
        if self.out is not None:
            self.out.close(ok)

    # --- status -----------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # --- model -------------------------------------------------------------------------------------
    @property
    def spec(self) -> Any:
        """Where the model comes from (resolved without loading it)."""
        if self._spec is None:
            a = self.args
            self._spec = resolve_model(a.model, a.gguf, revision=getattr(a, "revision", None),
                                       offline=True if getattr(a, "offline", False) else None,
                                       progress=not self.quiet, log=self.say)
        return self._spec

    def load(self) -> tuple[Any, Any]:
        if self._model is None:
            from canopy_rs.hf_models import load_model  # imports torch and transformers: only to load

            self.say(f"loading {self.spec.name} from {self.spec.path} ...")
            t = time.perf_counter()
            self._model, self._tokenizer = load_model(
                self.spec, device=self.args.device, dtype=self.args.dtype, quiet=True,
                trust_remote_code=bool(getattr(self.args, "trust_remote_code", False)),
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

    def backend(self, prompt: str, **options: Any) -> Any:
        from canopy_rs.backends.transformers import TransformersModel

        if self._first_backend is not None:  # the strategy and its self-check hold for the model: reused
            return self._first_backend.with_prompt(prompt, **options)
        model, tok = self.load()
        emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        width = getattr(getattr(emb, "weight", None), "shape", [None])[0]
        self.check_eos_flag(int(width) if width is not None else config_vocab_size(model.config.to_dict()),
                            "the width of its logits")
        self._first_backend = TransformersModel(
            model, tok, prompt=prompt, chat=self.chat(), strategy=self.args.strategy,
            eos_token_ids=self.args.eos_token_ids, context_length=self.args.context_length, **options,
        )
        return self._first_backend

    def model_info(self) -> dict[str, Any]:
        if self._model is None and self._saved_model_info is not None:
            return dict(self._saved_model_info)  # every prompt was resumed: what the run that computed them saw
        a = self.args
        info: dict[str, Any] = self.spec.to_dict()
        info.update(device=a.device, dtype=a.dtype, chat=a.chat, strategy=a.strategy)
        if self._model is not None:
            info.update(model_record(self._model, self.model_seconds), chat=self.chat())
        return info

    # --- prompts and policy ------------------------------------------------------------------------
    def prompts(self) -> list[dict[str, Any]]:
        if self._prompts is None:
            self._prompts = self._read_prompts()
        return self._prompts

    def _read_prompts(self) -> list[dict[str, Any]]:
        a = self.args
        out: list[dict[str, Any]] = [{"id": f"prompt{i}", "prompt": text} for i, text in enumerate(a.prompt or [])]
        if a.prompts == "-":
            out.extend(parse_prompts(sys.stdin.read(), "--prompts - (standard input)"))
        elif a.prompts:
            if not Path(a.prompts).is_file():
                raise InvalidArgumentError(f"--prompts {a.prompts}: no such file")
            out.extend(read_prompts(a.prompts))
        if not out:
            out = [{"id": "demo", "prompt": DEMO_PROMPT}]
        return out[: a.limit] if a.limit else out

    def policy(self) -> dict[str, Any]:
        a = self.args
        top_k = a.top_k if a.top_k and a.top_k > 0 else None
        return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": top_k, "top_p": a.top_p}

    def seed_for(self, index: int) -> Optional[int]:
        s = getattr(self.args, "seed", None)
        return None if s is None else int(s) + index

    def key_config(self, index: int, **extra: Any) -> dict[str, Any]:
        """Everything that changes a prompt's numbers (the resume key)."""
        a = self.args
        cfg = {
            "command": self.command,
            # The embedded model is keyed by its pinned version and a hub model by its commit, not by where this
            # machine keeps them.
            "model": {"kind": self.spec.kind, "gguf_file": self.spec.gguf_file,
                      "path": self.spec.extra.get("requirement") if self.spec.kind == "embedded" else
                      f"{self.spec.extra['repo_id']}@{self.spec.extra['commit']}" if self.spec.kind == "hub" else
                      self.spec.path},
            "dtype": a.dtype,
            "device": (a.device or "auto").split(":")[0],
            "chat": a.chat,
            "eos_token_ids": a.eos_token_ids,
            "policy": self.policy(),
            "index_seed": self.seed_for(index),
            # Prompts are keyed by position and text: two prompts with the same text are two prompts.
            "position": index,
        }
        cfg.update(extra)
        return cfg

    # --- the per-prompt loop ----------------------------------------------------------------------
    def run_prompts(self, fn: PromptFn, backend_options: Optional[BackendOptions] = None,
                    schema: Optional[dict[str, Any]] = None, **key_extra: Any) -> list[dict[str, Any]]:
        """Calls ``fn(ctx, job)`` for each prompt not already finished in ``--out`` and checkpoints its record
        and tables. ``backend_options(ctx, hf_model)`` gives extra keyword arguments for the prompt's backend.
        ``schema``: the fields (and their types) the command reads from a record beside
        :data:`~canopy_rs.runs.RECORD_SCHEMA`'s; a checkpoint without them is recomputed with a warning.
        With ``--ray`` (:meth:`spreads_prompts`: several prompts, or one the command cannot shard), they run on Ray
        workers (each loads the model once) and are checkpointed as they come back, under the same keys.
        Returns the records in prompt order."""
        full_schema = {**RECORD_SCHEMA, **(schema or {})}
        prompts = self.prompts()
        n = len(prompts)
        records: dict[int, dict[str, Any]] = {}
        todo: list[tuple[int, dict[str, Any], str]] = []
        for i, p in enumerate(prompts):
            key = prompt_key(p["prompt"], self.key_config(i, **key_extra))
            rec = self._resumed(i, p, key, n, full_schema)
            if rec is not None:
                records[i] = rec
            else:
                todo.append((i, p, key))

        def keep(i: int, key: str, rec: dict[str, Any], tables: dict[str, Any]) -> None:
            rec = {"key": key, **rec}
            if self.out is not None:
                self.out.save(key, rec, rollouts=tables.get("rollouts"), nodes=tables.get("nodes"))
            records[i] = rec

        if todo and self.spreads_prompts():
            self._run_on_ray(fn, backend_options, todo, keep)
        for i, p, key in todo:
            if i in records:
                continue
            self.say(f"{self._tag(i, n)}prompt {p['id']!r}: {short(p['prompt'], 70)}")
            keep(i, key, *compute_prompt(self, fn, backend_options, i, p))
        return [records[i] for i in range(n)]

    def worker_backend_factory(self, prompt: str, options: dict[str, Any]) -> Callable[[], Any]:
        """A picklable ``() -> backend`` of ``prompt`` that a Ray worker calls once: the model is loaded there,
        the way this run loads it (the resolved model, its revision, dtype, strategy and remote-code choice)."""
        return functools.partial(worker_backend, self._worker_args(), self.argv, self.spec, prompt, options)

    def _worker_args(self) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(self.args), "quiet": True})

    def spreads_prompts(self) -> bool:
        """Whether this run sends its prompts to Ray workers: ``--ray`` with several prompts, or with one for
        a command that cannot split a prompt's canopy into shards (``exact`` and ``bound`` do that instead)."""
        if getattr(self.args, "ray", None) is None or self.on_worker:
            return False
        return len(self.prompts()) > 1 or not getattr(self.args, "ray_shards", False)

    def _tag(self, i: int, n: int) -> str:
        return f"[{i + 1}/{n}] " if n > 1 else ""

    def _resumed(self, i: int, p: dict[str, Any], key: str, n: int, schema: dict[str, Any]) -> Optional[dict]:
        """The prompt's finished record in --out (with the same key), else None."""
        if self.out is None:
            return None
        tag = self._tag(i, n)

        def damaged(why: str) -> None:
            print(f"canopy-rs: warning: {tag}prompt {p['id']!r}: the checkpoint in {self.out.path} is "
                  f"damaged ({why}); recomputing it", file=sys.stderr, flush=True)

        rec = self.out.finished(key, fresh=self.args.fresh, damaged=damaged, schema=schema)
        if rec is not None and (rec["index"] != i or rec["prompt"] != p["prompt"]):
            damaged(f"it holds prompt {rec['index']} ({short(rec['prompt'], 30)!r}), not this one")
            rec = None
        if rec is None:
            return None
        self.say(f"{tag}prompt {p['id']!r}: already done in {self.out.path} (skipped; --fresh recomputes)")
        rec["resumed"] = True
        rec["id"] = p["id"]  # the id is a label, not a setting: this run's
        if self._saved_model_info is None and isinstance(rec.get("model"), dict):
            self._saved_model_info = rec["model"]
        return rec

    def _run_on_ray(self, fn: PromptFn, backend_options: Optional[BackendOptions],
                    todo: list[tuple[int, dict[str, Any], str]],
                    keep: Callable[[int, str, dict, dict], None]) -> None:
        """The prompts of ``todo`` on Ray workers, each a :class:`RunContext` of this run's arguments that
        loads the model once; every record is checkpointed as it arrives (an interrupted run keeps them)."""
        from canopy_rs.drivers.ray_pool import WorkerPool  # imports ray: only for --ray

        n = len(self.prompts())
        make_state = functools.partial(worker_context, self._worker_args(), self.argv, self.spec)
        task = functools.partial(compute_on_worker, fn, backend_options)
        with WorkerPool(make_state, max_workers=len(todo), ray_address=self.args.ray or None) as pool:
            self.say(f"ray: {len(todo)} prompt(s) on {pool.describe()}")
            keys = {i: key for i, _, key in todo}
            for done, ((i, p), (rec, tables), w) in enumerate(
                    pool.imap(task, [(i, p) for i, p, _ in todo]), start=1):
                keep(i, keys[i], rec, tables)
                if self._model is None and self._saved_model_info is None:
                    self._saved_model_info = rec.get("model")  # what the workers loaded (none here)
                self.say(f"[{done}/{len(todo)}] prompt {p['id']!r} ({i + 1} of {n}): {rec['seconds']:.1f} s "
                         f"(ray worker {w})")

    # --- outputs -----------------------------------------------------------------------------------
    def header(self, records: list[dict]) -> str:
        return header(self.spec.name, self.model_info().get("chat"), self.policy(), records)

    def plot_stem(self, rec: dict, n: int) -> str:
        """Path prefix of a prompt's plot files: ``DIR/`` for one prompt, ``DIR/p003_`` for several."""
        assert self.out is not None
        return os.path.join(str(self.out.path), f"p{rec['index']:03d}_" if n > 1 else "")

    def result(self, records: list[dict], pooled: Optional[dict] = None, **extra: Any) -> dict[str, Any]:
        config = {k: v for k, v in vars(self.args).items() if not callable(v)}
        res = {
            "command": self.command,
            "argv": self.argv,
            "config": config,
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

    def finish(self, records: list[dict], result: dict[str, Any], table: str,
               plots: Callable[[], list[Path]] = lambda: [],
               files: Callable[[], list[Path]] = lambda: []) -> int:
        """Writes tables, ``files()``, ``plots()`` and result.json to --out; prints the table or JSON.

        The folder ends as one consistent set: the files an earlier run wrote there (its manifest) that this
        run does not write again are removed before the new result.json lands, and the manifest names
        what this run wrote (updated as it goes, so that an interrupted run's files are known too)."""
        if self.out is not None:
            out = self.out
            earlier = out.owned()

            def rel(paths: list[str]) -> list[str]:
                return [os.path.relpath(f, out.path) for f in paths]

            def written(paths: Any) -> None:
                self.files += [str(p) for p in paths]
                out.own(earlier + rel(self.files))

            written(out.write_table("prompts", [prompt_row(r) for r in records]))
            for table_name in ("rollouts", "nodes"):
                trows: list[dict] = []
                for r in records:
                    trows.extend(out.rows(r["key"], table_name + ".csv"))
                if trows:
                    written(out.write_table(table_name, trows))
            written(files())
            if not getattr(self.args, "no_plots", True):
                try:
                    written(plots())
                except ImportError as e:
                    self.say(f"plots skipped: {e}")
            names = sorted(rel(self.files))
            removed = out.remove_owned(earlier, keep=names + [RESULT_JSON])
            if removed:
                self.say(f"removed {len(removed)} file(s) an earlier run wrote in {out.path} that this run does "
                         f"not: {', '.join(removed[:6])}{', ...' if len(removed) > 6 else ''}")
            result["files"] = names + [RESULT_JSON]
            result["wall_seconds"] = time.time() - self.t_start
            out.own(result["files"])
            p = out.write_result(result)
            self.say(f"wrote {p} and {len(self.files)} more file(s) in {out.path}")
        if self.args.format == "json":
            print(dumps(result, strict=True))
        else:
            print(table)
        return 0


def compute_prompt(ctx: RunContext, fn: PromptFn, backend_options: Optional[BackendOptions], index: int,
                   prompt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One prompt's record (without its resume key) and tables: the same in this process and on a worker."""
    t = time.perf_counter()
    backend = ctx.backend(prompt["prompt"], **(backend_options(ctx, ctx.load()[0]) if backend_options else {}))
    rec, tables = fn(ctx, PromptJob(index=index, id=prompt["id"], prompt=prompt["prompt"],
                                    seed=ctx.seed_for(index), backend=backend))
    rec = {
        "index": index, "id": prompt["id"], "prompt": prompt["prompt"],
        "prompt_tokens": len(getattr(backend, "prompt_ids", []) or []),
        "strategy": getattr(backend, "strategy", None),
        "eos_token_ids": [int(e) for e in backend.eos_token_ids],
        **rec,
        "seconds": time.perf_counter() - t,
        "model": ctx.model_info(),
    }
    return rec, tables


def worker_context(args: argparse.Namespace, argv: Sequence[str], spec: Any) -> RunContext:
    """A Ray worker's :class:`RunContext`: the run's arguments (quiet) and the model the driver resolved."""
    ctx = RunContext(args, argv)
    ctx.on_worker = True
    ctx._spec = spec
    return ctx


def worker_backend(args: argparse.Namespace, argv: Sequence[str], spec: Any, prompt: str,
                   options: dict[str, Any]) -> Any:
    """One prompt's backend, built on a Ray worker (:meth:`RunContext.worker_backend_factory`)."""
    return worker_context(args, argv, spec).backend(prompt, **options)


def compute_on_worker(fn: PromptFn, backend_options: Optional[BackendOptions], ctx: RunContext,
                      task: tuple[int, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A :class:`~canopy_rs.drivers.ray_pool.WorkerPool` call: one prompt on the worker's context."""
    return compute_prompt(ctx, fn, backend_options, *task)



def prompt_row(r: dict[str, Any]) -> dict[str, Any]:
    """A record's row of prompts.csv: its scalar fields flattened (``exact_*``, ``bounds_*``,
    ``estimate_*``), the recommended estimator's value beside the paper's (``best_*``) and what the rollouts
    cost (``rollouts_model_tokens``): every number a command's table prints."""
    row = {k: r.get(k) for k in ("index", "id", "prompt", "key", "prompt_tokens", "seconds", "resumed")}
    for part in ("exact", "bounds", "estimate"):
        if isinstance(r.get(part), dict):
            row.update(flatten(r[part], part + "_"))
    best = r.get("best")
    if isinstance(best, dict):
        row.update(best_estimator=best.get("estimator"), best_budget=best.get("budget"), best_ce_star=best.get("ce_star"),
                   best_ce_star_se=best.get("ce_star_se"))
        ci = best.get("ce_star_ci") or [None, None]
        row.update(best_ce_star_ci_lo=ci[0], best_ce_star_ci_hi=ci[1],
                   best_model_tokens=(best.get("cost") or {}).get("model_tokens"))
    cost = r.get("rollout_cost")
    if isinstance(cost, dict):
        row["rollouts_model_tokens"] = cost.get("model_tokens")
    return row
