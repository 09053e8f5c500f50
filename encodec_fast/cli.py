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
    parser.add_argument("input", type=Path, help="Input file: audio (wav, flac, ogg, mp3...) or .ecdc.")
    parser.add_argument("output", type=Path, nargs="?", help="Output file, otherwise inferred from input file.")
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
                        help="State dict of a compatible model (e.g. your own training) instead of the official weights.")
    parser.add_argument("--lm-checkpoint", type=Path,
                        help="State dict of the entropy-coding LM (with --lm, or to read LM-coded files) instead of "
                             "the official one.")
    parser.add_argument("--repository", type=Path,
                        help="Folder holding the official checkpoint files (offline use).")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu).")
    return parser


def _check_output(output: Path, force: bool) -> None:
    if not output.parent.exists():
        raise UserError(f"Output folder for {output} does not exist.")
    if output.exists() and not force:
        raise UserError(f"Output file {output} exists. Use -f / --force to overwrite.")


def _check_clipping(wav, rescale: bool) -> None:
    if rescale:
        return
    mx = wav.abs().max().item()
    if mx > 0.99:
        print(f"Clipping!! max scale {mx}, limit is 0.99. To avoid clipping, use the `-r` option to rescale "
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


def _decompress(data: bytes, args):
    from . import ecdc
    from .compress import _check_metadata, decompress
    meta = ecdc.read_ecdc_header(ecdc.as_file(data))
    name, _, _, _ = _check_metadata(meta)
    model = _load_model(name, args)
    return decompress(data, device=args.device, model=model)


def run(args) -> None:
    import torch

    from .audio import convert_audio, read_audio, save_audio
    from .compress import compress
    from .cpu import tune_cpu_allocator

    tune_cpu_allocator()
    if not args.input.exists():
        raise UserError(f"Input file {args.input} does not exist.")
    if args.input.suffix.lower() == SUFFIX:
        if args.output is None:
            args.output = args.input.with_name(args.input.stem + args.decompress_suffix).with_suffix(".wav")
        elif args.output.suffix.lower() not in AUDIO_OUT:
            raise UserError("Output extension must be .wav (or .flac)")
        _check_output(args.output, args.force)
        out, sample_rate = _decompress(args.input.read_bytes(), args)
        _check_clipping(out, args.rescale)
        save_audio(out, args.output, sample_rate, rescale=args.rescale)
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
    wav, sample_rate = read_audio(args.input)
    model = _load_model(name, args)
    model.set_target_bandwidth(args.bandwidth)
    wav = convert_audio(wav, sample_rate, model.sample_rate, model.channels).to(args.device)
    if not torch.isfinite(wav).all():
        raise UserError(f"{args.input} contains NaN or infinite samples")
    compressed = compress(model, wav, use_lm=args.lm)
    if args.output.suffix.lower() == SUFFIX:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_bytes(compressed)
        tmp.replace(args.output)
    else:
        from .compress import decompress
        out, out_rate = decompress(compressed, device=args.device, model=model)
        _check_clipping(out, args.rescale)
        save_audio(out, args.output, out_rate, rescale=args.rescale)


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
    parser.add_argument("--batch-seconds", type=float, default=120.0,
                        help="Audio per encoder call, padding included (default 120).")
    parser.add_argument("--workers", type=int, default=None,
                        help="Decoding/resampling processes (default: CPU count - 1, at most 8; 0: in-process).")
    parser.add_argument("--shard", default="0/1",
                        help="i/n: this process takes the inputs whose id hashes to i of n (for SLURM arrays or "
                             "torchrun without Ray); all shards may share one OUT_DIR.")
    parser.add_argument("--rows-per-shard", type=int, default=1000, help="Rows per Parquet file (default 1000).")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="local (default): worker processes on this machine; ray: Ray Data (pip install ray[data]).")
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
                           engine=args.engine, ray_address=args.ray_address)
    except (ValueError, CheckpointError, OSError, ImportError) as err:
        print(f"encodec-fast tokenize: error: {err}", file=sys.stderr)
        return 101
    except KeyboardInterrupt:
        print("encodec-fast tokenize: interrupted (finished shards are kept; run the command again to resume)",
              file=sys.stderr)
        return 130
    if not args.quiet:
        print(summary.line(), file=sys.stderr)
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
    from .pretrained import CheckpointError
    try:
        run(args)
    except (UserError, AudioError, CheckpointError, ValueError, EOFError, NotImplementedError) as err:
        print(f"encodec-fast: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("encodec-fast: interrupted", file=sys.stderr)
        return 130
    return 0
