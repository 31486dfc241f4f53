import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import bayesnoise as bn


def assert_same(got, want, where="tree"):
    """Equal values of the same types all the way down (a JAX array comes back as NumPy)."""
    if isinstance(want, jax.Array):
        want = np.asarray(want)
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, dict):
        assert list(got) == list(want), where
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, (np.ndarray, np.generic)):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        np.testing.assert_array_equal(got, want, err_msg=where)
    else:
        assert got == want, where


def round_trip(tmp_path, tree, like=None):
    path = tmp_path / "tree.msgpack"
    bn.io.save(path, tree)
    return bn.io.load(path, like=like)


def params_of(features=(5, 3), inputs=4, seed=0):
    model = bn.nn.MLP(features)
    return model, model.init(jax.random.key(seed), jnp.zeros((1, inputs)))


def test_a_stage_value_round_trips_exactly(tmp_path):
    value = {
        "curves": {"snr": [[0.0, 0.105], [0.2, 0.11]], "spr": [], "magnitude": [[0.5, 1]]},
        "breakpoints": {"snr": 0.4, "spr": 0.0},
        "unpruned": 0.10555555671453476,
        "moments": "laplace",
        "per_chain": {},
        "converged": False,
        "steps": 168,
        "relative": None,
        "pair": (1, "two", None),
        "nested": [[[]], [{}], [None, True, "x"]],
        "history": {"loss": np.arange(3, dtype=np.float32), "rhat": np.linspace(0, 1, 4)},
        "scales": {"bias": None, "kernel": jnp.ones(3)},
        "counts": np.arange(6, dtype=np.int32).reshape(2, 3),
        "keep": np.array([True, False]),
        "scalars": [np.float32(2.5), np.int64(-3), np.bool_(True), 1e300, -0.0, 2**62],
        "empty": np.zeros((0, 4), np.float32),
        "bytes": b"\x00\xff",
        "unicode": "σ0 = λ·w",
    }
    got = round_trip(tmp_path, value)
    assert_same(got, value)
    assert np.isnan(round_trip(tmp_path, {"x": float("nan")})["x"])


def test_dicts_that_look_like_the_list_tags_are_kept_as_dicts(tmp_path):
    value = {"a": {"__list__": {"0": 1}}, "b": {"__dict__": [1]}, "c": {"__tuple__": 1, "d": 2}}
    assert_same(round_trip(tmp_path, value), value)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=5)
)
keys = st.sampled_from(["__list__", "__tuple__", "__dict__", "0", ""]) | st.text(max_size=4)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(values)
def test_any_value_of_dicts_lists_and_scalars_round_trips(tmp_path_factory, value):
    assert_same(round_trip(tmp_path_factory.mktemp("io"), value), value)


def test_moments_state_round_trips_and_is_what_flax_writes(tmp_path):
    _, params = params_of()
    state = bn.moments.init(params)
    for i in range(3):
        state = bn.moments.update(state, jax.tree.map(lambda x, i=i: x + i, params))
    path = tmp_path / "moments.msgpack"
    bn.io.save(path, state)
    # a tree of dicts and NamedTuples is written exactly as flax.serialization.to_bytes does
    assert path.read_bytes() == serialization.to_bytes(state)
    plain = bn.io.load(path)
    assert list(plain) == ["count", "shift", "mean_dev", "m2"]
    got = bn.io.load(path, like=bn.moments.init(params))
    assert isinstance(got, bn.moments.MomentsState)
    assert jax.tree.structure(got) == jax.tree.structure(state)
    jax.tree.map(assert_same, got, jax.tree.map(np.asarray, state))
    np.testing.assert_array_equal(
        bn.moments.variance(got)["params"]["Dense_0"]["kernel"],
        bn.moments.variance(state)["params"]["Dense_0"]["kernel"],
    )


def test_hierarchy_round_trips_with_its_static_fields(tmp_path):
    _, params = params_of()
    h = bn.gsm.hierarchy(params, sigma0=0.5)
    scales = jax.tree.map(lambda s: s * jnp.arange(1.0, s.shape[0] + 1), h.scales)
    h = h.replace(scales=scales)
    plain = round_trip(tmp_path, h)
    assert set(plain) == {"scales", "sigma0"} and plain["sigma0"] == 0.5
    assert plain["scales"]["params"]["Dense_0"]["bias"] is None
    got = round_trip(tmp_path, h, like=bn.gsm.hierarchy(params))
    assert isinstance(got, bn.gsm.Hierarchy) and got.axes == h.axes and got.sigma0 == 0.5
    assert jax.tree.structure(got) == jax.tree.structure(h)
    np.testing.assert_array_equal(
        got.scales["params"]["Dense_1"]["kernel"], np.arange(1.0, 6.0, dtype=np.float32)
    )
    v = bn.gsm.to_identifiable(params, h.scales)
    np.testing.assert_allclose(bn.gsm.log_prior(v, got), bn.gsm.log_prior(v, h), rtol=1e-6)


def test_flax_params_round_trip_and_give_the_same_outputs(tmp_path):
    model, params = params_of()
    template = model.init(jax.random.key(1), jnp.zeros((1, 4)))
    got = round_trip(tmp_path, params, like=template)
    x = jax.random.normal(jax.random.key(2), (8, 4))
    np.testing.assert_array_equal(model.apply(got, x), model.apply(params, x))
    jax.tree.map(assert_same, round_trip(tmp_path, params), params)


def test_pruned_params_and_their_boolean_mask_round_trip(tmp_path):
    _, params = params_of()
    keep = bn.prune.mask(bn.prune.magnitude(params), 0.5)
    pruned = bn.prune.apply(params, keep)
    tree = {"params": pruned, "mask": keep}
    got = round_trip(tmp_path, tree, like=tree)
    kernel = got["mask"]["params"]["Dense_0"]["kernel"]
    assert kernel.dtype == np.bool_ and 0 < kernel.sum() < kernel.size
    np.testing.assert_array_equal(got["params"]["params"]["Dense_0"]["kernel"][~kernel], 0.0)
    jax.tree.map(assert_same, got, jax.tree.map(np.asarray, tree))


def test_an_optax_state_of_tuples_and_named_tuples_round_trips(tmp_path):
    _, params = params_of()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params)
    got = round_trip(tmp_path, state, like=opt.init(params))
    assert jax.tree.structure(got) == jax.tree.structure(state)
    jax.tree.map(assert_same, got, jax.tree.map(np.asarray, state))
    opt.update(grads, got, params)  # usable as the optimizer's state


def test_like_reads_the_files_flax_writes(tmp_path):
    tree = [np.ones(2, np.float32), (np.int32(3), {"a": np.zeros(1)})]
    path = tmp_path / "flax.msgpack"
    path.write_bytes(serialization.to_bytes(tree))  # lists as dicts keyed "0", "1"
    jax.tree.map(assert_same, bn.io.load(path, like=tree), tree)


def test_a_template_that_does_not_match_is_named_in_the_error(tmp_path):
    path = tmp_path / "tree.msgpack"
    bn.io.save(path, {"w": np.zeros((2, 3)), "b": [np.zeros(2)]})
    with pytest.raises(ValueError, match=r"no entry 'v' at the root"):
        bn.io.load(path, like={"v": np.zeros((2, 3))})
    with pytest.raises(ValueError, match=r"\['w'\] has shape \(2, 3\), `like` has \(3, 2\)"):
        bn.io.load(path, like={"w": np.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"\['b'\] has 1 entries, `like` has 2"):
        bn.io.load(path, like={"b": [np.zeros(2), np.zeros(2)]})
    with pytest.raises(ValueError, match=re.escape(str(path))):
        bn.io.load(path, like={"w": {"x": np.zeros(1)}})


def test_leaves_that_cannot_be_saved_are_named(tmp_path):
    path = tmp_path / "tree.msgpack"
    with pytest.raises(TypeError, match=r"object at \['a'\]\[1\]"):
        bn.io.save(path, {"a": [1, object()]})
    with pytest.raises(TypeError, match="key_data"):
        bn.io.save(path, {"key": jax.random.key(0)})
    with pytest.raises(ValueError, match="same str"):
        bn.io.save(path, {1: 0, "1": 0})
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        bn.io.load(tmp_path / "absent.msgpack")


def _truncated(tmp_path):
    whole = tmp_path / "whole.msgpack"
    bn.io.save(whole, {"w": np.ones((20, 20), np.float32), "curve": [[0.0, 0.1], [0.5, 0.2]]})
    data = whole.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        lambda tmp_path: _truncated(tmp_path),
        np.random.default_rng(0).bytes(4096),
        b"checkpoint: yes\n",
        b"\xdd\xff\xff\xff\xff",  # an array header claiming 2**32 entries
        b"\xc7\x10\x01" + b"\x00" * 16,  # an array extension holding garbage
    ],
    ids=["empty", "truncated", "random", "text", "huge-header", "bad-array"],
)
def test_garbage_and_truncated_files_raise_a_value_error_naming_them(tmp_path, content):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(content(tmp_path) if callable(content) else content)
    with pytest.raises(ValueError, match="bad.msgpack"):
        bn.io.load(path)


def test_writes_replace_the_target_and_leave_no_temporary_files(tmp_path, monkeypatch):
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (replaced.append((src, dst)), real_replace(src, dst))
    )
    bn.io.write_text(tmp_path / "a.txt", "first λ\n")
    bn.io.write_text(tmp_path / "a.txt", "second\n")
    bn.io.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    bn.io.save(tmp_path / "c.msgpack", {"x": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.msgpack"]
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "second\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    sources = [os.fspath(src) for src, _ in replaced]
    assert len(set(sources)) == 4  # a fresh temporary name every time
    for src, dst in replaced:  # in the target's folder, so the rename is atomic
        assert os.path.dirname(os.fspath(src)) == os.path.dirname(os.fspath(dst))


@pytest.mark.parametrize("error", [OSError("no space left on device"), KeyboardInterrupt()])
def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch, error):
    target = tmp_path / "tree.msgpack"
    bn.io.save(target, {"version": 1})
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise error

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(type(error)):
        bn.io.save(target, {"version": 2, "big": np.ones(10_000)})
    with pytest.raises(type(error)):
        bn.io.write_text(tmp_path / "new.txt", "never written")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["tree.msgpack"]
    assert bn.io.load(target) == {"version": 1}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    (tmp_path / "plain.txt").write_text("x")
    bn.io.write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode


def test_the_core_module_loads_without_the_application():
    code = "import sys, bayesnoise.io; print('bayesnoise.pipeline' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
