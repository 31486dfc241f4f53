"""Stage checkpoints of a run folder: a stage's value with the config settings it depends on."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import jax

from bayesnoise.pipeline import config as bconfig

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
}


def _setting(cfg: dict, key: str) -> Any:
    """A config section ("prune") or one field of it ("em.sigma0") of a config dict."""
    section, _, field = key.partition(".")
    value = cfg.get(section)
    return value.get(field) if field and isinstance(value, dict) else value


class Checkpoints:
    def __init__(self, out: Path, cfg: dict, resume: bool):
        self.dir = out / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.resume = resume

    def load(self, stage: str):
        path = self.dir / f"{stage}.pkl"
        if not (self.resume and path.exists()):
            return None
        with open(path, "rb") as f:
            saved = pickle.load(f)
        if self._as_now(saved.get("config")) != self._relevant(stage):
            print(f"[{stage}] checkpoint was made under another config: running it again")
            return None
        print(f"[{stage}] resumed from {path}")
        return saved["value"]

    def _relevant(self, stage: str) -> dict:
        return {key: _setting(self.cfg, key) for key in _DEPENDS[stage]}

    def _as_now(self, saved: Any) -> dict | None:
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
        return {key: _setting(full, key) for key in saved}

    def save(self, stage: str, value: Any) -> None:
        path = self.dir / f"{stage}.pkl"
        partial = path.with_suffix(".part")
        with open(partial, "wb") as f:
            pickle.dump({"config": self._relevant(stage), "value": jax.device_get(value)}, f)
        partial.replace(path)


def staged(ckpt: Checkpoints, timings: dict, stage: str, fn):
    value = ckpt.load(stage)
    if value is not None:
        return value
    print(f"[{stage}] running")
    t0 = time.perf_counter()
    value = jax.device_get(fn())
    timings[stage] = round(time.perf_counter() - t0, 2)
    ckpt.save(stage, value)
    return value
