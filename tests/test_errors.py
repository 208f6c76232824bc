"""One exception hierarchy (canopy_rs.errors): the Rust core and the Python checks raise its classes, and
``except canopy_rs.CanopyError`` catches every error while ``except ValueError`` etc. keep working."""

import inspect

import numpy as np
import pytest

import canopy_rs
from canopy_rs import _core, errors

BUILTIN = {
    "InvalidArgumentError": ValueError,
    "ArgumentTypeError": TypeError,
    "BackendOutputError": ValueError,
    "TreeTooLargeError": ValueError,
    "TreeAttentionUnsupported": ValueError,
    "StrategyUnsupportedError": ValueError,
    "CacheLayoutUnsupported": ValueError,
    "KVBudgetExceededError": MemoryError,
    "ModelNotFoundError": FileNotFoundError,
    "StudyConfigError": ValueError,
    "EngineStateError": RuntimeError,
}


def test_every_error_class_is_a_canopy_error_and_its_builtin():
    classes = {n: c for n, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__}
    assert set(classes) == set(BUILTIN) | {"CanopyError", "Interrupted"}
    for name, builtin in BUILTIN.items():
        cls = classes[name]
        assert issubclass(cls, canopy_rs.CanopyError) and issubclass(cls, builtin), name
        if name in canopy_rs.__all__:  # the common ones are top level too, under the same name
            assert getattr(canopy_rs, name) is cls
    assert {"CanopyError", "InvalidArgumentError", "TreeTooLargeError", "Interrupted"} <= set(canopy_rs.__all__)
    # Ctrl-C is not an error: `except CanopyError` must never swallow it.
    assert issubclass(errors.Interrupted, KeyboardInterrupt) and not issubclass(errors.Interrupted, Exception)


def test_core_has_no_exception_classes_of_its_own():
    assert not hasattr(_core, "CanopyError") and not hasattr(_core, "TreeTooLargeError")


@pytest.mark.parametrize(
    "call, cls, match",
    [
        (lambda: _core.Policy(0.0), errors.InvalidArgumentError, "temperature"),
        (lambda: _core.Policy(1.0, -3), errors.InvalidArgumentError, "top_k"),
        (lambda: _core.Tree(4, [], 3, _core.Policy()), errors.InvalidArgumentError, "eos_token_ids"),
        (lambda: _core.Tree(4, [7], 3, _core.Policy()), errors.InvalidArgumentError, "eos_token_ids"),
        (lambda: _core.Tree(4, [0], -2, _core.Policy()), errors.InvalidArgumentError, "max_new_tokens"),
        (lambda: _core.Tree(4, [0], 3, _core.Policy(), support_cap=9), errors.InvalidArgumentError, "support_cap"),
        (lambda: _core.Tree(4, [0], 3, _core.Policy(), order="random"), errors.InvalidArgumentError, "order"),
        (lambda: _core.Tree(4, [0], 3, _core.Policy()).ingest_logits(np.zeros((1, 4))), errors.EngineStateError,
         "next_batch"),
        (lambda: _core.policy_support(np.full((1, 3), np.nan), _core.Policy()), errors.BackendOutputError, "row 0"),
        (lambda: _core.policy_support(np.zeros((2, 3), dtype=np.int32), _core.Policy()), errors.ArgumentTypeError,
         "float32 or float64"),
    ],
)
def test_the_rust_core_raises_errors_py_classes(call, cls, match):
    with pytest.raises(cls, match=match):
        call()


def test_negative_node_id_is_reported_by_the_core():
    tree = _core.Tree(4, [0], 3, _core.Policy())
    with pytest.raises(errors.InvalidArgumentError, match="does not exist"):
        tree.prefixes(np.array([-1]))


def _fn(prefixes):
    return np.zeros((len(prefixes), 4))


@pytest.mark.parametrize(
    "call, cls",
    [
        (lambda: canopy_rs.exact(_fn, vocab_size=4, eos_token_ids=[0], max_new_tokens=0), errors.InvalidArgumentError),
        (lambda: canopy_rs.exact(_fn, vocab_size=4, eos_token_ids=[0], max_new_tokens=2.0), errors.ArgumentTypeError),
        (lambda: canopy_rs.sample(_fn, vocab_size=4, eos_token_ids=[0], max_new_tokens=2, num_rollouts=0),
         errors.InvalidArgumentError),
        (lambda: canopy_rs.bounded(_fn, vocab_size=4, eos_token_ids=[0], max_new_tokens=2, budget="x"),
         errors.ArgumentTypeError),
        (lambda: canopy_rs.Budget(), errors.InvalidArgumentError),
        (lambda: canopy_rs.exact(_fn, vocab_size=4, eos_token_ids=[0], max_new_tokens=8, top_k=4, max_nodes=50),
         errors.TreeTooLargeError),
    ],
)
def test_python_checks_raise_errors_py_classes(call, cls):
    with pytest.raises(cls):
        call()
