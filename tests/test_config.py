"""Experiment configs: the shipped YAML files, validation errors, overrides, round trips."""

import dataclasses
import inspect
import pickle
from pathlib import Path

import pytest
import yaml

from bayesnoise import nn as bnn
from bayesnoise import noise as bnoise
from bayesnoise.pipeline import config as bconfig
from bayesnoise.pipeline.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DIGITS = CONFIGS[0].parent / "digits.yaml"


def test_configs_are_shipped():
    shipped = {p.stem for p in CONFIGS}
    assert shipped >= {
        "digits",
        "mnist",
        "imdb",
        "msd",
        "mnist_sparsevd",
        "mnist_sparsevd_400",
        "mnist_learned_rows",
        "mnist_pruning",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, bconfig.Config)
    assert cfg.name == path.stem and path.stem.split("_")[0] == cfg.data.name
    assert load_config(cfg.to_dict()) == cfg
    assert load_config(yaml.safe_load(cfg.to_yaml())) == cfg
    assert load_config(cfg) == cfg
    # the noise section builds
    assert bconfig.build_noise(cfg) is not None


def test_shipped_config_contents():
    digits, mnist = load_config(DIGITS), load_config(DIGITS.parent / "mnist.yaml")
    assert digits.model.hidden_sizes == (128, 128) and digits.sgld.chains in (2, 3, 4)
    assert len(digits.prune.fraction_grid()) == 50 and digits.sgld.auto
    assert digits.sgld.num_steps is None and digits.sgld.max_steps == 80_000
    # full-batch kinetic Langevin with exchanges of units, the pruning scores from Laplace
    sampler = digits.sgld
    assert (sampler.method, sampler.batch_size, sampler.unit_swaps) == ("baoab", None, True)
    assert digits.prune.moments == "laplace" and sampler.run_settings()["unit_swaps"]
    assert mnist.model.hidden_sizes == (400, 400) and mnist.train.epochs == 20
    assert mnist.sgld.auto and mnist.sgld.run_settings()["learning_rate"] is None
    assert len(mnist.prune.fraction_grid()) == 100 and mnist.em.enabled
    # EM's posterior by BAOAB with the exact moves and the sheared output biases; the reference
    # network's chains shorter
    settings, reference = mnist.sgld.run_settings(), mnist.sgld.run_settings(reference=True)
    assert (settings["auto"], reference["auto"]) == ({"max_steps": 40_000}, {"max_steps": 4000})
    assert (mnist.sgld.method, mnist.sgld.batch_size) == ("baoab", 1900)
    assert settings["unit_swaps"] and settings["class_shifts"]
    assert settings["centring"] == "output" and reference["centring"] == "output"
    assert digits.sgld.run_settings(reference=True) == sampler.run_settings()
    # the pruning study: the trained network under λ = 1, short chains
    study = load_config(DIGITS.parent / "mnist_pruning.yaml")
    assert not study.em.enabled and study.sgld.method == "sgld" and study.sgld.max_steps == 3000
    assert study.prune == mnist.prune and study.train == mnist.train
    expected = {"Dense_0/": bnoise.Bernoulli(0.8), "": bnoise.Bernoulli(0.5)}
    assert bconfig.build_noise(mnist) == expected
    msd = load_config(DIGITS.parent / "msd.yaml")
    assert msd.metric == "rmse" and msd.relative_tolerance and msd.task == "regression"
    assert digits.metric == "error" and not digits.relative_tolerance


def test_defaults_and_derived_fields():
    cfg = load_config({})
    assert cfg.name == "digits" and cfg.out == "runs/digits"
    assert cfg.sgld.step_size == "auto" and cfg.sgld.polynomial is None
    fixed = load_config({"sgld": {"step_size": "1e-6"}}).sgld
    assert fixed.step_size == 1e-6 and fixed.num_steps == 1000 + 500 * 4
    assert fixed.run_settings()["num_burnin"] == 1000 and fixed.run_settings()["auto"] is None
    assert cfg.prune.num_fractions == 50
    assert cfg.prune.fraction_grid() == tuple(i / 50 for i in range(50))
    assert cfg.noise.keep == 0.5 and cfg.em.hyperprior.kind == "none"
    # the batch: 64 examples, or with method baoab the whole training set unless one is given
    assert cfg.sgld.batch_size == 64
    assert load_config({"sgld": {"method": "baoab"}}).sgld.batch_size is None
    assert load_config({"sgld": {"method": "baoab", "batch_size": 256}}).sgld.batch_size == 256
    named = load_config({"name": "trial-1", "data": {"name": "diabetes"}})
    assert named.out == "runs/trial-1" and named.metric == "rmse" and named.relative_tolerance
    explicit = load_config({"prune": {"fractions": [0, 0.5, 0.9]}, "eval": {"relative": True}})
    assert explicit.prune.fraction_grid() == (0.0, 0.5, 0.9) and explicit.relative_tolerance
    assert explicit.prune.num_fractions is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3


def _error(source, overrides=()):
    with pytest.raises(ConfigError) as err:
        load_config(source, overrides)
    assert isinstance(err.value, ValueError)
    return err.value


@pytest.mark.parametrize(
    "source, key, words",
    [
        ({"trian": {}}, "trian", ["unknown key", "'train'", "data, model, noise, train"]),
        ({"train": {"batchsize": 8}}, "train.batchsize", ["'batch_size'", "epochs, batch_size"]),
        ({"noise": {"input": {"kep": 0.8}}}, "noise.input.kep", ["'keep'", "kind, keep, alpha"]),
        (
            {"prune": {"soft_target": {"temp": 2}}},
            "prune.soft_target.temp",
            ["'temperature'", "enabled, temperature, alpha"],
        ),
        ({"data": {"options": {"seeds": 1}}}, "data.options.seeds", ["test_fraction, seed"]),
    ],
)
def test_unknown_keys_name_the_key_and_the_known_keys(source, key, words):
    e = _error(source)
    assert e.key == key and str(e).startswith(f"{key}: unknown key")
    for w in words:
        assert w in str(e)


@pytest.mark.parametrize(
    "source, key, words",
    [
        ({"train": {"epochs": "three"}}, "train.epochs", ["'three'", "an int >= 1"]),
        ({"train": {"epochs": 2.5}}, "train.epochs", ["2.5", "an int"]),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate", ["'fast'", "> 0"]),
        ({"em": {"enabled": "yes"}}, "em.enabled", ["'yes'", "true or false"]),
        ({"model": {"hidden_sizes": 128}}, "model.hidden_sizes", ["128", "a list of ints"]),
        ({"model": {"hidden_sizes": [64, "x"]}}, "model.hidden_sizes[1]", ["'x'", "an int"]),
        ({"noise": {"kind": "dropout"}}, "noise.kind", ["'dropout'", "bernoulli, gaussian, beta"]),
        ({"prune": {"rules": ["snr", "size"]}}, "prune.rules[1]", ["'size'", "snr, spr"]),
        ({"train": {"optimizer": "lbfgs"}}, "train.optimizer", ["'lbfgs'", "adam, adamw, sgd"]),
        ({"sgld": []}, "sgld", ["[]", "a mapping with the keys method, step_size"]),
        ({"data": {"name": "cifar"}}, "data.name", ["'cifar'", "digits, breast_cancer"]),
        ({"train": {"learning_rate": float("nan")}}, "train.learning_rate", ["nan", "> 0"]),
        ({"sgld": {"step_size": float("inf")}}, "sgld.step_size", ["inf", "> 0"]),
    ],
)
def test_wrong_types_name_the_key_value_and_allowed(source, key, words):
    e = _error(source)
    assert e.key == key and str(e).startswith(f"{key}: got")
    for w in words:
        assert w in str(e)


@pytest.mark.parametrize(
    "source, key, words",
    [
        ({"train": {"batch_size": 0}}, "train.batch_size", ["got 0", "an int >= 1"]),
        ({"noise": {"keep": 1.5}}, "noise.keep", ["1.5", "(0, 1]"]),
        ({"noise": {"input": {"keep": 0}}}, "noise.input.keep", ["got 0", "(0, 1]"]),
        ({"noise": {"kind": "gaussian", "alpha": -1}}, "noise.alpha", ["-1", "> 0"]),
        ({"noise": {"kind": "gaussian", "keep": 0.5}}, "noise.keep", ["gaussian takes alpha"]),
        ({"sgld": {"temperature": -0.1}}, "sgld.temperature", ["-0.1", ">= 0"]),
        (
            {"sgld": {"step_size": None, "polynomial": {"gamma": 0.3}}},
            "sgld.polynomial.gamma",
            ["0.3", "(0.5, 1]"],
        ),
        ({"sgld": {"polynomial": {}, "step_size": 1e-4}}, "sgld.step_size", ["one of"]),
        ({"eval": {"tolerance": -0.01}}, "eval.tolerance", ["-0.01", ">= 0"]),
        ({"sgld": {"step_size": "fast"}}, "sgld.step_size", ["'fast'", "auto, a number > 0"]),
        ({"sgld": {"step_size": -1.0}}, "sgld.step_size", ["-1.0", "auto, a number > 0"]),
        ({"sgld": {"method": "psgld"}}, "sgld.method", ["psgld", "numeric step_size"]),
        (
            {"sgld": {"method": "baoab", "step_size": None, "polynomial": {}}},
            "sgld.method",
            ["baoab with a polynomial schedule", "step_size auto or a number"],
        ),
        ({"sgld": {"method": "hmc"}}, "sgld.method", ["'hmc'", "sgld, psgld, baoab"]),
        (
            {"sgld": {"friction": 0.5}},
            "sgld.friction",
            ["0.5 with method sgld", "null, or a number > 0 with method baoab"],
        ),
        ({"sgld": {"method": "baoab", "friction": 0}}, "sgld.friction", ["got 0", "> 0"]),
        (
            {"sgld": {"step_size": 1e-5, "reference_max_steps": 500}},
            "sgld.reference_max_steps",
            ["500 with step_size 1e-05", "null, or a number >= 100 with step_size auto"],
        ),
        ({"sgld": {"reference_max_steps": 50}}, "sgld.reference_max_steps", ["50", ">= 100"]),
        ({"sgld": {"temperature": 0.0}}, "sgld.temperature", ["got 0", "temperature > 0"]),
        ({"prune": {"fractions": [0.2, 1.5]}}, "prune.fractions", ["1.5", "[0, 1]"]),
        ({"prune": {"fractions": [0.5, 0.2]}}, "prune.fractions", ["strictly increasing"]),
        ({"prune": {"rules": ["snr", "snr"]}}, "prune.rules", ["distinct"]),
        ({"prune": {"num_fractions": 1}}, "prune.num_fractions", ["got 1", ">= 2"]),
        ({"em": {"hyperprior": {"kind": "gamma", "rate": 0}}}, "em.hyperprior.rate", ["> 0"]),
        ({"data": {"path": "/data"}}, "data.path", ["'/data'", "null"]),
        ({"data": {"name": "msd"}, "eval": {"metric": "error"}}, "eval.metric", ["auto or rmse"]),
        ({"name": "my run"}, "name", ["'my run'", "letters, digits"]),
    ],
)
def test_out_of_range_values_name_the_key_value_and_allowed(source, key, words):
    e = _error(source)
    assert e.key == key and str(e).startswith(f"{key}: ") and "allowed:" in str(e)
    for w in words:
        assert w in str(e)


def test_top_level_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    e = _error(f)
    assert e.key == str(f) and "got [1, 2]" in str(e)
    assert "a mapping with the keys name, out, data" in str(e)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == load_config({})
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    e = _error(tmp_path / "missing.yaml")  # a ConfigError too, naming the path
    assert e.key == str(tmp_path / "missing.yaml") and "no such file" in str(e)
    e = _error(tmp_path)
    assert e.key == str(tmp_path) and "cannot be read" in str(e) and "allowed:" in str(e)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1\n")
    assert _error(bad).key == str(bad) and "not valid YAML" in str(_error(bad))


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("train.epoch=3", "train.epoch", ["unknown key", "'epochs'", "epochs, batch_size"]),
        ("trian.epochs=3", "trian", ["unknown key", "'train'"]),
        ("train.epochs.max=3", "train.epochs", ["{'max': 3}", "an int >= 1"]),
        ("train.epochs", "train.epochs", ["key=value"]),
        ("train.epochs=[3", "train.epochs", ["cannot read", "'[3'"]),
        ("train.epochs=3.5", "train.epochs", ["3.5", "an int >= 1"]),
        ("noise.kind=uniform", "noise.kind", ["'uniform'", "bernoulli, gaussian"]),
    ],
)
def test_bad_overrides_name_the_key(override, key, words):
    e = _error(DIGITS, [override])
    assert e.key == key
    for w in words:
        assert w in str(e)


def test_overrides_set_typed_values():
    raw = yaml.safe_load(DIGITS.read_text())
    before = yaml.safe_load(DIGITS.read_text())
    cfg = load_config(
        raw,
        [
            "train.epochs=3",
            "train.learning_rate=1e-2",  # YAML 1.1 reads 1e-2 as a string
            "model.hidden_sizes=[32, 16]",
            "prune.rules=[snr]",
            "sgld.batch_size=null",
            "data.options.seed=7",
            "noise.input.keep=0.9",
            "name=quick",
        ],
    )
    assert raw == before  # the mapping given is not modified
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.learning_rate == 0.01 and type(cfg.train.learning_rate) is float
    assert cfg.model.hidden_sizes == (32, 16) and cfg.prune.rules == ("snr",)
    assert cfg.sgld.batch_size is None and cfg.data.options["seed"] == 7
    assert cfg.noise.input.keep == 0.9 and cfg.name == "quick" and cfg.out == "runs/quick"
    assert load_config(cfg.to_dict()) == cfg


def test_overriding_a_kind_drops_the_old_kinds_parameters():
    cfg = load_config(DIGITS, ["noise.kind=gaussian"])
    assert cfg.noise.kind == "gaussian" and cfg.noise.alpha == 1.0 and cfg.noise.keep is None
    assert cfg.noise.input.keep == load_config(DIGITS).noise.input.keep  # input noise untouched
    cfg = load_config(DIGITS, ["noise.kind=beta", "noise.a=2", "noise.b=0.5"])
    assert bconfig.build_noise(cfg)[""] == bnoise.Beta(2.0, 0.5)
    e = _error(DIGITS, ["noise.kind=beta", "noise.keep=0.3"])
    assert e.key == "noise.keep" and "beta takes a, b" in str(e)
    polynomial = [
        "sgld.method=sgld",
        "sgld.step_size=null",
        "sgld.polynomial={a: 1.0e-4, gamma: 0.6}",
    ]
    cfg = load_config(DIGITS, polynomial)
    assert cfg.sgld.polynomial.a == 1e-4 and cfg.sgld.polynomial.b == 1.0
    assert float(cfg.sgld.learning_rate()(0)) == pytest.approx(0.5e-4)


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"kind": "bernoulli", "keep": 0.7}, bnoise.Bernoulli(0.7)),
        ({"kind": "gaussian", "alpha": 0.25}, bnoise.Gaussian(0.25)),
        ({"kind": "beta", "a": 8, "b": 2}, bnoise.Beta(8.0, 2.0)),
        ({"kind": "gamma", "concentration": 4, "rate": 4}, bnoise.Gamma(4.0, 4.0)),
        ({"kind": "lognormal", "loc": -0.125, "scale": 0.5}, bnoise.LogNormal(-0.125, 0.5)),
        ({"kind": "gaussian"}, bnoise.Gaussian()),
        ({"kind": "none"}, None),
        (
            {"kind": "bernoulli", "input": {"kind": "gaussian", "alpha": 0.25}},
            {"Dense_0/": bnoise.Gaussian(0.25), "": bnoise.Bernoulli(0.5)},
        ),
        ({"kind": "none", "input": {"kind": "beta"}}, {"Dense_0/": bnoise.Beta(1.0, 1.0)}),
        (
            {"kind": "gamma", "input": {"kind": "none"}},
            {"Dense_0/": bnoise.Bernoulli(1.0), "": bnoise.Gamma()},
        ),
    ],
)
def test_build_noise(section, expected):
    cfg = load_config({"noise": section})
    assert bconfig.build_noise(cfg) == expected
    assert bconfig.build_noise(cfg.noise) == expected


def test_build_hyperprior():
    assert bconfig.build_hyperprior(load_config({})) is None
    cfg = load_config({"em": {"hyperprior": {"kind": "inverse_gamma", "a": 3}}})
    assert bconfig.build_hyperprior(cfg) == bnoise.InverseGammaScale(3.0, 1.0)
    assert bconfig.build_hyperprior(cfg.em.hyperprior) == bnoise.InverseGammaScale(3.0, 1.0)
    cfg = load_config({"em": {"hyperprior": {"kind": "lognormal", "scale": 0.3}}})
    assert bconfig.build_hyperprior(cfg.em) == bnoise.LogNormal(0.0, 0.3)
    e = _error({"em": {"hyperprior": {"keep": 0.5}}})  # a noise parameter, not a hyperprior's
    assert e.key == "em.hyperprior.keep" and "unknown key" in str(e)


def test_data_names_are_the_loaders():
    import typing

    from bayesnoise import data

    assert set(typing.get_args(bconfig.DataName)) == set(data.LOADERS)


def test_sections_validate_when_built_directly():
    with pytest.raises(ConfigError, match=r"^epochs: got 0; allowed: an int >= 1\.$"):
        bconfig.TrainConfig(epochs=0)
    assert bconfig.PruneConfig(rules=["snr"]).rules == ("snr",)


def test_data_section_loads_the_data_set():
    cfg = load_config(DIGITS, ["data.options.test_fraction=0.5"])
    ds = cfg.data.load()
    assert ds.name == "digits" and len(ds.x_test) in (898, 899)


@pytest.mark.parametrize(
    "section, kinds, default",
    [
        ("noise", ["bernoulli", "gaussian", "beta", "gamma", "lognormal"], "bernoulli"),
        ("hyperprior", ["inverse_gamma", "gamma", "lognormal", "beta"], "none"),
    ],
)
def test_kind_defaults_come_from_the_noise_classes(section, kinds, default):
    classes = {
        "bernoulli": bnoise.Bernoulli,
        "gaussian": bnoise.Gaussian,
        "beta": bnoise.Beta,
        "gamma": bnoise.Gamma,
        "lognormal": bnoise.LogNormal,
        "inverse_gamma": bnoise.InverseGammaScale,
    }
    family = bconfig.NoiseConfig if section == "noise" else bconfig.HyperpriorConfig
    build = bconfig.build_noise if section == "noise" else bconfig.build_hyperprior

    def load(raw):
        cfg = load_config({"noise": raw} if section == "noise" else {"em": {"hyperprior": raw}})
        return cfg.noise if section == "noise" else cfg.em.hyperprior

    assert load({}).kind == family().kind == default
    for kind in kinds:
        sec = load({"kind": kind})
        defaults = dataclasses.asdict(classes[kind]())  # the class's own defaults
        assert isinstance(sec, family) and type(sec) is type(family(kind=kind))
        assert sec == family(kind=kind) and build(sec) == classes[kind]()
        assert {k: v for k, v in sec.to_dict().items() if k not in ("kind", "input")} == defaults
        assert all(type(getattr(sec, k)) is float for k in defaults)
        others = {"keep", "alpha", "a", "b", "concentration", "rate", "loc", "scale"} - set(
            defaults
        )
        assert all(getattr(sec, k) is None for k in others)  # another kind's parameter: unset
    e = _error({}, [f"{'noise' if section == 'noise' else 'em.hyperprior'}.kind=uniform"])
    assert "'uniform'" in str(e) and ", ".join(kinds[:2]) in str(e)
    with pytest.raises(ConfigError, match=r"^kind: got 'uniform'; allowed: one of "):
        family(kind="uniform")


def test_sections_are_frozen_and_forbid_unknown_keys():
    cfg = load_config(DIGITS)
    for section, name in [(cfg, "name"), (cfg.sgld, "chains"), (cfg.noise, "keep")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, getattr(section, name))
    assert hash(cfg.train) == hash(load_config(DIGITS).train)
    with pytest.raises(ConfigError, match=r"^epoch: unknown key \(did you mean 'epochs'\?\)"):
        bconfig.TrainConfig(epoch=3)
    with pytest.raises(ConfigError, match=r"^concentration: got 2.0, but kind beta takes a, b"):
        bconfig.NoiseConfig(kind="beta", concentration=2.0)
    assert (
        bconfig.NoiseConfig(kind="beta", a=2)
        == load_config({"noise": {"kind": "beta", "a": 2}}).noise
    )


def test_unknown_keys_suggest_the_nearest_known_key():
    e = _error({"sgld": {"step": 1e-3}})
    assert e.key == "sgld.step" and "(did you mean 'step_size'?)" in str(e)
    e = _error({"prune": {"fin": 3}})  # no close match: the first key it begins
    assert "(did you mean 'finetune_epochs'?)" in str(e)
    e = _error({"eval": {"xyz": 3}})
    assert "did you mean" not in str(e) and "known keys here: metric, tolerance" in str(e)


def test_several_errors_are_listed_in_one_message():
    e = _error({"train": {"epochs": 0, "batch_size": "x"}, "eval": {"mc_samples": 0}})
    lines = str(e).splitlines()
    assert e.key == "train.epochs" and lines[0] == "train.epochs: got 0; allowed: an int >= 1."
    assert lines[1:] == [
        "train.batch_size: got 'x'; allowed: an int >= 1.",
        "eval.mc_samples: got 0; allowed: an int >= 1.",
    ]
    assert [m.key for m in e.more] == ["train.batch_size", "eval.mc_samples"]


def test_numbers_are_typed_strictly():
    cfg = load_config({"train": {"learning_rate": 1}, "sgld": {"temperature": "5e-1"}})
    assert type(cfg.train.learning_rate) is float and cfg.sgld.temperature == 0.5
    for section, key, value in [
        ("train", "epochs", True),  # bool is not an int
        ("train", "epochs", 3.0),  # no float -> int
        ("train", "epochs", "3"),
        ("train", "learning_rate", True),
        ("train", "learning_rate", "1e-3x"),
        ("em", "enabled", 1),
    ]:
        e = _error({section: {key: value}})
        assert e.key == f"{section}.{key}" and str(e).startswith(
            f"{e.key}: got {value!r}; allowed:"
        )


def test_configs_pickle_and_validate_their_json_schema():
    cfg = load_config(DIGITS.parent / "mnist.yaml")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    schema = bconfig.Config.model_json_schema()
    assert schema["properties"]["noise"]["discriminator"]["propertyName"] == "kind"


def test_shipped_learned_noise_configs():
    sparse = load_config(DIGITS.parent / "mnist_sparsevd.yaml")
    rows = load_config(DIGITS.parent / "mnist_learned_rows.yaml")
    wide = load_config(DIGITS.parent / "mnist_sparsevd_400.yaml")
    for cfg in (sparse, rows, wide):
        assert cfg.data.name == "mnist" and cfg.noise.kind == "learned" and cfg.noise.input is None
        assert not cfg.em.enabled and cfg.prune.moments == "laplace"
        assert 0 <= cfg.noise.warmup_epochs <= cfg.train.epochs // 4
    assert sparse.noise.warmup_epochs > 0  # per-weight noise: the KL ramped in
    assert sparse.model.hidden_sizes == (300, 100) and sparse.noise.per == "weight"
    assert sparse.train.batch_size == 100 and sparse.train.learning_rate == 1e-3
    assert rows.model.hidden_sizes == (400, 400) and rows.noise.per == "row"
    # the comparison's network, per-weight noise, fine-tuned; fractions chosen as in mnist.yaml
    mnist = load_config(DIGITS.parent / "mnist.yaml")
    assert wide.model.hidden_sizes == mnist.model.hidden_sizes and wide.noise.per == "weight"
    assert wide.prune.finetune_epochs > 0 and wide.eval.tolerance == mnist.eval.tolerance
    assert max(wide.prune.fraction_grid()) >= 0.98


def test_learned_noise_defaults_come_from_the_core():
    learned = inspect.signature(bnn.learned_noise).parameters
    cfg = load_config({"noise": {"kind": "learned"}})
    assert cfg.noise == bconfig.NoiseConfig(kind="learned")
    assert cfg.noise.per == learned["per"].default == "row"
    assert cfg.noise.init_log_alpha == learned["init_log_alpha"].default
    assert cfg.noise.kl_weight == 1.0 and cfg.noise.warmup_epochs == 0
    assert type(cfg.noise.init_log_alpha) is float and type(cfg.noise.warmup_epochs) is int
    assert cfg.noise.keep is None and cfg.noise.input is None  # another kind's parameter
    assert load_config(cfg.to_dict()) == cfg and load_config(yaml.safe_load(cfg.to_yaml())) == cfg
    build = bconfig.build_noise(cfg)  # model -> bn.nn.learned_noise(model, ...)
    assert build.func is bnn.learned_noise
    assert build.keywords == {"per": "row", "init_log_alpha": learned["init_log_alpha"].default}
    import jax
    import jax.numpy as jnp

    weight = load_config({"noise": {"kind": "learned", "per": "weight", "init_log_alpha": -6}})
    vd = bconfig.build_noise(weight)(bnn.MLP((4, 2)))
    variables = vd.init(jax.random.key(0), jnp.ones((1, 3)))
    assert set(variables["params"]["Dense_0"]) == {"kernel", "bias", "log_sigma2"}
    layer = bnn.learned_layers(variables)[0]
    assert jnp.allclose(layer.log_alpha, -6.0, atol=1e-3)


@pytest.mark.parametrize(
    "noise, key, words",
    [
        ({"init_log_alpha": 12.5}, "noise.init_log_alpha", ["12.5", "a number in [-12, 12]"]),
        ({"init_log_alpha": -13}, "noise.init_log_alpha", ["-13", "[-12, 12]"]),
        ({"per": "column"}, "noise.per", ["'column'", "one of row, weight"]),
        ({"kl_weight": -0.5}, "noise.kl_weight", ["-0.5", "a number >= 0"]),
        ({"kl_weight": "heavy"}, "noise.kl_weight", ["'heavy'", ">= 0"]),
        ({"warmup_epochs": -1}, "noise.warmup_epochs", ["-1", "an int >= 0"]),
        ({"warmup_epochs": 2.5}, "noise.warmup_epochs", ["2.5", "an int >= 0"]),
        ({"keep": 0.5}, "noise.keep", ["0.5", "kind learned takes per, init_log_alpha"]),
        ({"input": {"kind": "bernoulli"}}, "noise.input", ["kind bernoulli", "null (omit it)"]),
    ],
)
def test_learned_noise_errors_name_the_key_value_and_allowed(noise, key, words):
    e = _error({"noise": {"kind": "learned", **noise}})
    assert e.key == key and str(e).startswith(f"{key}: ") and "allowed:" in str(e)
    for w in words:
        assert w in str(e)


def test_learned_noise_is_not_an_input_noise_and_other_kinds_take_none_of_its_fields():
    e = _error({"noise": {"kind": "bernoulli", "input": {"kind": "learned"}}})
    assert e.key == "noise.input.kind" and "allowed: one of bernoulli, gaussian" in str(e)
    assert "learned" not in str(e).rpartition("allowed:")[2]
    e = _error({"noise": {"kind": "gaussian", "per": "row"}})
    assert e.key == "noise.per" and "kind gaussian takes alpha" in str(e)
    e = _error({"noise": {"kind": "learned", "perr": "row"}})
    assert e.key == "noise.perr" and "unknown key (did you mean 'per'?)" in str(e)
    e = _error({"em": {"hyperprior": {"kind": "learned"}}})  # not a hyperprior
    assert e.key == "em.hyperprior.kind" and "'learned'" in str(e)


def test_overriding_the_kind_to_and_from_learned():
    cfg = load_config(DIGITS, ["noise.kind=learned", "noise.per=weight"])
    assert cfg.noise.kind == "learned" and cfg.noise.per == "weight"
    assert cfg.noise.input is None and cfg.noise.keep is None  # the input noise dropped too
    e = _error(DIGITS, ["noise.kind=learned", "noise.input.keep=0.9"])  # unless set
    assert e.key == "noise.input" and "null" in str(e)
    back = load_config(cfg, ["noise.kind=bernoulli"])
    assert back.noise == bconfig.NoiseConfig(kind="bernoulli") and back.noise.per is None
    cfg = load_config(cfg, ["noise.warmup_epochs=5", "noise.kl_weight=0.1"])  # same kind: kept
    assert cfg.noise.per == "weight" and cfg.noise.warmup_epochs == 5 and cfg.noise.kl_weight == 0.1
