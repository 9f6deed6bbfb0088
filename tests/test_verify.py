"""``moonforge verify``: transformers against moonforge on the same tokens, with a failing case."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moonforge.checkpoint.convert import hf_to_native
from moonforge.checkpoint.verify import compare_logits
from moonforge.cli import main
from tests.hf_reference import make_hf_model


def test_verify_passes_on_a_faithful_conversion_and_fails_on_a_perturbed_one(tmp_path, capsys):
    make_hf_model("moonlight", tmp_path / "hf")
    hf_to_native(tmp_path / "hf", tmp_path / "native")
    rc = main(["verify", "--hf", str(tmp_path / "hf"), "--ckpt", str(tmp_path / "native"), "--tokens", "32",
               "--json", str(tmp_path / "ok.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "OK: within tolerance" in out
    result = json.loads((tmp_path / "ok.json").read_text())
    assert result["max_abs_diff"] < 1e-5 and result["top1_agreement"] == 1.0 and result["cosine"] > 0.9999999
    assert result["tokens"] == 2 * 32 and result["failures"] == []

    # One expert's weights scaled by 1.5 in the checkpoint under test: verify must notice.
    (tmp_path / "bad").mkdir()
    for file in (tmp_path / "hf").iterdir():
        (tmp_path / "bad" / file.name).write_bytes(file.read_bytes())
    tensors = load_file(tmp_path / "bad" / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"] *= 1.5
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    hf_to_native(tmp_path / "bad", tmp_path / "bad_native")
    rc = main(["verify", "--hf", str(tmp_path / "hf"), "--ckpt", str(tmp_path / "bad_native"), "--tokens", "32"])
    captured = capsys.readouterr()
    assert rc == 1 and "FAIL: max |diff|" in captured.err
    assert "max |diff|" in captured.out and "top-1 agree" in captured.out


def test_compare_logits_numbers():
    a = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])
    b = torch.tensor([[[1.0, 2.0, 3.5], [1.0, 2.0, 3.0]]])
    c = compare_logits(a, b)
    assert c.max_abs_diff == pytest.approx(2.0) and c.mean_abs_diff == pytest.approx(4.5 / 6)
    assert c.top1_agreement == 0.5 and c.tokens == 2
    cos2 = (3 + 4 + 3) / 14
    assert c.min_token_cosine == pytest.approx(cos2)
    assert c.cosine == pytest.approx(float(a.flatten() @ b.flatten()) / float(a.norm() * b.norm()))
