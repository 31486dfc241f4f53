"""Stage checkpoints of a run folder: a stage's value with the config settings it depends on.

Each finished stage is saved as ``OUT/checkpoints/STAGE.msgpack`` by :mod:`bayesnoise.io`
(``{"config": the settings it depends on, "value": its value}``). A checkpoint that cannot be
read (truncated, corrupt) counts as missing: the stage runs again, with a warning. Pickles left
by older versions (``STAGE.pkl``) are never read.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax

from bayesnoise import io as bio
from bayesnoise.pipeline import config as bconfig

_log = logging.getLogger("bayesnoise")

# The config sections each stage depends on: changing others keeps its checkpoint valid.
_POSTERIOR = ("data", "model", "noise", "train", "sgld", "em")
_GRID = ("prune.num_fractions", "prune.fractions")
_MASKS = ("prune.rules", *_GRID, "prune.scope", "prune.include_biases", "prune.moments")
_DEPENDS = {
    "train": ("data", "model", "noise", "train"),
    "reference": ("data", "model", "train"),
    "sgld": _POSTERIOR,
    "sgld_reference": ("data", "model", "train", "sgld", "em.sigma0"),
    "prune": (*_POSTERIOR, *_MASKS, "eval"),
    "soft_target": (*_POSTERIOR, *_GRID, "prune.soft_target", "prune.moments"),
    "finetune": (*_POSTERIOR, *_MASKS, "prune.finetune_epochs", "prune.finetune_learning_rate"),
    "iterative": (*_POSTERIOR, *_MASKS, "prune.iterative"),
}


# fields of a section that only one stage reads: the other stages that depend on the whole
# section ignore them (a longer run of the noise-free network's chains keeps the posterior)
_ONLY = {"sgld.reference_max_steps": "sgld_reference"}


def _setting(cfg: dict, key: str, stage: str | None = None) -> Any:
    """A config section ("prune") or one field of it ("em.sigma0") of a config dict, as
    ``stage`` reads it (without the section's fields that only another stage reads)."""
    section, _, field = key.partition(".")
    value = cfg.get(section)
    if not isinstance(value, dict):
        return value
    if field:
        return value.get(field)
    others = {f.partition(".")[2] for f, s in _ONLY.items() if f.startswith(f"{section}.")}
    return {k: v for k, v in value.items() if k not in others or _ONLY[f"{section}.{k}"] == stage}


class Checkpoints:
    def __init__(self, out: Path, cfg: dict, resume: bool):
        self.dir = out / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.resume = resume
        self.seconds: dict[str, float | None] = {}  # stage -> its run time, read with its value

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.msgpack"

    def load(self, stage: str):
        path = self.path(stage)
        if not self.resume:
            return None
        if not path.exists():
            old = path.with_suffix(".pkl")
            if old.exists():
                _log.info("[%s] %s is a pickle of an older version, not read", stage, old)
            return None
        try:
            saved = bio.load(path)
        except (OSError, ValueError) as e:
            _log.warning(
                "[%s] cannot read the checkpoint %s (%s): running it again", stage, path, e
            )
            return None
        if not (isinstance(saved, dict) and "value" in saved):
            _log.warning("[%s] %s is not a stage checkpoint: running it again", stage, path)
            return None
        if self._as_now(saved.get("config"), stage) != self._relevant(stage):
            _log.info("[%s] checkpoint was made under another config: running it again", stage)
            return None
        _log.info("[%s] resumed from %s", stage, path)
        seconds = saved.get("seconds")
        self.seconds[stage] = float(seconds) if isinstance(seconds, (int, float)) else None
        return saved["value"]

    def _relevant(self, stage: str) -> dict:
        return {key: _setting(self.cfg, key, stage) for key in _DEPENDS[stage]}

    def _as_now(self, saved: Any, stage: str) -> dict | None:
        """A saved stage's settings read by today's config schema: fields added since it was
        saved take their defaults, so a checkpoint stays valid when only those are new."""
        if not isinstance(saved, dict):
            return None
        merged = dict(self.cfg)
        for key, value in saved.items():
            section, _, field = key.partition(".")
            if field:
                merged[section] = {**(merged.get(section) or {}), field: value}
            else:
                merged[section] = value
        try:
            full = bconfig.load_config(merged).to_dict()
        except (bconfig.ConfigError, TypeError):
            return None
        return {key: _setting(full, key, stage) for key in saved}

    def save(self, stage: str, value: Any, seconds: float | None = None) -> None:
        saved = {"config": self._relevant(stage), "value": value}
        if seconds is not None:
            saved["seconds"] = seconds
        bio.save(self.path(stage), saved)


def staged(ckpt: Checkpoints, timings: dict, stage: str, fn, seconds: dict | None = None):
    """The stage's value: its checkpoint's, or ``fn()`` run, timed and saved. ``timings`` gets
    the seconds of the stages run now; ``seconds``, if given, every stage's run time, read from
    the checkpoint of a resumed stage (None for checkpoints saved without it)."""
    value = ckpt.load(stage)
    if value is not None:
        if seconds is not None:
            seconds[stage] = ckpt.seconds.get(stage)
        return value
    _log.info("[%s] running", stage)
    t0 = time.perf_counter()
    value = jax.device_get(fn())
    timings[stage] = round(time.perf_counter() - t0, 2)
    if seconds is not None:
        seconds[stage] = timings[stage]
    ckpt.save(stage, value, timings[stage])
    return value
