import json
from pathlib import Path

import jax
import numpy as np
import pytest
from small_run import ITERATIVE, run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_run_writes_the_report(digits_small_run, tmp_path, capsys):
    import shutil

    import matplotlib

    backend = matplotlib.get_backend()
    import bayesnoise as bn

    out = digits_small_run  # conftest.py: small_run.SMALL and ITERATIVE, run once per session
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "digits" and res["metric"] == "error"
    # choices on the validation split (10% of digits' 1,257 training images), metrics on test
    assert res["validation"] == {"examples": 126, "fraction": None}
    for rule, pts in res["curves"].items():
        valid = np.asarray(res["valid_curves"][rule])
        chosen = bn.prune.breakpoint_fraction(valid[:, 0], valid[:, 1], res["unpruned_valid"], 0.01)
        assert res["breakpoints"][rule] == pytest.approx(chosen)
        test = np.asarray(pts)
        at = np.flatnonzero(np.isclose(test[:, 0], chosen))
        assert res["breakpoint_metrics"][rule] == pytest.approx(test[at[0], 1])
    for stage in ("finetuned", "iterative"):  # retrained: the same choice, per rule
        for rule, pts in res[stage].items():
            test, valid = np.asarray(pts), np.asarray(res[f"{stage}_valid"][rule])
            chosen = bn.prune.breakpoint_fraction(
                valid[:, 0], valid[:, 1], res["unpruned_valid"], 0.01
            )
            picked = res[f"{stage}_breakpoints"][rule]
            assert picked["fraction"] == pytest.approx(chosen)
            at = np.flatnonzero(np.isclose(test[:, 0], chosen))
            assert picked["metric"] == pytest.approx(test[at[0], 1] if at.size else res["unpruned"])
    assert [f for f, _ in res["iterative"]["magnitude"]] == [0.5, 0.8]
    assert set(res["curves"]) == {"snr", "spr", "magnitude"}
    for rule, pts in res["curves"].items():
        pts = np.asarray(pts)
        assert pts.shape == (5, 2)
        np.testing.assert_allclose(pts[:, 0], [0.0, 0.2, 0.4, 0.6, 0.8], atol=1e-6)
        assert np.all((pts[:, 1] >= 0) & (pts[:, 1] <= 1))
        assert pts[0, 1] == pytest.approx(res["unpruned"])  # fraction 0 is the unpruned net
        assert 0.0 <= res["breakpoints"][rule] <= 0.8
    # by default the scores read the Laplace posterior at the trained network
    assert res["pruning_moments"] == "laplace" and res["per_chain"] == {}
    # the Laplace moments are centred on EM's mode under the learned scales: its error unpruned
    assert res["unpruned"] == pytest.approx(res["em"][-1]["metric_at_mean"], abs=1e-6)
    assert np.isfinite(res["laplace_log_evidence"])
    # EM's iterations: modes and Laplace posteriors, the evidence of each, MacKay's update
    assert len(res["em"]) == 2 and all(np.isfinite(r["log_evidence"]) for r in res["em"])
    assert res["em_settings"]["method"] == "laplace" and "q" not in res["em"][0]
    assert all(r["pruned_rows"] >= 0 for r in res["em"])
    sg = res["sgld"]  # diagnostics, and the dead pixels' recovery
    assert isinstance(sg["converged"], bool) and sg["learning_rate"] > 0
    # the explicit settings override the derived ones (one SGLD E-step, after EM's iterations)
    assert sg["num_burnin"] == 20 and sg["num_samples"] == 10 and sg["thin"] == 1
    assert sg["prior_recovery"]["inputs"] == 4 and sg["prior_recovery"]["variance_over_prior"] > 0
    # and in function space: the predicted class's probability on held-out digits
    assert np.isfinite(sg["predictive_rhat_max"]) and sg["predictive_ess_min"] > 0
    for name in ("bma", "posterior_mean", "mc_dropout"):
        values = res["predictive"][name]
        assert 0 <= values["error"] <= 1 and values["nll"] > 0 and 0 <= values["ece"] <= 1
    assert len(res["soft_target"]) >= 1
    checked = 0
    for rule, pts in res["finetuned"].items():  # retraining with the mask fixed does not hurt
        grid = np.asarray(res["curves"][rule])
        for f, v in pts:
            one_shot = np.interp(f, grid[:, 0], grid[:, 1])
            if one_shot < 0.5:  # where the pruned net still predicts (chance is 0.9)
                assert v <= one_shot + 0.02
                checked += 1
    assert checked >= 2
    assert {"train", "sgld", "prune", "iterative", "soft_target"} <= set(res["timings"])
    assert res["config"]["train"]["epochs"] == 3
    for name in ("pruning_curves.png", "mean_vs_std.png", "em_scales.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    # the run prints its table (a copy, resumed: every stage from its checkpoint)
    copy = tmp_path / "digits"
    shutil.copytree(out, copy)
    capsys.readouterr()
    assert run_cli(copy, *ITERATIVE) == 0
    first = capsys.readouterr().out
    assert "breakpoint" in first and str(copy / "results.json") in first
    assert json.loads((copy / "results.json").read_text())["curves"] == res["curves"]
    assert matplotlib.get_backend() == backend  # the report never switches the backend


LEARNED = [
    "noise.kind=learned",  # drops the digits config's input noise
    "noise.per=weight",
    "noise.warmup_epochs=1",
    "sgld.step_size=1e-5",  # a fixed step: no adaptation
    "em.enabled=false",
    "prune.soft_target.enabled=false",
    "prune.finetune_epochs=0",
]


@pytest.mark.slow  # a whole pipeline run (30 s): `make test-slow`
def test_a_learned_noise_run_adds_the_log_alpha_rule_the_threshold_and_its_plots(tmp_path):
    import bayesnoise as bn

    out = tmp_path / "learned"
    assert run_cli(out, *LEARNED) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["noise"]["kind"] == "learned" and res["config"]["noise"]["input"] is None
    assert set(res["curves"]) == {"snr", "spr", "magnitude", "log_alpha"}
    pts = np.asarray(res["curves"]["log_alpha"])
    np.testing.assert_allclose(pts[:, 0], [0.0, 0.2, 0.4, 0.6, 0.8], atol=1e-6)
    assert np.all((pts[:, 1] >= 0) & (pts[:, 1] <= 1)) and 0 <= res["breakpoints"]["log_alpha"]
    ln = res["learned_noise"]
    assert ln["per"] == "weight" and ln["threshold"]["log_alpha"] == 3.0
    # the later stages read the mean network: its metric is the log alpha curve's first point
    assert ln["mean_metric"] == pytest.approx(res["trained_metric"]) == pytest.approx(pts[0, 1])
    assert res["unpruned"] == pytest.approx(res["trained_metric"], abs=1e-6)  # Laplace at it
    assert 0 <= ln["threshold"]["metric"] <= 1
    mc = ln["mc"]
    assert 0 <= mc["error"] <= 1 and mc["nll"] > 0 and 0 <= mc["ece"] <= 1
    assert "mc_dropout" not in res["predictive"]
    # the threshold's share, recomputed from the stored variables: log α = log σ² − log θ²
    trained = bn.io.load(out / "checkpoints" / "train.msgpack")["value"]
    layers = trained["variables"]["params"]
    log_alpha = [
        np.asarray(layer["log_sigma2"]) - np.log(np.asarray(layer["kernel"]) ** 2 + 1e-8)
        for layer in layers.values()
    ]
    removed = sum(int(np.sum(a >= 3.0)) for a in log_alpha) / sum(a.size for a in log_alpha)
    assert ln["threshold"]["fraction_removed"] == pytest.approx(removed, abs=1e-6)
    mean = trained["params"]["params"]  # the mean network: the same weights, no noise leaves
    assert set(mean) == set(layers) and all(set(mean[k]) == {"kernel", "bias"} for k in mean)
    np.testing.assert_array_equal(mean["Dense_0"]["kernel"], layers["Dense_0"]["kernel"])
    plots = {Path(p).name for p in res["plots"]}
    assert "log_alpha_hist.png" in plots and (out / "log_alpha_hist.png").stat().st_size > 0
    assert "kept_per_pixel.png" not in plots  # 64 inputs: no 28 x 28 image
    assert not (out / "kept_per_pixel.png").exists()
    _check_log_alpha_retraining(out, trained)


def _check_log_alpha_retraining(out, trained):
    """Fine-tuning and iterative pruning by log α, with retraining replaced by a recorder: each
    start is the learned network with the weights of lowest −log α removed, counted by hand."""
    import jax

    from bayesnoise.pipeline import config as bconfig
    from bayesnoise.pipeline import stages

    cfg = bconfig.load_config(out / "config.yaml")
    task = stages._Task(cfg)
    variables = jax.tree.map(np.asarray, trained["variables"])
    mean = trained["params"]
    post = {"mean": mean, "std": jax.tree.map(np.ones_like, mean)}
    seen = []

    def record(task_, key, params, epochs, lr, progress):
        # the mask retraining holds: the zeros of the pruned kernels
        seen.append((params, jax.tree.map(lambda x: x != 0 if x.ndim >= 2 else None, params)))
        return params

    layers = variables["params"]
    neg_log_alpha = np.concatenate(
        [
            -(
                np.asarray(layer["log_sigma2"]) - np.log(np.asarray(layer["kernel"]) ** 2 + 1e-8)
            ).ravel()
            for layer in layers.values()
        ]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "_retrain", record)
        tuned = stages._finetune(task, post, jax.random.key(0), False, variables)
    assert set(tuned["curves"]) == {"snr", "spr", "magnitude", "log_alpha"}
    starts = seen[-2:]  # log alpha at 0.5 and 0.75 (the grid ends at 0.8)
    for f, (params, mask), (g, test), (h, valid) in zip(
        (0.5, 0.75), starts, tuned["curves"]["log_alpha"], tuned["valid_curves"]["log_alpha"]
    ):
        assert g == h == f
        kept = np.concatenate(
            [np.asarray(mask["params"][k]["kernel"]).ravel() for k in layers]
        ).astype(bool)
        assert kept.size == neg_log_alpha.size and abs((~kept).mean() - f) < 1e-3
        # the removed weights are those of lowest -log alpha
        assert neg_log_alpha[~kept].max() <= neg_log_alpha[kept].min()
        kernel = params["params"]["Dense_0"]["kernel"]  # the kept weights as learned
        first = np.asarray(mask["params"]["Dense_0"]["kernel"]).astype(bool)
        np.testing.assert_array_equal(
            np.asarray(kernel)[first], np.asarray(layers["Dense_0"]["kernel"])[first]
        )
        assert test == pytest.approx(float(task.metric(params)))
        assert valid == pytest.approx(float(task.valid_metric(params)))
    seen.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "_retrain", record)
        iterated = stages._iterative(task, post, jax.random.key(0), False, variables)
    assert "log_alpha" in iterated["curves"]
    last_params, last_mask = seen[-1]
    kept = np.concatenate(
        [np.asarray(last_mask["params"][k]["kernel"]).ravel() for k in layers]
    ).astype(bool)
    final = cfg.prune.iterative.fractions[-1]
    assert abs((~kept).mean() - final) < 1e-3
    assert neg_log_alpha[~kept].max() <= neg_log_alpha[kept].min()
    assert iterated["curves"]["log_alpha"][-1][0] == pytest.approx(final)


@pytest.mark.parametrize("per", ["row", "weight"])
def test_the_learned_noise_plots_map_the_kept_weights_of_28_by_28_inputs(tmp_path, per):
    import jax
    import jax.numpy as jnp

    import bayesnoise as bn
    from bayesnoise.pipeline import report

    vd = bn.nn.learned_noise(bn.nn.MLP((8, 3)), per=per)
    variables = vd.init(jax.random.key(0), jnp.ones((1, 784)))
    mean = bn.inference.mean_params(variables)
    curve = [[0.0, 0.1], [0.5, 0.12]]
    results = {
        "metric": "error",
        "dataset": "toy",
        "unpruned": 0.1,
        "curves": {"snr": curve, "log_alpha": curve},
        "breakpoints": {"snr": 0.5, "log_alpha": 0.5},
        "em": [],
        "learned_noise": {
            "per": per,
            "threshold": {"log_alpha": 3.0, "fraction_removed": 0.7, "metric": 0.13},
        },
    }
    moments = {"mean": mean, "std": mean}
    files = report.plots(tmp_path, None, results, moments, moments, learned=variables)
    names = [Path(f).name for f in files]
    assert names[-2:] == ["log_alpha_hist.png", "kept_per_pixel.png"]
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*")) and len(list(tmp_path.iterdir())) == len(files)


def test_a_run_over_seeds_reports_every_seed_and_their_mean_and_sd(tmp_path, caplog):
    out = tmp_path / "seeds"
    fast = ["em.enabled=false", "sgld.step_size=1e-5", "prune.soft_target.enabled=false"]
    fast += ["prune.finetune_epochs=0", "train.epochs=2", "train.seed=3"]
    with jax.log_compiles(True):
        assert run_cli(out, *fast, "train.seeds=2") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [3, 4]
    # without EM the chains are one E-step under λ = 1, with no warning about EM's iterations
    messages = [r.getMessage() for r in caplog.records]
    second = [i for i, m in enumerate(messages) if "[seeds] seed 4" in m]
    assert len(second) == 1
    assert not any("iterations=0" in m for m in messages)
    # the second seed reuses the first one's task and compiled loops: training, sampling
    loops = ("jit(_epochs)", "jit(_sample)", "jit(_init_carry)")
    compiled = [m for m in messages[: second[0]] if m.startswith("Compiling jit(")]
    assert any(loop in m for m in compiled for loop in loops)
    again = [m for m in messages[second[0] :] if any(f"Compiling {loop}" in m for loop in loops)]
    assert again == []
    runs = [json.loads((out / f"seed_{s}" / "results.json").read_text()) for s in (3, 4)]
    assert [r["config"]["train"]["seed"] for r in runs] == [3, 4]
    assert runs[0]["trained_metric"] != runs[1]["trained_metric"]  # two trainings, not one
    for key in ("unpruned", "trained_metric"):
        values = [r[key] for r in runs]
        assert res[key] == pytest.approx(np.mean(values))
        assert res[f"{key}_sd"] == pytest.approx(np.std(values, ddof=1))
    for rule in ("snr", "spr", "magnitude"):
        chosen = [r["breakpoints"][rule] for r in runs]
        assert res["breakpoints"][rule] == pytest.approx(np.mean(chosen))
        assert [p["breakpoints"][rule] for p in res["per_seed"]] == chosen
        assert [p["breakpoint_metrics"][rule] for p in res["per_seed"]] == [
            r["breakpoint_metrics"][rule] for r in runs
        ]
        curves = np.asarray([np.asarray(r["curves"][rule])[:, 1] for r in runs])
        np.testing.assert_allclose(np.asarray(res["curves"][rule])[:, 1], curves.mean(0))
        np.testing.assert_allclose(np.asarray(res["curves_sd"][rule])[:, 1], curves.std(0, ddof=1))
    bma = [r["predictive"]["bma"]["error"] for r in runs]
    assert res["predictive"]["bma"]["mean"] == pytest.approx(np.mean(bma))
    assert (out / "pruning_curves.png").stat().st_size > 0 and set(res["timings"]) == {
        "seed_3",
        "seed_4",
        "total",
    }
    assert res["stage_seconds"]["total"] == pytest.approx(
        sum(r["stage_seconds"]["total"] for r in runs)
    )


def test_runs_over_seeds_drop_compiled_code_near_the_kernels_limit_on_memory_maps(monkeypatch):
    import jax

    from bayesnoise.pipeline import stages

    calls = []
    monkeypatch.setattr(jax, "clear_caches", lambda: calls.append(1))
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this system")
    stages._release_compiled(share=1.0)  # far below the limit: keep the compiled code
    assert calls == []
    stages._release_compiled(share=0.0)  # above any share of it: drop it
    assert calls == [1]


def test_the_sampling_stage_runs_kinetic_langevin_with_method_baoab():
    from small_run import CONFIG, SMALL

    from bayesnoise.pipeline import config, stages

    # digits.yaml's own sampler (full-batch BAOAB, exchanges of units), shorter
    small = [s for s in SMALL if not s.startswith("sgld.")]
    cfg = config.load_config(CONFIG, small + ["sgld.max_steps=400"])
    assert (cfg.sgld.method, cfg.sgld.batch_size, cfg.sgld.unit_swaps) == ("baoab", None, True)
    task = stages._Task(cfg)
    post = stages._sgld(task, task.init(jax.random.key(0)), jax.random.key(1), False, False)
    d = post["diagnostics"]
    # the whole training set as the batch, a tenth of the budget as burn-in, h from λ_max
    assert (d["method"], d["batch_size"], d["num_burnin"]) == ("baoab", len(task.x_train), 40)
    assert (
        d["num_samples"] * d["thin"] <= 360 and d["num_steps"] == 40 + d["num_samples"] * d["thin"]
    )
    # 0.5, halved after each divergence (the start is an untrained network, not a mode)
    assert d["step_fraction"] in (0.5, 0.25, 0.125, 0.0625)
    h = d["step_fraction"] / np.sqrt(d["curvature_max"])
    assert d["learning_rate"] == pytest.approx(h, rel=1e-6)
    assert d["prior_recovery"]["inputs"] == 4 and np.isfinite(d["rhat_max"])
    assert "preconditioner" not in d
    # the noise-free network's chains take sgld.reference_max_steps
    cfg = config.load_config(CONFIG, small + ["sgld.max_steps=400", "sgld.reference_max_steps=200"])
    task.cfg = cfg
    post = stages._sgld(task, task.init(jax.random.key(0)), jax.random.key(1), False, False)
    assert post["diagnostics"]["num_burnin"] == 40
    ref = stages._sgld(
        task, task.init(jax.random.key(0)), jax.random.key(1), False, False, reference=True
    )
    d = ref["diagnostics"]
    assert d["num_burnin"] == 20 and d["num_steps"] <= 200


@pytest.mark.slow  # a sampling stage (9 s): `make test-slow`
def test_the_sampling_stage_takes_its_friction_from_the_config():
    from small_run import CONFIG, SMALL

    from bayesnoise.pipeline import config, stages

    small = [s for s in SMALL if not s.startswith("sgld.")]
    baoab = ["sgld.method=baoab", "sgld.batch_size=null", "sgld.max_steps=200"]
    cfg = config.load_config(CONFIG, small + baoab + ["sgld.friction=0.3"])
    task = stages._Task(cfg)
    post = stages._sgld(task, task.init(jax.random.key(0)), jax.random.key(1), False, False)
    assert post["diagnostics"]["friction"] == 0.3
    assert config.load_config(CONFIG, small + baoab).sgld.friction is None  # bn.baoab's 1


@pytest.mark.slow  # a whole pipeline run (30 s): `make test-slow`
def test_a_stopped_sampling_stage_goes_on_from_the_chains_checkpoints(tmp_path, monkeypatch):
    from small_run import CONFIG, SMALL

    from bayesnoise import _loop, _resume
    from bayesnoise.pipeline import config, stages

    task = stages._Task(config.load_config(CONFIG, SMALL))
    params, key = task.init(jax.random.key(0)), jax.random.key(1)
    whole = stages._sgld(task, params, key, False, False)

    class Stop(Exception):
        pass

    folder, saves, save = tmp_path / "sgld.sampling", [], _resume.Checkpoint.save

    def stopping_save(self, carry, step, last):
        save(self, carry, step, last)
        if last:  # a short run saves only at its end
            saves.append(step)
        if len(saves) == 2:  # killed after the second compiled run of the chains was saved
            raise Stop

    monkeypatch.setattr(_resume.Checkpoint, "save", stopping_save)
    with pytest.raises(Stop):
        stages._sgld(task, params, key, False, False, folder)
    monkeypatch.undo()
    starts, run_chunked = [], _loop.run_chunked

    def counting(run_chunk, carry, lengths, **kw):
        starts.append((kw["start"], sum(lengths)))
        return run_chunked(run_chunk, carry, lengths, **kw)

    monkeypatch.setattr(_loop, "run_chunked", counting)
    resumed = stages._sgld(task, params, key, False, False, folder)
    # the two saved runs came back from their files without a step, the rest ran
    assert [n for _, n in starts[:2]] == [0, 0] and starts[0][0] > 0 and len(starts) > 2
    for name in ("mean", "std"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            resumed[name],
            whole[name],
        )
    np.testing.assert_allclose(resumed["rhat"], whole["rhat"], rtol=1e-5)
