"""A sampling run stopped part-way goes on from its checkpoint to the result of a run that was
never stopped, and a run with other inputs does not pick up its file."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bayesnoise as bn
from bayesnoise import _loop, _resume, moments, sampling

_rng = np.random.default_rng(1)
N, D = 256, 3
X = _rng.normal(size=(N, D)).astype(np.float32)
Y = (X @ np.array([1.0, -2.0, 0.5]) + _rng.normal(size=N)).astype(np.float32)
PARAMS = {"w": jnp.zeros(D), "b": jnp.zeros(())}


def _ll(p, xb, yb):
    return -0.5 * (yb - xb @ p["w"] - p["b"]) ** 2


def _lp(p):
    return -0.5 * (jnp.sum(p["w"] ** 2) + p["b"] ** 2)


def _predict(p, x):
    return x @ p["w"] + p["b"]


RUN = dict(
    learning_rate=2e-3,
    batch_size=32,  # minibatches: the epochs' permutations are part of the state
    num_burnin=40,
    num_samples=60,
    thin=3,
    num_chains=2,
    predict=_predict,
    predict_inputs=X[:5],
    progress_every=20,
)


class _Stop(Exception):
    pass


def _stopped_after(monkeypatch, saves: int):
    """Makes the next run raise after its ``saves``-th checkpoint save, as a killed process
    would stop (the file written, the rest of the run lost)."""
    original, calls = _resume.Checkpoint.save, []

    def save(self, carry, step, last):
        original(self, carry, step, last)
        calls.append(step)
        if len(calls) == saves:
            raise _Stop(step)

    monkeypatch.setattr(_resume.Checkpoint, "save", save)
    return calls


def _assert_same(a, b):
    for x, y in [
        (moments.mean(a.moments), moments.mean(b.moments)),
        (moments.variance(a.moments), moments.variance(b.moments)),
        (a.params, b.params),
        (a.trace, b.trace),
        (a.log_posterior, b.log_posterior),
        (a.predictive, b.predictive),
    ]:
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), x, y)


def test_a_stopped_run_goes_on_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    key = jax.random.key(0)
    whole = sampling.run(key, PARAMS, _ll, _lp, (X, Y), **RUN)

    folder = tmp_path / "ckpt"
    calls = _stopped_after(monkeypatch, saves=3)
    with pytest.raises(_Stop):
        sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, checkpoint_every=0, **RUN)
    stopped_at = calls[-1]
    total = RUN["num_burnin"] + RUN["num_samples"] * RUN["thin"]
    assert 0 < stopped_at < total and len(list(folder.iterdir())) == 1
    monkeypatch.undo()

    ran = []
    original = _loop.run_chunked

    def counting(run_chunk, carry, lengths, **kw):
        ran.append((kw["start"], sum(lengths)))
        return original(run_chunk, carry, lengths, **kw)

    monkeypatch.setattr(_loop, "run_chunked", counting)
    resumed = sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **RUN)
    # only the steps after the saved one ran, and the result is the uninterrupted run's
    assert ran == [(stopped_at, total - stopped_at)]
    _assert_same(resumed, whole)
    np.testing.assert_allclose(resumed.rhat, whole.rhat, rtol=1e-6)

    # a finished run's file gives its result without a step
    ran.clear()
    again = sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **RUN)
    assert ran == [(total, 0)]
    _assert_same(again, whole)


def test_other_inputs_do_not_read_the_file_of_a_run(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    key = jax.random.key(0)
    sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **RUN)
    ran = []
    original = _loop.run_chunked

    def counting(run_chunk, carry, lengths, **kw):
        ran.append(kw["start"])
        return original(run_chunk, carry, lengths, **kw)

    monkeypatch.setattr(_loop, "run_chunked", counting)
    total = RUN["num_burnin"] + RUN["num_samples"] * RUN["thin"]
    other_prior = functools.partial(lambda p, s: _lp(p) / s, s=2.0)
    for kwargs in (
        dict(key=jax.random.key(1)),  # another key
        dict(data=(X, Y + 1.0)),  # other data
        dict(log_prior=other_prior),  # a prior with another number in it
        dict(learning_rate=1e-3),  # another step
        dict(num_samples=61),  # another length
    ):
        call = dict(key=key, data=(X, Y), log_prior=_lp, **RUN)
        call.update(kwargs)
        k, data, lp = call.pop("key"), call.pop("data"), call.pop("log_prior")
        res = sampling.run(k, PARAMS, _ll, lp, data, checkpoint=folder, **call)
        assert ran[-1] == 0, kwargs  # started from the beginning
        assert res.num_steps == call["num_burnin"] + call["num_samples"] * call["thin"]
    assert len(list(folder.iterdir())) == 6
    assert ran.count(0) == 5 and total > 0


def test_a_file_of_another_run_or_a_corrupt_one_is_ignored_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "ckpt"
    key = jax.random.key(0)
    whole = sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **RUN)
    (path,) = folder.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with caplog.at_level(logging.WARNING, logger="bayesnoise"):
        res = sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **RUN)
    assert "cannot read the checkpoint" in caplog.text and str(path) in caplog.text
    _assert_same(res, whole)
    # the same name with another run's state (as after a clash of digests)
    saved = bn.io.load(path)
    bn.io.save(path, {**saved, "key": "another run"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bayesnoise"):
        res = sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **RUN)
    assert "holds another run's state" in caplog.text
    _assert_same(res, whole)


def test_automatic_settings_resume_too(tmp_path, monkeypatch):
    """With automatic settings the pilot windows and the main run each have their own file."""
    key = jax.random.key(2)
    kw = dict(batch_size=32, predict=_predict, predict_inputs=X[:5], auto={"max_steps": 600})
    whole = sampling.run(key, PARAMS, _ll, _lp, (X, Y), **kw)
    folder = tmp_path / "ckpt"
    _stopped_after(monkeypatch, saves=2)
    with pytest.raises(_Stop):
        sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, checkpoint_every=0, **kw)
    monkeypatch.undo()
    resumed = sampling.run(key, PARAMS, _ll, _lp, (X, Y), checkpoint=folder, **kw)
    _assert_same(resumed, whole)
    assert resumed.settings["learning_rate"] == whole.settings["learning_rate"]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(checkpoint=3), TypeError, ["checkpoint must be None or the path of a folder", "3"]),
        (dict(checkpoint=""), TypeError, ["checkpoint must be None or the path", "''"]),
        (dict(checkpoint_every=-1.0), ValueError, ["checkpoint_every", "-1"]),
    ],
)
def test_bad_checkpoint_settings(kwargs, error, words):
    with pytest.raises(error) as e:
        sampling.run(jax.random.key(0), PARAMS, _ll, _lp, (X, Y), **{**RUN, **kwargs})
    for w in words:
        assert w in str(e.value)


def test_a_checkpoint_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError) as e:
        sampling.run(jax.random.key(0), PARAMS, _ll, _lp, (X, Y), checkpoint=f, **RUN)
    assert str(f) in str(e.value) and "is a file" in str(e.value)
