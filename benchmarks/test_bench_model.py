"""Model-level benchmarks: UXNet inference, training step (forward + backward + AdamW step) and re-parameterised
inference, fast backend ("auto") vs "reference", each with its measured peak memory. Cases:
uxnet/bench/model_cases.py."""


def test_model(run_case, model_case):
    run_case(model_case, measure_memory=True)
