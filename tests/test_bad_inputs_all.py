"""One rule per argument name, over every public function that takes it.

The public functions of the core modules are found by introspection. Every function with an
argument named in RULES is called with valid examples for its other required arguments and a
bad value of that argument drawn by hypothesis; it must raise a clear error (one that names the
argument, shows the value and says what is allowed). A new public function with such an argument
is tested the moment it exists: if it needs an argument this file has no example for, the test
says which to add to EXAMPLES.
"""

import importlib
import inspect
import math

import bad_inputs as bad
import jax
import jax.numpy as jnp
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesnoise as bn

MODULES = [*bn._CORE, "sgld"]  # every core module

_not_finite_or_negative = st.one_of(bad.not_finite(), st.floats(max_value=-1e-3, min_value=-1e6))

# argument name -> the values no public function may accept for it
RULES = {
    "key": bad.bad_key(),  # where the key is required (an optional key may be None)
    "temperature": _not_finite_or_negative,
    "sigma0": bad.bad_positive(),
    "learning_rate": bad.bad_positive(),
    "num_samples": st.one_of(st.integers(max_value=-1), st.just(2.5), st.booleans()),
    "batch_size": bad.bad_count(1),
    "num_chains": bad.bad_count(1),
    "epochs": bad.bad_count(1),
    "iterations": st.one_of(st.integers(max_value=-1), st.just(1.5), st.just(math.nan)),
    "ddof": st.one_of(st.integers(max_value=-1), st.just("1")),
}

MODEL = bn.nn.MLP((4, 3))
X = jax.random.normal(jax.random.key(1), (8, 5))
Y = jnp.arange(8) % 3
PARAMS = MODEL.init(jax.random.key(0), X[:1])


def _log_likelihood(p, x, y):
    return bn.train.categorical_log_likelihood(MODEL.apply(p, x), y)


def _log_prior(p):
    return -0.5 * sum(jnp.sum(a**2) for a in jax.tree.leaves(p))


_LOSS = bn.train.classification_loss(lambda p, x, k: MODEL.apply(p, x))

# argument name -> a valid example (per function where the name means something else there)
EXAMPLES = {
    "key": jax.random.key(0),
    "params": PARAMS,
    "noise": bn.noise.Bernoulli(0.8),
    "hierarchy": bn.gsm.hierarchy(PARAMS),
    "log_likelihood": _log_likelihood,
    "log_prior": _log_prior,
    "data": (X, Y),
    "batch": (X[:4], Y[:4]),
    "apply_fn": lambda k, x: MODEL.apply(PARAMS, x),
    "x": X,
    "y": Y,
    "num_samples": 2,
    "loss_fn": _LOSS,
    "optimizer": optax.sgd(0.1),
    "epochs": 1,
    "batch_size": 4,
    "iterations": 0,
    "learning_rate": 1e-3,
    "count": 0,
    "student_logits": jnp.zeros((4, 3)),
    "teacher_logits": jnp.zeros((4, 3)),
    "state": bn.moments.update(bn.moments.init(PARAMS), PARAMS),
}
PER_FUNCTION = {
    "sampling.step": {
        "state": bn.sampling.init(PARAMS, _log_likelihood, _log_prior, 8, transform=bn.sgld(1e-3))
    },
    "sampling.init": {"num_data": 8, "transform": bn.sgld(1e-3)},
    "em.linear_em": {"y": X[:, 0]},
    "prune.iterative": {
        "score_fn": bn.prune.magnitude,
        "fractions": [0.5],
        "retrain": lambda k, p, m: p,
    },
}


def _functions():
    for module in MODULES:
        mod = importlib.import_module(f"bayesnoise.{module}")
        for name in getattr(mod, "__all__", []):
            fn = getattr(mod, name)
            if inspect.isfunction(fn):
                yield f"{module}.{name}", fn


def _cases():
    for qualname, fn in _functions():
        parameters = inspect.signature(fn).parameters
        for argument in RULES:
            p = parameters.get(argument)
            if p is None or (argument == "key" and p.default is not inspect.Parameter.empty):
                continue
            yield pytest.param(qualname, fn, argument, id=f"{qualname}-{argument}")


def _call(qualname, fn, argument, value):
    examples = {**EXAMPLES, **PER_FUNCTION.get(qualname, {})}
    kwargs = {}
    for name, p in inspect.signature(fn).parameters.items():
        if name == argument:
            kwargs[name] = value
        elif p.default is inspect.Parameter.empty and p.kind not in (
            p.VAR_POSITIONAL,
            p.VAR_KEYWORD,
        ):
            assert name in examples, f"add an example for {name!r} (needed by {qualname})"
            kwargs[name] = examples[name]
    return fn(**kwargs)


CASES = list(_cases())


def test_the_rules_reach_many_functions():
    assert len(CASES) >= 25, [c.id for c in CASES]


@pytest.mark.parametrize("qualname, fn, argument", CASES)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_every_public_function_rejects_the_bad_values_of_an_argument(qualname, fn, argument, data):
    value = data.draw(RULES[argument], label=argument)
    with bad.clear_error(argument, value) as err:
        _call(qualname, fn, argument, value)
    # a clear error of the right kind, not a crash deeper down (KeyError, IndexError, ...)
    assert err.type in (TypeError, ValueError) and argument in str(err.value)
