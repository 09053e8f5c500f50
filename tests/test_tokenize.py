"""`encodec-fast tokenize`: inputs, codes against upstream's per-file encode, bad inputs, resume
after SIGKILL, output readable by pyarrow / DuckDB / Hugging Face datasets."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import encodec
import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from encodec_fast.cli import main as cli_main
from encodec_fast.testing import make_signal
from encodec_fast.tokenize import CodesDataset, list_items, read_codes, tokenize
from encodec_fast.tokenize.sources import parse_shard

RATES = [16000, 22050, 44100, 48000]


def write_clip(path: Path, sr: int, seconds: float, channels: int, seed: int, subtype=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), make_signal(sr, int(sr * seconds), channels, seed=seed).numpy().T, sr, subtype=subtype)
    return path


def make_corpus(root: Path, n: int, seconds=(0.3, 1.2)) -> list:
    """n real-signal clips of mixed rates, channels, formats and lengths, some in subfolders."""
    paths = []
    for i in range(n):
        sr, ch = RATES[i % 4], 1 + (i // 2) % 2
        length = seconds[0] + (seconds[1] - seconds[0]) * ((i * 7) % n) / max(n - 1, 1)
        ext = "flac" if i % 3 == 0 else "wav"
        paths.append(write_clip(root / ("sub" if i % 2 else "") / f"clip{i:03d}.{ext}", sr, length, ch, seed=i))
    return paths


def upstream_codes(up, path: Path, start=None, end=None):
    """Upstream's per-file loop: load, convert_audio, encode -> [(codes [K, T], scale)]."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if start is not None or end is not None:
        data = data[int(round((start or 0) * sr)):None if end is None else int(round(end * sr))]
    wav = encodec.utils.convert_audio(torch.from_numpy(data.T.copy()), sr, up.sample_rate, up.channels)
    with torch.no_grad():
        return [(c[0].numpy(), s) for c, s in up.encode(wav[None])]


def test_inputs_directories_globs_manifests_and_shards(tmp_path):
    paths = make_corpus(tmp_path / "corpus", 6)
    (tmp_path / "corpus" / "notes.txt.bak").write_text("not audio")
    items, problems = list_items([tmp_path / "corpus"])
    assert [it.id for it in items] == sorted(p.relative_to(tmp_path / "corpus").as_posix() for p in paths)
    assert not problems
    items, _ = list_items([str(tmp_path / "corpus" / "sub" / "*.wav")])
    assert {Path(it.path) for it in items} == {p for p in paths if p.parent.name == "sub" and p.suffix == ".wav"}
    (tmp_path / "list.txt").write_text(f"# comment\n{paths[0]}\n\ncorpus/{paths[1].relative_to(tmp_path / 'corpus')}\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(paths[2]), "id": "a", "start": 0.1, "end": 0.2}) + "\n"
                                      + json.dumps({"path": str(paths[3])}) + "\n" + "[1, 2]\n"
                                      + json.dumps({"path": str(paths[4]), "start": 0.5, "end": 0.1}) + "\n")
    (tmp_path / "m.csv").write_text(f"path,id,start\n{paths[5]},b,0.05\n{paths[5]},,\n")
    items, problems = list_items([tmp_path / "list.txt", tmp_path / "m.jsonl", tmp_path / "m.csv",
                                  tmp_path / "nothing*.wav"])
    by_id = {it.id: it for it in items}
    assert Path(by_id[str(paths[0])].path) == paths[0]
    assert Path(by_id[f"corpus/{paths[1].relative_to(tmp_path / 'corpus')}"].path) == paths[1]
    assert (by_id["a"].start, by_id["a"].end) == (0.1, 0.2) and by_id["b"].start == 0.05
    assert str(paths[5]) in by_id and by_id[str(paths[5])].start is None
    reasons = sorted(p.error.split(":")[0] for p in problems)
    assert reasons == ["bad manifest line", "bad manifest line", "no such file or directory, and no audio file "
                       "matches it as a pattern"], problems
    # Shards partition the items, whatever else the inputs hold.
    everything, _ = list_items([tmp_path / "corpus"])
    parts = [list_items([tmp_path / "corpus"], (i, 3))[0] for i in range(3)]
    assert sorted(it.id for part in parts for it in part) == [it.id for it in everything]
    assert len({it.id for part in parts for it in part}) == len(everything)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def make_tar_shards(root: Path, files: tp.Sequence[Path], base: Path) -> Path:
    """WebDataset-style shards of `files`: two uncompressed tar archives with each clip under its path
    relative to `base` (some as ./name), a JSON sidecar per clip and a member that is not audio, a
    corrupt audio member, a compressed archive and a tar archive that is not one."""
    import io
    import tarfile
    root.mkdir(parents=True, exist_ok=True)

    def add(archive, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    half = len(files) // 2
    for k, part in enumerate((files[:half], files[half:])):
        with tarfile.open(root / f"shard{k}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for i, f in enumerate(part):
                name = f.relative_to(base).as_posix()
                add(archive, str(Path(name).with_suffix(".json")), json.dumps({"key": name}).encode())  # sidecar
                add(archive, ("./" if i % 2 else "") + name, f.read_bytes())
            add(archive, "README.txt", b"not audio")
            if k == 0:
                add(archive, "broken.flac", b"fLaC" + bytes(100))
    with tarfile.open(root / "packed.tar.gz", "w:gz") as archive:
        add(archive, "x.wav", files[0].read_bytes())
    (root / "fake.tar").write_bytes(b"this is not a tar archive at all" * 20)
    return root


def test_tar_archives_members_read_in_place(tmp_path, pair_24):
    """Audio members of uncompressed tar archives (WebDataset shards) are items read in place, with the
    codes of the same files read from a directory, those past `stream_seconds` streamed alike; a corrupt
    member, a compressed archive and a file that is no tar archive are reported, the rest goes on."""
    _, ours = pair_24
    files = make_corpus(tmp_path / "in", 8, seconds=(0.3, 1.6))
    shards = make_tar_shards(tmp_path / "shards", files, tmp_path / "in")
    plain = tokenize([tmp_path / "in"], tmp_path / "plain", model=ours, bandwidth=6.0, workers=0, quiet=True,
                     stream_seconds=0.8, rows_per_shard=3)
    summary = tokenize([shards], tmp_path / "out", model=ours, bandwidth=6.0, workers=1, quiet=True,
                       stream_seconds=0.8, rows_per_shard=3)
    assert (plain.tokenized, summary.tokenized) == (8, 8)
    assert summary.failed == 3  # broken.flac, packed.tar.gz, fake.tar
    got = {r["id"]: r for r in read_codes(tmp_path / "out")}
    want = {r["id"]: r for r in read_codes(tmp_path / "plain")}
    half = len(files) // 2
    for k, f in enumerate(files):
        rel = f.relative_to(tmp_path / "in").as_posix()
        row = got[f"shard{int(k >= half)}.tar/{rel}"]
        assert np.array_equal(row["codes"], want[rel]["codes"]), rel
        assert row["path"] == str(shards / f"shard{int(k >= half)}.tar")
        assert (row["num_samples"], row["source_sample_rate"]) == (want[rel]["num_samples"],
                                                                   want[rel]["source_sample_rate"])
    errors = {json.loads(line)["id"]: json.loads(line)["error"]
              for line in (tmp_path / "out" / "_errors.jsonl").read_text().splitlines()}
    assert "unreadable audio" in errors["shard0.tar/broken.flac"]
    assert "compressed tar archive" in errors["packed.tar.gz"] and "unreadable tar archive" in errors["fake.tar"]
    # a pattern and an archive named alone list the same members; halves of a split add up to the whole
    items, problems = list_items([str(shards / "*.tar")])
    assert {it.id for it in items} == {f"{shards.as_posix()}/{i}" for i in list(got) + ["shard0.tar/broken.flac"]}
    assert [p.id for p in problems] == [(shards / "fake.tar").as_posix()]
    first, _ = list_items([shards / "shard0.tar"], (0, 2))
    second, _ = list_items([shards / "shard0.tar"], (1, 2))
    assert len(first) + len(second) == half + 1 and all(it.offset > 0 and it.size > 0 for it in first + second)


def test_codes_equal_upstreams_per_file_encode_24khz(tmp_path, pair_24):
    up, ours = pair_24
    up.set_target_bandwidth(6.0)
    paths = make_corpus(tmp_path / "corpus", 8)
    manifest = tmp_path / "spans.jsonl"
    manifest.write_text(json.dumps({"path": str(paths[3]), "id": "span", "start": 0.1, "end": 0.45}) + "\n")
    summary = tokenize([tmp_path / "corpus", manifest], tmp_path / "out", model=ours, bandwidth=6.0, workers=2,
                       rows_per_shard=3, quiet=True)
    assert (summary.tokenized, summary.failed, summary.skipped) == (9, 0, 0)
    rows = {r["id"]: r for r in read_codes(tmp_path / "out")}
    assert len(rows) == 9
    for p in paths:
        row = rows[p.relative_to(tmp_path / "corpus").as_posix()]
        (ref, _), = upstream_codes(up, p)
        assert row["codes"].dtype == np.int16 and np.array_equal(row["codes"], ref), p
        info = sf.info(str(p))
        assert (row["source_sample_rate"], row["source_channels"]) == (info.samplerate, info.channels)
        assert row["frames"] == ref.shape[1] and row["codebooks"] == 8 and row["sample_rate"] == 24000
        assert row["num_samples"] == int(np.ceil(info.frames * 24000 / info.samplerate)) or info.samplerate == 24000
        assert row["scales"] is None and row["bandwidth"] == 6.0
    (ref, _), = upstream_codes(up, paths[3], 0.1, 0.45)
    assert np.array_equal(rows["span"]["codes"], ref) and rows["span"]["start"] == 0.1
    manifest_json = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest_json["items"] == 9 and manifest_json["failed"] == 0 and manifest_json["model"] == "encodec_24khz"
    assert len(manifest_json["checkpoint_sha256"]) == 64 and manifest_json["codebooks"] == 8
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 3


def test_resampling_in_the_encoding_process(tmp_path, pair_24):
    """`resample_on_device` (the default on CUDA): the decoding processes only decode, the encoding
    process resamples each clip after its copy, in a stage of its own. On CPU the same filter gives
    upstream's codes, as the workers' resampling does; the rows' lengths are the model-rate ones."""
    up, ours = pair_24
    up.set_target_bandwidth(6.0)
    paths = make_corpus(tmp_path / "corpus", 6)
    for workers in (0, 1):
        out = tmp_path / f"out{workers}"
        summary = tokenize([tmp_path / "corpus"], out, model=ours, bandwidth=6.0, workers=workers, quiet=True,
                           resample_on_device=True)
        assert (summary.tokenized, summary.failed) == (6, 0)
        assert summary.seconds_by_stage["resample (device)"] > 0
        rows = {r["id"]: r for r in read_codes(out)}
        for p in paths:
            row = rows[p.relative_to(tmp_path / "corpus").as_posix()]
            (ref, _), = upstream_codes(up, p)
            assert np.array_equal(row["codes"], ref), p
            info = sf.info(str(p))
            assert row["num_samples"] == int(np.ceil(info.frames * 24000 / info.samplerate))
    plain = tokenize([tmp_path / "corpus"], tmp_path / "plain", model=ours, bandwidth=6.0, workers=0, quiet=True)
    assert "resample (device)" not in plain.seconds_by_stage  # CPU jobs resample in the decoding processes


def test_time_breakdown_of_a_run(tmp_path, checkpoint_24, capsys):
    """The summary, the manifest and the command say where the time went: the main thread's stages
    and the model's (nested: the LSTM's time is not also the convolutions'), each once."""
    make_corpus(tmp_path / "corpus", 6)
    for workers in (0, 1):
        out = tmp_path / f"out{workers}"
        summary = tokenize([tmp_path / "corpus"], out, model="24khz", checkpoint=checkpoint_24, workers=workers,
                           quiet=True)
        stages = summary.seconds_by_stage
        assert set(stages) == {"read audio (decoding, or waiting for workers)", "encoder convolutions", "encoder LSTM",
                               "RVQ search", "to device", "to host", "write rows (writer thread)",
                               "other (main thread)"}
        assert all(v >= 0 for v in stages.values()) and stages["encoder convolutions"] > 0 and stages["RVQ search"] > 0
        host = sum(v for k, v in stages.items() if k != "write rows (writer thread)")
        # "other" fills the main thread's time up to the loop's wall time: the stages never add up to more
        assert host == pytest.approx(summary.loop_seconds, abs=0.01)
        assert 0 < summary.loop_seconds <= summary.wall_seconds and summary.gpu_stages == []
        last = json.loads((out / "_manifest.json").read_text())["last_run"]
        assert last["seconds_by_stage"] == stages and last["gpu_stages"] == []
        assert summary.breakdown().startswith(f"time, of {summary.loop_seconds:.1f} s tokenizing: ")
        # the reading processes' own rate: every clip was read whole (none streamed), in their time
        assert summary.read_audio_seconds == pytest.approx(summary.audio_seconds, rel=1e-9)
        assert summary.read_seconds > 0
        if workers == 0:  # read in the main thread, inside its wait for audio
            assert summary.read_seconds <= stages["read audio (decoding, or waiting for workers)"] + 1e-3
        assert last["reading"] == {"processes": 1, "seconds": summary.read_seconds,
                                   "audio_seconds": summary.read_audio_seconds}
        each = summary.read_audio_seconds / summary.read_seconds
        where = "this process (--workers 0)" if workers == 0 else "the one reading process"
        assert f"reading audio: {each:,.0f} audio-s/s in {where}" in summary.breakdown()
    assert cli_main(["tokenize", str(tmp_path / "corpus"), "-o", str(tmp_path / "cli"), "--model", "24khz",
                     "--checkpoint", str(checkpoint_24), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "encoder convolutions" in err and "RVQ search" in err and "write rows (writer thread)" in err
    assert "reading audio: " in err and "tokenizing ran at" in err
    # decoding that holds the encoder back gets a hint (where more processes are possible), else none
    read = "read audio (decoding, or waiting for workers)"
    slow = dataclasses.replace(summary, seconds_by_stage={**stages, read: 0.9 * summary.loop_seconds}, workers=0)
    fast = dataclasses.replace(summary, seconds_by_stage={**stages, read: 0.0}, workers=0)
    assert ("hint:" in slow.breakdown()) == ((os.cpu_count() or 1) > 1)
    assert "hint:" not in fast.breakdown()


def test_codes_scales_and_segments_equal_upstream_48khz(tmp_path, pair_48):
    up, ours = pair_48
    up.set_target_bandwidth(3.0)
    paths = [write_clip(tmp_path / "c" / "a.wav", 44100, 2.3, 2, seed=1),
             write_clip(tmp_path / "c" / "b.flac", 16000, 0.6, 1, seed=2)]
    summary = tokenize([tmp_path / "c"], tmp_path / "out", model=ours, bandwidth=3.0, workers=0, quiet=True)
    assert summary.tokenized == 2
    rows = {r["id"]: r for r in read_codes(tmp_path / "out")}
    for p in paths:
        ref = upstream_codes(up, p)
        row = rows[p.name]
        assert row["segment_frames"] == [c.shape[1] for c, _ in ref]
        assert np.array_equal(row["codes"], np.concatenate([c for c, _ in ref], axis=1))
        np.testing.assert_allclose(row["scales"], [float(s) for _, s in ref], rtol=1e-6)


def write_bad_inputs(root: Path) -> dict:
    """Each kind of bad input -> the words its error must contain."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "garbage.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    (root / "empty.wav").write_bytes(b"")
    good = write_clip(root / "truncated.wav", 16000, 1.0, 1, seed=3).read_bytes()
    (root / "truncated.wav").write_bytes(good[:30])
    sf.write(str(root / "zero.wav"), np.zeros((0, 1), np.float32), 16000)
    nan = make_signal(16000, 8000, 1, seed=4).numpy().T.copy()
    nan[100] = np.nan
    sf.write(str(root / "nan.wav"), nan, 16000, subtype="FLOAT")
    inf = make_signal(16000, 8000, 1, seed=5).numpy().T.copy()
    inf[7] = np.inf
    sf.write(str(root / "inf.wav"), inf, 16000, subtype="FLOAT")
    write_clip(root / "slow.wav", 200, 3.0, 1, seed=6)
    return {"garbage.wav": "unreadable", "empty.wav": "unreadable", "truncated.wav": "unreadable",
            "zero.wav": "no samples", "nan.wav": "NaN or infinite", "inf.wav": "NaN or infinite",
            "slow.wav": "sample rate"}


def test_bad_inputs_are_recorded_and_never_stop_the_job(tmp_path, pair_48, checkpoint_48):
    expected = write_bad_inputs(tmp_path / "in")
    write_clip(tmp_path / "in" / "six.wav", 48000, 0.5, 6, seed=7)  # many channels: the stereo model refuses
    write_clip(tmp_path / "in" / "odd.wav", 11025, 0.7, 2, seed=8)  # an odd rate is fine
    write_clip(tmp_path / "in" / "ok.flac", 48000, 0.4, 1, seed=9)
    expected["six.wav"] = "6 channels"
    gone = write_clip(tmp_path / "gone.wav", 16000, 0.5, 1, seed=10)
    (tmp_path / "list.txt").write_text(f"{gone}\n")
    gone.unlink()  # listed, then deleted before it is read
    rc = cli_main(["tokenize", str(tmp_path / "in"), str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"),
                   "--model", "48khz", "-b", "6", "--checkpoint", str(checkpoint_48), "--workers", "2",
                   "--device", "cpu", "--quiet"])
    errors = {e["id"]: e["error"] for e in map(json.loads,
                                               (tmp_path / "out" / "_errors.jsonl").read_text().splitlines())}
    expected[str(gone)] = "no such file"
    assert rc == len(expected) == len(errors)
    for name, words in expected.items():
        assert words in errors[name], (name, errors[name])
    assert sorted(r["id"] for r in read_codes(tmp_path / "out", columns=["id"])) == ["odd.wav", "ok.flac"]
    # A second run has nothing left to do and reports the earlier failures in its exit status.
    assert cli_main(["tokenize", str(tmp_path / "in"), str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"),
                     "--model", "48khz", "-b", "6", "--checkpoint", str(checkpoint_48), "--quiet"]) == len(expected)
    assert len((tmp_path / "out" / "_errors.jsonl").read_text().splitlines()) == len(expected)


def test_job_errors_and_overwrite(tmp_path, checkpoint_24, capsys):
    write_clip(tmp_path / "in" / "a.wav", 24000, 0.5, 1, seed=1)
    args = ["tokenize", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--checkpoint", str(checkpoint_24),
            "--workers", "0", "--device", "cpu"]
    assert cli_main(args) == 0
    err = capsys.readouterr().err
    assert "1 tokenized, 0 failed" in err and "x real time" in err
    assert cli_main(args + ["-b", "12"]) == 101  # another setting into the same directory
    assert "bandwidth" in capsys.readouterr().err
    assert cli_main(args + ["-b", "12", "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    (row,) = read_codes(tmp_path / "out")
    assert row["codebooks"] == 16 and row["bandwidth"] == 12.0
    assert cli_main(args + ["-b", "7"]) == 101
    # another precision mode is another configuration: never mixed into exact codes, and back
    assert cli_main(args + ["-b", "12", "--precision", "bf16", "--quiet"]) == 101
    assert "precision" in capsys.readouterr().err
    assert cli_main(args + ["-b", "12", "--precision", "bf16", "--overwrite", "--quiet"]) == 0
    assert json.loads((tmp_path / "out" / "_config.json").read_text())["precision"] == "bf16"
    assert cli_main(args + ["-b", "12", "--quiet"]) == 101
    if not torch.cuda.is_available():
        assert cli_main(args[:-2] + ["--device", "cuda"]) == 101
        assert "no CUDA GPU" in capsys.readouterr().err
    assert cli_main(["tokenize", str(tmp_path / "missing"), "-o", str(tmp_path / "o2"), "--checkpoint",
                     str(checkpoint_24), "--quiet"]) == 1  # one input that is not there: one failure


@pytest.mark.slow
def test_resume_after_sigkill_gives_every_item_exactly_once(tmp_path, checkpoint_24):
    """A subprocess is killed (SIGKILL) twice while it writes shards, then run to the end: every
    input appears exactly once across the shards, no temporary file is left, codes as a clean run."""
    make_corpus(tmp_path / "in", 36, seconds=(0.8, 2.0))
    write_bad_inputs(tmp_path / "in" / "bad")
    args = [sys.executable, "-m", "encodec_fast", "tokenize", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
            "--checkpoint", str(checkpoint_24), "--workers", "1", "--batch-seconds", "1", "--rows-per-shard", "2",
            "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    for wanted in (2, 6):
        proc = subprocess.Popen(args, env=env)
        deadline = time.time() + 300
        while len(list((tmp_path / "out").glob("part-*.parquet"))) < wanted and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 2, "the job finished before it could be killed: make the corpus longer"
    assert subprocess.run(args, env=env).returncode == 7  # the 7 bad inputs
    out = tmp_path / "out"
    ids = [r["id"] for r in read_codes(out, columns=["id"])]
    assert len(ids) == len(set(ids)) == 36
    errors = [json.loads(line)["id"] for line in (out / "_errors.jsonl").read_text().splitlines()]
    assert len(errors) == len(set(errors)) == 7
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    clean = tmp_path / "clean"
    subprocess.run(args[:6] + [str(clean)] + args[7:], env=env, check=False)
    got = {r["id"]: r["codes"] for r in read_codes(out)}
    for row in read_codes(clean):
        assert np.array_equal(got[row["id"]], row["codes"]), row["id"]


def test_output_reads_in_pyarrow_duckdb_datasets_and_codes_dataset(tmp_path, pair_24):
    _, ours = pair_24
    make_corpus(tmp_path / "in", 5)
    tokenize([tmp_path / "in"], tmp_path / "out", model=ours, bandwidth=1.5, workers=0, rows_per_shard=2, quiet=True)
    rows = {r["id"]: r for r in read_codes(tmp_path / "out")}
    table = pq.read_table(tmp_path / "out")  # the directory as one dataset
    assert table.num_rows == 5 and str(table.schema.field("codes").type) == "list<element: list<element: int16>>"
    import duckdb
    con = duckdb.connect()
    got = con.execute(f"select id, frames, codes from read_parquet('{tmp_path / 'out'}/part-*.parquet') "
                      "order by id").fetchall()
    assert [g[0] for g in got] == sorted(rows)
    for item_id, frames, codes in got:
        assert frames == rows[item_id]["frames"] and np.array_equal(np.array(codes), rows[item_id]["codes"])
    import datasets
    ds = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 5
    for rec in ds:
        assert np.array_equal(np.array(rec["codes"]), rows[rec["id"]]["codes"])
    cd = CodesDataset(tmp_path / "out")
    assert len(cd) == 5
    seen = {cd[i]["id"]: cd[i]["codes"] for i in range(len(cd))}
    assert cd[-1]["id"] == cd[4]["id"]
    for item_id, codes in seen.items():
        assert codes.dtype == torch.int64 and np.array_equal(codes.numpy(), rows[item_id]["codes"])
    loader = torch.utils.data.DataLoader(cd, batch_size=None, num_workers=2)
    assert sorted(r["id"] for r in loader) == sorted(rows)
    with pytest.raises(IndexError):
        cd[5]


def test_shards_share_one_output_directory(tmp_path, pair_24):
    """Two `--shard i/2` jobs into one directory: every item once, each shard's files apart, and
    the manifest written by the last one to end covers both."""
    _, ours = pair_24
    make_corpus(tmp_path / "in", 10)
    s0 = tokenize([tmp_path / "in"], tmp_path / "out", model=ours, bandwidth=6.0, workers=0, shard="0/2", quiet=True)
    s1 = tokenize([tmp_path / "in"], tmp_path / "out", model=ours, bandwidth=6.0, workers=0, shard=(1, 2), quiet=True)
    assert s0.tokenized + s1.tokenized == 10 and s0.tokenized and s1.tokenized
    ids = [r["id"] for r in read_codes(tmp_path / "out", columns=["id"])]
    assert len(ids) == len(set(ids)) == 10
    assert {p.name.split("-")[1] for p in (tmp_path / "out").glob("part-*.parquet")} == {"s0of2", "s1of2"}
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["items"] == 10
    again = tokenize([tmp_path / "in"], tmp_path / "out", model=ours, bandwidth=6.0, workers=0, shard="1/2", quiet=True)
    assert (again.tokenized, again.skipped) == (0, s1.tokenized)


def test_fp16_batches_read_after_the_next_is_queued(tmp_path, monkeypatch):
    """The local engine reads each batch's results after the next batch is queued (on CUDA the
    device then never waits for the host between batches). In fp16 a batch whose encoder
    overflowed is redone in exact at that read: the loud clip's codes are exact's, the others'
    fp16's, every clip once."""
    from encodec_fast import EncodecModel
    from encodec_fast.tokenize import local
    model = EncodecModel.encodec_model_24khz_small()
    quiet = [write_clip(tmp_path / "c" / f"q{i}.wav", 24000, 0.3 + 0.1 * i, 1, seed=i) for i in range(5)]
    loud = tmp_path / "c" / "loud.wav"
    sf.write(str(loud), 1e5 * make_signal(24000, 9000, 1, seed=9).numpy().T, 24000, subtype="FLOAT")
    events = []
    real_queue = local.queue_or_errors

    def spy(model, wavs, *args):
        events.append(f"queue {len(wavs)}")
        read = real_queue(model, wavs, *args)

        def logged():
            events.append(f"read {len(wavs)}")
            return read()
        return logged

    monkeypatch.setattr(local, "queue_or_errors", spy)
    with pytest.warns(RuntimeWarning, match="fp16 overflowed in the encoder"):
        summary = tokenize([tmp_path / "c"], tmp_path / "out", model=model, bandwidth=6.0, workers=0,
                           batch_seconds=0.5, precision="fp16", quiet=True)
    assert (summary.tokenized, summary.failed) == (6, 0)
    # batches of one clip (0.5 s at most), pooled up to 4 x 0.5 s (5 clips, then the last one):
    # within a pool, each batch's results are read after the next batch is queued
    assert events == ["queue 1", "queue 1", "read 1", "queue 1", "read 1", "queue 1", "read 1", "queue 1", "read 1",
                      "read 1", "queue 1", "read 1"], events
    rows = {r["id"]: r["codes"] for r in read_codes(tmp_path / "out")}

    def codes(path, mode):
        data, _ = sf.read(str(path), dtype="float32", always_2d=True)
        with torch.no_grad():
            return model.set_precision(mode).encode(torch.from_numpy(data.T.copy())[None])[0][0][0].numpy()
    assert np.array_equal(rows["loud.wav"], codes(loud, "exact"))
    for p in quiet:
        assert np.array_equal(rows[p.name], codes(p, "fp16")), p
    assert not all(np.array_equal(rows[p.name], codes(p, "exact")) for p in quiet)  # fp16 is not exact


def test_resampling_on_the_device_waits_for_nothing():
    """Resampling the clips on the encoder's device (`resampled`, tokenize's default on CUDA) runs no
    op that makes the host wait for a GPU (`HostReads`, run here on CPU), so it stays queued on the
    copy stream behind the batch's copies; mixed rates and channels, one clip at the model's rate."""
    from encodec_fast.testing import HostReads
    from encodec_fast.tokenize.loading import resampled
    wavs = [make_signal(44100, 30_000, 2, seed=1), make_signal(16000, 9_000, 1, seed=2),
            make_signal(24000, 5_000, 1, seed=3)]
    reads = HostReads()
    with reads:
        out = resampled(wavs, [44100, 16000, 24000], 24000, torch.device("cpu"))
    assert reads.reads == []
    assert [o.shape[-1] for o in out] == [16_327, 13_500, 5_000] and torch.equal(out[2], wavs[2])


def test_training_and_listing_import_without_pyarrow():
    """pyarrow is needed for the shards only: training (which lists and loads audio with this package's
    sources and loading) and `tokenize` itself import without it; the shards' reader says what it needs."""
    code = ("import sys\nsys.modules['pyarrow'] = None  # as if not installed\n"
            "import encodec_fast.train.trainer, encodec_fast.train.data\n"
            "from encodec_fast.tokenize import list_items, tokenize\n"
            "try:\n    from encodec_fast.tokenize import read_codes\nexcept ImportError as err:\n"
            "    print('reader:', err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("reader: ") and "pyarrow" in proc.stdout, proc.stdout
