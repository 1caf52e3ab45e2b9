"""The watchdog's bound holds even when the coordination service's calls hang instead of failing.

A dead process 0 can leave a peer's store call retrying inside gRPC for about two minutes, and a
service stuck on a lost peer can stop answering process 0 itself; before the deadline thread, such
survivors took ~125 s to exit (the 2-process kill soak). A fake client stands in for the service.
"""

import threading
import time

import pytest

from memjax.train import distributed


class _HangingClient:
  """Answers ``answers`` rounds (every peer's counter moving), then every call blocks."""

  def __init__(self, answers):
    self.answers, self.sets, self.release = answers, 0, threading.Event()

  def key_value_set(self, key, value, allow_overwrite=True):
    self.sets += 1
    if self.sets > self.answers:
      self.release.wait(600)

  def key_value_try_get(self, key):
    return str(self.sets)


@pytest.mark.parametrize("me,named", [(1, 0), (0, 1)])
def test_a_hanging_service_ends_the_process_within_the_bound_naming_the_peer(monkeypatch, me, named):
  client = _HangingClient(answers=3)
  verdicts = []
  monkeypatch.setattr(distributed, "_client", lambda: client)
  monkeypatch.setattr(distributed, "HEARTBEAT_SECONDS", 0.2)

  def record(message, code=1):
    verdicts.append((time.monotonic(), message, code))
    dog.stop()  # instead of ending the test process

  monkeypatch.setattr(distributed, "_say_and_exit", record)
  dog = distributed.Watchdog(me, 2, lost_after=1.5)
  t0 = time.monotonic()
  dog.start()
  deadline = time.monotonic() + 20
  while not verdicts and time.monotonic() < deadline:
    time.sleep(0.05)
  dog.stop()
  client.release.set()
  assert verdicts, "no verdict while the service hung"
  at, message, code = verdicts[0]
  assert code == 1 and f"process {named} of 2 was lost" in message and "did not answer" in message, message
  hung_at = t0 + 3 * 0.2
  assert at - hung_at <= 1.5 + 3 * 0.2 + 1.0  # lost_after + a round or two, not gRPC's minutes


def test_a_service_that_answers_gives_no_verdict(monkeypatch):
  client = _HangingClient(answers=10**9)
  verdicts = []
  monkeypatch.setattr(distributed, "_client", lambda: client)
  monkeypatch.setattr(distributed, "HEARTBEAT_SECONDS", 0.1)
  monkeypatch.setattr(distributed, "_say_and_exit", lambda *a, **k: verdicts.append(a))
  dog = distributed.Watchdog(0, 2, lost_after=0.5)
  dog.start()
  time.sleep(2.0)
  dog.stop()
  assert not verdicts and client.sets >= 10
