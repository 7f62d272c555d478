"""Run ``python -m MODULE ARGS...`` under a file-size limit (``RLIMIT_FSIZE``), for the
full-disk tests (not a test module): writes past BYTES fail with EFBIG, as on a full disk.

    python tests/support/file_size_limit.py BYTES MODULE ARGS...

(Set here rather than in a ``preexec_fn``: forking a multithreaded test process is unsafe.)
"""

import resource
import runpy
import sys

if __name__ == "__main__":
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
