"""The op tests, one file per op family (see samples.py for the inputs, bad_input.py for the bad-input convention).

A package, so that its helpers import as ``ops.samples`` / relatively from here, and as ``ops.samples`` from
tests/ (tests/op_cases.py): pytest puts tests/ on sys.path for both.
"""
