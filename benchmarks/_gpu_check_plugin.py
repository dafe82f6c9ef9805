"""pytest plugin of `benchmarks/gpu_check.sh` (loaded with `-p _gpu_check_plugin`).

With `SIE_TF32=off` it turns TensorFloat-32 off before any test runs: on
Ampere and later GPUs TensorFlow runs float32 matmuls in TF32 (10-bit
mantissa) by default, and the exact-oracle tests compare at rel 1e-5. The
script runs those tests both ways and reports each. It also prints the
devices TensorFlow sees, so that the log shows where the tests ran.
"""

import os


def pytest_configure(config):
    import tensorflow as tf

    if os.environ.get("SIE_TF32") == "off":
        tf.config.experimental.enable_tensor_float_32_execution(False)
    print(f"[gpu_check] GPUs: {[d.name for d in tf.config.list_physical_devices('GPU')]}; "
          f"TF32 {'on' if tf.config.experimental.tensor_float_32_execution_enabled() else 'off'}")
