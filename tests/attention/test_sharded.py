"""The KV store sharded along the sequence over emulated CPU devices (docs/design.md §10): the checks of
``tests/support/sharded_checks.py`` in one subprocess with ``--xla_force_host_platform_device_count=4``
(the device count is fixed when jax starts, so they cannot run in the suite's own process).

Layout and appends; exact DIPR sharded == unsharded (outputs, DIPR masks, maxima) with zero false negatives
against brute force, on 1, 2 and 4 devices, ragged lengths, shards of unequal fill (empty ones too), GQA
ratio 3, NaN-poisoned padding, a filter, both backends; dense attention sharded; generation and the
server's scheduler over 2 devices token for token equal to 1 device; --devices past the devices refused;
the kernels' estimated tail on a sharded store refused.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sharded_checks():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"  # emulated CPU devices, also on a machine with a GPU
    r = subprocess.run([sys.executable, "-m", "tests.support.sharded_checks"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    for name in ("devices", "layout", "append", "dipr", "dipr_pallas", "tail_refused", "dense", "generate",
                 "scheduler"):
        assert f"ok {name}" in r.stdout, r.stdout
