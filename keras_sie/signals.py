"""Training-dynamics signals recorded in the same step as the input-gradient score.

Per-sample, from the y and y_pred the fused step already holds (no extra pass):

* `"loss"`: the sample's own loss, unreduced and before `sample_weight` /
  `class_weight` (multi-output: the `loss_weights`-weighted sum over outputs).
* `"el2n"`: ||p - y||_2 (Paul et al. 2021); binary: |p - y|.
* `"margin"`: log p_y - max_{k != y} log p_k (Pleiss et al. 2020); binary:
  (2y - 1) log(p / (1 - p)). From logits when the loss takes logits, else from
  the log of the (clipped) probabilities.
* `"confidence"`: p_y (binary: p if y = 1 else 1 - p), with its population
  standard deviation over visits (`"confidence_std"`, Swayamdipta et al. 2020).
* `"forgetting"`: correct -> incorrect transitions between consecutive visits
  (Toneva et al. 2019).

Everything here is pure TensorFlow on [B]-shaped tensors, usable without `fit`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

SIGNALS = ("loss", "el2n", "margin", "confidence", "forgetting")
CLASSIFICATION_SIGNALS = ("el2n", "margin", "confidence", "forgetting")
# Names `signal(name)` answers: the recorded signals plus derived ones.
READABLE = SIGNALS + ("confidence_std",)
# Device bytes per sample each signal adds to the buffer (the default score: 8).
BYTES_PER_SAMPLE = {"loss": 4, "el2n": 4, "margin": 4, "confidence": 16, "forgetting": 8}
_EPS = 1e-7


@dataclasses.dataclass(frozen=True)
class OutputKind:
    """How to read a classification output.

    Attributes:
        kind: `"sparse_categorical"`, `"categorical"`, `"binary"` or `"other"`.
        from_logits: Whether the model outputs logits.
    """

    kind: str
    from_logits: bool = False

    @property
    def is_classification(self) -> bool:
        return self.kind != "other"


def check_requested(signals, kind: OutputKind | None, num_outputs: int) -> tuple[str, ...]:
    """Validates `signals=`; raises with the fix for a signal the model cannot give."""
    if signals is None:
        return ()
    if isinstance(signals, str):
        signals = (signals,)
    out = []
    for name in signals:
        if name == "input_gradient":
            continue  # always on
        if name not in SIGNALS:
            raise ValueError(
                f"Unknown signal {name!r}. Available: 'input_gradient' (always on), "
                f"{', '.join(repr(s) for s in SIGNALS)}."
            )
        if name not in out:
            out.append(name)
    wants_class = [s for s in out if s in CLASSIFICATION_SIGNALS]
    if wants_class and kind is not None:
        if num_outputs > 1:
            raise ValueError(
                f"Signals {wants_class} need a single classification output; this model has "
                f"{num_outputs} outputs. Request only signals=('loss',) for multi-output models."
            )
        if not kind.is_classification:
            raise ValueError(
                f"Signals {wants_class} need a classification loss (sparse/categorical or binary "
                "cross-entropy); this model's loss is not one. Request signals=('loss',) for "
                "regression."
            )
    return tuple(out)


def bytes_per_sample(signals) -> int:
    """Device bytes per sample of the buffer: 8 for the score plus each signal's."""
    return 8 + sum(BYTES_PER_SAMPLE[s] for s in signals)


def classification(kind: OutputKind, y: tf.Tensor, y_pred: tf.Tensor) -> dict[str, tf.Tensor]:
    """Per-row el2n, margin, confidence and correctness of one classification output.

    Args:
        kind: The output's `OutputKind`.
        y: Targets: class indices (sparse), one-hot / soft labels
            (categorical) or 0/1 (binary).
        y_pred: Logits or probabilities, as the loss takes them.

    Returns:
        Dict of [B] tensors: `el2n`, `margin`, `confidence` (float32) and
        `correct` (bool).
    """
    y_pred = tf.cast(y_pred, tf.float32)
    if kind.kind == "binary":
        z = tf.reshape(y_pred, [-1])
        t = tf.cast(tf.reshape(y, [-1]), tf.float32)
        if kind.from_logits:
            p = tf.sigmoid(z)
            logit = z
        else:
            p = tf.clip_by_value(z, _EPS, 1.0 - _EPS)
            logit = tf.math.log(p) - tf.math.log1p(-p)
        positive = t > 0.5
        return {
            "el2n": tf.abs(p - t),
            "margin": tf.where(positive, logit, -logit),
            "confidence": tf.where(positive, p, 1.0 - p),
            "correct": tf.equal(p > 0.5, positive),
        }
    num_classes = tf.shape(y_pred)[-1]
    logits = tf.reshape(y_pred, [-1, num_classes])
    if kind.kind == "sparse_categorical":
        label = tf.cast(tf.reshape(y, [-1]), tf.int32)
    else:
        label = tf.argmax(tf.reshape(tf.cast(y, tf.float32), [-1, num_classes]), axis=-1,
                          output_type=tf.int32)
    if kind.from_logits:
        logp = tf.nn.log_softmax(logits, axis=-1)
    else:
        probs = logits / tf.reduce_sum(logits, axis=-1, keepdims=True)
        logp = tf.math.log(tf.clip_by_value(probs, _EPS, 1.0))
    p = tf.exp(logp)
    onehot = tf.one_hot(label, num_classes, dtype=tf.float32)
    logp_y = tf.reduce_sum(onehot * logp, axis=-1)
    other = tf.reduce_max(tf.where(onehot > 0, tf.fill(tf.shape(logp), -1e30), logp), axis=-1)
    return {
        "el2n": tf.norm(p - onehot, axis=-1),
        "margin": logp_y - other,
        "confidence": tf.exp(logp_y),
        "correct": tf.equal(tf.argmax(logp, axis=-1, output_type=tf.int32), label),
    }


def per_row_mean(values: tf.Tensor, batch) -> tf.Tensor:
    """Mean over every non-batch axis -> [B] float32."""
    values = tf.cast(values, tf.float32)
    if values.shape.rank == 0:
        return tf.fill([batch], values)
    if values.shape.rank == 1:
        return values
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)
