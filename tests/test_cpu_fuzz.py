"""A slice of the differential fuzz of the CPU kernels (tests/cpu_fuzz.py) in the test suite: a fixed seed, a few
cases, under every ISA variant this machine runs (only the session's when UXNET_CPU_ISA is set for the run).

CI runs a larger slice with a per-commit seed (scripts/fuzz_cpu_slice.sh); docs/PERFORMANCE.md ("Reliability")
records the 10,000-case runs."""

import os

from conftest import CPU_ISAS, SESSION_CPU_ISA, cpu_isa_unavailable, require_compiled

import cpu_fuzz

CASES = int(os.environ.get("UXNET_FUZZ_CASES", "24"))
SEED = int(os.environ.get("UXNET_FUZZ_SEED", "20261130"))


def test_fuzz_slice_under_every_variant():
    require_compiled("cpu")
    isas = [name for name in CPU_ISAS if cpu_isa_unavailable(name) is None]
    if SESSION_CPU_ISA != "auto":
        isas = [SESSION_CPU_ISA]
    tallies = {name: cpu_fuzz.Tally() for name in isas}
    failures = []
    for seed in cpu_fuzz.case_seeds(SEED, CASES):
        failures += cpu_fuzz.check_case(cpu_fuzz.draw_case(seed), isas, tallies)
    assert all(t.cases == CASES and t.checks >= 2 * CASES for t in tallies.values()), tallies
    assert not failures, "\n".join(failures)


def test_fuzz_cases_are_a_function_of_their_seed():
    seeds = cpu_fuzz.case_seeds(7, 50)
    assert seeds == cpu_fuzz.case_seeds(7, 50)
    cases = [cpu_fuzz.draw_case(s) for s in seeds]
    assert cases == [cpu_fuzz.draw_case(s) for s in seeds]
    # The draw covers what the fuzz promises: every op, dtype and layout, C = 1, dims of 1, kernels up to 31,
    # non-finite inputs.
    many = [cpu_fuzz.draw_case(s) for s in cpu_fuzz.case_seeds(8, 2000)]
    assert {c.op for c in many} == set(cpu_fuzz.OPS)
    assert {c.dtype for c in many} == set(cpu_fuzz.DTYPES)
    assert {c.layout for c in many} == {"contiguous", "channels_last_3d", "strided"}
    assert any(c.shape[1] == 1 for c in many) and any(1 in c.shape[2:] for c in many)
    assert any(max(c.kernel) == 31 for c in many) and any(c.shape[0] > 1 for c in many)
    assert any(c.op == "dwconv3d" and min(c.shape[2:]) < max(c.kernel) for c in many)
    assert {c.poison[2] for c in many if c.poison} == {"nan", "inf", "-inf"}


def test_fuzz_detects_a_wrong_result():
    """The comparison is not vacuous: a result off by more than the rule allows, or with a NaN moved, fails."""
    import torch

    truth = torch.randn(100, dtype=torch.float64)
    same = truth.float()  # PyTorch's float32 error: the rounding of the truth
    assert cpu_fuzz.compare(same, same, truth, torch.float32) == (None, "tolerance")
    assert cpu_fuzz.compare(same * (1 + 3e-5), same, truth, torch.float32)[0] is not None
    # the float32-statistics floor admits errors up to twice its own, no more
    floor = truth * (1 + 1e-4)
    assert cpu_fuzz.compare(truth * (1 + 1.5e-4), same, truth, torch.float32, floor)[1] == "statistics floor"
    assert cpu_fuzz.compare(truth * (1 + 3e-4), same, truth, torch.float32, floor)[0] is not None
    moved = same.clone()
    moved[3] = float("nan")
    assert "non-finite" in cpu_fuzz.compare(moved, same, truth, torch.float32)[0]
    assert cpu_fuzz.compare(truth + 1e-9, same, truth, torch.float64)[0] is not None
