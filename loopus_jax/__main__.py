import sys

from loopus_jax.cli import main

sys.exit(main())
