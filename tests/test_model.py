import json
import zipfile

import numpy as np
import pytest

from ctre_edge.errors import ModelFileError, OutputExistsError
from ctre_edge.layers import erdos_renyi_layer
from ctre_edge.model import SparseMLP


@pytest.fixture
def model(rng):
    layers = [erdos_renyi_layer(12, 30, 2, rng), erdos_renyi_layer(30, 3, 2, rng)]
    return SparseMLP(layers, rng.normal(size=12).astype(np.float32), rng.random(12).astype(np.float32),
                     ["a", "b", "c"], {"method": "set", "epsilon": 2.0}, {"test_accuracy": 0.5})


def test_save_load_round_trip(model, tmp_path, rng):
    path = model.save(tmp_path / "m.ctre")
    loaded = SparseMLP.load(path)
    X = rng.normal(size=(20, 12)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    assert loaded.classes == ["a", "b", "c"] and loaded.config == model.config and loaded.metrics == model.metrics
    assert list(loaded.predict(X)) == list(model.predict(X))


def test_same_model_same_bytes(model, tmp_path):
    a = model.save(tmp_path / "a.ctre").read_bytes()
    b = model.save(tmp_path / "b.ctre").read_bytes()
    assert a == b


def test_refuses_to_overwrite_without_force(model, tmp_path):
    path = model.save(tmp_path / "m.ctre")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        model.save(path)
    assert path.read_bytes() == before
    model.save(path, force=True)


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_corrupt_or_foreign_file_is_refused(model, tmp_path, damage):
    path = model.save(tmp_path / "m.ctre")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "foreign":
        data = b"PK\x03\x04 not really a zip"
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError) as e:
        SparseMLP.load(path)
    assert "\n" not in str(e.value)


def test_every_single_byte_flip_is_detected(model, tmp_path):
    path = model.save(tmp_path / "m.ctre")
    data = path.read_bytes()
    for pos in range(0, len(data), max(1, len(data) // 300)):
        damaged = bytearray(data)
        damaged[pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        try:
            loaded = SparseMLP.load(path)
        except ModelFileError:
            continue
        # A flip in zip padding or a name's case may leave every array intact; then the model is unchanged.
        X = np.ones((2, 12), np.float32)
        np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


def test_newer_format_version_is_refused(model, tmp_path):
    path = model.save(tmp_path / "m.ctre")
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    meta = json.loads(members["meta.json"])
    meta["format_version"] = 99
    members["meta.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(ModelFileError, match="newer than this ctre-edge reads"):
        SparseMLP.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        SparseMLP.load(tmp_path / "nope.ctre")


def test_wrong_feature_count(model):
    with pytest.raises(ValueError, match="expects 12 features"):
        model.predict_proba(np.ones((3, 11), np.float32))
