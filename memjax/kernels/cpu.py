"""The ``cpu`` backend: C++ kernels called through the XLA FFI, with a pure-XLA fallback.

Shapes (flattened bags): values [M, Dv] f32|bf16, idx [B, L] int32, w [B, L], d_out [B, Dv], N = B * L.

The kernels live in ``cpu_ffi.cc`` (forward, weight gradient, dense value gradient, row-sparse value
gradient; fp32 accumulation in vector registers, software prefetch, a stable counting / radix sort of the
lookups for the atomic-free value gradient, XLA's intra-op thread pool) and the product-key top-k
that ``topk.py`` calls (``memjax_product_topk``). The library is compiled on first use with the
system C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``) against ``jax.ffi.include_dir()``
into ``$MEMJAX_CACHE_DIR`` (default ``~/.cache/memjax``), keyed by a hash of the source, compiler,
flags, jaxlib version and CPU, so it is built once per machine. Build it ahead of time with
``python -c "import memjax.kernels.cpu as c; c.main()"``.

If no compiler is found or the build fails, a ``RuntimeWarning`` says why once, and the backend runs
the pure-XLA formulations of ``xla.py`` (``xla_loop``: a loop over the bag dimension for the forward
and the weight gradient, the sort + segment sum for the value gradient). ``MEMJAX_CPU_FFI=0`` selects that path
without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from memjax.kernels import xla

_SOURCE = pathlib.Path(__file__).with_name("cpu_ffi.cc")
# FFI target name -> symbol in the library.
_TARGETS = {
    "memjax_bag_forward": "MemjaxBagForward",
    "memjax_bag_weight_grad": "MemjaxBagWeightGrad",
    "memjax_bag_value_grad": "MemjaxBagValueGrad",
    "memjax_bag_row_grads": "MemjaxBagRowGrads",
    "memjax_product_topk": "MemjaxProductTopK",  # called from topk.py
    "memjax_value_row_sums": "MemjaxValueRowSums",  # the fused value update (optim.py)
    "memjax_value_adam": "MemjaxValueAdam",
    "memjax_scatter_rows": "MemjaxScatterRows",  # the product top-k's score gradient (product_keys.py)
}
SUPPORTED_VALUE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno")

_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "message": str, "lib": CDLL


# ----- building and loading the library -------------------------------------------------------------


def cache_dir() -> pathlib.Path:
  """Where compiled kernels are kept: ``$MEMJAX_CACHE_DIR`` or ``$XDG_CACHE_HOME/memjax``."""
  if os.environ.get("MEMJAX_CACHE_DIR"):
    return pathlib.Path(os.environ["MEMJAX_CACHE_DIR"])
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "memjax"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_signature() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line
  except OSError:
    pass
  return platform.processor()


def _ffi_header() -> str:
  header = pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "ffi.h"
  return hashlib.sha256(header.read_bytes()).hexdigest() if header.exists() else ""


def _library_path(cxx: str, flags: tuple[str, ...]) -> pathlib.Path:
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
  key = hashlib.sha256("\0".join([
      _SOURCE.read_text(), cxx, version, " ".join(flags), jax.__version__, _ffi_header(),
      platform.machine(), _cpu_signature(),
  ]).encode()).hexdigest()[:16]
  return cache_dir() / f"memjax_cpu_ffi_{key}.so"


def _compile(cxx: str, flags: tuple[str, ...], out: pathlib.Path) -> str | None:
  """Compiles the kernels to ``out`` atomically; returns None or the compiler's complaint."""
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [cxx, *flags, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      return f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}"
    os.replace(tmp, out)  # concurrent builders race harmlessly: each rename is atomic
    return None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load() -> tuple[bool, str]:
  if os.environ.get("MEMJAX_CPU_FFI", "1") == "0":
    return False, "disabled by MEMJAX_CPU_FFI=0"
  if not _SOURCE.exists():
    return False, f"kernel source {_SOURCE} is missing"
  cxx = _compiler()
  if cxx is None:
    return False, "no C++ compiler found ($CXX, g++, c++ or clang++)"
  errors = []
  for flags in (_BASE_FLAGS + ("-march=native",), _BASE_FLAGS):
    path = _library_path(cxx, flags)
    if not path.exists():
      error = _compile(cxx, flags, path)
      if error:
        errors.append(error)
        continue
    try:
      lib = ctypes.CDLL(str(path))
      for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError) as e:
      errors.append(f"loading {path}: {e}")
      continue
    _state["lib"] = lib
    return True, f"loaded {path}"
  return False, "\n".join(errors)


def ffi_status() -> tuple[bool, str]:
  """(available, message): builds and registers the FFI kernels on first call."""
  with _lock:
    if "ok" not in _state:
      _state["ok"], _state["message"] = _load()
      if not _state["ok"] and os.environ.get("MEMJAX_CPU_FFI", "1") != "0":
        warnings.warn(
            "memjax: the C++ CPU kernels (embedding_bag, product-key top-k) are unavailable, so the CPU "
            "paths run their slower pure-XLA formulations. Install a C++17 compiler (e.g. `apt-get install "
            "g++`, or set $CXX) and restart; set MEMJAX_CPU_FFI=0 to choose the XLA path silently. Reason: "
            + _state["message"], RuntimeWarning, stacklevel=3)
    return _state["ok"], _state["message"]


# ----- checks -----------------------------------------------------------------------------------------


def check(values, idx_BxL, w_BxL, block_sizes=None) -> None:
  """Raises ValueError if the ``cpu`` backend cannot take these arguments."""
  del idx_BxL, w_BxL
  if block_sizes is not None:
    raise ValueError(f"backend 'cpu' takes no block sizes, got {block_sizes=}")
  if values.dtype not in SUPPORTED_VALUE_DTYPES:
    raise ValueError(f"backend 'cpu' supports values.dtype in (float32, bfloat16), got {values.dtype=}")
  if values.shape[0] >= 2**31:
    raise ValueError(f"backend 'cpu' indexes rows with int32: num_slots={values.shape[0]} must be < 2**31")


# ----- the FFI calls ------------------------------------------------------------------------------------


def _ffi_forward(values, idx_BxL, w_BxL):
  b, d = idx_BxL.shape[0], values.shape[1]
  call = jax.ffi.ffi_call("memjax_bag_forward", jax.ShapeDtypeStruct((b, d), jnp.float32),
                          vmap_method="sequential")
  return call(values, idx_BxL.astype(jnp.int32), w_BxL.astype(jnp.float32))


def _ffi_backward(values, idx_BxL, w_BxL, dout_BxD):
  idx_BxL, dout_BxD = idx_BxL.astype(jnp.int32), dout_BxD.astype(jnp.float32)
  dw = jax.ffi.ffi_call("memjax_bag_weight_grad", jax.ShapeDtypeStruct(idx_BxL.shape, jnp.float32),
                        vmap_method="sequential")(values, idx_BxL, dout_BxD)
  dv = jax.ffi.ffi_call("memjax_bag_value_grad", jax.ShapeDtypeStruct(values.shape, values.dtype),
                        vmap_method="sequential")(idx_BxL, w_BxL.astype(jnp.float32), dout_BxD)
  return dv, dw


def _ffi_row_grads(idx_BxL, w_BxL, dout_BxD, num_slots):
  n, d = idx_BxL.size, dout_BxD.shape[1]
  call = jax.ffi.ffi_call(
      "memjax_bag_row_grads",
      (jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n, d), jnp.float32)),
      vmap_method="sequential")
  rows, grads = call(idx_BxL.astype(jnp.int32), w_BxL.astype(jnp.float32), dout_BxD.astype(jnp.float32),
                     num_slots=int(num_slots))
  return rows, grads


def value_row_sums(idx, w, dout_BxD, num_slots: int):
  """The value gradient of one pool as summed rows, for ``value_adam`` (the kernel must be built).

  ``idx``/``w`` hold N = B * L lookups in any shape whose order matches ``dout_BxD``'s rows (L
  consecutive lookups per row). Returns ``(rows [U] int32, g [U, Dv] f32, sq f32)`` with
  U = min(N, M): the distinct rows read ascending, then padding equal to M; their summed gradients
  (zero on padding); the squared norm of g. Deterministic (a counting sort by row, lookup order
  within a row). Nothing of size [M, Dv] when N < M.
  """
  d = dout_BxD.shape[-1]
  u = min(int(idx.size), int(num_slots))
  call = jax.ffi.ffi_call(
      "memjax_value_row_sums",
      (jax.ShapeDtypeStruct((u,), jnp.int32), jax.ShapeDtypeStruct((u, d), jnp.float32),
       jax.ShapeDtypeStruct((), jnp.float32)),
      vmap_method="sequential")
  return call(idx.astype(jnp.int32).reshape(-1), w.astype(jnp.float32).reshape(-1),
              dout_BxD.astype(jnp.float32).reshape(-1, d), num_slots=int(num_slots))


def value_adam(table, mu, nu, rows, g, *, lr, div, mul, bc1, bc2, b1: float, b2: float, eps: float,
               weight_decay: float, lazy: bool, table_in_place: bool = False):
  """One Adam step of a value table (cpu_ffi.cc ``MemjaxValueAdam``) with the gradient ``(g / div) * mul``
  on ``rows`` (``value_row_sums``' output) and 0 elsewhere; ``lazy`` updates only those rows. ``bc1``,
  ``bc2`` are the bias corrections ``1 - b^t``. Returns ``(table, mu, nu)``.

  The moments are updated in place (their only reader is this call). ``table_in_place`` updates the
  table in place too: with ``lazy``, O(rows read) work, the right choice when a step reads fewer rows
  than the table has (its reads then go through XLA's gather). Otherwise the table is written once
  to a fresh buffer (rows not read are copied under ``lazy``): when opaque kernels read the table,
  XLA keeps a copy of it for them, and an in-place update would cost a second one.
  """
  shape = jax.ShapeDtypeStruct(table.shape, jnp.float32)
  aliases = {0: 0, 1: 1, 2: 2} if table_in_place else {1: 1, 2: 2}
  call = jax.ffi.ffi_call("memjax_value_adam", (shape, shape, shape), input_output_aliases=aliases,
                          vmap_method="sequential")
  scalar = lambda x: jnp.asarray(x, jnp.float32).reshape(())
  return call(table, mu, nu, rows, g, scalar(lr), scalar(div), scalar(mul), scalar(bc1), scalar(bc2),
              b1=np.float32(b1), b2=np.float32(b2), eps=np.float32(eps), weight_decay=np.float32(weight_decay),
              lazy=bool(lazy))


def scatter_rows(idx, v, n: int):
  """``out[..., :] = 0; out[..., idx[..., c]] += v[..., c]``: [..., k] -> [..., n] fp32, the transpose
  of ``take_along_axis`` (the C++ kernel when built, else ``scatter_rows_xla``: the same bits for
  indices in [0, n); the kernel clamps others, XLA drops them).

  Example:
    >>> scatter_rows(jnp.array([[2, 0, 2]]), jnp.array([[1.0, 2.0, 3.0]]), 4).tolist()
    [[2.0, 0.0, 4.0, 0.0]]
  """
  if not ffi_status()[0]:
    return scatter_rows_xla(idx, v, n)
  shape = idx.shape[:-1] + (n,)
  call = jax.ffi.ffi_call("memjax_scatter_rows", jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
  return call(idx.astype(jnp.int32), v.astype(jnp.float32), n=int(n))


def scatter_rows_xla(idx, v, n: int):
  """``scatter_rows`` as one XLA scatter-add. Each row's k updates are added in order c = 0 .. k-1 to
  zeros, as the kernel adds them, so the two agree bit for bit (tests/test_topk_cpu.py)."""
  shape = idx.shape[:-1] + (n,)
  flat_idx, flat_v = idx.reshape(-1, idx.shape[-1]), v.reshape(-1, idx.shape[-1]).astype(jnp.float32)
  out = jnp.zeros((flat_idx.shape[0], n), jnp.float32)
  return out.at[jnp.arange(flat_idx.shape[0])[:, None], flat_idx].add(flat_v).reshape(shape)


# ----- the backend --------------------------------------------------------------------------------------


def forward(values, idx_BxL, w_BxL):
  if ffi_status()[0]:
    return _ffi_forward(values, idx_BxL, w_BxL)
  return xla.loop_forward(values, idx_BxL, w_BxL)


def backward(values, idx_BxL, w_BxL, dout_BxD):
  if ffi_status()[0]:
    return _ffi_backward(values, idx_BxL, w_BxL, dout_BxD)
  return xla.loop_backward(values, idx_BxL, w_BxL, dout_BxD)


def row_grads(idx_BxL, w_BxL, dout_BxD, num_slots):
  if ffi_status()[0] and num_slots < 2**31:
    return _ffi_row_grads(idx_BxL, w_BxL, dout_BxD, num_slots)
  return xla.sorted_row_grads(idx_BxL, w_BxL, dout_BxD, num_slots)


def main(argv=None) -> int:
  """Builds (if needed) and reports the FFI kernels; exit status 0 if they load."""
  del argv
  ok, message = ffi_status()
  print(("ok: " if ok else "unavailable: ") + message)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())

