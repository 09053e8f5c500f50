"""Our model against upstream encodec 0.1.1: state dicts, codes, decoded audio."""

import math
import warnings

import encodec
import pytest
import torch

import encodec_fast
from encodec_fast.testing import lengths_for, make_signal, rel_err

DECODE_RTOL = 1e-5


def batch_signal(model, batch, length, seed=0):
    return torch.stack([make_signal(model.sample_rate, length, model.channels, seed=seed + b) for b in range(batch)])


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_state_dict_round_trip(name, request):
    up, ours = request.getfixturevalue(f"pair_{name[:2]}")
    up_sd, our_sd = up.state_dict(), ours.state_dict()
    assert list(our_sd) == list(up_sd)
    for key in up_sd:
        assert our_sd[key].shape == up_sd[key].shape and torch.equal(our_sd[key], up_sd[key]), key
    # and back: upstream strictly loads what we write
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = getattr(encodec.EncodecModel, f"encodec_model_{name}")(pretrained=False)
    fresh.load_state_dict(our_sd, strict=True)
    fresh_ours = getattr(encodec_fast.EncodecModel, f"encodec_model_{name}")(pretrained=False)
    fresh_ours.load_state_dict(fresh.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh_ours.state_dict().values(), our_sd.values()))


def test_parameter_counts(pair_24, pair_48):
    assert sum(p.numel() for p in pair_24[1].parameters()) == 14_851_810
    assert sum(p.numel() for p in pair_48[1].parameters()) == 14_856_294
    assert pair_24[1].frame_rate == 75 and pair_48[1].frame_rate == 150
    assert pair_48[1].segment_length == 48000 and pair_48[1].segment_stride == 47520


def assert_same_frames(up_frames, our_frames):
    assert len(up_frames) == len(our_frames)
    for (uc, us), (oc, os_) in zip(up_frames, our_frames):
        assert oc.dtype == torch.int64 and oc.shape == uc.shape
        mismatch = (oc != uc).sum().item()
        assert mismatch == 0, f"{mismatch} of {uc.numel()} codes differ"
        if us is None:
            assert os_ is None
        else:
            assert os_.shape == us.shape and torch.equal(os_, us)


def check_codes_and_audio(up, ours, x, bandwidth):
    up.set_target_bandwidth(bandwidth)
    ours.set_target_bandwidth(bandwidth)
    with torch.no_grad():
        up_frames = up.encode(x)
        our_frames = ours.encode(x)
        assert_same_frames(up_frames, our_frames)
        ref = up.decode(up_frames)
        out = ours.decode(our_frames)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= DECODE_RTOL


@pytest.mark.parametrize("bandwidth", [1.5, 3.0, 6.0, 12.0, 24.0])
def test_codes_24khz_every_bandwidth(pair_24, bandwidth):
    up, ours = pair_24
    check_codes_and_audio(up, ours, batch_signal(up, 3, 24000 + 123, seed=int(bandwidth * 10)), bandwidth)


@pytest.mark.parametrize("length", lengths_for(24000))
def test_codes_24khz_edge_lengths(pair_24, length):
    up, ours = pair_24
    check_codes_and_audio(up, ours, batch_signal(up, 2, length, seed=length), 24.0)


@pytest.mark.parametrize("bandwidth", [3.0, 6.0, 12.0, 24.0])
def test_codes_48khz_every_bandwidth(pair_48, bandwidth):
    up, ours = pair_48
    # 2.5 segments, batch 2
    length = 2 * 47520 + 24000
    check_codes_and_audio(up, ours, batch_signal(up, 2, length, seed=int(bandwidth)), bandwidth)


@pytest.mark.parametrize("length", [1, 300, 321, 47999, 48000, 48001, 47520 + 480, 5 * 47520 + 777])
def test_codes_48khz_segment_edges(pair_48, length):
    up, ours = pair_48
    check_codes_and_audio(up, ours, batch_signal(up, 1, length, seed=length % 97), 6.0)


def test_no_bandwidth_uses_all_codebooks(pair_24, pair_48):
    for up, ours in (pair_24, pair_48):
        up.bandwidth = None
        ours.bandwidth = None
        x = batch_signal(up, 1, 4000)
        with torch.no_grad():
            frames = ours.encode(x)
        assert frames[0][0].shape[1] == ours.quantizer.n_q
        with torch.no_grad():
            assert_same_frames(up.encode(x), frames)


def test_forward_matches_upstream(pair_24):
    up, ours = pair_24
    up.set_target_bandwidth(6)
    ours.set_target_bandwidth(6)
    x = batch_signal(up, 2, 5000)
    with torch.no_grad():
        ref, out = up(x), ours(x)
    assert out.shape == x.shape
    assert rel_err(out, ref) <= DECODE_RTOL


def test_decode_fewer_codebooks_and_too_many(pair_24):
    _, ours = pair_24
    ours.bandwidth = None
    x = batch_signal(ours, 1, 3200)
    codes, _ = ours.encode(x)[0]
    with torch.no_grad():
        y = ours.decode([(codes[:, :3], None)])
    assert y.shape == (1, 1, 3200)
    with pytest.raises(ValueError, match="codebooks"):
        ours.decode([(torch.zeros(1, 33, 10, dtype=torch.long), None)])


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_encode_batch_equals_one_by_one(name, request):
    up, ours = request.getfixturevalue(f"pair_{name[:2]}")
    ours.set_target_bandwidth(24.0 if name == "24khz" else 12.0)
    gen = torch.Generator().manual_seed(7)
    sr = ours.sample_rate
    lengths = [1, 7, 320, 999, int(0.73 * sr), int(0.2 * sr) + 5, int(1.3 * sr) + 11]
    if name == "48khz":
        lengths += [48000, 2 * 47520 + 100]
    order = torch.randperm(len(lengths), generator=gen).tolist()
    wavs = [make_signal(sr, lengths[i], ours.channels, seed=i) for i in order]
    with torch.no_grad():
        batched = ours.encode_batch(wavs, max_batch_samples=3 * sr)
        for wav, frames in zip(wavs, batched):
            alone = ours.encode(wav[None])
            assert_same_frames(alone, frames)
    # and through upstream, for the clips themselves
    up.set_target_bandwidth(ours.bandwidth)
    with torch.no_grad():
        assert_same_frames(up.encode(wavs[0][None]), batched[0])


def test_bad_inputs(pair_24, pair_48):
    _, ours = pair_24
    with pytest.raises(ValueError, match="shape"):
        ours.encode(torch.zeros(100))
    with pytest.raises(ValueError, match="channel"):
        ours.encode(torch.zeros(1, 2, 100))
    with pytest.raises(ValueError, match="empty"):
        ours.encode(torch.zeros(1, 1, 0))
    with pytest.raises(TypeError):
        ours.encode(torch.zeros(1, 1, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="channel"):
        pair_48[1].encode(torch.zeros(1, 1, 1000))
    with pytest.raises(ValueError, match="bandwidth"):
        pair_48[1].set_target_bandwidth(1.5)
    with pytest.raises(ValueError, match="one frame"):
        ours.decode([(torch.zeros(1, 2, 3, dtype=torch.long), None)] * 2)


def test_weight_norm_cache_follows_parameter_updates(pair_24):
    _, ours = pair_24
    model = encodec_fast.EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(ours.state_dict())
    model.set_target_bandwidth(24)
    x = batch_signal(model, 1, 3200)
    with torch.no_grad():
        before = model.encode(x)[0][0]
        model.encoder.model[0].conv.conv.weight_g.mul_(3.0)  # in-place change must invalidate the fold
        after = model.encode(x)[0][0]
        model.load_state_dict(ours.state_dict())
        again = model.encode(x)[0][0]
    assert not torch.equal(before, after)
    assert torch.equal(before, again)


def test_training_forward_has_gradients(pair_24):
    _, ours = pair_24
    model = encodec_fast.EncodecModel.encodec_model_24khz(pretrained=False)
    model.load_state_dict(ours.state_dict())
    x = batch_signal(model, 1, 3200)
    emb = model.encoder(x)
    y = model.decoder(emb)
    y.pow(2).mean().backward()
    g = model.encoder.model[0].conv.conv.weight_v.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # with grad the weight-normed path matches the cached inference path
    with torch.no_grad():
        assert rel_err(model.encoder(x), emb.detach()) <= 1e-5


def test_quantizer_matches_upstream_in_eval_forward(pair_24):
    up, ours = pair_24
    x = torch.randn(2, 128, 37)
    with torch.no_grad():
        ref = up.quantizer(x, 75, 6.0)
        out = ours.quantizer(x, 75, 6.0)
    assert torch.equal(ref.codes, out.codes)
    assert torch.equal(ref.quantized, out.quantized)
    assert math.isclose(float(ref.bandwidth), float(out.bandwidth))


@pytest.mark.parametrize("name", ["24khz", "48khz"])
def test_stacked_encoding_on_cpu_equals_separate_calls(name, request, monkeypatch):
    """The batched (GPU) path, forced on CPU: padding rebuilt per row, LSTM/ELU/search per row."""
    import encodec_fast.model as model_module
    _, ours = request.getfixturevalue(f"pair_{name[:2]}")
    ours.set_target_bandwidth(6.0)
    sr = ours.sample_rate
    wavs = [make_signal(sr, n, ours.channels, seed=n) for n in (int(1.2 * sr) + 3, 5, 700, int(0.5 * sr))]
    with torch.no_grad():
        separate = ours.encode_batch(wavs)
        full = ours.encode(torch.stack([wavs[0]] * 2))
        monkeypatch.setattr(model_module, "BATCH_ON_CPU", True)
        stacked = ours.encode_batch(wavs)
        full_stacked = ours.encode(torch.stack([wavs[0]] * 2))
    for a, b in zip(separate, stacked):
        assert_same_frames(a, b)
    assert_same_frames(full, full_stacked)


@pytest.mark.parametrize("head_rows,tail_samples", [(1, 48_000), (4, 48_000), (4, 3 * 48_000), (256, 64 * 48_000)])
def test_decode_chunking_matches_upstream(pair_48, monkeypatch, head_rows, tail_samples):
    """Segments share decoder calls in chunks (frame-rate layers, then upsampling); any chunking
    must decode as upstream's one-segment-at-a-time loop, including the shorter last segment."""
    import encodec_fast.model as model_module
    up, ours = pair_48
    monkeypatch.setattr(model_module, "HEAD_BATCH_ROWS", head_rows)
    monkeypatch.setitem(model_module.SEGMENT_BATCH_SAMPLES, "cpu", tail_samples)
    up.set_target_bandwidth(12.0)
    x = batch_signal(up, 2, 4 * 47520 + 1000, seed=5)
    with torch.no_grad():
        frames = up.encode(x)
        ref = up.decode(frames)
        out = ours.decode(frames)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= DECODE_RTOL
