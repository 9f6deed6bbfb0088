"""Logits of moonforge's model against transformers' own DeepseekV3/V2 on tiny random checkpoints."""

import pytest
import torch

import moonforge
from tests.hf_reference import REFERENCE_CONFIGS, make_hf_model


@pytest.mark.parametrize("kind", sorted(REFERENCE_CONFIGS))
def test_logits_match_transformers(kind, tmp_path):
    reference = make_hf_model(kind, tmp_path)
    ours = moonforge.load_model(tmp_path, dtype=torch.float32)
    torch.manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40))
    with torch.no_grad():
        want = reference(ids).logits
        got = ours(ids)
    diff = (got - want).abs().max().item()
    print(f"{kind}: max |logit diff| = {diff:.3e}")
    assert diff < 1e-5


def test_packed_documents_equal_separate_rows(tmp_path):
    """Two documents packed in one row give the logits of each document run alone."""
    make_hf_model("moonlight", tmp_path)
    model = moonforge.load_model(tmp_path)
    torch.manual_seed(2)
    a, b = torch.randint(0, 512, (1, 11)), torch.randint(0, 512, (1, 21))
    packed = torch.cat([a, b], dim=1)
    docs = torch.tensor([[0] * 11 + [1] * 21])
    with torch.no_grad():
        got = model(packed, document_ids=docs)
        want = torch.cat([model(a), model(b)], dim=1)
    assert (got - want).abs().max().item() < 1e-5
