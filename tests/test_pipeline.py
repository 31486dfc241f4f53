import json
import pickle
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


def test_run_writes_the_report_and_resumes(tmp_path, capsys):
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

    # a second run resumes every finished stage
    (out / "checkpoints" / "prune.pkl").unlink()  # as if interrupted before pruning finished
    assert run_cli(out) == 0
    second = capsys.readouterr().out
    assert "[train] resumed" in second and "[sgld] resumed" in second
    assert "[prune] running" in second
    res2 = json.loads((out / "results.json").read_text())
    assert res2["curves"] == res["curves"]
    assert "train" not in res2["timings"] and "prune" in res2["timings"]

    # a checkpoint saved before a config field existed stays valid while the field is at its
    # default (it is read by today's schema), and not once the field is set otherwise
    path = out / "checkpoints" / "train.pkl"
    saved = pickle.loads(path.read_bytes())
    assert saved["config"]["model"]["compute_dtype"] == "float32"
    del saved["config"]["model"]["compute_dtype"]
    path.write_bytes(pickle.dumps(saved))
    assert run_cli(out) == 0
    assert "[train] resumed" in capsys.readouterr().out
    saved["config"]["model"]["hidden_sizes"] = [7]
    path.write_bytes(pickle.dumps(saved))
    assert run_cli(out) == 0
    assert "[train] checkpoint was made under another config" in capsys.readouterr().out

    # changing the pruning settings keeps the training and SGLD checkpoints, not pruning's;
    # with the chains' moments, every chain's own curve comes too
    assert run_cli(out, "prune.num_fractions=4", "prune.moments=sgld") == 0
    third = capsys.readouterr().out
    assert "[sgld] resumed" in third and "[prune] checkpoint was made under another config" in third
    res3 = json.loads((out / "results.json").read_text())
    assert len(res3["curves"]["spr"]) == 4 and res3["pruning_moments"] == "sgld"
    chains = res3["per_chain"]  # the curves of each of the 2 chains' own moments
    for rule in ("snr", "spr", "magnitude"):
        per = np.asarray(chains["curves"][rule])
        assert per.shape == (2, 4) and np.all((per >= 0) & (per <= 1))
        np.testing.assert_allclose(per[:, 0], chains["unpruned"], atol=1e-6)
        assert len(chains["breakpoints"][rule]) == 2

    # longer fine-tuning reruns only the fine-tuning
    assert (
        run_cli(out, "prune.num_fractions=4", "prune.moments=sgld", "prune.finetune_epochs=2") == 0
    )
    fourth = capsys.readouterr().out
    assert "[prune] resumed" in fourth and "[soft_target] resumed" in fourth
    assert "[finetune] checkpoint was made under another config" in fourth


def test_bad_config_exits_with_a_message(tmp_path, capsys):
    code = cli.main(
        [
            "run",
            str(ROOT / "configs" / "digits.yaml"),
            "--out",
            str(tmp_path),
            "--set",
            "train.batch_size=-3",
        ]
    )
    assert code == 2
    assert "train.batch_size" in capsys.readouterr().err
