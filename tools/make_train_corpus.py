"""A training corpus anyone can regenerate offline: espeak-ng speech in many voices and languages,
and synthesized music, as 24 kHz mono WAV files.

    python -m tools.make_train_corpus OUT_DIR [--speech-clips 600] [--music-clips 150] [--seed 0]

OUT_DIR/train/ and OUT_DIR/heldout/ (speech in languages and voice variants not used for
training, music from other seeds and instruments' settings; for validation and quality reports).
Speech: sentences in the voice's language where we have them, else syllable strings the voice
pronounces with its language's phonology; random voice variant, speed, pitch and gain. Music:
additive and plucked-string (Karplus-Strong) instruments playing random melodies over chords,
a bass line and drums, with reverb-like decay, 4-12 s per clip. Needs espeak-ng (Debian package).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RATE = 24_000

SENTENCES = {
    "en": ["The quick brown fox jumps over the lazy dog while the children watch from the window.",
           "Please call Stella and ask her to bring these things with her from the store.",
           "A neural audio codec turns a waveform into a few discrete tokens per frame.",
           "It was raining in the morning, but by noon the sky had cleared completely."],
    "de": ["Die Sonne scheint heute besonders hell über den Bergen und dem stillen See.",
           "Können Sie mir bitte sagen, wie ich am schnellsten zum Bahnhof komme?"],
    "fr": ["Le petit chat dort tranquillement sur le canapé près de la fenêtre ouverte.",
           "Nous avons rendez-vous demain matin à neuf heures devant la bibliothèque."],
    "es": ["El tren de la mañana llegó tarde porque había mucha niebla en las montañas.",
           "Me gustaría aprender a tocar la guitarra antes del próximo verano."],
    "it": ["La cena è pronta, ma dobbiamo aspettare che arrivino anche i nostri amici.",
           "Domani andremo al mare se il tempo resterà sereno e caldo."],
    "pt": ["O barco saiu do porto ao amanhecer e voltou carregado de peixes frescos."],
    "nl": ["De fietsers reden langs de rivier terwijl de zon langzaam onderging."],
    "sv": ["Vi promenerade genom skogen och plockade blåbär hela eftermiddagen."],
    "pl": ["W sobotę pojedziemy na wycieczkę rowerową nad jezioro."],
    "fi": ["Kesällä aurinko paistaa yölläkin pohjoisessa Suomessa."],
}

TRAIN_LANGS = ["en-us", "en-gb", "de", "fr-fr", "es", "it", "pt", "nl", "sv", "pl", "ru", "cs", "tr", "hu",
               "ro", "el", "hi", "id", "sw", "vi", "cmn", "ja", "ko", "ar", "fa", "he", "da", "nb", "hr", "sk"]
HELDOUT_LANGS = ["fi", "en-us", "de", "es", "fr-fr", "uk", "bg", "ta", "ms", "eu"]
TRAIN_VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+f1", "+f2", "+f3", "+klatt", "+klatt2"]
HELDOUT_VARIANTS = ["+m5", "+f4", "+klatt3", "+m7"]
SYLLABLES = [c + v for c in "ptkbdgmnslrfvhjw" for v in "aeiou"] + ["an", "en", "in", "on", "ar", "ol", "is"]


def _text(rng: np.random.Generator, lang: str) -> str:
    base = lang.split("-")[0]
    if base in SENTENCES and rng.random() < 0.6:
        return str(rng.choice(SENTENCES[base]))
    words = [''.join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(rng.integers(6, 16))]
    return " ".join(words) + "."


def _espeak(text: str, voice: str, speed: int, pitch: int, path: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                   check=True, capture_output=True)
    import soundfile as sf
    import torch

    from encodec_fast.audio import resample
    wav, rate = sf.read(path, dtype="float32")
    if wav.ndim > 1:
        wav = wav.mean(axis=1)
    return resample(torch.from_numpy(wav)[None], rate, RATE)[0].numpy()  # espeak-ng writes 22050 Hz


def speech(rng: np.random.Generator, langs, variants, tmp: Path) -> np.ndarray:
    lang = str(rng.choice(langs))
    voice = lang + str(rng.choice(variants))
    wav = _espeak(_text(rng, lang), voice, int(rng.integers(120, 200)), int(rng.integers(25, 75)), tmp / "s.wav")
    wav = wav / (np.abs(wav).max() + 1e-9) * rng.uniform(0.2, 0.9)
    return wav


def _pluck(freq: float, seconds: float, rng: np.random.Generator, damping: float) -> np.ndarray:
    """Karplus-Strong string, a period at a time (each period the averaged, damped previous one)."""
    period = max(2, int(RATE / freq))
    n = int(seconds * RATE)
    buf = rng.uniform(-1, 1, period)
    blocks = []
    for _ in range(n // period + 1):
        blocks.append(buf)
        buf = damping * 0.5 * (buf + np.roll(buf, -1))
    return np.concatenate(blocks)[:n]


def _tone(freq: float, seconds: float, harmonics: np.ndarray, attack: float, decay: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    wave = sum(a * np.sin(2 * np.pi * freq * (h + 1) * t) for h, a in enumerate(harmonics) if freq * (h + 1) < RATE / 2)
    env = np.minimum(1, t / attack) * np.exp(-t / decay)
    return wave * env


def music(rng: np.random.Generator, seconds: float) -> np.ndarray:
    n = int(seconds * RATE)
    out = np.zeros(n + RATE)
    bpm = rng.uniform(70, 160)
    beat = 60 / bpm
    root = 110 * 2 ** (rng.integers(0, 12) / 12)
    scale = np.array([0, 2, 4, 5, 7, 9, 11]) if rng.random() < 0.6 else np.array([0, 2, 3, 5, 7, 8, 10])
    lead = rng.uniform(0, 1, 8) ** 2 / np.arange(1, 9)
    pad = rng.uniform(0, 1, 4) / np.arange(1, 5)
    pluck_lead = rng.random() < 0.4
    t = 0.0
    while t < seconds:  # chords every bar
        degree = int(rng.choice([0, 3, 4, 5]))
        for k in (0, 2, 4):
            step = scale[(degree + k) % 7] + 12 * ((degree + k) // 7)
            f = root * 2 ** (step / 12)
            note = _tone(f, 4 * beat, pad, 0.05, 2.0) * 0.12
            i = int(t * RATE)
            out[i:i + len(note)] += note[:len(out) - i]
        bass = _tone(root / 2 * 2 ** (scale[degree] / 12), 2 * beat, np.array([1, 0.5, 0.2]), 0.01, 0.5) * 0.25
        i = int(t * RATE)
        out[i:i + len(bass)] += bass[:len(out) - i]
        t += 4 * beat
    t = 0.0
    while t < seconds:  # melody
        length = beat * float(rng.choice([0.5, 1, 1, 2]))
        if rng.random() < 0.85:
            step = scale[rng.integers(0, 7)] + 12 * rng.integers(1, 3)
            f = root * 2 ** (step / 12)
            note = (_pluck(f, length + 0.3, rng, 0.996) if pluck_lead else _tone(f, length + 0.3, lead, 0.02, 0.6))
            i = int(t * RATE)
            out[i:i + len(note)] += 0.2 * note[:len(out) - i]
        t += length
    t = 0.0
    while t < seconds:  # drums: kick on beats 1 and 3, snare-like noise on 2 and 4, hats
        for b in range(4):
            i = int((t + b * beat) * RATE)
            if i >= n:
                break
            if b % 2 == 0:
                tt = np.arange(int(0.25 * RATE)) / RATE
                kick = np.sin(2 * np.pi * (50 + 100 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 12) * 0.5
                out[i:i + len(kick)] += kick[:len(out) - i]
            else:
                tt = np.arange(int(0.2 * RATE)) / RATE
                snare = rng.standard_normal(len(tt)) * np.exp(-tt * 20) * 0.15
                out[i:i + len(snare)] += snare[:len(out) - i]
            j = int((t + (b + 0.5) * beat) * RATE)
            hat = np.diff(rng.standard_normal(int(0.05 * RATE) + 1)) * np.exp(-np.arange(int(0.05 * RATE)) / 200) * 0.05
            out[j:j + len(hat)] += hat[:max(0, len(out) - j)]
        t += 4 * beat
    out = out[:n]
    out = np.convolve(out, np.exp(-np.arange(2400) / 600) * rng.uniform(0.0, 0.03), mode="same") + out  # room
    return (out / (np.abs(out).max() + 1e-9) * rng.uniform(0.3, 0.9)).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--speech-clips", type=int, default=600)
    parser.add_argument("--music-clips", type=int, default=150)
    parser.add_argument("--heldout-clips", type=int, default=24, help="of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-no-speech", action="store_true",
                        help="without espeak-ng, write the music only (smoke runs) instead of failing")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        if not args.allow_no_speech:
            print("make_train_corpus: needs espeak-ng (apt-get install espeak-ng)", file=sys.stderr)
            return 1
        print("make_train_corpus: espeak-ng not found: music only", file=sys.stderr)
        args.speech_clips = 0
    import soundfile as sf
    from tqdm import tqdm
    jobs = ([("train", "speech", i) for i in range(args.speech_clips)] +
            [("train", "music", i) for i in range(args.music_clips)] +
            [("heldout", "speech", i) for i in range(args.heldout_clips if args.speech_clips else 0)] +
            [("heldout", "music", i) for i in range(args.heldout_clips)])
    seconds = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for split, kind, i in tqdm(jobs, desc="corpus", unit="clip"):
            folder = args.out / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([args.seed, split == "heldout", kind == "music", i])
            if kind == "speech":
                langs, variants = (TRAIN_LANGS, TRAIN_VARIANTS) if split == "train" else (HELDOUT_LANGS,
                                                                                          HELDOUT_VARIANTS)
                wav = speech(rng, langs, variants, Path(tmp))
            else:
                wav = music(rng, float(rng.uniform(4, 12)))
            sf.write(folder / f"{kind}{i:04d}.wav", wav, RATE, subtype="PCM_16")
            seconds += len(wav) / RATE
    print(f"{len(jobs)} clips, {seconds / 60:.1f} minutes of audio in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
