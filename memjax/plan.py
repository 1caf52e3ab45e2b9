"""``python -m memjax.plan``: the command name of the capacity planner, ``memjax.scale.plan``."""

import sys

from memjax.scale.plan import main

if __name__ == "__main__":
  sys.exit(main())
