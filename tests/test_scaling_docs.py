"""README "Scaling out": the FSDP config it shows parses into Lightning's FSDPStrategy with one
wrap unit per ViT block, and on a CPU Lightning refuses it with the message README quotes.
(The torchrun, SLURM and multi-process commands themselves run in tests/test_multinode.py, FSDP
training in tests/test_fsdp.py, and on a GPU in benchmarks/gpu_check.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lit_ft.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_fsdp_yaml(tmp_path: Path) -> Path:
    section = README[README.index("## Scaling out"):]
    (block,) = re.findall(r"```yaml\n(# fsdp\.yaml.*?)```", section, re.S)
    path = tmp_path / "fsdp.yaml"
    path.write_text(block)
    return path


def test_readme_fsdp_config_parses_to_fsdp_with_a_wrap_unit_per_vit_block(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / "smoke.yaml"), "--config", str(readme_fsdp_yaml(tmp_path)),
              "--print_config"])
    assert exit_.value.code == 0
    strategy = yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["auto_wrap_policy"] == ["timm.models.vision_transformer.Block"]
    assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD"


def test_on_a_cpu_lightning_refuses_fsdp_with_the_message_readme_quotes(tmp_path):
    with pytest.raises(ValueError, match="requires a GPU accelerator") as err:
        main(["fit", "--config", str(ROOT / "configs" / "smoke.yaml"), "--config", str(readme_fsdp_yaml(tmp_path)),
              "--trainer.accelerator", "cpu", "--trainer.max_steps", "1"])
    assert "The strategy `fsdp` requires a GPU accelerator" in str(err.value)
    assert '"The strategy `fsdp` requires a GPU accelerator"' in README
