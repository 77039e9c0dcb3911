"""Golden models: fixed seeds and settings must keep giving the same weights, topology and ONNX graph.

The hashes were recorded from the code before the sparse-aware initialisation and the run layer
were introduced; every config here spells out the settings of that time (Glorot initialisation
sized for the dense fan, lr 0.05, min-max scaling, no early stop), so a refactor or a new default
that changes what these settings produce fails here. Model files also carry a JSON header (the
full configuration, which gains fields as options are added), so the pin is on the arrays and the
ONNX graph, not on the header.
"""

import hashlib
import platform

import pytest

from ctre_edge.data import load_data
from ctre_edge.fileio import array_digest
from ctre_edge.train import TrainConfig, train

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                                reason="golden hashes were recorded on x86-64")

LEGACY = dict(hidden=(100, 100), epsilon=2.0, epochs=4, lr=0.05, scaling="minmax", seed=3, batch_size=50,
              similarity_samples=300, init="dense-glorot", early_stop=0)

CASES = {
    "static": dict(method="static"),
    "set": dict(method="set"),
    "ctre-sim-exact": dict(method="ctre-sim", similarity="exact"),
    "ctre-sim-sketch": dict(method="ctre-sim", similarity="sketch", sketch_dim=32),
    "ctre-seq-exact": dict(method="ctre-seq", similarity="exact", patience=1),
    "ctre-seq-sketch": dict(method="ctre-seq", similarity="sketch", sketch_dim=32, patience=1),
    # Every layer wide (8+ connections per row): the weight gradient in 16 lanes. Recorded when
    # that order came in; the cases above have no wide layer and kept their hashes through it.
    "ctre-sim-exact-wide": dict(method="ctre-sim", similarity="exact", epsilon=20.0),
}

GOLDEN = {  # case: (digest of the model's arrays, sha256 of the ONNX graph)
    'ctre-seq-exact': ("b75f3ce468c60107eda4c6ac277eff809eb3b0e21b4e1be6972b6a3f5edc75fd",
                       "b6088dcfc114563e4299773fd6f9f375976ef04a9d91c27dbeaab0145895fc99"),
    'ctre-seq-sketch': ("911334273643ffe1beb0ca63b1a52b08cec44c3b05b201e3962edc314b93a296",
                        "3c44f4ad331a0dd28f4490221b94b76a04f97ef7f6ca64395cd311637fc1e86f"),
    'ctre-sim-exact': ("616a1041facf19fd8b61f79079a02b50f390589d352035a9db494a6a10e9a9b5",
                       "70d9e7732b6d7054ee3012748001ee07a794e2be56b6f0d9f94df9b6544044a2"),
    'ctre-sim-exact-wide': ("a7042e74d81ddb1952f4d945c1566565ec365dbbdb57147316171aff3257b971",
                            "3d87d78c4288ef5088085d94c38f0e567f89590c51de669f25cdf5fd7107d73a"),
    'ctre-sim-sketch': ("4a4a11b1f907ccc62964de8f5ec338519e16290efc82135489bc04ee62d42515",
                        "ca316bc72694a20ab15f4ed0dfd97328641a2e70b085d4d2b0707a1a55224a17"),
    'set': ("494c99315ae06e0d6f8d4c35e42da72c254554ebf100d3b3063ca35f18a4682b",
            "262dc0c114404be4e6a1946d1af4462f7a914501574be1a278e932ab65c577ea"),
    'static': ("7a603b28bfb48f6243ede612b614d827ec0677413429792b5b2528a845654255",
               "385de1abd7c2746e2a174653f0a276e48b4263eab4b9974d087bf71a12101657"),
}


def legacy_config(**extra):
    return TrainConfig(**{**LEGACY, **extra})


@pytest.fixture(scope="module")
def digits():
    return load_data("builtin:digits")


def golden_digests(model):
    from ctre_edge.export import build_onnx

    proto = build_onnx(model, "sparse-ops")
    return array_digest(model.arrays()), hashlib.sha256(proto.graph.SerializeToString()).hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_model(case, digits):
    result = train(digits, legacy_config(**CASES[case]))
    assert golden_digests(result.model) == GOLDEN[case]
