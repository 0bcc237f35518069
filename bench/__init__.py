"""Benchmarks of helpline on one machine, load generators in their own processes on loopback.

Run them with ``python -m bench.<name>`` (``inbound``, ``hunting``, ``scale``, ``recovery``);
each prints a table and updates its section of ``bench/RESULTS.md``.
"""
