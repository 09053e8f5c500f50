"""The `encodec-fast` command, with upstream `encodec`'s interface.

    encodec-fast [-b BW] [-f] [--hq] [--lm] [-r] INPUT [OUTPUT]
    encodec-fast tokenize INPUT... -o OUT_DIR [--model 24khz|48khz] [-b BW] [--shard i/n] ...
    encodec-fast train DATA... -o RUN_DIR [--model 24khz|48khz|small] [--resume] ...   (see `train --help`)
    encodec-fast train report RUN_DIR
    encodec-fast info [--json]

`.ecdc` output compresses, `.ecdc` input decompresses, any other output (.wav, .flac) does a
round trip. Extra options: --checkpoint PATH (your own weights), --repository DIR (official
weights offline), --device. User errors print one line and exit with status 1.
"""

import argparse
import sys
import typing as tp
from pathlib import Path

SUFFIX = ".ecdc"
AUDIO_OUT = (".wav", ".flac")


class UserError(Exception):
    """An error caused by the command line or the user's files: one line, exit status 1."""


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "encodec-fast",
        description="High fidelity neural audio codec (fast EnCodec). If input is a .ecdc, decompresses it. "
                    "Otherwise compresses it; if output is .wav (or .flac), does a compression/decompression cycle.")
    parser.add_argument("input", type=Path,
                        help="Input file: audio (wav, flac, ogg, mp3...) or .ecdc; - reads standard input.")
    parser.add_argument("output", type=Path, nargs="?",
                        help="Output file, otherwise inferred from input file; - writes standard output "
                             "(.ecdc from audio, WAV from .ecdc).")
    parser.add_argument("-b", "--bandwidth", type=float, default=6, choices=[1.5, 3.0, 6.0, 12.0, 24.0],
                        help="Target bandwidth (1.5, 3, 6, 12 or 24). 1.5 is not supported with --hq.")
    parser.add_argument("-q", "--hq", action="store_true", help="Use HQ stereo model operating on 48 kHz audio.")
    parser.add_argument("-m", "--model", choices=["24khz", "48khz", "small"], default=None,
                        help="Model for compression: 24khz (default; the official weights), 48khz (= --hq), or small "
                             "(a small 24 kHz codec whose weights ship with encodec-fast: works offline).")
    parser.add_argument("-l", "--lm", action="store_true",
                        help="Use a language model to reduce the size (about 25-40%%; slower).")
    parser.add_argument("-f", "--force", action="store_true", help="Overwrite output file if it exists.")
    parser.add_argument("-s", "--decompress_suffix", type=str, default="_decompressed",
                        help="Suffix for the decompressed output file (if no output path specified)")
    parser.add_argument("-r", "--rescale", action="store_true",
                        help="Automatically rescale the output to avoid clipping.")
    parser.add_argument("--checkpoint", type=Path,
                        help="State dict of a compatible model (e.g. your own training) instead of the official "
                             "weights.")
    parser.add_argument("--lm-checkpoint", type=Path,
                        help="State dict of the entropy-coding LM (with --lm, or to read LM-coded files) instead of "
                             "the official one.")
    parser.add_argument("--repository", type=Path,
                        help="Folder holding the official checkpoint files (offline use).")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu).")
    parser.add_argument("--debug", action="store_true", help="On an error, show the Python traceback.")
    return parser


def _check_output(output: Path, force: bool) -> None:
    if not output.parent.exists():
        raise UserError(f"Output folder for {output} does not exist.")
    if output.is_dir():
        raise UserError(f"Output {output} is a directory; give a file name.")
    if output.exists() and not force:
        raise UserError(f"Output file {output} exists. Use -f / --force to overwrite.")


def _warn_clipping(peak: float, rescale: bool) -> None:
    if not rescale and peak > 0.99:
        print(f"Clipping!! max scale {peak}, limit is 0.99. To avoid clipping, use the `-r` option to rescale "
              "the output.", file=sys.stderr)


def _load_model(name: str, args):
    from .model import FACTORIES
    factory = FACTORIES[name]
    if args.checkpoint is not None:
        model = factory(pretrained=False, checkpoint=args.checkpoint)
    else:
        model = factory(pretrained=True, repository=args.repository)
    model.lm_checkpoint, model.lm_repository = args.lm_checkpoint, args.repository
    return model.to(args.device)


def _write_audio(stream, path: Path, rescale: bool) -> None:
    """The chunks of a DecompressIter into `path`, block by block (see `audio.AudioWriter`)."""
    from .audio import AudioWriter
    writer = AudioWriter(path, stream.sample_rate, stream.channels, rescale=rescale)
    try:
        for chunk in stream:
            writer.write(chunk)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    _warn_clipping(writer.peak, rescale)


def _decompress_file(path: Path, output: Path, args) -> None:
    from . import ecdc
    from .compress import _check_metadata, decompress_iter
    with open(path, "rb") as f:
        name, _, _, _ = _check_metadata(ecdc.read_ecdc_header(f))
        model = _load_model(name, args)
        f.seek(0)
        _write_audio(decompress_iter(f, device=args.device, model=model), output, args.rescale)


def _audio_chunks(path: Path, model, device: str):
    """-> (length at the model's rate, the file's audio in chunks [C, n] at the model's rate and
    channels): decoded and resampled 10 s at a time, never held whole."""
    from .audio import AudioError, audio_length
    from .tokenize.loading import stream_item
    from .tokenize.sources import Item
    length, _, _ = audio_length(path, model.sample_rate)

    def chunks():
        try:
            for piece in stream_item(Item("input", str(path)), model.sample_rate, model.channels):
                yield piece.to(device)
        except ValueError as err:
            if "NaN" in str(err):
                raise UserError(f"{path} contains NaN or infinite samples") from None
            raise AudioError(f"cannot read audio file {path}: {err}") from None
    return length, chunks()


def _spool_stdin(folder: Path) -> Path:
    """Standard input into a file (soundfile and the .ecdc reader want to seek): .ecdc when it
    starts with the .ecdc magic, else audio; copied in blocks, so memory stays bounded."""
    import shutil
    head = sys.stdin.buffer.read(4)
    if not head:
        raise UserError("standard input is empty")
    path = folder / ("stdin" + (SUFFIX if head == b"ECDC" else ".audio"))
    with open(path, "wb") as f:
        f.write(head)
        shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)
    return path


def run(args) -> None:
    import tempfile

    from .cpu import tune_cpu_allocator

    tune_cpu_allocator()
    with tempfile.TemporaryDirectory(prefix="encodec-fast-") as scratch:
        to_stdout = args.output is not None and str(args.output) == "-"
        if str(args.input) == "-":
            args.input = _spool_stdin(Path(scratch))
        elif not args.input.exists():
            raise UserError(f"Input file {args.input} does not exist.")
        if to_stdout:  # .ecdc from audio, WAV from .ecdc; written to a file first, then copied out
            args.output = Path(scratch) / ("stdout" + (".wav" if args.input.suffix.lower() == SUFFIX else SUFFIX))
        _run(args)
        if to_stdout:
            import shutil
            with open(args.output, "rb") as f:
                shutil.copyfileobj(f, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()


def _run(args) -> None:
    import io

    from .compress import compress_iter, decompress_iter
    if args.input.suffix.lower() == SUFFIX:
        if args.output is None:
            args.output = args.input.with_name(args.input.stem + args.decompress_suffix).with_suffix(".wav")
        elif args.output.suffix.lower() not in AUDIO_OUT:
            raise UserError("Output extension must be .wav (or .flac)")
        _check_output(args.output, args.force)
        _decompress_file(args.input, args.output, args)
        return

    if args.output is None:
        args.output = args.input.with_suffix(SUFFIX)
    elif args.output.suffix.lower() not in (SUFFIX,) + AUDIO_OUT:
        raise UserError(f"Output extension must be .wav, .flac or {SUFFIX}")
    _check_output(args.output, args.force)
    from .model import LM_CHECKPOINTS, MODEL_CONFIGS, SHORT_NAMES
    if args.hq and args.model not in (None, "48khz"):
        raise UserError(f"--hq is the 48khz model; it cannot go with --model {args.model}")
    name = SHORT_NAMES["48khz" if args.hq else (args.model or "24khz")]
    if args.lm and name not in LM_CHECKPOINTS:
        raise UserError(f"No entropy-coding LM is trained for the model {name}; leave out --lm")
    if args.bandwidth not in MODEL_CONFIGS[name]["target_bandwidths"]:
        raise UserError(f"Bandwidth {args.bandwidth} is not supported by the model {name}")
    from .audio import audio_length
    audio_length(args.input, MODEL_CONFIGS[name]["sample_rate"])  # an unreadable file fails before the model loads
    model = _load_model(name, args)
    model.set_target_bandwidth(args.bandwidth)
    length, chunks = _audio_chunks(args.input, model, args.device)
    pieces = compress_iter(model, chunks, length, use_lm=args.lm)
    if args.output.suffix.lower() == SUFFIX:
        tmp = args.output.with_name(args.output.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(args.output)
    else:  # a round trip: the compressed bytes are small; the audio goes out block by block
        compressed = b"".join(pieces)
        _write_audio(decompress_iter(io.BytesIO(compressed), device=args.device, model=model), args.output,
                     args.rescale)


def tokenize_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "encodec-fast tokenize",
        description="Turn audio files into EnCodec codes: Parquet shards in OUT_DIR (one row per input), resumable: "
                    "run the same command again after a crash to finish the rest. Exit status: 0, or the number of "
                    "failed inputs, this run's and earlier runs' (at most 100; see OUT_DIR/_errors.jsonl); 101 when "
                    "the job itself cannot run.")
    parser.add_argument("inputs", nargs="+", help="Audio files, directories (searched recursively), glob patterns, "
                                                  "or manifests (.txt: a path per line; .jsonl/.csv/.tsv: path, "
                                                  "optional id, start, end in seconds).")
    parser.add_argument("-o", "--out", type=Path, required=True, help="Output directory.")
    parser.add_argument("--model", choices=["24khz", "48khz", "small"], default="24khz",
                        help="24khz or 48khz (official weights), small (shipped with the package)")
    parser.add_argument("-b", "--bandwidth", type=float, default=6.0, help="kbps (default 6).")
    parser.add_argument("--checkpoint", type=Path, help="State dict of a compatible model instead of the official one.")
    parser.add_argument("--repository", type=Path, help="Folder holding the official checkpoint (offline use).")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu).")
    parser.add_argument("--precision", choices=["exact", "tf32", "bf16", "fp16"], default="exact",
                        help="The encoder's precision mode (default exact: fp32 products everywhere, the CPU's "
                             "codes; tf32, bf16 and fp16 run faster on GPUs, and their codes can differ: fp16 "
                             "keeps more of them than bf16).")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="On CUDA, replay each batch shape (length bucket x clips) from a captured CUDA graph: "
                             "less launch overhead for short clips; one capture per shape.")
    parser.add_argument("--debug", action="store_true", help="On an error, show the Python traceback.")
    parser.add_argument("--batch-seconds", type=float, default=120.0,
                        help="Audio per encoder call, padding included (default 120).")
    parser.add_argument("--workers", type=int, default=None,
                        help="Decoding/resampling processes (default: CPU count - 1, at most 8 on CPU and 32 on "
                             "CUDA, where the clips are resampled on the GPU; 0: in-process).")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: this process takes the inputs whose id hashes to i of n (for SLURM arrays or "
                             "torchrun without Ray); all shards may share one OUT_DIR.")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="Rows per Parquet file (default 1000).")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local (default): worker processes on this machine; ray: Ray Data "
                             "(pip install ray[data]).")
    parser.add_argument("--ray-address", default=None,
                        help="With --engine ray: the cluster to join (e.g. auto, ray://host:10001); default: "
                             "start a local Ray instance.")
    parser.add_argument("--overwrite", action="store_true", help="Delete earlier output in OUT_DIR and start over.")
    parser.add_argument("--quiet", action="store_true", help="No progress line and no summary.")
    return parser


def tokenize_main(argv: tp.Sequence[str]) -> int:
    args = tokenize_parser().parse_args(argv)
    import torch

    from .cpu import tune_cpu_allocator
    from .jobs import Interrupted, JobLockError, report_failure, report_interruption
    from .pretrained import CheckpointError
    from .tokenize import tokenize
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu":
        tune_cpu_allocator()  # as the compress command: freed activations are reused, not page-faulted again
    try:
        summary = tokenize(args.inputs, args.out, model=args.model, bandwidth=args.bandwidth,
                           checkpoint=args.checkpoint, repository=args.repository, device=device,
                           batch_seconds=args.batch_seconds, workers=args.workers, shard=args.shard,
                           overwrite=args.overwrite, quiet=args.quiet, rows_per_shard=args.rows_per_shard,
                           engine=args.engine, ray_address=args.ray_address, precision=args.precision,
                           cuda_graphs=args.cuda_graphs)
    except (ValueError, CheckpointError, OSError, ImportError, JobLockError) as err:
        return report_failure("encodec-fast tokenize", err, 101, args.debug)
    except Interrupted as err:
        return report_interruption("encodec-fast tokenize", err)
    except KeyboardInterrupt:
        print("encodec-fast tokenize: interrupted (finished shards are kept; run the command again to resume)",
              file=sys.stderr)
        return 130
    if not args.quiet:
        print(summary.line(), file=sys.stderr)
        if summary.breakdown():
            print(summary.breakdown(), file=sys.stderr)
    return min(summary.failed + summary.failed_before, 100)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tokenize"]:
        return tokenize_main(argv[1:])
    if argv[:1] == ["train"]:
        from .train.command import main as train_main
        return train_main(argv[1:])
    if argv[:1] == ["info"]:
        from .info import main as info_main
        return info_main(argv[1:])
    args = get_parser().parse_args(argv)
    from .audio import AudioError
    from .jobs import report_failure
    from .pretrained import CheckpointError
    try:
        run(args)
    except (UserError, AudioError, CheckpointError, ValueError, EOFError, NotImplementedError, OSError) as err:
        return report_failure("encodec-fast", err, 1, args.debug, path=args.output)
    except KeyboardInterrupt:
        print("encodec-fast: interrupted", file=sys.stderr)
        return 130
    return 0
