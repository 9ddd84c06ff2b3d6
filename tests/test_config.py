"""Run configs: every file in configs/ parses; unknown keys and bad values name the file, key and line;
malformed config / constitution / prompt files fail before Ray or a JAX backend starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import RunConfig, load_run_config, redacted
from trainer.configlib import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_run_configs():
    names = {p.name for p in RUN_CONFIGS}
    assert {"demo.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_config_file_parses(path):
    config = load_run_config(path)
    assert isinstance(config, RunConfig)
    assert config.run.stages


def test_unknown_key_names_file_line_and_closest_match(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  iterations: 2\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message and "batch_sise" in message and "'batch_size'" in message


def test_override_typo_and_bad_values_are_rejected():
    with pytest.raises(ConfigError, match="rollout.num_worker.*num_workers"):
        load_run_config(None, ["rollout.num_worker=2"])
    with pytest.raises(ConfigError, match="run.stages"):
        load_run_config(None, ["run.stages=[ppo,sl]"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_run_config(None, ["ppo.iterations=many"])
    with pytest.raises(ConfigError, match="cudnn needs model.dtype: bfloat16"):
        load_run_config(None, ["model.attention=cudnn"])
    assert load_run_config(None, ["model.attention=cudnn", "model.dtype=bfloat16"]).model.attention == "cudnn"


@pytest.mark.parametrize("label, line, key", [
    ("  scoring: contrast\n  few_shot: 0\n  debias_order: true\n", 6, "label.debias_order"),
    ("  scoring: contrast\n  chain_of_thought: true\n  few_shot: 0\n  debias_order: false\n", 5,
     "label.chain_of_thought"),
    ("  chain_of_thought: true\n  cot_clamp: [0.6, 0.9]\n", 5, "label.cot_clamp"),
])
def test_worker_settings_rules_are_checked_at_load_with_file_line_and_key(tmp_path, label, line, key):
    """The label section is the FeedbackConfig the workers use: its cross-field rules fail the load,
    pointing at the key to change, not a worker mid-run."""
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\nlabel:\n" + label)
    with pytest.raises(ConfigError) as err:
        load_run_config(path)
    assert f"{path}, line {line}, key '{key}'" in str(err.value)


def test_worker_settings_are_the_loaded_classes():
    from trainer.critique import CritiqueConfig
    from trainer.feedback import FeedbackConfig

    config = load_run_config(ROOT / "configs" / "demo.yaml")
    assert isinstance(config.sl, CritiqueConfig) and isinstance(config.label, FeedbackConfig)
    with pytest.raises(ConfigError, match="top_p"):
        load_run_config(None, ["ppo.top_p=0"])


def test_overrides_and_stage_selection():
    config = load_run_config(ROOT / "configs" / "tiny.yaml", ["run.stages=[sl,label]", "ppo.update.kl.beta=0.1"])
    assert config.run.stages == ("sl", "label")
    assert config.ppo.update.kl.beta == 0.1


def test_dpo_route_and_its_settings():
    config = load_run_config(ROOT / "configs" / "tiny.yaml", ["run.stages=[sl,label,dpo]", "dpo.loss=ipo"])
    assert config.run.stages == ("sl", "label", "dpo") and config.dpo.loss == "ipo"
    assert load_run_config(None).run.stages == ("sl", "label", "rm", "ppo")  # DPO is chosen, never the default
    with pytest.raises(ConfigError, match="run.stages: ppo and dpo are two ways"):
        load_run_config(None, ["run.stages=[sl,label,dpo,rm,ppo]"])
    with pytest.raises(ConfigError, match="dpo.beta"):
        load_run_config(None, ["dpo.beta=0"])


def test_secrets_are_redacted():
    data = {"ray": {"address": "ray://user:pw@host:10001", "auth_token": "abc"}, "run": {"name": "x"}}
    out = redacted(data)
    assert out["ray"]["auth_token"] == "<redacted>" and "pw" not in out["ray"]["address"]
    assert out["run"]["name"] == "x"


CHECK = """
import sys
from trainer.cli import main
rc = main(sys.argv[1:])
import jax._src.xla_bridge as xb
print("RESULT", rc, "ray" in sys.modules, bool(xb._backends))
"""


def _run_cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", CHECK, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def _assert_clean_failure(proc, *needles):
    assert "Traceback" not in proc.stderr, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][0]
    rc, ray_imported, jax_started = line.split()[1:]
    assert rc == "2" and ray_imported == "False" and jax_started == "False", (line, proc.stderr)
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_malformed_config_fails_before_ray_and_jax(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run:\n  name: x\n  stagez: [sl]\n")
    _assert_clean_failure(_run_cli(["train", "--config", str(path)], tmp_path), str(path), "stagez", "stages")


def test_malformed_constitution_fails_before_ray_and_jax(tmp_path):
    constitution = tmp_path / "c.yaml"
    constitution.write_text("name: broken\nversion: '1'\nprinciples: []\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"constitution: {constitution}\nrun: {{runs_dir: {tmp_path}/runs}}\n")
    _assert_clean_failure(_run_cli(["train", "--config", str(config)], tmp_path), str(constitution))
    assert not (tmp_path / "runs").exists()


def test_malformed_prompt_file_fails_before_ray_and_jax(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + '{"prompt": "broken\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {{prompts: ['{prompts}']}}\nrun: {{runs_dir: {tmp_path}/runs}}\n")
    _assert_clean_failure(_run_cli(["train", "--config", str(config)], tmp_path), str(prompts), "line 2")


def test_a_run_saved_before_a_new_config_key_still_resumes(tmp_path):
    import yaml

    from trainer.pipeline import RunDirError, prepare_run_dir

    config = load_run_config(None, [f"run.runs_dir={tmp_path}"])
    run_dir = prepare_run_dir(config, resume=False)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["model"]["attention"]  # as written by a cairl without that key
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert prepare_run_dir(config, resume=True) == run_dir
    changed = load_run_config(None, [f"run.runs_dir={tmp_path}", "model.dtype=bfloat16"])
    with pytest.raises(RunDirError, match="model.dtype: 'float32' → 'bfloat16'"):
        prepare_run_dir(changed, resume=True)


def test_exponent_without_a_dot_is_a_number():
    # PyYAML (YAML 1.1) reads 2e-5 as a string; configs and overrides mean the number.
    config = load_run_config(None, ["sl.optimizer.learning_rate=2e-5", "rm.optimizer.learning_rate=3E-4"])
    assert config.sl.optimizer.learning_rate == 2e-5 and config.rm.optimizer.learning_rate == 3e-4
    for bad in (".nan", ".inf", "-.inf", "1e999"):  # a NaN learning rate would pass every range check
        with pytest.raises(ConfigError, match="ppo.policy_optimizer.learning_rate.*expected a finite number"):
            load_run_config(None, [f"ppo.policy_optimizer.learning_rate={bad}"])
    with pytest.raises(ConfigError, match="expected a number"):
        load_run_config(None, ["sl.optimizer.learning_rate=fast"])
