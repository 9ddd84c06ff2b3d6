"""`cairl bench rl`: each algorithm's iteration timed and its memory measured against PPO's."""

import json

import pytest

from trainer.cli import main


@pytest.mark.slow  # compiles the PPO and RLOO updates of the tiny preset
def test_bench_rl_reports_time_and_memory_ratios_to_ppo(capsys, eight_devices):
    code = main(["bench", "rl", "--algorithm", "rloo", "--model", "tiny", "--batch", "8", "--group-size", "4",
                 "--seq-len", "32", "--response-len", "16", "--runs", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["results"]) == {"ppo", "rloo"}
    assert result["time_ratio_to_ppo"] > 0
    # No value model, and no optimizer state for one: less memory than PPO's iteration.
    assert result["memory_ratio_to_ppo"] < 1.0
    assert result["results"]["rloo"]["peak_bytes"] < result["results"]["ppo"]["peak_bytes"]


def test_bench_rl_rejects_a_batch_that_is_not_whole_groups(capsys):
    assert main(["bench", "rl", "--algorithm", "grpo", "--model", "tiny", "--batch", "6", "--group-size", "4"]) == 2
    assert "whole groups" in capsys.readouterr().err
