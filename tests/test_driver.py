"""The shared drivers (canopy_rs.drivers): every entry point checks the same arguments, validates a backend's
output the same way (one error type, one message), reads counters without swallowing errors, and uses the
backend's preferred batch size."""

import numpy as np
import pytest

import canopy_rs
from canopy_rs.backends.output import expand_support
from canopy_rs.drivers import setup as _setup
from canopy_rs.protocol import NextTokenLogits, PolicySupport

V, EOS = 5, (0,)
KW = dict(max_new_tokens=3, top_k=2)


class ScriptedBackend:
    """A backend whose expand() output is produced by ``make(batch)``; counts like CallableModel."""

    vocab_size = V

    def __init__(self, make, eos=EOS):
        self.make = make
        self.eos_token_ids = eos
        self.calls, self.rows = 0, []

    def reset(self):
        self.calls, self.rows = 0, []

    def expand(self, batch, policy):
        self.calls += 1
        self.rows.append(len(batch))
        return self.make(batch)

    def release(self, node_ids):
        pass

    def counters(self):
        return {"model_calls": self.calls, "rows_evaluated": sum(self.rows)}


def good_logits(batch):
    return NextTokenLogits(np.tile(np.arange(V, dtype=np.float64), (len(batch), 1)))


DRIVERS = {
    "exact": lambda m: canopy_rs.exact(m, **KW),
    "bounded": lambda m: canopy_rs.bounded(m, budget=3, **KW),
    "sample": lambda m: canopy_rs.sample(m, num_rollouts=4, seed=0, **KW),
    "beam": lambda m: canopy_rs.estimators.stochastic_beam_search(m, beam_size=2, seed=0, **KW),
    "hybrid": lambda m: canopy_rs.estimate_hybrid(m, budget_nodes=1, num_rollouts=8, seed=0, **KW),
}

MISTAKES = {
    "logits shape": lambda b: NextTokenLogits(np.zeros((len(b), V + 1))),
    "logits dtype": lambda b: NextTokenLogits(np.zeros((len(b), V), dtype=np.int32)),
    "NaN logits": lambda b: NextTokenLogits(np.full((len(b), V), np.nan)),
    "support rows": lambda b: PolicySupport(np.arange(len(b) + 2), np.ones(len(b) + 1, dtype=np.int64),
                                            np.zeros(len(b) + 1)),
    "support mass": lambda b: PolicySupport(np.arange(len(b) + 1), np.ones(len(b), dtype=np.int64),
                                            np.full(len(b), -1.0)),
    "support dtype": lambda b: PolicySupport(np.arange(len(b) + 1), np.ones(len(b)), np.zeros(len(b))),
    "wrong kind": lambda b: {"logits": 0},
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_the_same_output_mistake_gives_one_error_and_message_from_every_driver(mistake):
    messages = {}
    for name, run in DRIVERS.items():
        with pytest.raises(canopy_rs.errors.BackendOutputError) as e:
            run(ScriptedBackend(MISTAKES[mistake]))
        messages[name] = str(e.value)
    assert len(set(messages.values())) == 1, messages
    assert "ScriptedBackend.expand" in messages["exact"]


def test_a_callable_is_named_as_logits_fn():
    with pytest.raises(canopy_rs.errors.BackendOutputError, match=r"^logits_fn: logits row 0: .*NaN"):
        canopy_rs.sample(lambda p: np.full((len(p), V), np.nan), vocab_size=V, eos_token_ids=EOS,
                         num_rollouts=2, **KW)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_every_driver_rejects_a_backend_without_eos_ids_the_same_way(name):
    with pytest.raises(canopy_rs.InvalidArgumentError, match="ScriptedBackend.eos_token_ids must name at least one"):
        DRIVERS[name](ScriptedBackend(good_logits, eos=()))


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_counter_errors_propagate(name):
    class Broken(ScriptedBackend):
        def counters(self):
            raise RuntimeError("counter backend down")

    with pytest.raises(RuntimeError, match="counter backend down"):
        DRIVERS[name](Broken(good_logits))


def test_non_numeric_counters_are_a_backend_output_error():
    class Odd(ScriptedBackend):
        def counters(self):
            return {"model_calls": "many"}

    with pytest.raises(canopy_rs.errors.BackendOutputError, match=r"counters\(\)\['model_calls'\]"):
        canopy_rs.exact(Odd(good_logits), **KW)


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_preferred_batch_size_is_used_unless_the_caller_sets_one(name):
    class Narrow(ScriptedBackend):
        preferred_batch_size = 1

    b = Narrow(good_logits)
    DRIVERS[name](b)
    assert max(b.rows) == 1
    if name != "bounded":  # its budget caps the rows anyway
        wide = ScriptedBackend(good_logits)
        DRIVERS[name](wide)
        assert max(wide.rows) > 1


def test_bad_preferred_batch_size_names_the_backend():
    class Bad(ScriptedBackend):
        preferred_batch_size = 0

    with pytest.raises(canopy_rs.InvalidArgumentError, match="Bad.preferred_batch_size"):
        canopy_rs.exact(Bad(good_logits), **KW)


def test_chunked_expansion_matches_one_call():
    b = ScriptedBackend(lambda batch: NextTokenLogits(
        np.stack([np.roll(np.arange(V, dtype=np.float64), int(i)) for i in batch.node_ids])))
    pol = _setup.make_policy(top_k=2)
    ids = np.arange(7, dtype=np.int64)
    args = (ids, np.full(7, -1), np.full(7, -1), np.zeros(7, dtype=np.int64), lambda sl: [[]] * len(ids[sl]))
    one = expand_support(b, pol, *args, batch_size=7)
    chunked = expand_support(b, pol, *args, batch_size=3)
    assert b.rows == [7, 3, 3, 1]
    for x, y in zip(one, chunked):
        np.testing.assert_array_equal(x, y)


def test_setup_checks_shared_arguments():
    with pytest.raises(canopy_rs.errors.ArgumentTypeError, match="max_new_tokens"):
        _setup.setup(ScriptedBackend(good_logits), vocab_size=None, eos_token_ids=None, max_new_tokens=2.5,
                      temperature=1.0, top_k=None, top_p=1.0, batch_size=None)
    with pytest.raises(canopy_rs.InvalidArgumentError, match="seed"):
        _setup.make_rng("seven")
    s = _setup.setup(ScriptedBackend(good_logits), vocab_size=None, eos_token_ids=None, max_new_tokens=2,
                      temperature=1.0, top_k=2, top_p=1.0, batch_size=None)
    assert s.batch_size == _setup.default_batch_size(V) and s.eos_token_ids == EOS


def test_the_size_probe_is_a_library_function():
    from canopy_rs.backends import CallableModel
    from canopy_rs.drivers.size_probe import check_canopy_size
    from canopy_rs.testing import random_logits_fn

    model = CallableModel(random_logits_fn(50, seed=1, eos_bias=-3.0), 50, [0])
    # A policy that cannot exceed the limit is not sampled at all.
    assert check_canopy_size(model, node_limit=1000, max_new_tokens=3, top_k=2) is None
    with pytest.raises(canopy_rs.TreeTooLargeError, match="far over the limit of 1,000"):
        check_canopy_size(model, node_limit=1000, max_new_tokens=40)
    probe = check_canopy_size(model, node_limit=9000, max_new_tokens=8, top_k=3)  # <= 9,841 nodes: sampled
    assert probe is not None and probe.depth == 8 and "nodes" in probe.describe()
