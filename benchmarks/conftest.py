"""pytest-benchmark suite of uxnet: fast backends vs the PyTorch reference, measured side by side.

    pytest benchmarks/ --benchmark-only                      # CPU sizes (default), < 10 min on 2 cores
    pytest benchmarks/ --benchmark-only --uxnet-size=paper   # the paper's sizes (96^3, batch 2): a GPU machine
    UXNET_BENCH_SIZE=paper pytest benchmarks/ --benchmark-only

Each case is timed by pytest-benchmark's pedantic loop over ``uxnet.bench`` pieces: the call synchronises the
device, is warmed up first, takes its inputs round-robin from a pool larger than the last-level cache, and the
number of rounds follows the warmed-up call time. pytest-benchmark groups the rows by comparison group; the
summary at the end prints each row's median with its speedup over the PyTorch reference row of the same group
and layout, and the peak memory of the model cases.
"""

import json
import os

import pytest
import torch

from uxnet.bench import runner
from uxnet.bench.model_cases import model_cases
from uxnet.bench.op_cases import op_cases
from uxnet.bench.presets import SIZES, Size
from uxnet.bench.report import add_speedups, format_table
from uxnet.memory.tracker import peak_memory
from uxnet.timing import plan_rounds, timed_call, warm_up

_ROWS = pytest.StashKey()
_TEXT = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("uxnet benchmarks")
    group.addoption("--uxnet-size", choices=("cpu", "paper"), default=os.environ.get("UXNET_BENCH_SIZE", "cpu"),
                    help="case sizes: cpu (default; env UXNET_BENCH_SIZE) or paper (96^3 patches, batch 2)")
    group.addoption("--uxnet-device", choices=("auto", "cpu", "cuda"), default=os.environ.get("UXNET_BENCH_DEVICE",
                                                                                                 "auto"),
                    help="auto: cuda when available, else cpu")
    group.addoption("--uxnet-include-slow", action="store_true", default=os.environ.get("UXNET_BENCH_SLOW") == "1",
                    help="also run reference rows that take minutes per call at this size (env UXNET_BENCH_SLOW=1)")
    group.addoption("--uxnet-json", default=os.environ.get("UXNET_BENCH_JSON"),
                    help="write the summary rows (medians, speedups, FLOPs, peak memory) to this JSON file")


def bench_size(config) -> Size:
    return SIZES[config.getoption("--uxnet-size")]


def bench_device(config) -> str:
    name = config.getoption("--uxnet-device")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def pytest_configure(config):
    config.stash[_ROWS] = []
    config.stash[_TEXT] = []


def pytest_generate_tests(metafunc):
    config = metafunc.config
    size, device = bench_size(config), bench_device(config)
    if "op_case" in metafunc.fixturenames:
        found = op_cases(size, device)
        metafunc.parametrize("op_case", found, ids=[c.id for c in found])
    if "model_case" in metafunc.fixturenames:
        found = model_cases(size, device)
        metafunc.parametrize("model_case", found, ids=[c.id for c in found])


@pytest.fixture
def record_text(request):
    """Text (e.g. the FLOP table) to print in the terminal summary."""
    return request.config.stash[_TEXT].append


@pytest.fixture
def run_case(benchmark, request):
    """``run_case(case, measure_memory=False)``: skip with the reason if it cannot run here; otherwise warm up,
    time it with pytest-benchmark, and record its row for the summary."""
    config = request.config
    size, include_slow = bench_size(config), config.getoption("--uxnet-include-slow")

    def run(case, measure_memory: bool = False):
        why = runner.skip_reason(case, size, include_slow)
        if why:
            config.stash[_ROWS].append(runner.make_row(case, note=why))
            pytest.skip(why)
        device = torch.device(case.device)
        fn, pool = runner.build(case)
        call = timed_call(fn, device)
        first = warm_up(call, pool)
        rounds = plan_rounds(first, size.budget_s, size.min_rounds, size.max_rounds)
        benchmark.group = case.group
        benchmark.extra_info.update(impl=case.label, reference=case.is_reference, size=size.name)
        benchmark.pedantic(call, setup=pool.next_for_pedantic, rounds=rounds, iterations=1, warmup_rounds=0)
        if benchmark.disabled:  # plain `pytest benchmarks/`: the call ran once as a smoke test, nothing timed
            return
        peak = peak_memory(call, pool.next(), device) if measure_memory else None
        row = runner.make_row(case, benchmark.stats.stats.median, rounds, peak)
        benchmark.extra_info.update(flops=row.flops, min_bytes=row.min_bytes, peak_bytes=row.peak_bytes,
                                    peak_method=row.peak_method)
        config.stash[_ROWS].append(row)

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = config.stash.get(_ROWS, [])
    texts = config.stash.get(_TEXT, [])
    if not rows and not texts:
        return
    add_speedups(rows)
    size = bench_size(config)
    terminalreporter.write_sep("=", f"uxnet: speedups vs the PyTorch reference, same run ({size.name} size)")
    terminalreporter.write_line(f"sizes: {size.note}; device: {bench_device(config)}, torch threads "
                                f"{torch.get_num_threads()}")
    terminalreporter.write_line("x ref: reference median (same layout) / median; x best ref: the faster reference "
                                "layout / median; GB/s: activation bytes floor / median")
    if rows:
        terminalreporter.write_line(format_table(rows, with_memory=any(r.peak_bytes is not None for r in rows)))
    for text in texts:
        terminalreporter.write_line("")
        terminalreporter.write_line(text)
    path = config.getoption("--uxnet-json")
    if path:
        with open(path, "w") as f:
            json.dump({"size": size.name, "rows": [r.as_dict() for r in rows], "texts": texts}, f, indent=2)
        terminalreporter.write_line(f"wrote {path}")
