"""Benchmark helpers shared by ``benchmarks/`` (pytest-benchmark) and ``uxnet bench``: honest timing
(:mod:`.timing`), measured peak memory (:mod:`.memory`), FlopCounterMode counts (:mod:`.flops`), the cases
(:mod:`.cases`) and the speedup table (:mod:`.report`)."""
