"""The chunked scan behind the progress bars of training and sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesnoise import _loop


@pytest.mark.parametrize("total", [1, 7, 100, 101, 3000, 4099])
@pytest.mark.parametrize("every", [None, 1, 10, 64])
def test_chunks_cover_the_run_with_at_most_two_lengths(total, every):
    lengths = _loop.chunk_lengths(total, every, progress=True)
    assert sum(lengths) == total and min(lengths) >= 1
    assert len(set(lengths)) <= 2 and lengths[:-1] == [lengths[0]] * (len(lengths) - 1)
    assert _loop.chunk_lengths(total, every, progress=False) == [total]


def test_chunked_run_equals_one_scan_and_advances_the_bar(capsys):
    def run(carry, start, length):
        xs = start + jnp.arange(length)
        return jax.lax.scan(lambda c, t: (c * 1.01 + t, t), carry, xs)

    whole, out = run(jnp.float32(1.0), jnp.int32(0), 50)
    carry, outs = _loop.run_chunked(
        run, jnp.float32(1.0), [20, 20, 10], progress=True, desc="test", unit="step"
    )
    np.testing.assert_allclose(carry, whole, rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate(outs), out)
    assert "50/50" in capsys.readouterr().err


def test_a_save_after_a_chunk_sees_it_finished_without_a_bar():
    """Dispatch is asynchronous: without waiting, the host queues every chunk before the first
    has run, and a save gated on the time since the last one finds nothing finished until the
    whole run is (a long run that is stopped would then lose everything)."""

    @jax.jit
    def run(carry, start, length):
        # about 0.1 s of work on one CPU core per chunk
        return jax.lax.fori_loop(0, 40, lambda i, c: jnp.tanh(c @ c.T) * 0.5, carry), None

    ready = []
    x = jax.random.normal(jax.random.key(0), (600, 600))
    _loop.run_chunked(
        run, x, [1, 1, 1], progress=False, desc="test", unit="step",
        after_chunk=lambda c, done, last: ready.append((done, c.is_ready())),
    )  # fmt: skip
    assert ready == [(1, True), (2, True), (3, True)]


def test_shuffled_batches_are_a_permutation_without_the_remainder():
    idx = np.asarray(_loop.shuffled_batches(jax.random.key(0), 103, 10))
    assert idx.shape == (10, 10) and len(set(idx.ravel())) == 100 and idx.max() < 103
