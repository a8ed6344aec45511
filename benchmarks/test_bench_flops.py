"""FLOPs (torch.utils.flop_counter.FlopCounterMode, on the meta device) and parameters of the paper's Table 1
model and Table 3 kernel ablation at a 96^3 patch. Timed once so that it runs under --benchmark-only."""

from uxnet.bench import flops

DEFAULT_FLOPS = 1.1556e12  # FlopCounterMode, in_chans=1, out_chans=14, 96^3 (2 FLOPs per multiply-add)
DEFAULT_PARAMS = 53_006_510


def test_flops_and_params_table(benchmark, record_text):
    rows = benchmark.pedantic(flops.paper_table, rounds=1, iterations=1)
    default = rows[0]
    record_text(flops.format_table(rows) + f"\nFLOPs: FlopCounterMode (2 per multiply-add); GMACs = GFLOPs / 2; the "
                f"paper's {flops.PAPER_TABLE1['flops_g']} G follows neither convention (docs/PERFORMANCE.md)")
    benchmark.extra_info.update(table=[r.as_dict() for r in rows])
    assert default.params == DEFAULT_PARAMS
    assert abs(default.flops / DEFAULT_FLOPS - 1) <= 1e-3
    mismatched = [(r.name, r.params) for r in rows if not flops.matches_paper_params(r)]
    assert not mismatched, f"parameter counts that do not round to the paper's: {mismatched}"
