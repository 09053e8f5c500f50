"""The small 24 kHz codec that ships with the package (trained by `encodec-fast train`): loads
offline with its hash checked, loads strictly into upstream's modules, is a working codec (not
random weights), and the command, `.ecdc` files and the tokenizer use it by name."""

import json
import warnings

import encodec
import pytest
import soundfile as sf
import torch

from encodec_fast import EncodecModel, cli, ecdc, pretrained
from encodec_fast.testing import make_signal
from encodec_fast.train.metrics import mel_distance, si_snr


@pytest.fixture(scope="module")
def small():
    return EncodecModel.encodec_model_24khz_small().eval()


def test_the_checkpoint_ships_within_8_mb_and_loads_without_a_download(small, monkeypatch):
    path = pretrained.PACKAGED_DIR / pretrained.PACKAGED["encodec_24khz_small"]
    assert path.is_file() and path.stat().st_size <= 8 * 10 ** 6
    assert pretrained.sha256_file(path).startswith(pretrained._hash_prefix(path.name))
    monkeypatch.setenv("ENCODEC_FAST_ROOT_URL", "http://127.0.0.1:9/nothing-here/")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")
    model = EncodecModel.encodec_model_24khz_small()
    assert model.name == "encodec_24khz_small" and model.quantizer.n_q == 32
    assert model.target_bandwidths == [1.5, 3.0, 6, 12.0, 24.0]


def test_upstream_loads_it_strictly_and_gives_the_same_codes(small):
    kw = dict(channels=1, dimension=16, n_filters=8, lstm=1, causal=True, norm="weight_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        up = encodec.EncodecModel(encodec.modules.SEANetEncoder(**kw), encodec.modules.SEANetDecoder(**kw),
                                  encodec.quantization.ResidualVectorQuantizer(dimension=16, n_q=32, bins=1024),
                                  [1.5, 3.0, 6.0, 12.0, 24.0], 24000, 1).eval()
    up.load_state_dict(small.state_dict(), strict=True)
    x = make_signal(24000, 24000, seed=3)[None]
    for bw in (1.5, 24.0):
        up.set_target_bandwidth(bw)
        small.set_target_bandwidth(bw)
        with torch.no_grad():
            assert torch.equal(small.encode(x)[0][0], up.encode(x)[0][0])


def test_it_is_a_codec_not_random_weights(small):
    """On signals it never saw, more bandwidth is better, and it is far from a random init."""
    torch.manual_seed(0)
    random = EncodecModel.encodec_model_24khz_small(pretrained=False).eval()
    x = torch.stack([make_signal(24000, 3 * 24000, seed=s) for s in (11, 12)])
    scores = {}
    with torch.no_grad():
        for bw in (1.5, 24.0):
            for name, model in (("small", small), ("random", random)):
                model.set_target_bandwidth(bw)
                y = model.decode(model.encode(x))[..., :x.shape[-1]]
                scores[name, bw] = (float(si_snr(x, y).mean()), float(mel_distance(x, y, 24000).mean()))
    assert scores["small", 24.0][0] > scores["small", 1.5][0]
    assert scores["small", 24.0][0] > 3.0, scores
    assert scores["small", 24.0][0] > scores["random", 24.0][0] + 10, scores
    assert scores["small", 6.0 if ("small", 6.0) in scores else 24.0][1] < scores["random", 24.0][1]


def test_the_command_compresses_with_it_and_decompress_finds_it_by_name(tmp_path, small):
    wav = tmp_path / "in.wav"
    sf.write(wav, make_signal(24000, 2 * 24000, seed=5).T.numpy(), 24000)
    assert cli.main([str(wav), str(tmp_path / "a.ecdc"), "-m", "small", "-b", "6"]) == 0
    header = ecdc.read_ecdc_header(ecdc.as_file((tmp_path / "a.ecdc").read_bytes()))
    assert header["m"] == "encodec_24khz_small" and header["nc"] == 8
    assert cli.main([str(tmp_path / "a.ecdc"), str(tmp_path / "a.wav")]) == 0  # no --model: from the header
    out, rate = sf.read(tmp_path / "a.wav", dtype="float32")
    assert rate == 24000 and len(out) == 2 * 24000
    small.set_target_bandwidth(6.0)
    with torch.no_grad():
        expected = small.decode(small.encode(torch.from_numpy(sf.read(wav, dtype="float32")[0])[None, None]))
    assert float((torch.from_numpy(out) - expected[0, 0, :len(out)]).abs().max()) < 1e-4  # 16-bit WAV


def test_the_command_refuses_the_lm_and_the_hq_flag_with_it(tmp_path, capsys):
    wav = tmp_path / "in.wav"
    sf.write(wav, make_signal(24000, 4800).T.numpy(), 24000)
    assert cli.main([str(wav), str(tmp_path / "a.ecdc"), "-m", "small", "--lm"]) == 1
    assert "No entropy-coding LM" in capsys.readouterr().err
    assert cli.main([str(wav), str(tmp_path / "b.ecdc"), "-m", "small", "--hq"]) == 1
    assert "--hq" in capsys.readouterr().err


def test_tokenize_takes_it(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "a.wav", make_signal(16000, 16000, seed=1).T.numpy(), 16000)
    assert cli.main(["tokenize", str(folder), "-o", str(tmp_path / "codes"), "--model", "small", "-b", "3",
                     "--workers", "0", "--quiet"]) == 0
    import pyarrow.parquet as pq
    rows = pq.read_table(next((tmp_path / "codes").glob("*.parquet"))).to_pylist()
    assert len(rows) == 1
    meta = json.dumps(rows[0], default=str)
    assert "a.wav" in meta
