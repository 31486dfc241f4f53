"""The command line: exit codes, messages, what it shows."""

import logging
from pathlib import Path

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
