from dataclasses import dataclass, field
from typing import Literal

import pytest

from mmkit.cli import main
from mmkit.config import ConfigError, load_config


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Recipe:
    task: Literal["vq", "chameleon"] = "vq"
    steps: int = 10
    optim: Optim = field(default_factory=Optim)
    model: dict = field(default_factory=dict)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("task: chameleon\noptim:\n  lr: 3e-4\nmodel: {dim: 8}\n")
    cfg = load_config(Recipe, p, ["steps=5", "optim.betas=[0.8, 0.9]", "model.depth=2"])
    assert cfg.task == "chameleon" and cfg.steps == 5
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model == {"dim": 8, "depth": 2}


@pytest.mark.parametrize("text,override,needle", [
    ("optim:\n  lrr: 1\n", [], "unknown key 'optim.lrr'"),
    ("stepz: 1\n", [], "unknown key 'stepz'"),
    ("", ["steps=abc"], "key 'steps': expected an integer"),
    ("task: gpt\n", [], "key 'task': 'gpt' is not one of"),
    ("", ["optim.lr=[1]"], "key 'optim.lr': expected a number"),
])
def test_errors_name_key_and_file(tmp_path, text, override, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(Recipe, p, override)
    assert needle in str(e.value) and "bad.yaml" in str(e.value)


def test_cli_usage_error_is_one_line_exit_2(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkit: error:") and "\n" not in err
