"""Benchmarks of uxnet, shared by ``benchmarks/`` (pytest-benchmark) and ``uxnet bench``: the size presets
(:mod:`.presets`), the op and model cases (:mod:`.op_cases`, :mod:`.model_cases`), FlopCounterMode counts
(:mod:`.flops`), running a case (:mod:`.runner`) and the speedup table and chart (:mod:`.report`). Timing is
``uxnet.timing``'s, peak memory ``uxnet.memory.tracker``'s."""
