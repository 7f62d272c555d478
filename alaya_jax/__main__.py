import sys

from alaya_jax.cli import main

sys.exit(main())
