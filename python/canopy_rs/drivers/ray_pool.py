"""The package's one Ray executor: a pool of actors, each holding a state built once on its worker (a loaded
model), that run calls on tasks and hand the results back as they arrive. One canopy's shards
(:mod:`canopy_rs.drivers.ray_canopy`), several prompts (:func:`canopy_rs.drivers.prompts.map_prompts`,
``canopy-rs exact|bound|sample|compare --ray``) and the study's units (:mod:`canopy_rs.study.ray_executor`)
all run on it. Ray, an optional dependency, is imported here and in the modules named for Ray.

One actor per GPU where the cluster has GPUs (``num_gpus=1`` each), else one per CPU. An actor builds its
state with ``make_state()`` on its worker, so a large model is loaded there rather than pickled; actors
import canopy_rs themselves, so every node needs it installed and the model's path (or hub cache) there.
A task whose worker dies is redone on a fresh actor (a task's result must not depend on where it ran), at
most :data:`MAX_TRIES` times. Leaving the pool (Ctrl-C included) kills its actors, which drops their
unfinished calls: the caller keeps what it was handed.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence

try:
    import ray
    from ray.exceptions import RayActorError
except ImportError:
    raise ImportError('executor="ray" needs Ray: pip install "canopy_rs[ray]"') from None

from canopy_rs.errors import CanopyError, InvalidArgumentError

__all__ = ["ray_init", "WorkerPool", "MAX_TRIES"]

# Tries per task before a worker death is taken to be the task's own fault (a model that cannot load, a
# prompt that crashes the process), so that a poisoned task cannot restart actors forever.
MAX_TRIES = 3


def ray_init(address: Optional[str]) -> bool:
    """Connects to (or starts) Ray; True when this call started it (so the caller shuts it down again).
    ``address``: a cluster (``"auto"``, ``"ray://host:10001"``, ...); None or "": the Ray already running in
    this process, else a new local one."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address:
        kw.pop("include_dashboard")
        ray.init(address=address, **kw)
    else:
        ray.init(**kw)
    return True


class _Holder:
    """The Ray actor: one state (``make_state()``, built on the worker) for every call it runs."""

    def __init__(self, make_state: Callable[[], Any]) -> None:
        self.state = make_state()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.state, *args)


# Chooses, for an idle worker, the position in the queue of its next task (the study keeps a worker on the
# model it holds); the default takes the first.
Pick = Callable[[int, Sequence[Any]], int]


class WorkerPool:
    """Ray actors holding ``make_state()`` each; use as a context manager (it starts Ray when none is running
    and shuts it down again, and kills its actors on the way out). ``num_workers`` (default: the cluster's
    GPUs, else its CPUs) is capped by ``max_workers`` (e.g. the number of tasks)."""

    def __init__(self, make_state: Callable[[], Any], *, num_workers: Optional[int] = None,
                 max_workers: Optional[int] = None, ray_address: Optional[str] = None) -> None:
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 1):
            raise InvalidArgumentError(f"num_workers must be a positive int or None, got {num_workers!r}")
        self.make_state = make_state
        self._requested = num_workers
        self._max = max_workers
        self.ray_address = ray_address
        self._started = False
        self.actors: list[Any] = []
        self.gpus = 0
        self._todo: deque[Any] = deque()

    def __enter__(self) -> "WorkerPool":
        self._started = ray_init(self.ray_address)
        res = ray.cluster_resources()
        self.gpus = int(res.get("GPU", 0))
        slots = self.gpus if self.gpus >= 1 else max(1, int(res.get("CPU", 1)))
        n = self._requested or slots
        if self._max is not None:
            n = min(n, max(1, self._max))
        opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if self.gpus >= 1 else {"num_cpus": 1}
        self._actor_cls = ray.remote(**opts)(_Holder)
        self.actors = [self._new_actor() for _ in range(n)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._started:
            ray.shutdown()

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    def describe(self) -> str:
        return f"{self.num_workers} Ray worker(s), {'1 GPU' if self.gpus >= 1 else '1 CPU'} each"

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self.make_state)

    def call(self, fn: Callable[..., Any], *args: Any, worker: int = 0) -> Any:
        """``fn(state, *args)`` on one worker, waited for (e.g. the canopy's head, before its shards)."""
        return ray.get(self.actors[worker].call.remote(fn, *args))

    def add(self, task: Any, first: bool = False) -> None:
        """Queues one more task for the running :meth:`imap` (``first``: before those waiting)."""
        if first:
            self._todo.appendleft(task)
        else:
            self._todo.append(task)

    def imap(self, fn: Callable[..., Any], tasks: Sequence[Any], pick: Optional[Pick] = None
             ) -> Iterator[tuple[Any, Any, int]]:
        """Runs ``fn(state, task)`` for every task (and every task :meth:`add` queues meanwhile), each
        worker taking the next as it finishes its last; yields ``(task, result, worker)`` as results
        arrive. ``fn`` goes to the workers with Ray's cloudpickle (a
        function, partial, lambda or closure)."""
        self._todo = deque(tasks)
        tries: dict[int, int] = {}
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(w: int) -> None:
            if not self._todo:
                return
            i = pick(w, self._todo) if pick is not None else 0
            task = self._todo[i]
            del self._todo[i]
            pending[self.actors[w].call.remote(fn, task)] = (w, task)

        for w in range(self.num_workers):
            submit(w)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            w, task = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except RayActorError as e:
                n = tries[id(task)] = tries.get(id(task), 0) + 1
                if n >= MAX_TRIES:
                    raise CanopyError(f"a Ray worker died {n} times running the same task ({e}); giving up "
                                      "(the model could not load there, or the task crashes its process)") from None
                self.actors[w] = self._new_actor()  # the worker died: a fresh actor redoes its task
                self._todo.appendleft(task)
                submit(w)
                continue
            submit(w)
            yield task, result, w
            for idle in range(self.num_workers):  # tasks added while the caller held the result
                if not any(pw == idle for pw, _ in pending.values()):
                    submit(idle)
