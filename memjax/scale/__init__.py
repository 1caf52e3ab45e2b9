"""Scaling out: per-device memory and communication, from formulas (``plan``) and compiled programs (``comms``).

  plan.py    the capacity planner (``python -m memjax.plan``)
  comms.py   the collectives of a compiled XLA program
"""
