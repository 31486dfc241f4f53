"""The command line: exit codes, messages, what it shows."""

import logging
from pathlib import Path

import pytest

from bayesnoise.pipeline import cli

ROOT = Path(__file__).resolve().parents[1]


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


def test_the_command_line_shows_the_library_log_and_removes_its_handler(tmp_path, capsys):
    logger = logging.getLogger("bayesnoise")
    before = list(logger.handlers)
    code = cli.main(["run", str(tmp_path / "missing.yaml")])
    assert code == 2 and "missing.yaml" in capsys.readouterr().err
    assert logger.handlers == before


def run(args, capsys):
    """(exit status, stderr) of the command line."""
    code = cli.main(args)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


CONFIG = str(ROOT / "configs" / "digits.yaml")


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--set", "train.batch_size=5000"], "train.batch_size"),
        (["--set", "sgld.batch_size=5000"], "sgld.batch_size"),
        (["--set", "data.options.test_fraction=1.5"], "data.options.test_fraction"),
        (["--set", "data.options.seed=-1"], "data.options.seed"),
        (["--set", "data.validation_fraction=1.5"], "data.validation_fraction"),
        (["--set", "data.validation_fraction=0.9999"], "data.validation_fraction"),  # no training
        (["--set", "train.seeds=0"], "train.seeds"),
    ],
)
def test_a_bad_value_found_after_the_config_loads_is_one_line_and_status_2(
    tmp_path, capsys, extra, key
):
    code, err = run(["run", CONFIG, "--out", str(tmp_path / "out"), *extra], capsys)
    line = one_line(err)
    assert code == 2 and key in line and extra[1].split("=")[1] in line
    assert "cosine" not in line


def test_an_unusable_out_folder_is_status_2(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    code, err = run(["run", CONFIG, "--out", str(file / "out")], capsys)
    assert code == 2 and "is a file" in one_line(err)


@pytest.mark.parametrize("content", [None, b"\x00\xff\x89PNG\x00\x01"])
def test_a_config_that_is_a_folder_or_binary_is_status_2(tmp_path, capsys, content):
    path = tmp_path / "config"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, err = run(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and str(path) in one_line(err)


@pytest.mark.parametrize("content", [None, b"not the MNIST pickle"])
def test_missing_or_corrupt_data_is_a_failed_run(tmp_path, capsys, content):
    data = tmp_path / "mnist.pkl.gz"
    if content is not None:
        data.write_bytes(content)
    args = ["run", CONFIG, "--out", str(tmp_path / "out"), "--set", "data.name=mnist"]
    args += ["--set", "data.options={}"]
    code, err = run([*args, "--set", f"data.path={data}"], capsys)
    line = one_line(err)
    assert code == 1 and str(data) in line
    assert ("sha256" in line) if content else ("no MNIST file" in line)


def test_ctrl_c_is_status_130_and_says_that_rerunning_resumes(tmp_path, capsys, monkeypatch):
    from bayesnoise import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    code, err = run(["run", CONFIG, "--out", str(tmp_path)], capsys)
    assert code == 130 and "rerunning the same command resumes" in one_line(err)


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    from bayesnoise import pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(pipeline, "run", broken)
    code, err = run(["run", CONFIG, "--out", str(tmp_path)], capsys)
    line = one_line(err)
    assert code == 1 and "RuntimeError: something; broke" in line and "--debug" in line
    with pytest.raises(RuntimeError, match="something"):
        cli.main(["run", CONFIG, "--out", str(tmp_path), "--debug"])


@pytest.mark.parametrize("lr", ["1e12", "1e6"])  # NaN; finite but no better than a guess
def test_a_diverging_training_run_fails_and_writes_no_results(tmp_path, capsys, lr):
    out = tmp_path / "out"
    sets = ["train.epochs=2", f"train.learning_rate={lr}", "train.optimizer=sgd"]
    code, err = run(
        ["run", CONFIG, "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)],
        capsys,
    )
    line = one_line(err)
    assert code == 1 and "[train]" in line and "train.learning_rate" in line
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("k", ["0", "-2"])
def test_seeds_below_one_are_one_line_and_status_2(tmp_path, capsys, k):
    code, err = run(["run", CONFIG, "--out", str(tmp_path / "out"), "--seeds", k], capsys)
    line = one_line(err)
    assert code == 2 and f"--seeds: got {k}; allowed: an int >= 1" in line
    assert not (tmp_path / "out").exists()  # nothing started
