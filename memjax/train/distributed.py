"""Several processes, one run: start-up, stopping together, and losing a process.

On pods one process is preempted or crashes while the others are inside a collective. This module
makes that a clean, bounded event:

``initialize(...)``
    ``jax.distributed.initialize`` with a bounded start-up (``initialization_timeout``) and with the
    coordination service's own heartbeat check moved out of the way (it aborts the survivors with a
    fatal-error stack dump, and its callback is not usable from Python); then starts the
    ``Watchdog``.
``Watchdog``
    Every process bumps its counter in the coordination service's key-value store every
    ``HEARTBEAT_SECONDS``. A peer whose counter stops moving for ``lost_after`` seconds, or a store
    that cannot be reached (process 0 hosts it: it is gone), is a lost process. The watchdog then
    prints one line naming it and ends this process with exit code 1 at once (``os._exit``: the
    survivor would otherwise wait inside a collective, an Orbax barrier or the shutdown barrier).
    On CPU meshes an abort inside the collectives library (gloo throws from one of its threads when
    a peer dies mid-transfer) is held (``abort_hold.c``) until the watchdog has named the peer.
    A checkpoint being written is never finalised by a survivor (Orbax finalises a step only after
    every process wrote its part), so restarting every process resumes from the newest complete one.
``stop_requested(step)``
    True at the same step on every process once any of them received SIGTERM (JAX's preemption
    sync manager) or SIGINT: all stop at one step and save one checkpoint together.
``allgather_json(obj)`` / ``agree(flag)``
    Every process's JSON value (its data-iterator state), and whether a flag holds on all processes
    (a checkpoint restored everywhere), so that processes never act on different decisions.

Single-process runs use none of it (every function is a no-op or the identity there).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import signal
import sys
import threading
import time

import numpy as np

HEARTBEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 30.0  # default bound on how long a survivor waits for a silent peer
INIT_TIMEOUT_SECONDS = 120
# The coordination service's own heartbeat check would abort every survivor (SIGABRT, stack dump);
# with a day, the Watchdog decides first.
_SERVICE_HEARTBEAT_SECONDS = 24 * 3600
_KEY = "memjax/alive/{}"

_watchdog: "Watchdog | None" = None
_sigint = threading.Event()
_finishing = threading.Event()  # this process's run is over: it waits in the shutdown barrier
_exit_code = [0]


def _client():
  from jax._src import distributed  # the coordination-service client jax.distributed holds
  return distributed.global_state.client


def _say_and_exit(message: str, code: int = 1) -> None:
  try:
    sys.stdout.flush()
  finally:
    os.write(2, (message.rstrip() + "\n").encode())
    os._exit(code)


class Watchdog(threading.Thread):
  """Detects a lost process through heartbeats in the coordination service's key-value store."""

  def __init__(self, process_index: int, process_count: int, lost_after: float):
    super().__init__(name="memjax-watchdog", daemon=True)
    self.process_index, self.process_count, self.lost_after = process_index, process_count, lost_after
    self._stop_event = threading.Event()
    self.lost: tuple[int, str] | None = None
    self._round_done = time.monotonic()  # when the last round of store calls completed
    self._last_change: dict[int, float] = {}  # peer -> when its counter last moved

  def _lose(self, peer: int | None, why: str) -> None:
    self.lost = (peer, why)
    who = f"process {peer} of {self.process_count}" if peer is not None else "another process of the run"
    if _finishing.is_set():
      _say_and_exit(f"error: {who} was lost ({why}) while the run was ending; "
                    f"process {self.process_index} had finished it. Restart every process with the same command "
                    "to finish it on all of them")
    _say_and_exit(f"error: {who} was lost ({why}); process {self.process_index} "
                  "stops without saving. Restart every process with the same command: the run resumes from the "
                  "newest checkpoint all processes finished")

  def _deadline(self) -> None:
    """A store call can hang (a service stuck on a lost peer, or a dead process 0 that gRPC keeps
    retrying for minutes): a round of heartbeats that does not complete within ``lost_after`` is a
    lost process too. Process 0's own service stuck names the peer heard from least recently."""
    while not self._stop_event.wait(HEARTBEAT_SECONDS):
      stuck = time.monotonic() - self._round_done
      if stuck <= self.lost_after:
        continue
      why = f"the coordination service did not answer for {stuck:.0f} s"
      if self.process_index != 0:
        self._lose(0, why)
        return
      peers = sorted((t, p) for p, t in self._last_change.items())
      quiet = [p for t, p in peers if t == peers[0][0]] if peers else []
      self._lose(quiet[0] if len(quiet) == 1 and len(peers) == self.process_count - 1 else None, why)
      return

  def run(self) -> None:
    client = _client()
    seen: dict[int, tuple[str, float]] = {}
    started = time.monotonic()
    beat = 0
    threading.Thread(target=self._deadline, name="memjax-watchdog-deadline", daemon=True).start()
    while not self._stop_event.wait(HEARTBEAT_SECONDS if beat else 0):
      beat += 1
      try:
        client.key_value_set(_KEY.format(self.process_index), str(beat), allow_overwrite=True)
      except Exception as e:  # noqa: BLE001 - the service (process 0) is gone
        if self._stop_event.is_set():
          return
        if _finishing.is_set():  # the barrier passed and process 0 closed the service: our run is complete
          sys.stdout.flush()
          os._exit(_exit_code[0])
        self._lose(0, f"the coordination service on process 0 stopped answering: {' '.join(str(e).split())[:120]}")
      now = time.monotonic()
      for peer in range(self.process_count):
        if peer == self.process_index:
          continue
        try:
          value = client.key_value_try_get(_KEY.format(peer))
        except Exception:  # noqa: BLE001 - not written yet (a peer still starting) or gone
          value = None
        last = seen.get(peer)
        if value is not None and (last is None or last[0] != value):
          seen[peer] = (value, now)
          self._last_change[peer] = now
        elif now - (last[1] if last else started) > self.lost_after:
          self._lose(peer, f"no heartbeat for {self.lost_after:.0f} s")
      self._round_done = time.monotonic()
      pet_native_watchdog()

  def stop(self) -> None:
    self._stop_event.set()
    stop_native_watchdog()


def initialize(*, coordinator_address: str | None, num_processes: int | None, process_id: int | None,
               auto: bool = False, lost_after: float = LOST_AFTER_SECONDS,
               init_timeout: int = INIT_TIMEOUT_SECONDS) -> None:
  """``jax.distributed.initialize`` (explicit arguments, or ``auto``-detected on TPU pods, SLURM, ...),
  then the ``Watchdog``; a process that does not connect within ``init_timeout`` seconds ends the
  others with one line and exit code 1."""
  global _watchdog
  import jax
  kwargs = dict(initialization_timeout=init_timeout, heartbeat_timeout_seconds=_SERVICE_HEARTBEAT_SECONDS)
  if not auto:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # noqa: BLE001 - a peer never came up, or the coordinator is unreachable
    why = " ".join(str(e).split())[:160]
    if process_id not in (None, 0):
      who = f"process 0 of {num_processes} (the coordinator, {coordinator_address}) was lost or never started"
    elif process_id == 0 and num_processes == 2:
      who = "process 1 of 2 was lost or never started"
    else:
      who = f"some of the {num_processes or 'other'} processes were lost or never started"
    _say_and_exit(f"error: {who}: the processes of this run did not all connect within {init_timeout} s "
                  f"(--startup_timeout; {why}); start every process with the same command")
  if jax.process_count() > 1:
    _watchdog = Watchdog(jax.process_index(), jax.process_count(), lost_after)
    _watchdog.start()
    if jax.devices()[0].platform == "cpu":  # gloo carries the collectives
      hold = lost_after + 2 * HEARTBEAT_SECONDS + 5
      me, count = jax.process_index(), jax.process_count()
      hold_aborts(hold, f"error: process {me} of {count} aborted inside a collective (the collectives library's "
                  f"message is above) and no process was found lost within {hold:.0f} s; it stops without saving. "
                  "Restart every process with the same command: the run resumes from the newest checkpoint all "
                  "processes finished")
      who = f"process {1 - me} of 2" if count == 2 else "another process of the run"
      quiet = lost_after + 2 * HEARTBEAT_SECONDS
      start_native_watchdog(quiet, f"error: {who} was lost (process {me} was blocked in a collective with it for "
                            f"{quiet:.0f} s, its watchdog unable to run); process {me} stops without saving. Restart "
                            "every process with the same command: the run resumes from the newest checkpoint all "
                            "processes finished")
    # SIGINT (Ctrl-C on one host) becomes a stop request like SIGTERM: the preemption sync manager
    # then stops every process at the same step.
    signal.signal(signal.SIGINT, _on_sigint)


_ABORT_HOLD_SOURCE = pathlib.Path(__file__).with_name("abort_hold.c")


def _native_library():
  """``abort_hold.c`` built with the system C compiler once (cached beside the CPU kernels), or None."""
  if "lib" in _native:
    return _native["lib"]
  _native["lib"] = None
  from memjax.kernels import cpu
  cc = next((shutil.which(c) for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
  if cc is None or not _ABORT_HOLD_SOURCE.exists():
    return None
  source = _ABORT_HOLD_SOURCE.read_bytes()
  path = cpu.cache_dir() / f"memjax_abort_hold_{hashlib.sha256(source + cc.encode()).hexdigest()[:16]}.so"
  try:
    if not path.exists():
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp")
      proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", str(_ABORT_HOLD_SOURCE), "-o", str(tmp)],
                            capture_output=True, timeout=120)
      if proc.returncode != 0:
        return None
      os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    lib.memjax_hold_aborts.argtypes = [ctypes.c_double, ctypes.c_char_p]
    lib.memjax_native_watchdog_start.argtypes = [ctypes.c_double, ctypes.c_char_p]
    lib.memjax_native_watchdog_pet.argtypes = []
    lib.memjax_native_watchdog_stop.argtypes = []
  except (OSError, subprocess.SubprocessError, AttributeError):
    return None
  _native["lib"] = lib
  return lib


_native: dict = {}


def hold_aborts(seconds: float, line: str) -> bool:
  """Makes SIGABRT park the aborting thread for up to ``seconds`` (the watchdog ends the process
  first if a peer was lost), then print ``line`` and exit with code 1 (``abort_hold.c``). Returns
  False, changing nothing, where the C library cannot be built.

  Example:
    >>> hold_aborts(40.0, "error: ...")   # doctest: +SKIP
    True
  """
  lib = _native_library()
  return lib is not None and lib.memjax_hold_aborts(float(seconds), (line.rstrip() + "\n").encode()) == 0


def start_native_watchdog(seconds: float, line: str) -> bool:
  """Starts a thread outside Python that prints ``line`` and exits with code 1 once the Python
  watchdog has not completed a round (``pet_native_watchdog``) for ``seconds`` (a main thread
  blocked in a collective can hold the GIL, and then no Python thread runs). False where the C
  library cannot be built."""
  lib = _native_library()
  return lib is not None and lib.memjax_native_watchdog_start(float(seconds), (line.rstrip() + "\n").encode()) == 0


def pet_native_watchdog() -> None:
  lib = _native.get("lib")
  if lib is not None:
    lib.memjax_native_watchdog_pet()


def stop_native_watchdog() -> None:
  lib = _native.get("lib")
  if lib is not None:
    lib.memjax_native_watchdog_stop()


def _on_sigint(signum, frame) -> None:
  _sigint.set()
  signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends the process at once
  os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier listens for SIGTERM


def multi_process() -> bool:
  import jax
  return jax.process_count() > 1


def stop_requested(step: int) -> int | None:
  """The signal that stops the run at ``step`` on every process (the same step everywhere), else None.

  Call it once per step, with increasing steps, on every process."""
  from jax.experimental import multihost_utils
  if multihost_utils.reached_preemption_sync_point(step):
    return signal.SIGINT if _sigint.is_set() else signal.SIGTERM
  return None


def finish(code: int) -> int:
  """Ends a run that finished (or stopped together) on every process: waits in JAX's shutdown barrier
  with the watchdog still on (a peer lost now still ends this process with one line), then stops it.
  Returns ``code``, the exit code, also used if the coordinator closes the service first."""
  if _watchdog is None:
    return code
  import jax
  _exit_code[0] = code
  _finishing.set()
  stop_native_watchdog()  # a peer still writing the export may keep this one waiting in the barrier
  jax.distributed.shutdown()
  _watchdog.stop()
  return code


def wait_for_verdict() -> None:
  """Waits as long as the watchdog needs to name a lost process (it then ends this process)."""
  time.sleep((_watchdog.lost_after if _watchdog else LOST_AFTER_SECONDS) + 2 * HEARTBEAT_SECONDS)


def end_after_error(message: str, code: int) -> None:
  """Ends a multi-process run's process after an error: the message, then ``os._exit(code)``. A normal
  exit would wait in the shutdown barrier for peers that are stuck in a collective with this one; its
  silence tells their watchdogs that it is gone."""
  _say_and_exit(message, code)


def barrier(name: str) -> None:
  """Waits until every process got here (a no-op on one process)."""
  if multi_process():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def allgather_json(obj) -> list:
  """Every process's JSON-able ``obj``, in process order (``[obj]`` on one process)."""
  if not multi_process():
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([data.size], np.int32)).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def agree(flag: bool) -> bool:
  """True when ``flag`` is True on every process (``flag`` itself on one process)."""
  return all(allgather_json(bool(flag)))
