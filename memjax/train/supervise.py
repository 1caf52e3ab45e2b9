"""A multi-process run's ``train.py`` process watches its worker, so that losing the coordinator is a line.

When process 0 (which hosts JAX's coordination service) dies, the client in every other process
aborts at once from C++ (``LOG(FATAL)``: SIGABRT, exit 134, a stack dump), before any Python code
can run, and JAX offers no Python hook for it. So with several processes ``train.py`` runs the
training in a child process (``python -m memjax.train.main``, the same flags) and:

* passes the child's stdout through untouched, and its stderr line by line (``StderrFilter``),
  holding back the coordination service's own log lines and the reports of a collective that failed
  with a dead peer (a C++ abort inside gloo, a Python traceback of the failed collective), dropped
  when the watchdog then names the lost process; when the child reports that the coordination service is
  gone, the rest (the stack dump) is dropped and one line is printed instead, exit code 1;
* forwards SIGTERM and SIGINT to the child (JAX's preemption sync manager then stops every process
  at the same step);
* exits with the child's exit code otherwise (128 + n if a signal n ended it).

The child dies with its parent (``PR_SET_PDEATHSIG`` on Linux), so ``kill -9`` of ``train.py`` is
the loss of that process, as on a real host.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

ENV = "MEMJAX_SUPERVISED_BY"
# glog lines of the coordination client and service (held back; printed unless a fatal follows).
_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (coordination_service\S*|client\.h|preemption\S*|"
                   r"distributed\S*):\d+\]")
_CONTINUATION = ("Additional GRPC error", ":UNKNOWN:", ":", " ", "\t", "*** ")
# The coordination client's way to its fatal abort: the first line, then the fatal one. The abort
# symbolises a stack trace, which can take minutes on a loaded machine: the child is ended at once.
_FATAL = ("Polled an error from coordination service",
          "Terminating process because the JAX distributed service detected fatal errors")


def needed(argv: list[str]) -> bool:
  """Whether a ``train.py`` command line runs several processes (and is not the supervised child)."""
  if os.environ.get(ENV):
    return False
  return any(a.startswith(("--coordinator_address", "--num_processes")) or a in ("--distributed", "--distributed=true")
             for a in argv[1:])


def die_with_parent() -> None:
  """In the supervised child: be killed when ``train.py`` (the parent) dies, whatever kills it."""
  parent = os.environ.get(ENV)
  if not parent:
    return
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: fall back to polling the parent
    def watch():
      while os.getppid() == int(parent):
        threading.Event().wait(1.0)
      os._exit(1)
    threading.Thread(target=watch, daemon=True).start()
    return
  if os.getppid() != int(parent):  # the parent died before prctl took effect
    os._exit(1)


def _flag(argv: list[str], name: str) -> str:
  for i, a in enumerate(argv):
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
    if a == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


class StderrFilter:
  """The child's stderr, line by line: what to print now (``feed``), and what is left at the end (``end``).

  Holds back the coordination service's log lines (printed with the next ordinary line), sets
  ``fatal`` at the coordination client's fatal abort (the rest is dropped), and holds the report of
  a collective that failed because a peer died (the C++ runtime's "terminate called after throwing
  ..." block of an abort inside gloo, or a Python traceback ending in a ``JaxRuntimeError`` of a
  collective) until it is known whether the watchdog names a lost process (then the report is
  dropped: the verdict line says it all) or not (then it is printed)."""

  _TRACEBACK_STARTS = ("Traceback (most recent call last):", "Exception in thread")
  _TRACEBACK_INNER = ("Traceback (most recent call last):", "During handling of the above exception",
                      "The above exception was the direct cause")
  _COLLECTIVE_FAILURE = ("Gloo", "gloo", "collective", "Connection reset by peer", "DEADLINE_EXCEEDED")

  def __init__(self):
    self.held: list[bytes] = []
    self.fatal = False
    self._failure = False  # the held lines include a failure report
    self._traceback: list[bytes] | None = None  # a Python traceback being read

  def _release(self, lines: list[bytes]) -> list[bytes]:
    out, self.held, self._failure = self.held + lines, [], False
    return out

  def feed(self, line: bytes) -> list[bytes]:
    if self.fatal:
      return []
    text = line.decode("utf-8", "replace")
    if any(marker in text for marker in _FATAL):
      self.fatal, self.held, self._traceback = True, [], None
      return []
    if self._traceback is not None:
      self._traceback.append(line)
      if text.startswith((" ", "\t") + self._TRACEBACK_INNER) or not text.strip():
        return []
      block, self._traceback = self._traceback, None  # ``text`` is the exception line: the block is whole
      if "JaxRuntimeError" in text and any(m in text for m in self._COLLECTIVE_FAILURE):
        self.held += block
        self._failure = True
        return []
      return self._release(block)
    if text.startswith(self._TRACEBACK_STARTS):
      self._traceback = [line]
      return []
    if text.startswith("terminate called after throwing"):
      self._failure = True
      self.held.append(line)
      return []
    if _GLOG.match(text) or (self.held and (text.startswith(_CONTINUATION) or not text.strip())):
      self.held.append(line)  # a coordination log line, or the continuation of one
      return []
    if self._failure and text.startswith("error: ") and "was lost" in text:
      self.held = []  # the watchdog's verdict explains the failure
    return self._release([line])

  def end(self) -> list[bytes]:
    out = self.held + (self._traceback or [])
    self.held, self._traceback = [], None
    return out


def supervise(argv: list[str]) -> int:
  """Runs ``argv``'s training in a child process; returns the exit code for ``train.py``."""
  child = subprocess.Popen([sys.executable, "-m", "memjax.train.main", *argv[1:]], stderr=subprocess.PIPE,
                           env={**os.environ, ENV: str(os.getpid())})
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: child.send_signal(signum))
  lines = StderrFilter()
  err = sys.stderr.buffer
  for line in iter(child.stderr.readline, b""):
    was_fatal = lines.fatal
    out = lines.feed(line)
    if lines.fatal and not was_fatal:
      child.kill()
    err.writelines(out)
    err.flush()
  code = child.wait()
  fatal, held = lines.fatal, lines.end()
  if fatal:
    me, count = _flag(argv, "process_id"), _flag(argv, "num_processes")
    if me != "0":
      lost = "process 0, which hosts the coordination service, was lost"
    elif count == "2":
      lost = "process 1 of 2 was lost (the coordination service reported it failed)"
    else:
      lost = "another process was lost (the coordination service reported a failed process)"
    print(f"error: {lost}; process {me} stops without saving. Restart every process with the same command: the "
          "run resumes from the newest checkpoint all processes finished", file=sys.stderr, flush=True)
    return 1
  err.writelines(held)
  err.flush()
  return code if code >= 0 else 128 - code
