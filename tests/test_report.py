"""The run's report: plots written without touching matplotlib's backend, and the table."""

import matplotlib
import numpy as np
import pytest

from bayesnoise.pipeline import report


def _results(em):
    curve = [[0.0, 0.02], [0.5, 0.025], [0.9, 0.2]]
    return {
        "metric": "error",
        "dataset": "toy",
        "unpruned": 0.02,
        "trained_metric": 0.021,
        "curves": {"snr": curve, "spr": curve},
        "breakpoints": {"snr": 0.5, "spr": 0.5},
        "breakpoint_metrics": {"snr": 0.025, "spr": 0.031},
        "em": em,
        "sgld": {"converged": False, "rhat_max": 3.0, "ess_min": 4.0},
    }


def _moments(seed):
    rng = np.random.default_rng(seed)
    tree = {"params": {"Dense_0": {"kernel": rng.normal(size=(4, 3)), "bias": np.zeros(3)}}}
    return {
        "scales": {"params": {"Dense_0": {"kernel": np.exp(rng.normal(size=4)), "bias": None}}},
        "mean": tree,
        "std": {
            "params": {
                "Dense_0": {
                    "kernel": np.abs(tree["params"]["Dense_0"]["kernel"]),
                    "bias": np.ones(3),
                }
            }
        },
    }


@pytest.mark.parametrize(
    "em", [[], [{"iteration": 0, "scales_mean": [1.0]}, {"iteration": 1, "scales_mean": [0.8]}]]
)
def test_plots_are_written_and_listed_with_or_without_em(tmp_path, em):
    backend = matplotlib.get_backend()
    files = report.plots(tmp_path, None, _results(em), _moments(0), _moments(1))
    names = {p.rsplit("/", 1)[-1] for p in files}
    assert {"pruning_curves.png", "mean_vs_std.png"} <= names
    assert ("em_scales.png" in names) == bool(em)
    assert ("em_first_layer_scales.png" in names) == bool(em)
    for f in files:
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    assert not list(tmp_path.glob("*.tmp*")) and len(list(tmp_path.iterdir())) == len(files)


def test_table_names_every_rule_and_the_sampler_state():
    text = report.table(_results([]))
    assert "snr" in text and "spr" in text and "NOT converged" in text and "2.00%" in text
    assert "3.10%" in text  # the test error at the breakpoint chosen on validation
    chosen = {"fraction": 0.9, "metric": 0.0234}
    text = report.table({**_results([]), "iterative_breakpoints": {"snr": chosen}})
    assert "iterative" in text and "snr 90.0% at 2.34%" in text


def test_em_scales_of_28x28_inputs_are_drawn_as_an_image(tmp_path):
    import matplotlib.image

    post = _moments(0)
    post["scales"] = {"params": {"Dense_0": {"kernel": np.linspace(1e-4, 1.0, 784)}}}
    results = _results([{"iteration": 0, "scales_mean": [1.0]}])
    files = report.plots(tmp_path, None, results, post, _moments(1))
    path = next(f for f in files if f.endswith("em_first_layer_scales.png"))
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.std() > 0.05  # a picture, not a blank canvas


def test_table_shows_what_em_learned():
    em = [
        {"iteration": 0, "metric_at_mean": 0.02, "log_evidence": -3000.0, "pruned_rows": 0},
        {"iteration": 1, "metric_at_mean": 0.03, "log_evidence": -900.5, "pruned_rows": 12},
    ]
    text = report.table(_results(em))
    assert "em: error at the mode 2.00% (λ = 1) -> 3.00% (learned)" in text
    assert "-3000.0 -> -900.5" in text and "12 rows at the floor" in text
    assert "em:" not in report.table(_results([]))
