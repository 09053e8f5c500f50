"""`encodec-fast train` (and `python -m encodec_fast.train`, for torchrun).

    encodec-fast train DATA... -o RUN_DIR [--model 24khz|48khz|small] [--init CKPT] [options]
    encodec-fast train DATA... -o RUN_DIR --resume [--steps N]
    torchrun --nproc-per-node N -m encodec_fast.train DATA... -o RUN_DIR [options]
    encodec-fast train report RUN_DIR

Every `TrainConfig` field is an option (`--batch-size`, `--no-balancer`, ...). With --resume the
run's saved configuration is used; only the options that steer the run, not what it computes
(--steps, --max-minutes, --workers, --device, --threads, --log-every, --valid-every,
--checkpoint-every, --max-nonfinite), may be given again. Exit status: 0; 1 for a user error (one line); 2 when the
run stopped on non-finite losses; 130 on Ctrl-C (after writing a checkpoint).
"""

import argparse
import dataclasses
import json
import sys
import typing as tp
from pathlib import Path

from .trainer import CONFIG, TrainConfig

#: Options a resumed run may change.
STEERING = {"steps", "workers", "device", "threads", "log_every", "valid_every", "checkpoint_every", "max_nonfinite",
            "max_minutes", "deterministic"}


#: The type of the options whose default is None.
_OPTIONAL = {"disc_prob": float, "l_g": float, "l_feat": float, "init": str, "device": str}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "encodec-fast train", description="Train or fine-tune an EnCodec model (the paper's recipe by default). "
        "`encodec-fast train report RUN_DIR` plots a run.")
    parser.add_argument("data", nargs="*", help="Training audio: files, directories, globs, manifests.")
    parser.add_argument("-o", "--out", type=Path, required=True, help="Run directory.")
    parser.add_argument("--resume", action="store_true", help="Continue the run in RUN_DIR from its checkpoint.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    parser.add_argument("--debug", action="store_true", help="On an error, show the Python traceback.")
    for field in dataclasses.fields(TrainConfig):
        meta = dict(field.metadata)
        if not meta.pop("cli", True):
            continue
        flag = "--" + field.name.replace("_", "-")
        help_text = meta.pop("help")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
            continue
        kind = meta.pop("type", None) or (_OPTIONAL[field.name] if default is None
                                          else str if isinstance(default, list) else type(default))
        parser.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS,
                            help=f"{help_text} (default: {default})", **meta)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "data" and hasattr(args, f.name)}
    if given.get("valid"):
        given["valid"] = [_absolute(v) for v in given["valid"]]
    if given.get("init"):
        given["init"] = _absolute(given["init"])
    data = [_absolute(d) for d in args.data]
    if args.resume:
        path = args.out / CONFIG
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"--resume: cannot read {path}: {err}") from None
        changed = sorted(k for k, v in given.items() if k not in STEERING and saved.get(k) != v)
        if changed:
            raise ValueError(f"--resume continues the saved run; these options cannot change: "
                             f"{', '.join('--' + k.replace('_', '-') for k in changed)}")
        if data and data != saved.get("data"):
            raise ValueError("--resume continues the saved run; its data cannot change")
        saved.update(given)
        return TrainConfig(**saved)
    if not args.data:
        raise ValueError("no training data given")
    return TrainConfig(data=data, **given)


def _absolute(spec: str) -> str:
    """Existing paths made absolute (a resumed run may start elsewhere); patterns as given."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else str(spec)


def main(argv: tp.Optional[tp.Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from .report import main as report_main
        return report_main(argv[1:])
    args = get_parser().parse_args(argv)
    from ..jobs import Interrupted, JobLockError, report_failure, report_interruption
    from ..pretrained import CheckpointError
    from .trainer import TrainingError, train
    try:
        config = config_from_args(args)
        summary = train(config, args.out, resume=args.resume, quiet=args.quiet)
    except (ValueError, CheckpointError, OSError, JobLockError) as err:
        return report_failure("encodec-fast train", err, 1, args.debug)
    except Interrupted as err:
        return report_interruption("encodec-fast train", err)
    except TrainingError as err:
        print(f"encodec-fast train: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if not args.quiet:
        print(f"encodec-fast train: {summary['step']} steps ({summary['skipped_steps']} skipped); "
              f"model in {args.out / 'model.th'}", file=sys.stderr)
    return 0
