"""DistillConfig: kwargs, YAML with command-line overrides, validation messages, the saved resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llmdistill import DistillConfig
from llmdistill.objectives import OBJECTIVES


def test_yaml_with_command_line_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"divergence": "jsd", "jsd_beta": 0.3, "alpha_kd": 0.7, "max_steps": 4}))
    config = DistillConfig.from_yaml(path, ["--alpha_kd", "0.2", "--temperature", "2.0", "--output_dir", str(tmp_path)])
    assert (config.divergence, config.jsd_beta, config.alpha_kd, config.temperature, config.max_steps) == (
        "jsd", 0.3, 0.2, 2.0, 4
    )


def test_saved_config_reads_back_equal(tmp_path):
    config = DistillConfig(output_dir=str(tmp_path), divergence="skl", skew_alpha=0.2, max_length=300, report_to=[])
    path = config.save_yaml(tmp_path)
    again = DistillConfig.from_yaml(path)
    assert again.to_dict() == config.to_dict()


def test_unknown_yaml_key_names_the_key_and_a_suggestion(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("divergense: fkl\n")
    with pytest.raises(ValueError, match="unknown option 'divergense'.*'divergence'"):
        DistillConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"divergence": "kll"}, "divergence='kll' is unknown: choose one of fkl"),
        ({"objective": "magic"}, "objective='magic' is unknown"),
        ({"alpha_kd": 1.5}, "alpha_kd=1.5"),
        ({"temperature": 0.0}, "temperature"),
        ({"jsd_beta": 2.0, "divergence": "jsd"}, "beta"),
        ({"max_prompt_length": 512, "max_length": 512}, "max_length=512 must exceed"),
        ({"model_dtype": "int8"}, "model_dtype='int8'"),
        ({"loss_chunk_size": 0}, "loss_chunk_size=0 must be"),
    ],
)
def test_invalid_values_name_the_field(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(output_dir=str(tmp_path), **options)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_a_valid_distill_config(path, tmp_path):
    config = DistillConfig.from_yaml(path, ["--output_dir", str(tmp_path)])
    assert config.objective == "sft" or config.objective in OBJECTIVES
