"""Host-resident bytes per sample of the device buffer, measured on CPU.

On CPU, device and host memory are the same, so the resident-set growth of
the process is the buffer's memory. Used for the "Memory" part of the README's
tf.distribute section.

Run:
    python benchmarks/buffer_memory.py 25000000
"""

import gc
import os
import resource
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf

from keras_sie.buffer import ImportanceBuffer


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 25_000_000
    # Warm up TF and tf.function on a small buffer, so the deltas are the buffer's own.
    small = ImportanceBuffer(1000)
    tf.function(lambda ids: small.accumulate(ids, [tf.ones([512])], 1.0))(
        tf.range(512, dtype=tf.int64))
    small.read()
    small.reset()
    gc.collect()
    r0, p0 = rss(), peak()
    buf = ImportanceBuffer(n)
    r1 = rss()
    step = tf.function(lambda ids: buf.accumulate(ids, [tf.ones([512])], 1.0))
    for i in range(10):
        step(tf.range(i * 512, (i + 1) * 512, dtype=tf.int64))
    r2 = rss()
    snap = buf.read()
    r3 = rss()
    del snap
    gc.collect()
    buf.reset()
    r4 = rss()
    p = peak()
    print(f"N={n:,}  buffer nbytes={buf.nbytes / n:.3f} B/sample  created={(r1 - r0) / n:.2f}  "
          f"after 10 steps={(r2 - r0) / n:.2f}  after read (host copy held)={(r3 - r0) / n:.2f}  "
          f"after reset={(r4 - r0) / n:.2f}  peak delta={(p - max(p0, r0)) / n:.2f} B/sample")


if __name__ == "__main__":
    main()
