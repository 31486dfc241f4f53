import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import serialization
from small_run import CONFIG, SMALL, run_cli

import bayesnoise as bn
from bayesnoise.pipeline import config as bconfig
from bayesnoise.pipeline.checkpoints import Checkpoints, staged

ROOT = Path(__file__).resolve().parents[1]


def logged(caplog) -> str:
    """The messages logged since the last call, as one string."""
    text = "\n".join(caplog.messages)
    caplog.clear()
    return text


@pytest.fixture
def caplog_info(caplog):
    caplog.set_level(logging.INFO, logger="bayesnoise")
    return caplog


def config_dict(*overrides):
    return bconfig.load_config(CONFIG, [*SMALL, *overrides]).to_dict()


STAGE_VALUE = {
    "curves": {"snr": [[0.0, 0.1], [0.5, 0.25]], "spr": []},
    "breakpoints": {"snr": 0.5, "spr": 0.0},
    "unpruned": 0.1,
    "moments": "laplace",
    "per_chain": {},
    "laplace_log_evidence": None,
    "scales": {"bias": None, "kernel": np.ones(3, np.float32)},
    "history": {"loss": np.arange(3, dtype=np.float32)},
}


def never(stage="stage"):
    def fn():
        raise AssertionError(f"{stage} ran although its checkpoint is valid")

    return fn


# The checkpoints on their own: fast, no pipeline.


def test_a_stage_value_comes_back_from_its_checkpoint_exactly(tmp_path, caplog_info):
    ckpt = Checkpoints(tmp_path, config_dict(), resume=True)
    timings = {}
    first = staged(ckpt, timings, "prune", lambda: STAGE_VALUE)
    assert "[prune] running" in logged(caplog_info) and "prune" in timings
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["prune.msgpack"]
    seconds = {}
    again = staged(ckpt, {}, "prune", never("prune"), seconds)
    path = ckpt.dir / "prune.msgpack"
    assert seconds == {"prune": timings["prune"]}  # the run time saved with the value
    assert f"[prune] resumed from {path}" in logged(caplog_info)
    for value in (first, again):
        assert value["curves"] == {"snr": [[0.0, 0.1], [0.5, 0.25]], "spr": []}
        assert type(value["curves"]["snr"][0][1]) is float
        assert value["laplace_log_evidence"] is None and value["per_chain"] == {}
        assert value["scales"]["bias"] is None
        np.testing.assert_array_equal(value["scales"]["kernel"], np.ones(3, np.float32))
        assert value["history"]["loss"].dtype == np.float32
    saved = bn.io.load(path)  # a plain msgpack file: the settings the stage depends on, its value
    assert set(saved) == {"config", "value", "seconds"}
    assert saved["config"]["prune.num_fractions"] == 5 and saved["seconds"] == timings["prune"]


def test_without_resume_every_stage_runs(tmp_path):
    Checkpoints(tmp_path, config_dict(), resume=True).save("prune", STAGE_VALUE)
    ckpt = Checkpoints(tmp_path, config_dict(), resume=False)
    assert staged(ckpt, {}, "prune", lambda: {"fresh": 1.0}) == {"fresh": 1.0}


def test_a_changed_setting_reruns_only_the_stages_that_depend_on_it(tmp_path, caplog_info):
    ckpt = Checkpoints(tmp_path, config_dict(), resume=True)
    for stage in ("train", "sgld", "prune"):
        ckpt.save(stage, {"stage": stage})
    ckpt = Checkpoints(tmp_path, config_dict("prune.num_fractions=4"), resume=True)
    assert ckpt.load("train") == {"stage": "train"} and ckpt.load("sgld") == {"stage": "sgld"}
    assert ckpt.load("prune") is None
    assert "[prune] checkpoint was made under another config" in logged(caplog_info)
    # a field only the noise-free network's chains read reruns only them
    for stage in ("sgld", "sgld_reference"):
        ckpt.save(stage, {"stage": stage})
    ckpt = Checkpoints(
        tmp_path,
        config_dict("prune.num_fractions=4", "sgld.reference_max_steps=500"),
        resume=True,
    )
    assert ckpt.load("sgld") == {"stage": "sgld"} and ckpt.load("sgld_reference") is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00garbage\xff" * 10,
        lambda data: data[: len(data) // 2],
        lambda data: data[:-1],
        lambda _: serialization.msgpack_serialize(
            [1.0, 2.0]
        ),  # readable, but not a stage checkpoint
    ],
    ids=["empty", "garbage", "truncated", "last-byte-missing", "not-a-checkpoint"],
)
def test_an_unreadable_checkpoint_is_run_again_with_a_warning(tmp_path, caplog_info, content):
    ckpt = Checkpoints(tmp_path, config_dict(), resume=True)
    ckpt.save("prune", STAGE_VALUE)
    path = ckpt.dir / "prune.msgpack"
    path.write_bytes(content(path.read_bytes()) if callable(content) else content)
    assert staged(ckpt, {}, "prune", lambda: {"fresh": 1.0}) == {"fresh": 1.0}
    warnings = [r for r in caplog_info.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert "[prune] running" in logged(caplog_info)
    assert bn.io.load(path)["value"] == {"fresh": 1.0}  # rewritten whole
    assert staged(ckpt, {}, "prune", never("prune")) == {"fresh": 1.0}


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return {"config": {}, "value": "from the pickle"}


class _Pickled:
    def __reduce__(self):
        return _record_unpickling, ()


def test_old_pickle_checkpoints_are_never_read(tmp_path, caplog_info):
    ckpt = Checkpoints(tmp_path, config_dict(), resume=True)
    old = ckpt.dir / "prune.pkl"
    old.write_bytes(pickle.dumps(_Pickled()))
    assert staged(ckpt, {}, "prune", lambda: {"fresh": 1.0}) == {"fresh": 1.0}
    assert UNPICKLED == []
    assert str(old) in logged(caplog_info)
    assert (ckpt.dir / "prune.msgpack").exists() and old.exists()


# The checkpoints of a run folder: one pipeline run on a tiny config, copied for each test.


@pytest.fixture
def finished_run(digits_small_run):
    return digits_small_run  # conftest.py: one run shared with test_stages.py, not modified


@pytest.fixture
def run_folder(finished_run, tmp_path):
    out = tmp_path / "digits"
    shutil.copytree(finished_run, out)
    return out


def test_a_run_leaves_a_msgpack_checkpoint_per_stage(finished_run):
    names = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    stages = [
        "finetune",
        "iterative",
        "prune",
        "reference",
        "sgld",
        "sgld_reference",
        "soft_target",
        "train",
    ]
    assert names == [f"{stage}.msgpack" for stage in stages]
    train = bn.io.load(finished_run / "checkpoints" / "train.msgpack")["value"]
    assert train["params"]["params"]["Dense_0"]["kernel"].shape == (64, 128)


def test_a_second_run_resumes_every_finished_stage(run_folder, caplog_info):
    res = json.loads((run_folder / "results.json").read_text())
    (run_folder / "checkpoints" / "prune.msgpack").unlink()  # as if interrupted before pruning
    assert run_cli(run_folder) == 0
    second = logged(caplog_info)
    assert "[train] resumed" in second and "[sgld] resumed" in second
    assert "[prune] running" in second
    res2 = json.loads((run_folder / "results.json").read_text())
    assert res2["curves"] == res["curves"]
    assert "train" not in res2["timings"] and "prune" in res2["timings"]
    # every stage's run time stays in results.json: a resumed stage's from its checkpoint
    before, after = res["stage_seconds"], res2["stage_seconds"]
    assert after["train"] == before["train"] == res["timings"]["train"] > 0
    assert after["sgld"] == before["sgld"] and after["prune"] == res2["timings"]["prune"]
    assert after["total"] == pytest.approx(sum(v for k, v in after.items() if k != "total"))


def test_a_checkpoint_older_than_a_config_field_is_valid_while_the_field_is_default(
    run_folder, caplog_info
):
    # a checkpoint saved before a config field existed stays valid while the field is at its
    # default (it is read by today's schema), and not once the field is set otherwise
    path = run_folder / "checkpoints" / "train.msgpack"
    saved = bn.io.load(path)
    assert saved["config"]["model"]["compute_dtype"] == "float32"
    del saved["config"]["model"]["compute_dtype"]
    bn.io.save(path, saved)
    assert run_cli(run_folder) == 0
    assert "[train] resumed" in logged(caplog_info)
    saved["config"]["model"]["hidden_sizes"] = [7]
    bn.io.save(path, saved)
    assert run_cli(run_folder) == 0
    assert "[train] checkpoint was made under another config" in logged(caplog_info)


def test_changed_pruning_settings_rerun_only_the_stages_that_depend_on_them(
    run_folder, caplog_info
):
    # changing the pruning settings keeps the training and SGLD checkpoints, not pruning's;
    # with the chains' moments, every chain's own curve comes too
    assert run_cli(run_folder, "prune.num_fractions=4", "prune.moments=sgld") == 0
    third = logged(caplog_info)
    assert "[sgld] resumed" in third and "[prune] checkpoint was made under another config" in third
    res3 = json.loads((run_folder / "results.json").read_text())
    assert len(res3["curves"]["spr"]) == 4 and res3["pruning_moments"] == "sgld"
    chains = res3["per_chain"]  # the curves of each of the 2 chains' own moments
    for rule in ("snr", "spr", "magnitude"):
        per = np.asarray(chains["curves"][rule])
        assert per.shape == (2, 4) and np.all((per >= 0) & (per <= 1))
        np.testing.assert_allclose(per[:, 0], chains["unpruned"], atol=1e-6)
        assert len(chains["breakpoints"][rule]) == 2

    # longer fine-tuning reruns only the fine-tuning
    extra = ("prune.num_fractions=4", "prune.moments=sgld", "prune.finetune_epochs=2")
    assert run_cli(run_folder, *extra) == 0
    fourth = logged(caplog_info)
    assert "[prune] resumed" in fourth and "[soft_target] resumed" in fourth
    assert "[finetune] checkpoint was made under another config" in fourth


def test_a_garbage_checkpoint_in_a_run_folder_reruns_its_stage_with_a_warning(
    run_folder, caplog_info
):
    res = json.loads((run_folder / "results.json").read_text())
    garbage = run_folder / "checkpoints" / "prune.msgpack"
    garbage.write_bytes(b"\x93not a checkpoint\x00\xff")
    truncated = run_folder / "checkpoints" / "train.msgpack"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    assert run_cli(run_folder) == 0
    warnings = [r.getMessage() for r in caplog_info.records if r.levelno == logging.WARNING]
    for path in (garbage, truncated):
        assert any(str(path) in w for w in warnings), warnings
    text = logged(caplog_info)
    assert "[train] running" in text and "[prune] running" in text
    assert "[sgld] resumed" in text and "[finetune] resumed" in text
    res2 = json.loads((run_folder / "results.json").read_text())
    for rule, curve in res["curves"].items():
        np.testing.assert_allclose(res2["curves"][rule], curve, atol=1e-6)
    assert {"train", "prune"} <= set(res2["timings"]) and "sgld" not in res2["timings"]
    for path in (garbage, truncated):  # written again, whole
        assert set(bn.io.load(path)) == {"config", "value", "seconds"}


def strict_json(path):
    """The file read as strict JSON: NaN and Infinity are errors."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_unconverged_chains_stop_the_run_before_pruning_and_a_rerun_can_go_on(
    run_folder, caplog_info, capsys
):
    strict_json(run_folder / "results.json")
    capsys.readouterr()
    # the pruning scores read the chains' moments: unconverged chains stop the run
    chains = "prune.moments=sgld"
    assert run_cli(run_folder, chains, "eval.allow_unconverged=false") == 1
    err = capsys.readouterr().err
    assert "did not converge" in err and "max split R-hat" in err
    assert "eval.allow_unconverged=true" in err and "Traceback" not in err
    text = logged(caplog_info)
    assert "[sgld] resumed" in text and "[prune] running" not in text
    assert run_cli(run_folder, chains, "eval.allow_unconverged=true") == 0
    assert "[sgld] resumed" in logged(caplog_info)
    # the Laplace moments at EM's (Laplace) mode read no chain: the run goes on
    assert run_cli(run_folder, "eval.allow_unconverged=false") == 0
    res = strict_json(run_folder / "results.json")
    assert res["sgld"]["converged"] is False and res["pruning_moments"] == "laplace"


def test_results_are_strict_json_with_non_finite_numbers_as_null(caplog_info):
    from bayesnoise.pipeline.stages import to_json

    text = to_json({"a": float("nan"), "b": [1.0, np.float32("inf")], "c": {"d": np.int64(3)}})
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": {"d": 3}}
    assert "2 numbers were NaN or inf" in caplog_info.text and "b[1]" in caplog_info.text
