"""keras_sie: sample importance estimation for Keras 3 (TensorFlow backend).

Scores every training sample by the normalized absolute gradient of its loss
with respect to its inputs, computed inside the compiled train step:

    I_i = sum_j |dJ_i/dX_ij| / sum_i sum_j |dJ_i/dX_ij|
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from keras_sie.score_record import EpochScores, ScoreRecord
from keras_sie.storage import CorruptRunError, load

__version__ = "0.1.0"

# Names that need TensorFlow are imported on first use, so that reading runs
# (`keras_sie.load`, the `keras-sie` command line) starts without loading it.
_LAZY = {
    "SampleImportance": "keras_sie.callback",
    "split_ids": "keras_sie.ids",
    "with_ids": "keras_sie.ids",
    "without_ids": "keras_sie.ids",
    "record": "keras_sie.adapters.keras3",
    "prepare_distributed": "keras_sie.adapters.keras3",
    "ImportanceSampler": "keras_sie.actions",
    "select": "keras_sie.actions",
    "to_sample_weight": "keras_sie.actions",
    "export_run": "keras_sie.export",
}

if TYPE_CHECKING:  # for type checkers and IDEs
    from keras_sie.actions import ImportanceSampler, select, to_sample_weight
    from keras_sie.adapters.keras3 import prepare_distributed, record
    from keras_sie.callback import SampleImportance
    from keras_sie.export import export_run
    from keras_sie.ids import split_ids, with_ids, without_ids


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_sie' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CorruptRunError",
    "EpochScores",
    "ImportanceSampler",
    "SampleImportance",
    "ScoreRecord",
    "__version__",
    "export_run",
    "load",
    "prepare_distributed",
    "record",
    "select",
    "split_ids",
    "to_sample_weight",
    "with_ids",
    "without_ids",
]
