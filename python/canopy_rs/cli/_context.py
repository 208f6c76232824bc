"""The run context of one ``canopy-rs`` invocation: arguments, the output directory, the lazily loaded
model, the per-prompt loop with its checkpoints, and the final result."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from canopy_rs.cli._args import DEMO_PROMPT
from canopy_rs.cli._format import header, short
from canopy_rs.drivers.progress import ProgressBar
from canopy_rs.errors import InvalidArgumentError
from canopy_rs.models import library_versions, resolve_model
from canopy_rs.prompts import parse_prompts, read_prompts
from canopy_rs.runs import RunDir, dumps, flatten, model_record, prompt_key

MAX_PLOTTED_PROMPTS = 8


@dataclass(frozen=True)
class PromptJob:
    """One prompt to compute: its position, id and text, its seed (``--seed`` + index) and its backend."""

    index: int
    id: str
    prompt: str
    seed: Optional[int]
    backend: Any


# A command's per-prompt work: the record to checkpoint and its tables (``{"rollouts": rows, "nodes": rows}``).
PromptFn = Callable[[PromptJob], tuple[dict, dict]]


def tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class BracketProgress:
    """A ``progress=`` callback for :func:`canopy_rs.exact` / :func:`canopy_rs.bounded`: shows nodes
    expanded, nodes/s, mass covered and the bracket width on a tqdm bar (unless ``quiet``) and, with
    ``record``, keeps each snapshot (for the bracket-vs-budget plot)."""

    def __init__(self, quiet: bool, desc: str, record: bool = False) -> None:
        self.snapshots: list[dict[str, Any]] = []
        self.record = record
        self.t0 = time.perf_counter()
        self.bar = ProgressBar(not quiet, desc=desc, unit="node", file=sys.stderr)

    def __call__(self, b: Any) -> None:
        if self.record:
            self.snapshots.append({
                "num_expanded": int(b.num_expanded), "ce_star_lower": float(b.ce_star_lower),
                "ce_star_upper": float(b.ce_star_upper), "explored_mass": float(b.explored_mass),
                "tokens_forwarded": int(b.info.tokens_forwarded), "seconds": time.perf_counter() - self.t0,
            })
        self.bar.show(int(b.num_expanded), {"mass": f"{b.explored_mass:.4f}",
                                            "width": f"{b.ce_star_upper - b.ce_star_lower:.2e}"})

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

    # --- before and after the command ------------------------------------------------------------------
    def open(self) -> None:
        """Everything that can fail without the model, checked before it loads: the model's location, the
        prompts, the device, and the output directory (created and locked)."""
        a = self.args
        if hasattr(a, "model"):
            _ = self.spec
            self.prompts()
            if a.device:
                from canopy_rs.hf_models import check_device  # imports torch: only to check a given device

                check_device(a.device)
        if getattr(a, "out", None):
            self.out = RunDir(a.out)

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
        }
        cfg.update(extra)
        return cfg

    # --- the per-prompt loop ----------------------------------------------------------------------
    def run_prompts(self, fn: PromptFn, backend_options: Optional[Callable[[Any], dict]] = None,
                    **key_extra: Any) -> list[dict[str, Any]]:
        """Calls ``fn(job)`` for each prompt not already finished in ``--out`` and checkpoints its record and
        tables. ``backend_options(hf_model)`` gives extra keyword arguments for the prompt's backend. Returns
        the records in prompt order."""
        prompts = self.prompts()
        records = []
        n = len(prompts)
        for i, p in enumerate(prompts):
            key = prompt_key(p["prompt"], self.key_config(i, **key_extra))
            tag = f"[{i + 1}/{n}] " if n > 1 else ""
            if self.out is not None:
                def damaged(why: str, p: dict = p, tag: str = tag) -> None:
                    print(f"canopy-rs: warning: {tag}prompt {p['id']!r}: the checkpoint in {self.out.path} is "
                          f"damaged ({why}); recomputing it", file=sys.stderr, flush=True)

                rec = self.out.finished(key, fresh=self.args.fresh, damaged=damaged)
                if rec is not None:
                    self.say(f"{tag}prompt {p['id']!r}: already done in {self.out.path} (skipped; --fresh recomputes)")
                    rec["resumed"] = True
                    if self._saved_model_info is None and isinstance(rec.get("model"), dict):
                        self._saved_model_info = rec["model"]
                    records.append(rec)
                    continue
            self.say(f"{tag}prompt {p['id']!r}: {short(p['prompt'], 70)}")
            t = time.perf_counter()
            backend = self.backend(p["prompt"], **(backend_options(self.load()[0]) if backend_options else {}))
            rec, tables = fn(PromptJob(index=i, id=p["id"], prompt=p["prompt"], seed=self.seed_for(i), backend=backend))
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
        """Writes tables, ``files()``, ``plots()`` and result.json to --out; prints the table or JSON."""
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
            self.files += [str(p) for p in files()]
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
