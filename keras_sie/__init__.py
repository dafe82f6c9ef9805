"""keras_sie: sample importance estimation for Keras 3 (TensorFlow backend).

Scores every training sample by the normalized absolute gradient of its loss
with respect to its inputs, computed inside the compiled train step:

    I_i = sum_j |dJ_i/dX_ij| / sum_i sum_j |dJ_i/dX_ij|
"""

from keras_sie.callback import SampleImportance
from keras_sie.ids import split_ids, with_ids
from keras_sie.step_hook import record
from keras_sie.storage import CorruptRunError, Run, load

__version__ = "0.1.0"

__all__ = [
    "CorruptRunError",
    "Run",
    "SampleImportance",
    "__version__",
    "load",
    "record",
    "split_ids",
    "with_ids",
]
