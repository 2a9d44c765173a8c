"""Bad input to the exporter gets a clear error (exit code 2 from the CLI), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Exported

from inferaligner_onnx.cli import main
from inferaligner_onnx.config import ExportError
from inferaligner_onnx.export import load_source
from inferaligner_onnx.fixture import write_hf_model


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    src = write_hf_model(tmp_path / "hf", seed=3)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"unsupported architecture 'gpt_neox'.*Llama family"):
        load_source(src)


def test_unsupported_rope_scaling_is_refused(tmp_path: Path) -> None:
    src = write_hf_model(tmp_path / "hf", seed=3, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ExportError, match="rope scaling 'yarn'"):
        load_source(src)


def test_missing_source_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no config\.json"):
        load_source(tmp_path)


def test_missing_weights_are_a_clear_error(tmp_path: Path) -> None:
    src = write_hf_model(tmp_path / "hf", seed=3)
    (src / "model.safetensors").unlink()
    with pytest.raises(ExportError, match=r"no \*.safetensors"):
        load_source(src)


def test_truncated_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    src = write_hf_model(tmp_path / "hf", seed=3)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="truncated"):
        load_source(src)


def test_existing_output_is_not_overwritten_without_force(tiny: Exported, capsys) -> None:
    before = (tiny.out / "manifest.json").read_bytes()
    args = ["export", str(tiny.hf_dir), str(tiny.out)]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (tiny.out / "manifest.json").read_bytes() == before
    assert main([*args, "--force"]) == 0


def test_cli_check_reports_parity(tiny: Exported, capsys) -> None:
    assert main(["check", str(tiny.out), str(tiny.hf_dir), "--tolerance", "1e-4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_abs_logit_diff"] <= 1e-4
    assert report["same_argmax"]
