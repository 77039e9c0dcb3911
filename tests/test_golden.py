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
    # that order came in for wide layers; the cases above have no wide layer and were recorded
    # again when short rows took the same order.
    "ctre-sim-exact-wide": dict(method="ctre-sim", similarity="exact", epsilon=20.0),
    # Batches of 100: their rows are stored at a stride of 112 floats (packed.row_stride). Recorded
    # with the code before that stride, which stored them at 100: the padding changes no bit.
    "set-batch-100": dict(method="set", batch_size=100),
    "ctre-sim-exact-wide-batch-100": dict(method="ctre-sim", similarity="exact", epsilon=20.0, batch_size=100),
}

GOLDEN = {  # case: (digest of the model's arrays, sha256 of the ONNX graph)
    'ctre-seq-exact': ("5a5e81c6315425de3fd8130fbdc86cb9aeafe0b5ae46d0f9b53798d78b66c45c",
                       "4fc1d3ebf4966cb91e0e30dd4c8e442efd2fbfe2efabaea5a337f6ce416a087b"),
    'ctre-seq-sketch': ("413a620abdcf60e9f1436afde5f89875d01b0fb213daa1a5a21050a4504b169d",
                        "c2138fb44ede9a6d2f7ae76998e7e91d90abb288ad957c85df6dde5acf2da43f"),
    'ctre-sim-exact': ("82d4dbe2b36b345380eab37823ff6e5cffb29f65a9efec70f563996d6049adbc",
                       "03746b6b26df31b3a3b1f14d8ae381cd3a87c16fa550642d30c7531e63df7c8d"),
    'ctre-sim-exact-wide': ("a7042e74d81ddb1952f4d945c1566565ec365dbbdb57147316171aff3257b971",
                            "3d87d78c4288ef5088085d94c38f0e567f89590c51de669f25cdf5fd7107d73a"),
    'ctre-sim-sketch': ("5e83f36bb822aca8cf27950c17947a59ad6266e26e228401251e0f6ab1c340c2",
                        "24c4a02d597b389912e892b1553abbb0e9470555a3cbaf5206240146b7f8c862"),
    'set-batch-100': ("186709935881edf2a743dd2b44600b51b50c6af4a1cbbffa42ec08af8a944b8d",
                      "eda4203dc0c29970134c93a597860f1a007d1de579755d0be36917ab837d4c36"),
    'ctre-sim-exact-wide-batch-100': ("06d51f7b4d8effdff8a47a2b81612cf62ad5855909073724c4ca2f6196afe073",
                                      "2f5729e98d53a84ea90929bcd0fb6ba0292d5295dcfa4a72028c8559d6245cd8"),
    'set': ("bd2f1ef367e10df5407602956924b8b7848ddc16e2375d798363f2730c22a8cc",
            "b663bea57a3d1cc10809ad63be95b7f38b842c6320456b0801b0aea8240dbd1d"),
    'static': ("219e4dae9b2f0273f5c5a43ae987754e9143ad9a6474fe6aa7d88a900a0ac7f2",
               "82f06f16f2c7be6e5108c26244818ed80a985476142805e2e18791e4434d40e4"),
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
