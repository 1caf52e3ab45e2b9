"""An abort inside the collectives library, when a peer is lost, ends a process with the watchdog's one line.

gloo can throw from one of its threads when a peer dies mid-transfer (std::terminate -> abort), which
used to end the survivor with exit 134 before the watchdog could name the lost process. These tests
drive the two halves directly: ``distributed.hold_aborts`` (the SIGABRT handler of ``abort_hold.c``)
in a real process that aborts from a thread, and the supervisor's ``StderrFilter`` on the lines such
a process writes.
"""

import subprocess
import sys
import textwrap
import time

import pytest

from memjax.train.supervise import StderrFilter

_CHILD = textwrap.dedent("""
    import ctypes, os, sys, threading, time
    from memjax.train import distributed
    assert distributed.hold_aborts({hold}, "error: held abort expired")
    def verdict():
      time.sleep({verdict})
      os.write(2, b"error: process 1 of 2 was lost (no heartbeat for 8 s)\\n")
      os._exit(1)
    if {verdict} >= 0:
      threading.Thread(target=verdict, daemon=True).start()
    # std::terminate on one of gloo's threads: abort() from a thread that does not hold the GIL
    threading.Thread(target=ctypes.CDLL(None).abort).start()
    time.sleep(30)
    print("the main thread ran on", flush=True)
""")


def _run(hold, verdict):
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, "-c", _CHILD.format(hold=hold, verdict=verdict)], capture_output=True,
                       text=True, timeout=60)
  return out, time.monotonic() - t0


def test_a_held_abort_waits_for_the_watchdogs_verdict():
  out, _ = _run(hold=20, verdict=1.0)
  assert out.returncode == 1, out.stderr
  assert out.stderr.strip().splitlines() == ["error: process 1 of 2 was lost (no heartbeat for 8 s)"]


def test_a_held_abort_with_no_verdict_ends_with_its_line_after_the_hold():
  out, waited = _run(hold=2, verdict=-1)
  assert out.returncode == 1, out.stderr
  assert out.stderr.strip().splitlines() == ["error: held abort expired"]
  assert waited >= 2 and "ran on" not in out.stdout


_TERMINATE = [b"terminate called after throwing an instance of 'gloo::EnforceNotMet'\n",
              b"  what():  [enforce fail at pair.cc:459] op.preamble.length <= op.nbytes. 2056 vs 4.\n", b"\n"]


def _filtered(lines):
  f = StderrFilter()
  out = [o for line in lines for o in f.feed(line)]
  return out + f.end(), f.fatal


@pytest.mark.parametrize("tail", [[], [b"error: process 0 of 2 aborted inside a collective ...\n"]],
                         ids=["cut_off", "no_verdict"])
def test_the_terminate_report_is_kept_when_no_process_is_named_lost(tail):
  out, fatal = _filtered([b"step 5 loss 3.1\n", *_TERMINATE, *tail])
  assert out == [b"step 5 loss 3.1\n", *_TERMINATE, *tail] and not fatal


def test_the_terminate_report_gives_way_to_the_verdict():
  verdict = b"error: process 1 of 2 was lost (no heartbeat for 8 s); process 0 stops without saving.\n"
  out, fatal = _filtered([b"step 5 loss 3.1\n", *_TERMINATE, verdict])
  assert out == [b"step 5 loss 3.1\n", verdict] and not fatal


_TRACEBACK = [b"Exception in thread Thread-3 (save):\n", b"Traceback (most recent call last):\n",
              b'  File "x.py", line 3, in save\n', b"    npy_value = self._value()\n",
              b"jax.errors.JaxRuntimeError: UNKNOWN: Gloo AllGather failed: Read error: Connection reset by peer\n"]


def test_a_collective_failures_traceback_gives_way_to_the_verdict_and_other_tracebacks_pass():
  verdict = b"error: process 1 of 2 was lost (no heartbeat for 10 s); process 0 stops without saving.\n"
  out, _ = _filtered([b"step 5 loss 3.1\n", *_TRACEBACK, verdict])
  assert out == [b"step 5 loss 3.1\n", verdict]
  out, _ = _filtered([*_TRACEBACK, b"step 6 loss 3.0\n"])  # no verdict: everything is printed, in order
  assert out == [*_TRACEBACK, b"step 6 loss 3.0\n"]
  other = [b"Traceback (most recent call last):\n", b'  File "y.py", line 1\n', b"ValueError: bad\n"]
  f = StderrFilter()
  assert [o for line in other for o in f.feed(line)] == other  # printed as soon as it is whole
  cut = [b"Traceback (most recent call last):\n", b'  File "y.py", line 1\n']
  assert _filtered(cut)[0] == cut  # a report cut off by the end is printed at the end


def test_coordination_log_lines_are_held_and_a_fatal_abort_drops_the_rest():
  glog = b"E1202 13:40:01.123456   42 coordination_service_agent.cc:300] heartbeat late\n"
  out, fatal = _filtered([glog, b"step 6 loss 3.0\n"])
  assert out == [glog, b"step 6 loss 3.0\n"] and not fatal
  out, fatal = _filtered([glog, b"F1202 ... Terminating process because the JAX distributed service detected fatal errors\n",
                          b"*** stack\n"])
  assert out == [] and fatal


_NATIVE = textwrap.dedent("""
    import ctypes, time
    from memjax.train import distributed
    assert distributed.start_native_watchdog(1.5, "error: process 1 of 2 was lost (blocked)")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3:  # a Python watchdog completing its rounds
      distributed.pet_native_watchdog()
      time.sleep(0.2)
    print("alive after petting", flush=True)
    if {hold_gil}:
      ctypes.PyDLL(None).sleep(20)  # a C call that blocks with the GIL held: no Python thread can run
    print("not reached" if {hold_gil} else "stopped", flush=True)
    distributed.stop_native_watchdog()
    time.sleep(2.5)
""")


@pytest.mark.parametrize("hold_gil", [True, False], ids=["gil_held", "petted"])
def test_the_native_watchdog_ends_a_process_whose_python_threads_cannot_run(hold_gil):
  t0 = time.monotonic()
  out = subprocess.run([sys.executable, "-c", _NATIVE.format(hold_gil=hold_gil)], capture_output=True, text=True,
                       timeout=60)
  waited = time.monotonic() - t0
  assert "alive after petting" in out.stdout, out.stderr
  if hold_gil:
    assert out.returncode == 1 and out.stderr.strip().splitlines() == ["error: process 1 of 2 was lost (blocked)"]
    assert "not reached" not in out.stdout and waited < 15
  else:
    assert out.returncode == 0 and out.stderr.strip() == "" and "stopped" in out.stdout
