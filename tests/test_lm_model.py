"""The LM's architecture and state dict against upstream's (coding with it comes later)."""

import warnings

import encodec
import pytest
import torch

import encodec_fast
from encodec_fast import pretrained


@pytest.mark.parametrize("n_q,past", [(32, 262), (16, 525)])
def test_lm_state_dict_and_outputs_match_upstream(n_q, past):
    torch.manual_seed(n_q)
    up = encodec.model.LMModel(n_q, 1024, num_layers=5, dim=200, past_context=past).eval()
    ours = encodec_fast.LMModel(n_q, 1024, num_layers=5, dim=200, past_context=past).eval()
    assert list(ours.state_dict()) == list(up.state_dict())
    ours.load_state_dict(up.state_dict(), strict=True)
    idx = torch.randint(0, 1025, (2, n_q, 6))
    with torch.no_grad():
        ref, ref_states, ref_off = up(idx)
        out, states, off = ours(idx)
        assert torch.equal(out, ref) and off == ref_off
        ref2, _, _ = up(idx[:, :, :1], ref_states, ref_off)
        out2, _, _ = ours(idx[:, :, :1], states, off)
    assert torch.equal(out2, ref2)
    assert out.shape == (2, 1024, n_q, 6)


def test_get_lm_model_loads_by_the_same_rules(pair_24, tmp_path, monkeypatch):
    _, ours = pair_24
    lm = encodec_fast.LMModel(32, 1024, num_layers=5, dim=200, past_context=262)
    path = tmp_path / "lm.th"
    torch.save(lm.state_dict(), path)
    name = f"encodec_lm_24khz-{pretrained.sha256_file(path)[:8]}.th"
    path.rename(tmp_path / name)
    monkeypatch.setitem(pretrained.CHECKPOINTS, "encodec_lm_24khz", name)
    loaded = ours.get_lm_model(repository=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), lm.state_dict().values()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unnamed = encodec_fast.EncodecModel.encodec_model_24khz(pretrained=False)
    with pytest.raises(RuntimeError, match="No LM"):
        unnamed.get_lm_model()
