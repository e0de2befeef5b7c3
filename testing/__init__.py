"""Test, benchmark and training code: what the tests and ``perf/`` share, never imported by the
served package. ``harness`` starts and watches real tritonservers; ``shapes`` renders and judges
the tiny default's scenes; ``train_shapes`` trains that model."""
