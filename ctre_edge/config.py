"""Settings of a training run and the names every choice may take.

``TrainConfig`` holds every setting with its default; ``validate`` checks it against one table
(``RANGES``) with one message format. The choice tables (``METHODS``, ``SIMILARITIES``,
``SCALINGS``, ``INITS``, ``NAN_POLICIES``, ``KERNELS``) are the single list of names: the code dispatches on
them and the CLI takes its ``--method``/``--similarity``/... choices from them. This module imports
numpy alone, so a command can validate its settings (and refuse a run that does not fit) before
numba or onnx is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import ConfigError

METHODS = ("static", "set", "ctre-sim", "ctre-seq")  # topology policies (evolve.POLICIES)
SIMILARITIES = ("exact", "sketch")  # cosine scoring of ctre-*: blocked exact top-k or a random sketch
SCALINGS = ("auto", "minmax", "standard", "none")  # input scaling fitted on the training split (data.fit_scaling)
INITS = ("sparse", "dense-glorot")  # initial weights (layers.erdos_renyi_layer)
NAN_POLICIES = ("error", "zero", "mean", "median")  # NaN/Inf features (data.load_data)
KERNELS = ("auto", "sparse-ops", "dense", "sparse-initializer")  # ONNX per-layer compute (export.py)
EXPORT_FORMATS = ("onnx", "c")  # export targets (export.py, export_c.py)
QUANTIZATIONS = ("none", "int8")  # weights of the C export (export_c.py)


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults follow the paper where it has one.

    ``lr_drop_epoch`` None keeps the learning rate constant; otherwise lr is divided by 3 at that
    epoch and by 9 twenty epochs later. ``similarity_samples`` is the S of the cosine scoring.
    ``early_stop`` N ends the run after N epochs without a strictly better validation accuracy
    (0: run all ``epochs``); for ctre-seq the count starts again when growth switches to random.
    ``init`` is one of ``INITS``: "sparse" (per-neuron fan-in) or "dense-glorot" (the paper's).
    """

    hidden: tuple = (1000, 1000, 1000)
    method: str = "ctre-sim"
    epsilon: float = 1.0
    init: str = "sparse"
    zeta: float = 0.2
    epochs: int = 300
    early_stop: int = 30
    batch_size: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    l2: float = 1e-4
    lr_drop_epoch: int | None = None
    seed: int = 0
    scaling: str = "auto"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    patience: int = 40
    similarity: str = "exact"
    similarity_samples: int = 1000
    similarity_workspace_mib: int = 32
    sketch_dim: int = 256
    eval_batch_size: int = 1000

    def validate(self) -> "TrainConfig":
        """Check every field; raise ConfigError naming the argument, the allowed range and the value."""
        hidden = tuple(self.hidden)
        if not hidden or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1
                                 for h in hidden):
            raise ConfigError("'hidden' must be a non-empty list of positive ints, e.g. 1000,1000,1000; "
                              f"got {self.hidden!r}")
        self.hidden = tuple(int(h) for h in hidden)
        for name, kind, lo, hi in RANGES:
            value = getattr(self, name)
            if value is None and name in OPTIONAL:
                continue
            ok_type = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if kind is int \
                else isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            if not ok_type or not (lo <= value <= hi) or (kind is float and not math.isfinite(value)):
                raise ConfigError(f"'{name}' must be {'an int' if kind is int else 'a number'} in "
                                  f"[{lo}, {hi}]; got {value!r}")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"'{name}' must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "hidden" else v) for k, v in d.items() if k in known})


RANGES = [  # (field, type, low, high): one table, one message format
    ("epsilon", float, 1e-9, 1e9),
    ("zeta", float, 0.0, 1.0),
    ("epochs", int, 1, 10**7),
    ("early_stop", int, 0, 10**7),
    ("batch_size", int, 1, 10**7),
    ("lr", float, 0.0, 1e6),
    ("momentum", float, 0.0, 1.0),
    ("l2", float, 0.0, 1e6),
    ("lr_drop_epoch", int, 0, 10**7),
    ("seed", int, 0, 2**63 - 1),
    ("validation_fraction", float, 1e-9, 0.9),
    ("test_fraction", float, 0.0, 0.9),
    ("patience", int, 1, 10**7),
    ("similarity_samples", int, 1, 10**9),
    ("similarity_workspace_mib", int, 1, 10**6),
    ("sketch_dim", int, 1, 65536),
    ("eval_batch_size", int, 1, 10**7),
]
OPTIONAL = ("lr_drop_epoch",)  # fields whose None means "off"
CHOICES = {"method": METHODS, "scaling": SCALINGS, "similarity": SIMILARITIES, "init": INITS}
