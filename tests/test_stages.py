import json
from pathlib import Path

import numpy as np
import pytest

from bayesnoise.pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "train.epochs=3",
    "sgld.burnin=20",
    "sgld.samples=10",
    "sgld.thin=1",
    "sgld.chains=2",
    "sgld.max_steps=300",
    "em.iterations=1",
    "prune.num_fractions=5",
    "prune.soft_target.enabled=true",
    "prune.soft_target.epochs=2",
    "prune.finetune_epochs=1",
]


def run_cli(out, *extra):
    args = ["run", str(ROOT / "configs" / "digits.yaml"), "--out", str(out), "--quiet"]
    for s in SMALL + list(extra):
        args += ["--set", s]
    return cli.main(args)


def test_run_writes_the_report(tmp_path, capsys):
    import matplotlib

    backend = matplotlib.get_backend()
    out = tmp_path / "digits"
    assert run_cli(out) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "digits" and res["metric"] == "error"
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
    assert res["unpruned"] == pytest.approx(res["trained_metric"], abs=1e-6)
    assert np.isfinite(res["laplace_log_evidence"])
    assert len(res["em"]) == 2 and "q" in res["em"][0]
    sg = res["sgld"]  # diagnostics, and the dead pixels' recovery
    assert isinstance(sg["converged"], bool) and sg["learning_rate"] > 0
    # the explicit settings override the derived ones (burn-in halved after the first E-step)
    assert sg["num_burnin"] == 10 and sg["num_samples"] == 10 and sg["thin"] == 1
    assert sg["prior_recovery"]["inputs"] == 4 and sg["prior_recovery"]["variance_over_prior"] > 0
    for name in ("bma", "posterior_mean", "mc_dropout"):
        values = res["predictive"][name]
        assert 0 <= values["error"] <= 1 and values["nll"] > 0 and 0 <= values["ece"] <= 1
    assert len(res["soft_target"]) >= 1
    for rule, pts in res["finetuned"].items():  # retraining with the mask fixed does not hurt
        grid = np.asarray(res["curves"][rule])
        for f, v in pts:
            assert v <= np.interp(f, grid[:, 0], grid[:, 1]) + 0.02
    assert {"train", "sgld", "prune", "soft_target"} <= set(res["timings"])
    assert res["config"]["train"]["epochs"] == 3
    for name in ("pruning_curves.png", "mean_vs_std.png", "em_scales.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    first = capsys.readouterr().out
    assert "breakpoint" in first and str(out / "results.json") in first
    assert matplotlib.get_backend() == backend  # the report never switches the backend
