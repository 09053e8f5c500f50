"""Codec quality against bitrate on held-out audio the suite generates: speech (espeak-ng voices
and languages not in the small model's training set) and synthesized music, the same clips as
`tools/make_train_corpus.py`'s held-out split. For each bandwidth: SI-SNR, mel distance and
multi-scale STFT distance (encodec_fast.train.metrics), PESQ and STOI when the `pesq` / `pystoi`
packages are installed; ours encodes, and ours and upstream each decode the same codes, so their
difference is measured (reported per bandwidth), not assumed. "ours, unquantized": the decoder on the
encoder's latents without the quantizer, the ceiling no bitrate can pass.

Checkpoints: `--checkpoint PATH` (its architecture is found by loading it), else the shipped
small model, plus the official 24 / 48 kHz weights when they are already on this machine.
"""

import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

import numpy as np
import torch

from bench import peers
from bench.core import Context, benchmark


def heldout_clips(kinds: tp.Sequence[str], count: int, seconds: float, seed: int = 0
                  ) -> tp.Tuple[tp.Dict[str, tp.List[torch.Tensor]], tp.Dict[str, str]]:
    """{kind: [mono 24 kHz clips]} (first `seconds` of each), and {kind: reason} for kinds that
    cannot be made here (speech without espeak-ng). With $ENCODEC_FAST_BENCH_CLIPS set to a folder,
    each clip is read from it when there (`heldout_<kind>_<seed>_<i>.npy`, the whole clip) and written
    to it when made: a machine without espeak-ng (a GPU machine) measures on the clips made elsewhere."""
    from tools import make_train_corpus as corpus
    cache = os.environ.get("ENCODEC_FAST_BENCH_CLIPS")
    clips: tp.Dict[str, tp.List[torch.Tensor]] = {}
    missing: tp.Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            out = []
            for i in range(count):
                saved = Path(cache) / f"heldout_{kind}_{seed}_{i}.npy" if cache else None
                if saved is not None and saved.exists():
                    wav = np.load(saved)
                elif kind == "speech" and shutil.which("espeak-ng") is None:
                    missing[kind] = "espeak-ng is not installed (apt-get install espeak-ng)"
                    break
                else:
                    rng = np.random.default_rng([seed, True, kind == "music", i])  # make_train_corpus's held-out seeds
                    if kind == "speech":
                        wav = corpus.speech(rng, corpus.HELDOUT_LANGS, corpus.HELDOUT_VARIANTS, Path(tmp))
                    else:
                        wav = corpus.music(rng, float(rng.uniform(4, 12)))
                    if saved is not None:
                        saved.parent.mkdir(parents=True, exist_ok=True)
                        np.save(saved, np.asarray(wav, dtype=np.float32))
                out.append(torch.from_numpy(np.asarray(wav, dtype=np.float32))[None, : int(seconds * corpus.RATE)])
            if kind not in missing:
                clips[kind] = out
    return clips, missing


def _which_model(state: tp.Dict[str, torch.Tensor]) -> str:
    for model in ("24khz", "48khz", "small"):
        try:
            peers.ours_model(model, state)
            return model
        except RuntimeError:
            continue
    raise ValueError("the checkpoint loads into none of the 24khz, 48khz and small architectures")


def checkpoints(ctx: Context) -> tp.List[tp.Tuple[str, tp.Dict[str, torch.Tensor], str]]:
    """(model, state dict, where from) for each checkpoint to evaluate."""
    if ctx.checkpoint is not None:
        state, source = peers.load_state("small", str(ctx.checkpoint))
        return [(_which_model(state), state, source)]
    out = []
    for model in ("small", "24khz", "48khz"):
        state, source = peers.load_state(model, None)
        if not source.startswith("random"):
            out.append((model, state, source))
    return out


def _optional_scores(x: torch.Tensor, y: torch.Tensor, rate: int) -> tp.Dict[str, float]:
    """PESQ (wide band, 16 kHz) and STOI when their packages are installed."""
    scores: tp.Dict[str, float] = {}
    from encodec_fast.audio import resample
    ref = resample(x.mean(0, keepdim=True), rate, 16000)[0].numpy().astype(np.float64)
    deg = resample(y.mean(0, keepdim=True), rate, 16000)[0].numpy().astype(np.float64)
    try:
        from pesq import pesq
        scores["pesq"] = float(pesq(16000, ref, deg, "wb"))
    except ImportError:
        pass
    except Exception:  # pesq refuses some signals (e.g. no utterance found): no score for that clip
        pass
    try:
        from pystoi import stoi
        scores["stoi"] = float(stoi(ref, deg, 16000, extended=False))
    except ImportError:
        pass
    return scores


METRICS = {"si_snr": ("dB", True), "mel_distance": ("", False), "stft_distance": ("", False), "pesq": ("", True),
           "stoi": ("", True)}


def _ceiling(ctx: Context, model: str, source: str, ours: "peers.Codec", clips, seconds: float) -> None:
    """The decoder on the encoder's unquantized latents: the quality no bitrate can exceed (tells a
    decoder ceiling from quantizer stages that learn nothing). Models without normalisation or
    segments only (the 24 kHz ones), where that is one encoder and one decoder call."""
    from encodec_fast.audio import convert_audio
    from encodec_fast.train.metrics import mel_distance, si_snr
    net = ours.net
    if net.normalize or net.segment is not None:
        return
    for kind, wavs in clips.items():
        ctx.check_time(f"{model} unquantized {kind}")
        values: tp.Dict[str, tp.List[float]] = {"si_snr": [], "mel_distance": []}
        with torch.no_grad():
            for wav in wavs:
                x = convert_audio(wav, 24000, ours.sample_rate, ours.channels)[None]
                y = net.decoder(net.encoder(x))[..., :x.shape[-1]]
                values["si_snr"].append(float(si_snr(x, y)[0]))
                values["mel_distance"].append(float(mel_distance(x, y, ours.sample_rate)[0]))
        params = {"model": model, "weights": source, "kind": kind, "quantizer": "none (decoder on the encoder's "
                  "latents)", "files": len(wavs), "seconds": seconds}
        for metric, vals in values.items():
            unit, higher = METRICS[metric]
            ctx.record(params, "ours, unquantized", metric, unit, vals, higher_is_better=higher,
                       mean=float(np.mean(vals)), note="reps = files")


@benchmark("quality", "Codec quality against bitrate on held-out speech and music (ours; upstream decoding our codes)",
           priority=35)
def run(ctx: Context) -> None:
    from encodec_fast.audio import convert_audio
    from encodec_fast.train.metrics import mel_distance, si_snr, stft_distance
    count, seconds = ctx.pick(1, 6, 24), ctx.pick(1.0, 5.0, 10.0)
    clips, missing = heldout_clips(("speech", "music"), count, seconds)
    for model, state, source in checkpoints(ctx):
        codecs = peers.build_all(model, state, ("ours", "upstream"))
        ours = codecs["ours"]
        assert isinstance(ours, peers.Codec)
        up = codecs["upstream"] if isinstance(codecs["upstream"], peers.Codec) else None
        for kind, reason in missing.items():
            ctx.na({"model": model, "kind": kind}, "ours", "si_snr", "dB", reason)
        _ceiling(ctx, model, source, ours, clips, seconds)
        for kbps in ours.net.target_bandwidths:
            ctx.check_time(f"{model} at {kbps:g} kbps")
            for kind, wavs in clips.items():
                params = {"model": model, "weights": source, "kind": kind, "kbps": float(kbps), "files": len(wavs),
                          "seconds": seconds}
                scores: tp.Dict[str, tp.Dict[str, tp.List[float]]] = {"ours": {}, "upstream": {}}
                diffs = []
                for wav in wavs:
                    x = convert_audio(wav, 24000, ours.sample_rate, ours.channels)[None]
                    enc = ours.encode(x, kbps)
                    outputs = {"ours": ours.decode(enc)[..., :x.shape[-1]]}
                    if up is not None:
                        outputs["upstream"] = up.decode(enc)[..., :x.shape[-1]]
                        diffs.append((outputs["upstream"] - outputs["ours"]).abs().max().item())
                    for impl, y in outputs.items():
                        row = {"si_snr": float(si_snr(x, y)[0]),
                               "mel_distance": float(mel_distance(x, y, ours.sample_rate)[0]),
                               "stft_distance": float(stft_distance(x, y)[0]), **_optional_scores(x[0], y[0],
                                                                                                  ours.sample_rate)}
                        for metric, value in row.items():
                            scores[impl].setdefault(metric, []).append(value)
                for impl, by_metric in scores.items():
                    for metric, values in by_metric.items():
                        unit, higher = METRICS[metric]
                        ctx.record(params, impl, metric, unit, values, higher_is_better=higher,
                                   mean=float(np.mean(values)), note="reps = files")
                if up is None:
                    ctx.na(params, "upstream", "si_snr", "dB", str(codecs["upstream"]))
                else:
                    ctx.record(params, "upstream", "audio_max_abs_diff_ours", "", diffs,
                               note="upstream's decode of our codes minus ours, per file")
