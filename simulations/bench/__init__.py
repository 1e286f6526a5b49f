"""Benchmarks: ``radfl bench`` (``parts``) and the measurements run with ``python -m``
(``simulations.bench.stems``, ``precision``, ``loading``, ``fedavg_inprocess``)."""
