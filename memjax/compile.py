"""``python -m memjax.compile``: the command name of ``memjax.scale.compile`` (deviceless AOT compiles)."""

import sys

from memjax.scale.compile import main

if __name__ == "__main__":
  sys.exit(main())
