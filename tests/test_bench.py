"""The benchmark package: its registry, the command line, the import layout and the rng suite."""

import ast
import json
from pathlib import Path

import pytest

from bayesnoise import bench
from bayesnoise.pipeline import cli

SUITES = {"sgld", "prune", "em", "pipeline", "rng"}


def test_bench_registry_and_cli():
    assert "sgld" in bench.SUITES
    with pytest.raises(ValueError, match="unknown benchmark suite 'nope'"):
        bench.main("nope")
    args = cli.build_parser().parse_args(["bench", "--suite", "sgld", "--out", "b.json"])
    assert args.suite == "sgld" and args.out == "b.json"


def test_every_suite_is_registered_and_offered_by_the_cli():
    assert set(bench.SUITES) == SUITES
    for name in SUITES:
        assert cli.build_parser().parse_args(["bench", "--suite", name]).suite == name
        assert bench.SUITES[name].__module__ == f"bayesnoise.bench.{name}"


def test_suite_modules_import_only_the_private_helpers_of_the_package():
    # No circle: the package imports the suites, the suites import only bench._common.
    folder = Path(bench.__file__).parent
    for name in SUITES:
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "bayesnoise.bench"
            ):
                assert node.module == "bayesnoise.bench._common", (name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("bayesnoise.bench") for a in node.names), name


def test_pipeline_suite_config_is_valid():
    from bayesnoise.bench.pipeline import DIGITS
    from bayesnoise.pipeline.config import load_config

    cfg = load_config(DIGITS)
    assert cfg.data.name == "digits" and cfg.em.enabled


def test_rng_suite_runs_tiny_and_writes_json_with_the_decision(tmp_path):
    out = tmp_path / "rng.json"
    # One key implementation, to keep the compilations few; the full suite times all three.
    bench.main(
        "rng", out=out, features=(8, 2), num_inputs=4, chains=2, impls=("threefry2x32",), repeats=1
    )
    result = json.loads(out.read_text())
    rng = result["rng"]
    assert {"device", "platform", "jax", "seconds"} <= set(result)
    assert rng["num_params"] == 4 * 8 + 8 + 8 * 2 + 2
    assert rng["handwritten_equals_jax_random_normal"]
    ways = {"handwritten", "threefry2x32", "bn.sgld"}
    for size in ("1", "2"):
        assert set(rng["update_ms"][size]) == ways
        assert all(ms > 0 for ms in rng["update_ms"][size].values())
    decision = rng["decision"]
    assert isinstance(decision["keep_handwritten"], bool)
    assert set(decision["margin"]) == {"1", "2"}
    assert decision["best_jax_random"] == {"1": "threefry2x32", "2": "threefry2x32"}
    with pytest.raises(ValueError, match="impls must be"):
        bench.SUITES["rng"](impls=("philox",))
