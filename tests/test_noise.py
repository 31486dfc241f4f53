import math

import jax
import numpy as np
import pytest
from scipy import integrate, stats

import bayesnoise as bn

N = 200_000

CASES = [
    (bn.noise.Bernoulli(keep=0.8), stats.bernoulli(0.8)),
    (bn.noise.Bernoulli(keep=0.3), stats.bernoulli(0.3)),
    (bn.noise.Gaussian(alpha=0.25), stats.norm(1.0, 0.5)),
    (bn.noise.Beta(2.0, 3.0), stats.beta(2.0, 3.0)),
    (bn.noise.Beta(4.0, 1.0), stats.beta(4.0, 1.0)),
    (bn.noise.Beta(1.0, 2.5), stats.beta(1.0, 2.5)),
    (bn.noise.Gamma(4.0, 2.0), stats.gamma(4.0, scale=0.5)),
    (bn.noise.LogNormal(-0.08, 0.4), stats.lognorm(0.4, scale=math.exp(-0.08))),
]


@pytest.mark.parametrize("noise,ref", CASES, ids=lambda c: repr(c)[:30])
def test_moments_match_scipy(noise, ref):
    assert noise.mean == pytest.approx(ref.mean(), rel=1e-6)
    assert noise.variance == pytest.approx(ref.var(), rel=1e-6)
    assert noise.second_moment == pytest.approx(ref.var() + ref.mean() ** 2, rel=1e-6)
    assert noise.scale_factor == noise.mean


@pytest.mark.parametrize("noise,ref", CASES, ids=lambda c: repr(c)[:30])
def test_samples_have_the_stated_moments(noise, ref):
    x = np.asarray(noise.sample(jax.random.key(1), (N,)), np.float64)
    assert x.dtype == np.float64 and x.shape == (N,)
    se_mean = math.sqrt(noise.variance / N)
    assert abs(x.mean() - noise.mean) < 5 * se_mean
    fourth = (
        ref.moment(4)
        - 4 * ref.mean() * ref.moment(3)
        + 6 * ref.mean() ** 2 * ref.moment(2)
        - 3 * ref.mean() ** 4
    )
    se_var = math.sqrt((fourth - noise.variance**2) / N)
    assert abs(x.var() - noise.variance) < 5 * se_var


@pytest.mark.parametrize("noise,ref", CASES, ids=lambda c: repr(c)[:30])
def test_log_prob_matches_scipy(noise, ref):
    if noise.continuous:
        xs = np.asarray(ref.ppf([0.05, 0.3, 0.5, 0.8, 0.97]))
        want = ref.logpdf(xs)
    else:
        xs = np.array([0.0, 1.0])
        want = ref.logpmf(xs)
    got = np.asarray(noise.log_prob(xs))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_continuity_flags():
    assert not bn.noise.Bernoulli(0.5).continuous
    for n in (
        bn.noise.Gaussian(1.0),
        bn.noise.Beta(1, 1),
        bn.noise.Gamma(2, 2),
        bn.noise.LogNormal(0, 1),
        bn.noise.InverseGammaScale(3, 2),
    ):
        assert n.continuous


def test_beta_log_prob_is_minus_inf_outside_support():
    lp = np.asarray(bn.noise.Beta(2.0, 2.0).log_prob(np.array([-0.1, 0.0, 1.0, 1.5])))
    assert np.all(np.isneginf(lp))


def test_inverse_gamma_scale_against_numerical_integration():
    a, b = 3.0, 2.0
    noise = bn.noise.InverseGammaScale(a, b)
    ig = stats.invgamma(a, scale=b)
    dens = lambda lam: 2 * lam * ig.pdf(lam**2)  # change of variables s = λ²
    mass = integrate.quad(dens, 0, np.inf)[0]
    m1 = integrate.quad(lambda t: t * dens(t), 0, np.inf)[0]
    m2 = integrate.quad(lambda t: t * t * dens(t), 0, np.inf)[0]
    assert mass == pytest.approx(1.0, abs=1e-7)
    assert noise.mean == pytest.approx(m1, rel=1e-6)
    assert noise.second_moment == pytest.approx(m2, rel=1e-6)
    assert noise.variance == pytest.approx(m2 - m1**2, rel=1e-6)
    xs = np.array([0.3, 0.7, 1.2, 2.5])
    np.testing.assert_allclose(np.asarray(noise.log_prob(xs)), np.log(dens(xs)), rtol=1e-5)
    x = np.asarray(noise.sample(jax.random.key(0), (N,)), np.float64)
    assert stats.kstest(x**2, ig.cdf).statistic < 1.63 / math.sqrt(N)


@pytest.mark.parametrize("jit", [False, True])
def test_bernoulli_keep_rate(jit):
    noise = bn.noise.Bernoulli(keep=0.8)
    sample = jax.jit(noise.sample, static_argnums=1) if jit else noise.sample
    x = sample(jax.random.key(0), (100_000,))
    se = (0.8 * 0.2 / 100_000) ** 0.5
    assert abs(float(x.mean()) - 0.8) < 5 * se
    assert set(np.unique(np.asarray(x))) <= {0.0, 1.0}


def test_noise_is_hashable_for_static_use():
    assert hash(bn.noise.Beta(2.0, 3.0)) == hash(bn.noise.Beta(2.0, 3.0))
    assert bn.noise.Gaussian(0.5) != bn.noise.Gaussian(0.25)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: bn.noise.Bernoulli(keep=0.0),
            r"keep must be a finite number in \(0, 1\].*got 0.0",
        ),
        (lambda: bn.noise.Bernoulli(keep=1.5), r"keep must be.*got 1.5"),
        (lambda: bn.noise.Bernoulli(keep=-0.2), r"keep must be.*got -0.2"),
        (lambda: bn.noise.Beta(0.0, 1.0), r"Beta: a must be a finite number > 0, got 0.0"),
        (lambda: bn.noise.Beta(1.0, -2.0), r"Beta: b must be a finite number > 0, got -2.0"),
        (lambda: bn.noise.Gaussian(alpha=-1.0), r"Gaussian: alpha"),
        (lambda: bn.noise.Gamma(1.0, 0.0), r"Gamma: rate"),
        (lambda: bn.noise.LogNormal(0.0, 0.0), r"LogNormal: scale"),
        (lambda: bn.noise.InverseGammaScale(-1.0, 1.0), r"InverseGammaScale: a"),
    ],
)
def test_bad_parameters_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_keep_one_is_allowed_and_deterministic():
    x = bn.noise.Bernoulli(keep=1.0).sample(jax.random.key(0), (1000,))
    assert float(x.min()) == 1.0
