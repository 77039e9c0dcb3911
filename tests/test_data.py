import gzip
import io
import os
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctre_edge import data as data_module
from ctre_edge.data import inspect_data, load_data, make_dataset, stratified_split, summarize_data
from ctre_edge.errors import ConfigError, DataError
from ctre_edge.io import cache as parse_cache
from ctre_edge.io import delimited


@pytest.fixture(scope="module")
def digits():
    return load_data("builtin:digits")


# ---------------------------------------------------------------- writers

def write_csv(path, X, y, *, header=True, delim=",", label="label"):
    with open(path, "w") as f:
        if header:
            f.write(delim.join([f"f{i}" for i in range(X.shape[1])] + [label]) + "\n")
        for row, lab in zip(X.tolist(), y.tolist()):
            f.write(delim.join(map(str, row + [lab])) + "\n")
    return path


def write_libsvm(path, X, y):
    with open(path, "w") as f:
        for k, (row, lab) in enumerate(zip(X.tolist(), y.tolist())):
            # the last index once, so the width is X's even if its last column is all zeros
            pairs = [f"{j + 1}:{v}" for j, v in enumerate(row) if v or (k == 0 and j == len(row) - 1)]
            f.write(" ".join([str(lab), *pairs]) + "\n")
    return path


def idx_bytes(a: np.ndarray, code=0x08) -> bytes:
    return bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(">u1").tobytes()


def write_idx(path, a):
    raw = idx_bytes(a)
    Path(path).write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return path


def one_line(e) -> str:
    message = str(e.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---------------------------------------------------------------- round trips

def _sources(tmp, X, y):
    np.savez(tmp / "d.npz", X=X, y=y)
    write_idx(tmp / "train-images-idx3-ubyte", X.reshape(-1, 8, 8))
    write_idx(tmp / "train-labels-idx1-ubyte", y)
    write_idx(tmp / "t10k-images-idx3-ubyte.gz", X.reshape(-1, 8, 8))
    write_idx(tmp / "t10k-labels-idx1-ubyte.gz", y)
    return {
        "npz": tmp / "d.npz",
        "csv": write_csv(tmp / "h.csv", X, y),
        "csv-no-header": write_csv(tmp / "n.csv", X, y, header=False),
        "tsv": write_csv(tmp / "d.tsv", X, y, delim="\t"),
        "txt": write_csv(tmp / "d.txt", X, y, delim=" ", header=False),
        "libsvm": write_libsvm(tmp / "d.libsvm", X, y),
        "idx": tmp / "train-images-idx3-ubyte",
        "idx-pair": f"{tmp / 'train-images-idx3-ubyte'},{tmp / 'train-labels-idx1-ubyte'}",
        "idx-gz": tmp / "t10k-images-idx3-ubyte.gz",
    }


def test_every_format_loads_the_same_arrays(digits, tmp_path):
    X, y = digits.X, digits.y
    assert X.dtype == np.uint8 and y.dtype == np.int64
    for kind, spec in _sources(tmp_path, X, y).items():
        for cache in (False, True, True):  # no cache, writing it, reading it
            d = load_data(str(spec), cache=cache)
            assert d.X.dtype == np.uint8 and d.X.flags.c_contiguous, kind
            assert np.array_equal(d.X, X) and np.array_equal(d.y, y) and d.y.dtype == np.int64, kind
            assert d.classes == digits.classes and all(type(c) is int for c in d.classes), kind
            s = summarize_data(str(spec))
            assert (s.n_samples, s.n_features, s.n_classes) == (1797, 64, 10), kind
            assert s.min_bytes <= d.nbytes, kind


def test_float_features_load_as_float32(tmp_path):
    X = np.array([[0.5, 1.0], [2.0, 3.25], [1e-3, 7.0], [4.0, 300.0]])
    y = np.array([0, 1, 0, 1])
    d = load_data(write_csv(tmp_path / "f.csv", X, y), cache=False)
    assert d.X.dtype == np.float32 and np.array_equal(d.X, X.astype(np.float32))
    d = load_data(write_csv(tmp_path / "g.csv", np.array([[1, 256], [0, 3], [4, 5], [6, 7]]), y), cache=False)
    assert d.X.dtype == np.float32 and d.X[0, 1] == 256
    # integer arrays given to the API also end as uint8 or float32 (the kernels' two dtypes)
    assert make_dataset(np.arange(8, dtype=np.int64).reshape(4, 2), y).X.dtype == np.uint8
    assert make_dataset(np.arange(8, dtype=np.int64).reshape(4, 2) * 100, y).X.dtype == np.float32


def test_string_labels_and_the_target_column(tmp_path):
    text = "species,w,h\ncat,1,2\ndog,3,4\n bird ,5,6\ncat,7,8\n"
    (tmp_path / "a.csv").write_text(text)
    for target in ("species", 0, -3, "0"):
        d = load_data(str(tmp_path / "a.csv"), target=target, cache=False)
        assert d.classes == ["bird", "cat", "dog"]
        assert d.y.tolist() == [1, 2, 0, 1] and d.X.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    (tmp_path / "b.csv").write_text("w,h,z\n1,2,3\n4,5,6\n7,8,9\n")
    d = load_data(str(tmp_path / "b.csv"), target="h", cache=False)  # a middle column as the label
    assert d.classes == [2, 5, 8] and d.X.tolist() == [[1, 3], [4, 6], [7, 9]]
    (tmp_path / "q.csv").write_text('"x","y","kind"\n1,2,"a, b"\n3,4,"c"\n')
    assert load_data(str(tmp_path / "q.csv"), cache=False).classes == ["a, b", "c"]
    (tmp_path / "long.csv").write_text("".join(f"{i},{'z' * 40}{i % 2}\n" for i in range(4)))
    assert load_data(str(tmp_path / "long.csv"), cache=False).classes == ["z" * 40 + "0", "z" * 40 + "1"]


def test_header_detection(tmp_path):
    (tmp_path / "a.csv").write_text("1,2,0\n3,4,1\n")
    assert load_data(str(tmp_path / "a.csv"), cache=False).X.shape == (2, 2)
    (tmp_path / "b.csv").write_text("a,b,c\n1,2,0\n3,4,1\n")
    assert load_data(str(tmp_path / "b.csv"), cache=False).X.shape == (2, 2)
    (tmp_path / "c.csv").write_text("1,2,cat\n3,4,dog\n")  # string labels are not a header
    assert load_data(str(tmp_path / "c.csv"), cache=False).X.shape == (2, 2)
    (tmp_path / "d.txt").write_text("a;b;c\n\n1;2;x\n3;4;y\n")  # sniffed delimiter, blank line
    assert load_data(str(tmp_path / "d.txt"), cache=False).X.tolist() == [[1, 2], [3, 4]]
    (tmp_path / "e.csv").write_bytes('\ufeff"a","b","y"\r\n"1","2",0\r\n3,4,1\r\n'.encode())  # BOM, CRLF, quotes
    assert load_data(str(tmp_path / "e.csv"), target="y", cache=False).X.tolist() == [[1, 2], [3, 4]]


def test_separate_test_file(digits, tmp_path):
    X, y = digits.X, digits.y
    train = write_csv(tmp_path / "train.csv", X[:1500], y[:1500])
    test = write_csv(tmp_path / "test.csv", X[1500:], y[1500:])
    d = load_data(str(train), test_spec=str(test), cache=False)
    assert np.array_equal(d.X_test, X[1500:]) and np.array_equal(d.y_test, y[1500:])
    # any format for the test file; a test file with fewer classes keeps the training codes
    keep = y[1500:] >= 5
    write_libsvm(tmp_path / "test.libsvm", X[1500:][keep], y[1500:][keep])
    d = load_data(str(train), test_spec=str(tmp_path / "test.libsvm"), cache=False)
    assert np.array_equal(d.X_test, X[1500:][keep]) and np.array_equal(d.y_test, y[1500:][keep])
    # a LIBSVM test file whose highest index is lower than the training width is padded
    (tmp_path / "tr.svm").write_text("1 1:1 5:2\n2 2:3\n")
    (tmp_path / "te.svm").write_text("2 1:4\n")
    d = load_data(str(tmp_path / "tr.svm"), test_spec=str(tmp_path / "te.svm"), cache=False)
    assert d.X_test.tolist() == [[4, 0, 0, 0, 0]] and d.y_test.tolist() == [1]
    s = summarize_data(str(train), test_spec=str(test))
    assert (s.n_samples, s.n_test) == (1500, 297) and s.min_bytes <= d.nbytes + 10 ** 9


def test_test_labels_must_be_seen_in_training(tmp_path):
    (tmp_path / "tr.csv").write_text("1,2,cat\n3,4,dog\n")
    (tmp_path / "te.csv").write_text("1,2,cat\n3,4,emu\n5,6,fox\n")
    with pytest.raises(DataError, match=r"te.csv: has label\(s\) \['emu', 'fox'\] never seen in training") as e:
        load_data(str(tmp_path / "tr.csv"), test_spec=str(tmp_path / "te.csv"), cache=False)
    one_line(e)
    (tmp_path / "wide.csv").write_text("1,2,3,cat\n")
    with pytest.raises(DataError, match="has 3 features but the training data has 2"):
        load_data(str(tmp_path / "tr.csv"), test_spec=str(tmp_path / "wide.csv"), cache=False)
    (tmp_path / "wide.svm").write_text("1 9:1\n")
    (tmp_path / "tr.svm").write_text("1 1:1\n2 2:1\n")
    with pytest.raises(DataError, match="has feature index 9 but the training data has 2 features"):
        load_data(str(tmp_path / "tr.svm"), test_spec=str(tmp_path / "wide.svm"), cache=False)


def test_nan_policies_use_training_statistics_only(tmp_path):
    (tmp_path / "tr.csv").write_text("a,b,y\n1,,0\n3,10,1\nNaN,20,0\n5,NA,1\n7,90,1\n")
    (tmp_path / "te.csv").write_text("a,b,y\n,?,0\n2,inf,1\n")
    tr, te = str(tmp_path / "tr.csv"), str(tmp_path / "te.csv")
    with pytest.raises(DataError, match=r"tr.csv: has 3 NaN/Inf value\(s\), the first at line 2, column 'b'; "
                                        r"clean them or pass --nan-policy mean\|median\|zero") as e:
        load_data(tr, cache=False)
    one_line(e)
    expect = {"zero": (0, 0), "mean": (4, 40), "median": (4, 20)}  # from the training file only
    for policy, (fa, fb) in expect.items():
        d = load_data(tr, test_spec=te, nan_policy=policy, cache=False)
        assert d.X.tolist() == [[1, fb], [3, 10], [fa, 20], [5, fb], [7, 90]], policy
        assert d.X_test.tolist() == [[fa, fb], [2, fb]], policy
        assert d.X.dtype == np.uint8  # byte-valued after imputation
    with pytest.raises(ConfigError, match="'nan_policy' must be one of error, zero, mean, median"):
        load_data(tr, nan_policy="drop")
    np.savez(tmp_path / "n.npz", X=np.array([[1.0, np.nan], [2.0, 3.0]]), y=[0, 1])
    with pytest.raises(DataError, match=r"has 1 NaN/Inf value\(s\), the first at X\[0, 1\]"):
        load_data(str(tmp_path / "n.npz"))
    assert load_data(str(tmp_path / "n.npz"), nan_policy="mean").X.tolist() == [[1, 3], [2, 3]]


def test_inspect_data(tmp_path):
    (tmp_path / "tr.csv").write_text("a,b,c,y\n1,,5,x\n3,10,5,y\n2,1.5,5,y\n")
    (tmp_path / "te.csv").write_text("a,b,c,y\n4,4,5,y\n")
    doc = inspect_data(str(tmp_path / "tr.csv"), test_spec=str(tmp_path / "te.csv"), cache=False)
    assert doc["n_samples"] == 3 and doc["n_features"] == 3 and doc["dtype"] == "float32"
    assert doc["classes"] == {"x": 1, "y": 2} and doc["n_classes"] == 2
    assert doc["nan_count"] == 1 and (doc["min"], doc["max"]) == (1.0, 10.0) and doc["constant_features"] == 1
    assert doc["nbytes"] == 3 * 3 * 4 + 3 * 8 + 3 * 1 + 8 and doc["test"]["dtype"] == "uint8"
    assert doc["test"]["n_samples"] == 1 and doc["test"]["classes"] == {"x": 0, "y": 1}
    doc = inspect_data(str(tmp_path / "tr.csv"), nan_policy="zero", cache=False)
    assert doc["nan_count"] == 1 and doc["min"] == 0 and doc["test"] is None


# ---------------------------------------------------------------- errors

def _errors(tmp):
    bad_idx = bytearray(idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    bad_idx[2] = 0x07
    (tmp / "bad-images-idx3-ubyte").write_bytes(bytes(bad_idx))
    (tmp / "short-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-3])
    (tmp / "short-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    (tmp / "gz-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-3]))
    (tmp / "gz-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    write_idx(tmp / "n-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    write_idx(tmp / "n-labels-idx1-ubyte", np.arange(2))
    write_idx(tmp / "lonely-images-idx3-ubyte", np.zeros((3, 2, 2), np.uint8))
    files = {
        "empty.csv": "",
        "blank.csv": "\n \n",
        "ragged.csv": "a,b,c\n1,2,0\n3,4,1\n5,6\n",
        "wide.csv": "1,2,0\n3,4,5,1\n",
        "word.csv": "a,pixel7,y\n1,2,0\n3,abc,1\n",
        "nohead.csv": "1,2,0\n3,x,1\n",
        "inf.csv": "1,2,0\n3,inf,1\n",
        "single.csv": "1,2,7\n3,4,7\n",
        "headeronly.csv": "a,b,y\n",
        "nolabel.csv": "a,b,y\n1,2,\n3,4,1\n",
        "one.csv": "1\n2\n",
        "bad.libsvm": "1 1:2\n0 x:1 2:3\n",
        "zero.libsvm": "1 0:2\n",
        "dup.libsvm": "1 1:2\n0 2:1 2:3\n",
        "float.libsvm": "1 1:2\n0 1.5:1\n",
        "data.xlsx": "x",
        "d.txt": "a b c\nd e\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "latin1.csv").write_bytes("a,b,y\n1,2,caf\xe9\n".encode("latin-1"))
    (tmp / "x.npz").write_bytes(b"PK\x03\x04garbage")
    np.savez(tmp / "noy.npz", X=np.zeros((2, 2)))
    t = str(tmp)
    return [
        (f"{t}/missing.csv", {}, "missing.csv not found; check the path"),
        (t, {}, "is a directory"),
        (f"{t}/empty.csv", {}, "empty.csv: the file is empty"),
        (f"{t}/blank.csv", {}, "blank.csv: the file is empty or has only blank lines"),
        (f"{t}/ragged.csv", {}, "ragged.csv: line 4 has 2 fields, expected 3; every line needs"),
        (f"{t}/wide.csv", {}, "wide.csv: line 2 has 4 fields, expected 3"),
        (f"{t}/word.csv", {},
         "word.csv: line 3, column 'pixel7': 'abc' is not a number; fix the value, or pass --target"),
        (f"{t}/nohead.csv", {}, "nohead.csv: line 2, column 2: 'x' is not a number"),
        (f"{t}/inf.csv", {}, r"inf.csv: has 1 NaN/Inf value\(s\), the first at line 2, column 2; clean them or pass "
                             r"--nan-policy mean\|median\|zero"),
        (f"{t}/single.csv", {}, r"single.csv: has a single class \(7\); a classifier needs at least two"),
        (f"{t}/headeronly.csv", {}, "has a header but no data rows"),
        (f"{t}/nolabel.csv", {}, "nolabel.csv: line 2, column 'y': the label is empty"),
        (f"{t}/one.csv", {}, "one.csv: line 1 has 1 field; a data file needs feature columns and a label column"),
        (f"{t}/ragged.csv", {"target": "label"}, r"target column 'label' not found among the columns 'a', 'b', 'c'"),
        (f"{t}/single.csv", {"target": "label"}, "target column 'label' not found: the file has no header row"),
        (f"{t}/single.csv", {"target": 3}, r"target column index 3 is out of range for 3 columns; use 0..2 or -3..-1"),
        (f"{t}/single.csv", {"target": 1.5}, "target must be a column name or index"),
        (f"{t}/latin1.csv", {}, "latin1.csv: is not UTF-8 text"),
        (f"{t}/data.xlsx", {}, r"data.xlsx: unsupported data format '.xlsx'; use one of: builtin:NAME, .npz, .csv"),
        (f"{t}/d.txt", {}, "cannot tell the delimiter of this .txt file"),
        (f"{t}/bad.libsvm", {}, "bad.libsvm: line 2: bad token 'x:1'; LIBSVM features are index:value"),
        (f"{t}/zero.libsvm", {}, "zero.libsvm: line 1: bad token '0:2'"),
        (f"{t}/float.libsvm", {}, "float.libsvm: line 2: bad token '1.5:1'"),
        (f"{t}/dup.libsvm", {}, "dup.libsvm: line 2: feature index 2 appears twice"),
        (f"{t}/bad-images-idx3-ubyte", {},
         r"labels file bad-labels-idx1-ubyte not found .*give both files as IMAGES,LABELS"),
        (f"{t}/bad-images-idx3-ubyte,{t}/short-labels-idx1-ubyte", {}, "not an IDX file \\(magic bytes 00000703\\)"),
        (f"{t}/short-images-idx3-ubyte", {}, "short-images-idx3-ubyte: is truncated: dimensions \\(3, 2, 2\\) need 12 "
                                             "bytes, the file has 9; download the file again"),
        (f"{t}/gz-images-idx3-ubyte.gz", {}, "is truncated: dimensions \\(3, 2, 2\\) need 12 bytes, got 9"),
        (f"{t}/n-images-idx3-ubyte", {}, "has 3 images but n-labels-idx1-ubyte has 2 labels"),
        (f"{t}/lonely-images-idx3-ubyte", {}, "labels file lonely-labels-idx1-ubyte not found"),
        (f"{t}/x.npz", {}, "x.npz: cannot read as .npz"),
        (f"{t}/noy.npz", {}, r"noy.npz: missing array\(s\) y"),
        ("builtin:nope", {}, "unknown built-in data set 'nope'"),
        (f"{t}/a.csv,{t}/b.csv", {}, "a comma joins two files only for IDX data"),
    ]


def test_error_messages_are_one_line_and_say_what_to_do(tmp_path):
    for spec, kwargs, message in _errors(tmp_path):
        with pytest.raises(DataError, match=message) as e:
            load_data(spec, cache=False, **kwargs)
        one_line(e)
        try:  # header-only summaries (npz, IDX) may not see the problem; if they do, same rules
            summarize_data(spec, cache=False, **kwargs)
        except DataError as e:
            assert "\n" not in str(e)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write_csv(tmp_path / "d.csv", np.eye(2, dtype=np.uint8), np.arange(2))
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"d.csv: cannot read the file \(Permission denied\)") as e:
            load_data(str(path))
        one_line(e)
    finally:
        path.chmod(0o644)


def test_too_few_samples_for_a_stratified_split(rng):
    with pytest.raises(DataError, match="class 1 has 1 sample") as e:
        stratified_split(np.array([0, 0, 0, 1]), 0.5, rng)
    one_line(e)


# ---------------------------------------------------------------- shared data sets

@pytest.mark.parametrize("name, shape, n_test, n_classes", [
    ("mnist", (60000, 784), 10000, 10), ("madelon", (2000, 500), 600, 2),
    ("coil20", (1440, 1024), 0, 20), ("pcmac", (1943, 3289), 0, 2)])
def test_shared_datasets(name, shape, n_test, n_classes):
    path = shared_dataset(f"{name}.npz")
    s = summarize_data(str(path))
    assert (s.n_samples, s.n_features, s.n_test, s.n_classes) == (*shape, n_test, n_classes)
    d = load_data(str(path))
    assert d.X.shape == shape and len(d.classes) == n_classes and d.X.dtype in (np.uint8, np.float32)
    assert (0 if d.X_test is None else d.X_test.shape[0]) == n_test and s.min_bytes <= d.nbytes


# ---------------------------------------------------------------- summaries of large text files

def test_large_file_summaries_are_lower_bounds(digits, tmp_path, monkeypatch):
    X, y = digits.X[:300].astype(np.float32) / 2, digits.y[:300]  # float32 once loaded
    sources = [write_csv(tmp_path / "a.csv", X, y), write_csv(tmp_path / "b.tsv", X, y, delim="\t", header=False),
               write_libsvm(tmp_path / "c.libsvm", X, y)]
    monkeypatch.setattr(data_module, "_SMALL_TEXT", 0)  # scan instead of parsing
    for spec in sources:
        s = summarize_data(str(spec), cache=False)
        d = load_data(str(spec), cache=False)
        assert (s.n_samples, s.n_classes) == (300, 10) and s.n_features <= 64 and s.min_bytes <= d.nbytes
        assert s.min_bytes >= d.nbytes // 4  # not uselessly low


# ---------------------------------------------------------------- the cache

def _spy(monkeypatch):
    calls = []
    real = delimited.parse_delimited

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(delimited, "parse_delimited", spy)
    return calls


def test_cache_is_reused_and_invalidated(digits, tmp_path, monkeypatch):
    path = write_csv(tmp_path / "d.csv", digits.X, digits.y)
    calls = _spy(monkeypatch)
    first = load_data(str(path))
    cache = parse_cache.cache_dir([path])
    assert cache.parent == parse_cache.cache_root() and cache.name.startswith("d.csv-")
    assert not (tmp_path / "d.csv.ctre-cache").exists()  # nothing written beside the input unasked
    assert len(calls) == 1 and sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy", ".npy"]
    second = load_data(str(path))
    assert len(calls) == 1 and np.array_equal(first.X, second.X) and second.classes == first.classes
    second.X[0, 0] = 99  # copy-on-write: the cache file is not changed
    assert load_data(str(path)).X[0, 0] == first.X[0, 0] and len(calls) == 1

    load_data(str(path), target="f5")  # other options: another key, parsed again
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 1

    text = path.read_text().replace("\n0,", "\n1,", 1)  # same size, new content
    path.write_text(text)
    changed = load_data(str(path))
    assert len(calls) == 3 and changed.X[0, 0] == 1
    load_data(str(path))
    assert len(calls) == 3

    for npy in cache.glob("*.X.npy"):  # a damaged cache is ignored and rebuilt
        npy.write_bytes(b"garbage")
    assert np.array_equal(load_data(str(path)).X, changed.X) and len(calls) == 4
    load_data(str(path))
    assert len(calls) == 4


def test_cache_false_writes_nothing(digits, tmp_path, monkeypatch):
    path = write_csv(tmp_path / "d.csv", digits.X, digits.y)
    calls = _spy(monkeypatch)
    load_data(str(path), cache=False)
    load_data(str(path), cache=False)
    assert len(calls) == 2 and sorted(os.listdir(tmp_path)) == ["d.csv"]
    assert not parse_cache.cache_dir([path]).exists()


def test_cache_beside_the_input_only_when_asked(digits, tmp_path, monkeypatch):
    path = write_csv(tmp_path / "d.csv", digits.X, digits.y)
    calls = _spy(monkeypatch)
    load_data(str(path), cache="beside")
    beside = tmp_path / "d.csv.ctre-cache"
    assert sorted(p.suffix for p in beside.iterdir()) == [".json", ".npy", ".npy"]
    assert not parse_cache.cache_dir([path]).exists()  # the user cache is not written too
    assert np.array_equal(load_data(str(path), cache="beside").X, digits.X) and len(calls) == 1


def test_unwritable_cache_locations_never_fail_a_load(digits, tmp_path, monkeypatch, user_cache_home):
    """Independent of permissions (root ignores them): every location is a path mkdir cannot create."""
    path = write_csv(tmp_path / "d.csv", digits.X, digits.y)
    calls = _spy(monkeypatch)
    (tmp_path / "d.csv.ctre-cache").write_text("a file where the cache directory would go")
    load_data(str(path), cache="beside")  # beside is impossible: the user cache directory is used
    assert len(calls) == 1 and parse_cache.cache_dir([path], beside=False).is_dir()
    assert np.array_equal(load_data(str(path), cache="beside").X, digits.X) and len(calls) == 1
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))  # no user cache directory either
    for _ in range(2):
        assert np.array_equal(load_data(str(path), cache="beside").X, digits.X)
    assert len(calls) == 3  # parsed each time, no cache, no error


def test_read_only_directory_still_loads(digits, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    path = write_csv(ro / "d.csv", digits.X, digits.y)
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions (root); "
                        "test_unwritable_cache_locations_never_fail_a_load covers it without them")
        calls = _spy(monkeypatch)
        for cache in (True, "beside"):
            d = load_data(str(path), cache=cache)
            assert np.array_equal(d.X, digits.X)
        assert len(calls) == 1  # the beside request fell back to the user cache written by the first load
        assert not any(p.name.endswith(".npy") for p in ro.rglob("*"))
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------- memory

@pytest.mark.slow
def test_mnist_sized_csv_loads_within_twice_the_uint8_array(tmp_path):
    n, d = 60000, 784
    rng = np.random.default_rng(0)
    tokens = np.array([str(i) for i in range(256)], dtype=object)
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write(",".join([f"pixel{i}" for i in range(d)] + ["label"]) + "\n")
        for s in range(0, n, 2000):
            block = np.where(rng.random((2000, d)) < 0.2, rng.integers(0, 256, (2000, d)), 0)
            block = np.column_stack([block, rng.integers(0, 10, 2000)])
            f.write("\n".join(",".join(row) for row in tokens[block]) + "\n")
    tracemalloc.start()
    try:
        t = time.perf_counter()
        data = load_data(str(path), cache=False)
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.X.shape == (n, d) and data.X.dtype == np.uint8 and len(data.classes) == 10
    assert peak < 2 * data.X.nbytes, \
        f"peak {peak / 1e6:.1f} MB for a {data.X.nbytes / 1e6:.1f} MB array ({seconds:.1f} s)"


# ---------------------------------------------------------------- fuzz

_GOOD = ["0", "1", "2", "7", "255", "3.5", "-1", "1e3"]
_BAD = ["", "nan", "NA", "?", "inf", "1e400", "abc", '"x"', '"a,b"', "7\x00", "é", "1_0", " "]
_SVM_BAD = ["cat", "0:1", "x:1", "2:", ":3", "1:2:3", "qid:4", "#c", "2:nan", "9:1e400", "1.5:2", "3:abc"]


@st.composite
def malformed(draw):
    """Mostly well-formed files with a few bad tokens or bytes, so both outcomes are exercised."""
    kind = draw(st.sampled_from(["csv", "tsv", "txt", "libsvm", "idx", "npz", "bytes"]))
    token = st.sampled_from(_GOOD * 10 + _BAD)
    if kind in ("csv", "tsv", "txt"):
        delim = {"csv": ",", "tsv": "\t"}.get(kind) or draw(st.sampled_from([",", " ", ";"]))
        width = draw(st.integers(1, 4))
        ragged = draw(st.booleans()) and draw(st.booleans())
        rows = draw(st.lists(st.lists(token, min_size=1 if ragged else width, max_size=5 if ragged else width),
                             max_size=8))
        rows = [r + [draw(st.sampled_from(["0", "1", "a", "b", ""]))] for r in rows]
        return kind, "\n".join(delim.join(r) for r in rows).encode()
    if kind == "libsvm":
        pair = st.builds(lambda i, v: f"{i}:{v}", st.integers(1, 6), st.sampled_from(_GOOD))
        line = st.lists(st.one_of(pair, pair, pair, st.sampled_from(_SVM_BAD)), max_size=4)
        rows = draw(st.lists(st.tuples(st.sampled_from(["0", "1", "+1", "-1", "x"]), line), max_size=8))
        return kind, "\n".join(" ".join([lab, *toks]) for lab, toks in rows).encode()
    if kind == "idx":
        dims = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
        code = draw(st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0B, 0x0D, 0x0E, 0x07]))
        itemsize = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0D: 4, 0x0E: 8}.get(code, 1)
        head = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
        size = int(np.prod(dims)) * itemsize if dims else 0
        body = draw(st.binary(min_size=size, max_size=size)) + draw(st.binary(max_size=2))
        return kind, (head + body)[:draw(st.integers(0, len(head) + len(body)))] if draw(st.booleans()) else head + body
    if kind == "npz":
        buf = io.BytesIO()
        n = draw(st.integers(1, 4))
        np.savez(buf, X=np.arange(n * 2, dtype=draw(st.sampled_from(["f8", "i4", "u1"]))).reshape(n, 2),
                 y=np.arange(n) % 2)
        raw = bytearray(buf.getvalue())
        for _ in range(draw(st.integers(0, 3))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return kind, bytes(raw[:draw(st.integers(0, len(raw)))]) if draw(st.booleans()) else bytes(raw)
    return draw(st.sampled_from(["csv", "libsvm", "idx", "npz"])), draw(st.binary(max_size=200))


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed(), labels=st.binary(max_size=40))
def test_malformed_input_ends_in_a_dataset_or_a_one_line_error(case, labels):
    kind, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        name = {"idx": "f-images-idx3-ubyte"}.get(kind, f"f.{kind}")
        path = Path(tmp) / name
        path.write_bytes(raw)
        if kind == "idx":  # labels for as many images as the header says, or random bytes
            n = min(struct.unpack(">I", raw[4:8])[0] if len(raw) >= 8 else 3, 9)
            (Path(tmp) / "f-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(n) % 3) if not labels else labels)
        for cache in (True, False):
            try:
                d = load_data(str(path), cache=cache)
            except DataError as e:
                assert "\n" not in str(e) and str(e)
                d = None
            try:
                s = summarize_data(str(path), cache=cache)
            except DataError as e:
                assert "\n" not in str(e) and str(e)
                s = None
            if d is not None:
                assert d.X.dtype in (np.uint8, np.float32) and d.X.flags.c_contiguous and len(d.classes) >= 2
                assert s is not None and s.min_bytes <= d.nbytes and s.n_samples == d.X.shape[0]


def test_every_format_trains_to_the_same_model(digits, tmp_path):
    """Issue 6 acceptance: npz, csv, libsvm and idx of the same data give the same model, bit for bit."""
    from ctre_edge.train import TrainConfig, train

    config = dict(hidden=(32,), epsilon=3, epochs=3, seed=5)
    models = {}
    for kind, spec in _sources(tmp_path, digits.X, digits.y).items():
        if kind in ("npz", "csv", "libsvm", "idx-pair"):
            models[kind] = train(load_data(str(spec)), TrainConfig(**config)).model.save(tmp_path / f"{kind}.ctre")
    first = models.pop("npz").read_bytes()
    for kind, path in models.items():
        assert path.read_bytes() == first, kind


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=malformed())
def test_malformed_input_through_the_cli_is_one_line_and_writes_nothing(case):
    from typer.testing import CliRunner

    from ctre_edge.cli import app

    kind, raw = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ({"idx": "f-images-idx3-ubyte"}.get(kind, f"f.{kind}"))
        path.write_bytes(raw)
        out = Path(tmp) / "out" / "m.ctre"
        out.parent.mkdir()
        for args in (["data", "inspect", str(path)],
                     ["train", "--data", str(path), "--hidden", "4", "--epochs", "1", "--quiet", "--no-cache",
                      "--out", str(out)]):
            r = CliRunner().invoke(app, args)
            if r.exit_code != 0:
                assert r.exit_code in (2, 4), (args, r.exit_code, r.stderr)
                assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
                assert not out.exists() and not any(out.parent.iterdir())
