"""Test-wide JAX settings: implicit rank promotion is an error, so shape bugs fail loudly.

``tests/multidevice/`` holds tests that need 8 fake CPU devices, which must be configured before JAX
is imported: ``tests/test_multidevice.py`` runs each of its modules in a fresh pytest process
(``MEMJAX_MULTIDEVICE=1``), and this process does not collect them.
"""

import os

# Tests compile hundreds of small CPU programs and run each for a few steps: LLVM at -O0 halves XLA's CPU
# compile time (tests/multidevice/test_equivalence.py: 142 s -> 73 s) for steps ~2x slower to run.
# Fast-math stays off, but two different programs that are bitwise equal at the default level may
# differ in the last bits at -O0 (seen once: the LoRA model with B = 0 against its base, <= 5e-7), so
# tests comparing two programs allow fp32 rounding; tests of one program (resume, determinism) stay
# bitwise. Set before JAX starts a backend; the
# subprocesses inherit it (``helpers.subprocess_env``) except the accelerator compilers' (``helpers.aot_env``).
TEST_XLA_FLAG = "--xla_backend_optimization_level=0"
if TEST_XLA_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Runs compile the same programs again and again (each train() call builds new closures); a
# persistent compilation cache shared by the test process and its subprocesses saves minutes.
CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "memjax-test-jax-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

collect_ignore = [] if os.environ.get("MEMJAX_MULTIDEVICE") else ["multidevice"]

# Files by their time on a 2-core machine, longest first (`--durations` of a `-n 2` run):
# under `-n 2 --dist loadfile` a worker takes the next file when it finishes one, so starting the
# long ones first keeps a long file from running alone at the end.
LONGEST_FIRST = ("test_multidevice.py", "test_multiprocess_resume.py", "test_compile.py", "test_benchmarks.py",
                 "test_notebooks.py", "test_optim.py")


def pytest_collection_modifyitems(items):
  rank = lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: the order within a file and among the other files is kept
