"""``uxnet memory``: table and JSON output, the budget verdict, and clear errors for bad arguments."""

import json

import pytest

from uxnet import cli
from uxnet.memory.report import parse_size

TINY_ARGS = ["--feat-size", "4", "8", "16", "32", "--hidden-size", "16", "--depths", "1", "1", "1", "1",
             "--out-chans", "2", "--device", "cpu"]


def test_memory_json_has_both_models_and_the_budget_verdict(capsys):
    argv = ["memory", "--roi", "32", "--batch", "2", "--official", "--budget", "1GiB", "--json"] + TINY_ARGS
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    uxnet, official = report["predictions"]
    assert uxnet["spec"]["kind"] == "uxnet" and official["spec"]["kind"] == "official"
    assert uxnet["spec"]["roi"] == [32, 32, 32] and uxnet["spec"]["batch"] == 2
    assert uxnet["spec"]["config"]["feat_size"] == [4, 8, 16, 32]
    for p in (uxnet, official):
        assert p["peak_bytes"] > p["start_bytes"] > 0
        assert sum(p["saved_by_block"].values()) == p["saved_bytes"]
        assert p["step_bytes"] == p["peak_bytes"] - p["start_bytes"]
    assert report["budget_bytes"] == 2**30
    assert report["budget"]["uxnet"]["fits"] is True  # a ~100 MiB step fits in 1 GiB
    assert report["budget"]["official"]["fraction_of_budget"] == official["peak_bytes"] / 2**30


def test_memory_table_prints_blocks_peak_and_verdict(capsys):
    argv = ["memory", "--roi", "32", "--batch", "1", "--checkpointing", "--official", "--budget", "1MB"] + TINY_ARGS
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for text in ("uxnet_3d.stage0", "encoder1", "decoder2", "loss", "total saved activations", "PEAK of the step",
                 "uxnet (ckpt)", "official", "/ official", "budget 1MB = 0.00 GiB", "DOES NOT FIT",
                 "the official model has no activation checkpointing"):
        assert text in out, text


def test_memory_amp_flag_picks_the_device_dtype(capsys):
    assert cli.main(["memory", "--roi", "32", "--batch", "1", "--amp", "--json"] + TINY_ARGS) == 0
    spec = json.loads(capsys.readouterr().out)["predictions"][0]["spec"]
    assert spec["amp"] == "bfloat16" and spec["device"] == "cpu"


@pytest.mark.parametrize("args,message", [
    (["--roi", "40"], "multiples of 16"),
    (["--roi", "32", "32"], "1 or 3 positive multiples of 16"),
    (["--batch", "0"], "batch must be a positive int"),
    (["--budget", "lots"], "not a memory size"),
    (["--budget=-3GB"], "not a memory size"),
    (["--hidden-size", "0"], "UXNet: channel counts must be positive"),
    (["--kernel-size", "4"], "kernel_size must be an odd positive int"),
])
def test_memory_rejects_bad_arguments_with_one_line(capsys, args, message):
    assert cli.main(["memory"] + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("uxnet memory: error:") and message in err, err


def test_memory_rejects_unknown_amp_dtype():
    with pytest.raises(SystemExit) as exc:
        cli.main(["memory", "--amp", "float8"])
    assert exc.value.code == 2


@pytest.mark.parametrize("text,expected", [
    ("24GB", 24 * 10**9), ("24 GiB", 24 * 2**30), ("24G", 24 * 2**30), ("11000MiB", 11000 * 2**20),
    ("1.5TB", 15 * 10**11), ("80", 80 * 2**30), ("512kib", 512 * 2**10),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "24XB", "0GB", "-1GiB", "24 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="not a memory size"):
        parse_size(text)
