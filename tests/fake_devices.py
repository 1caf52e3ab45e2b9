"""Runs a test script in a fresh Python process (fake-device XLA flags must precede importing JAX)."""

import json
import os
import subprocess
import sys


def run_result_script(script: str, timeout: int = 600):
  """Runs ``script`` with the suite's persistent compile cache; returns the JSON it printed after
  ``RESULT`` on its last such line. Fails the test with the script's stderr tail if it fails."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "memjax-test-jax-cache"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
