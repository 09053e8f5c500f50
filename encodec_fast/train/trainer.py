"""The EnCodec training loop: `Trainer(config, run_dir).run()` or `train(config, run_dir)`.

One step (the paper's recipe, §3.4 and §4.4, every knob in `TrainConfig`):
1. a bandwidth for the whole batch and whether the discriminator learns this step are drawn from
   `np.random.default_rng([seed, step])`, the same on every worker and after a resume;
2. per micro-batch (`accumulate` of them): encoder -> quantizer (fp32, EMA codebooks) ->
   decoder; the generator's losses against the discriminator as it is (time L1, multi-scale mel,
   adversarial hinge, relative feature matching) go through the balancer into the decoder
   output, the commitment loss backpropagates on its own (weight `commitment_weight`); if the
   discriminator learns this step, its hinge loss on the detached output accumulates its gradient;
3. gradients are averaged across workers (torchrun), then one Adam step for the model and, if
   drawn, one for the discriminator; the optional EMA of the weights follows.

A step whose losses or the balancer's gradient norms are not finite is skipped (no update, the
balancer's moving averages unchanged; the codebooks' EMA statistics of that forward are kept)
with a warning, and `max_nonfinite` such steps in a row stop the run with a clear error.
Checkpoints (`checkpoint.pt`: everything a resume needs, written atomically) every
`checkpoint_every` steps, at the end and on Ctrl-C; `model.th` is the model alone in upstream's
state-dict layout (the EMA weights when `ema` > 0).

Data parallel (`torchrun --nproc-per-node N -m encodec_fast.train ...`): `batch_size` is global.
N workers of batch b compute what one process computes with batch N x b: the examples are the
same (`data.StepBatches`), gradients are averaged, the balancer's norms are averaged and its
output gradient scaled by N (see `Balancer.backward`), feature matching divides by the global
mean of the real features, and the codebooks run with `EuclideanCodebook.sync_statistics`
(k-means and expiry on the gathered vectors, EMA counts and sums summed before the update).
"""

import contextlib
import copy
import dataclasses
import errno
import json
import math
import os
import random
import sys
import time
import typing as tp
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distrib, timing
from .. import precision as precision_modes
from ..audio import save_audio
from ..jobs import GracefulStop, Interrupted, OutputLock, written_then_renamed
from ..model import MODEL_CONFIGS, EncodecModel
from ..pretrained import load_state_dict_file
from ..quantization.core_vq import EuclideanCodebook
from . import data as D
from .balancer import Balancer
from .losses import (
    MultiScaleMelLoss,
    discriminator_hinge_loss,
    generator_hinge_loss,
    relative_feature_matching,
    time_l1,
)
from .metrics import codebook_usage, mel_distance, si_snr, stft_distance
from .msstftd import MultiScaleSTFTDiscriminator

#: Named model configurations: (model configuration in `MODEL_CONFIGS`, SEANet/quantizer sizes
#: changed from it).
MODELS: tp.Dict[str, tp.Tuple[str, tp.Dict[str, int]]] = {
    "24khz": ("encodec_24khz", {}),
    "48khz": ("encodec_48khz", {}),
    # The small 24 kHz codec (every bandwidth of the official one): 8 filters, 16-dim latents, one
    # LSTM layer; 0.67 M weights, a 7.0 MB state dict, most of it the 32 codebooks.
    "small": ("encodec_24khz_small", {}),
    # For tests and smoke runs: seconds per step on a CPU, not a codec.
    "tiny": ("encodec_24khz", {"n_filters": 4, "dimension": 8, "lstm": 0}),
}

CHECKPOINT, EXPORT, CONFIG, METRICS = "checkpoint.pt", "model.th", "config.json", "metrics.jsonl"


def _opt(default, help: str, **kw):
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _list(default, help: str, **kw):
    return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Every option of a run (saved as RUN_DIR/config.json). Defaults: the paper's recipe."""
    data: tp.List[str] = _list([], "training audio: files, directories, globs, manifests", cli=False)
    valid: tp.List[str] = _list([], "validation audio (default: hold out `valid_percent` of the data)", nargs="*")
    valid_percent: float = _opt(2.0, "share of the files held out for validation when --valid is not given")
    valid_items: int = _opt(16, "validation files at most")
    valid_seconds: float = _opt(5.0, "seconds of each validation file evaluated")
    valid_samples: int = _opt(2, "validation files whose decoded audio is saved")
    model: str = _opt("24khz", "model configuration", choices=sorted(MODELS))
    init: tp.Optional[str] = _opt(None, "state dict to start from (official weights or your own export)")
    segment_seconds: float = _opt(1.0, "length of the random training crops")
    batch_size: int = _opt(64, "crops per step, over all workers (the paper: 64)")
    accumulate: int = _opt(1, "micro-batches per step (gradient accumulation)")
    steps: int = _opt(600_000, "optimizer steps in all (the paper: 300 epochs x 2000)")
    lr: float = _opt(3e-4, "Adam learning rate, model and discriminator")
    betas: tp.List[float] = _list([0.5, 0.9], "Adam betas", nargs=2, type=float)
    disc_prob: tp.Optional[float] = _opt(None, "probability that the discriminator learns in a step "
                                               "(default: the paper's 2/3 at 24 kHz, 1/2 at 48 kHz)")
    disc_filters: int = _opt(32, "discriminator filters")
    l_t: float = _opt(0.1, "weight of the time-domain L1 loss")
    l_f: float = _opt(1.0, "weight of the multi-scale mel loss")
    l_g: tp.Optional[float] = _opt(None, "weight of the adversarial loss (default 3 at 24 kHz, 4 at 48 kHz)")
    l_feat: tp.Optional[float] = _opt(None, "weight of relative feature matching (default 3 at 24 kHz, 4 at 48 kHz)")
    commitment_weight: float = _opt(1.0, "weight of the commitment loss (outside the balancer)")
    balancer: bool = _opt(True, "balance the generator's losses (else plain weighted sum)")
    balancer_decay: float = _opt(0.999, "EMA decay of the balancer's gradient norms")
    revive_dead_codes: bool = _opt(False, "fix upstream issue #61: dead codewords really replaced")
    commitment_all_stages: bool = _opt(False, "fix upstream issue #25: every stage's commitment loss trains")
    ema: float = _opt(0.0, "decay of an EMA of the model's weights used for validation and export (0: off)")
    precision: str = _opt("auto", "bf16 autocast (quantizer in fp32), tf32 (fp32 tensors, TF32 tensor cores for "
                                  "convolutions, LSTMs and matrix products on CUDA), fp32 (TF32 off), or fp64 "
                                  "(slow; for exactness checks, exported in fp32); auto: bf16 on CUDA",
                          choices=["auto", "bf16", "tf32", "fp32", "fp64"])
    device: tp.Optional[str] = _opt(None, "torch device (default: cuda when available)")
    workers: int = _opt(2, "data loading processes (0: in the training process)")
    seed: int = _opt(2036, "seed of everything")
    log_every: int = _opt(25, "steps between metric lines")
    valid_every: int = _opt(1000, "steps between validations (0: only at the end)")
    checkpoint_every: int = _opt(1000, "steps between checkpoints")
    max_minutes: float = _opt(0.0, "stop (checkpoint, export, validate) after this much wall time (0: no limit)")
    max_nonfinite: int = _opt(5, "stop after this many steps in a row with non-finite losses")
    threads: int = _opt(0, "torch CPU threads (0: torch's default)")
    deterministic: bool = _opt(False, "deterministic algorithms only, for the step and validation "
                                      "(torch.use_deterministic_algorithms, cuDNN's deterministic convolutions, "
                                      "CUBLAS_WORKSPACE_CONFIG=:4096:8): a run repeats its bits on the same GPU; "
                                      "slower on CUDA; a CPU step is deterministic without it")

    @property
    def base(self) -> str:
        return MODELS[self.model][0]

    @property
    def sample_rate(self) -> int:
        return MODEL_CONFIGS[self.base]["sample_rate"]

    def weights(self) -> tp.Dict[str, float]:
        hq = self.base == "encodec_48khz"
        return {"l1": self.l_t, "mel": self.l_f, "adv": self.l_g if self.l_g is not None else (4.0 if hq else 3.0),
                "feat": self.l_feat if self.l_feat is not None else (4.0 if hq else 3.0)}

    def discriminator_probability(self) -> float:
        if self.disc_prob is not None:
            return self.disc_prob
        return 0.5 if self.base == "encodec_48khz" else 2 / 3

    def check(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: one of {sorted(MODELS)}")
        for name in ("batch_size", "accumulate", "steps", "log_every", "checkpoint_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.segment_seconds > 0:
            raise ValueError("segment_seconds must be positive")
        if not 0 <= self.ema < 1:
            raise ValueError("ema must be in [0, 1)")
        if self.disc_prob is not None and not 0 <= self.disc_prob <= 1:
            raise ValueError("disc_prob must be in [0, 1]")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. losses not finite several steps in a row); checkpoints are intact."""


def build_model(config: TrainConfig) -> EncodecModel:
    base, changes = MODELS[config.model]
    cfg = MODEL_CONFIGS[base]
    arch = {**cfg.get("arch", {}), **changes}
    model = EncodecModel._get_model(cfg["target_bandwidths"], cfg["sample_rate"], cfg["channels"],
                                    causal=cfg["causal"], model_norm=cfg["norm"], audio_normalize=cfg["normalize"],
                                    segment=cfg["segment"], name=base if not changes else "unset",
                                    revive_dead_codes=config.revive_dead_codes,
                                    commitment_all_stages=config.commitment_all_stages, **arch)
    if config.init:
        state = load_state_dict_file(config.init)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"--init {config.init} does not fit the {config.model} model: {err}") from None
    for layer in model.quantizer.vq.layers:
        layer.warn = False  # upstream's issue #25 warning: the trainer documents the choice instead
    return model


def build_discriminator(config: TrainConfig) -> MultiScaleSTFTDiscriminator:
    """The paper's MS-STFTD: 5 scales, windows 2048..128 (doubled at 48 kHz), hop a quarter; one
    audio channel (stereo channels are judged separately, as the paper does)."""
    factor = 2 if config.base == "encodec_48khz" else 1
    ffts = [factor * n for n in (2048, 1024, 512, 256, 128)]
    return MultiScaleSTFTDiscriminator(config.disc_filters, n_ffts=ffts, hop_lengths=[n // 4 for n in ffts],
                                       win_lengths=ffts)


class WeightEMA:
    """Exponential moving average of a model's floating-point parameters and buffers (codebooks
    included), with audiocraft's bias correction: decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)

    def state_dict(self, model: nn.Module) -> tp.Dict[str, torch.Tensor]:
        """The model's state with the averaged values."""
        return {k: self.shadow.get(k, v) for k, v in model.state_dict().items()}


def _atomic_save(obj: tp.Any, path: Path) -> None:
    with written_then_renamed(path, path.with_name(path.name + ".tmp")) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's writer reports a failed write (a full disk) as a RuntimeError
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise OSError(errno.EIO, f"writing failed ({first[:120]}); is the disk full?", str(path)) from None


def _rng_state() -> tp.Dict[str, tp.Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: tp.Dict[str, tp.Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _init_distributed(device: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


class Trainer:
    """config: a `TrainConfig`; run_dir: where checkpoints, exports, metrics and samples go.
    resume: continue from RUN_DIR/checkpoint.pt (an error if there is none); without it, a
    RUN_DIR that already holds a run is an error (nothing is overwritten)."""

    def __init__(self, config: TrainConfig, run_dir: tp.Union[str, Path], resume: bool = False,
                 quiet: bool = False):
        config.check()
        self.config, self.run_dir, self.quiet = config, Path(run_dir), quiet
        if config.deterministic:  # read when cuBLAS makes its first handle: before any CUDA work
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{os.environ['LOCAL_RANK']}"
        _init_distributed(device)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.rank, self.world = distrib.rank(), distrib.world_size()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not a multiple of the {self.world} workers")
        if (config.batch_size // self.world) % config.accumulate:
            raise ValueError(f"batch_size per worker {config.batch_size // self.world} is not a multiple of "
                             f"accumulate {config.accumulate}")
        self.micro_batch = config.batch_size // self.world // config.accumulate
        checkpoint = self.run_dir / CHECKPOINT
        if resume and not checkpoint.exists():
            if not (self.run_dir / CONFIG).exists():
                raise ValueError(f"--resume: no {CHECKPOINT} in {self.run_dir}")
            resume = False  # the run stopped before its first checkpoint (a full disk, a kill): start at step 0
        elif not resume and (checkpoint.exists() or (self.run_dir / METRICS).exists()):
            raise ValueError(f"{self.run_dir} already holds a run; pass --resume to continue it or choose "
                             "another directory")
        self.bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")

        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2 ** 32)
        random.seed(config.seed)
        self.dtype = torch.float64 if config.precision == "fp64" else torch.float32
        self.model = build_model(config).to(self.device, self.dtype)
        self.disc = build_discriminator(config).to(self.device, self.dtype)
        distrib.broadcast_tensors(list(self.model.parameters()) + list(self.disc.parameters()))
        for module in self.model.modules():
            if isinstance(module, EuclideanCodebook):
                module.sync_statistics = True
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=config.lr, betas=tuple(config.betas))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=config.lr, betas=tuple(config.betas))
        self.weights = config.weights()
        self.adversarial = self.weights["adv"] > 0 or self.weights["feat"] > 0
        if not any(self.weights.values()):
            raise ValueError("every loss weight is 0: nothing to train the model with")
        self.balancer = Balancer({k: v for k, v in self.weights.items() if v > 0}, rescale_grads=config.balancer,
                                 ema_decay=config.balancer_decay, monitor=True)
        self.mel_loss = MultiScaleMelLoss(config.sample_rate).to(self.device, self.dtype)
        self.ema = WeightEMA(self.model, config.ema) if config.ema > 0 else None
        self.step, self.nonfinite, self.skipped = 0, 0, 0
        self.tensorboard = None
        self.segment = round(config.segment_seconds * config.sample_rate)
        if resume:
            self._load(checkpoint)
        self._setup_data()

    # -- data ------------------------------------------------------------------------------------
    def _setup_data(self) -> None:
        cfg = self.config
        clips, skipped = D.scan(cfg.data, cfg.segment_seconds)
        if cfg.valid:
            valid, more = D.scan(cfg.valid, 0.0)
            skipped += more
            held = {os.path.realpath(c.path) for c in valid}  # ids are relative to each input: compare files
            train = [c for c in clips if os.path.realpath(c.path) not in held]
        else:
            train, valid = D.split_validation(clips, cfg.valid_percent, cfg.valid_items)
        valid = D.spread(valid, cfg.valid_items)
        self.valid_audio, bad = D.load_validation(valid, cfg.sample_rate, self.model.channels, cfg.valid_seconds)
        skipped += bad
        self.skipped_files = skipped
        for s in skipped:
            self._problem(s.path, s.reason)
        if not train:
            raise ValueError(f"no usable training audio in {cfg.data} ({len(skipped)} inputs skipped; see "
                             f"{self.run_dir / 'data_problems.jsonl'})")
        self.train_clips, self.valid_clips = train, valid
        self.dataset = D.CropDataset(train, cfg.sample_rate, self.model.channels, self.segment, cfg.seed)

    def _problem(self, path: str, reason: str) -> None:
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "data_problems.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step, "path": path, "reason": reason}) + "\n")
        if not self.quiet:
            print(f"encodec-fast train: skipped {path}: {reason}", file=sys.stderr)

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> tp.Dict[str, tp.Any]:
        return {"version": 1, "step": self.step, "config": dataclasses.asdict(self.config),
                "model": self.model.state_dict(), "discriminator": self.disc.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "balancer": self.balancer.state_dict(),
                "ema": None if self.ema is None else {"shadow": self.ema.shadow, "updates": self.ema.updates},
                "rng": _rng_state(), "nonfinite": self.nonfinite, "skipped": self.skipped}

    def _load(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as err:
            raise ValueError(f"cannot read {path}: {err}") from None
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.balancer.load_state_dict(state["balancer"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.shadow, self.ema.updates = state["ema"]["shadow"], state["ema"]["updates"]
        _set_rng_state(state["rng"])
        self.step, self.nonfinite, self.skipped = state["step"], state["nonfinite"], state["skipped"]

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_save(self.state_dict(), self.run_dir / CHECKPOINT)
            self.export(self.run_dir / EXPORT)

    def export_state(self) -> tp.Dict[str, torch.Tensor]:
        """The model alone (EMA weights if on), upstream's keys, on CPU, floats in fp32."""
        state = self.ema.state_dict(self.model) if self.ema is not None else self.model.state_dict()
        return {k: v.detach().cpu().to(torch.float32 if v.is_floating_point() else v.dtype).clone()
                for k, v in state.items()}

    def export(self, path: Path) -> None:
        _atomic_save(self.export_state(), path)

    # -- one step --------------------------------------------------------------------------------
    def draws(self, step: int) -> tp.Tuple[float, bool]:
        """(bandwidth, discriminator learns) of a step: the same on every worker and after resume."""
        rng = np.random.default_rng([self.config.seed, step, 1])
        bandwidth = float(rng.choice(self.model.target_bandwidths))
        return bandwidth, bool(rng.random() < self.config.discriminator_probability()) and self.adversarial

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def precision_name(self) -> str:
        """The precision this run computes in: bf16, tf32, fp32 or fp64 ('auto' resolved)."""
        return "bf16" if self.bf16 else self.config.precision if self.config.precision != "auto" else "fp32"

    @contextlib.contextmanager
    def _torch_math(self) -> tp.Iterator[None]:
        """The step's precision mode for our ops (`encodec_fast.precision.declare`: the kernels'
        products in tf32 under tf32) and, on CUDA, torch's TF32 switches (cuDNN convolutions and
        LSTMs, cuBLAS) for the whole step, backward included: on for tf32, off otherwise (fp32 means
        fp32; what bf16 leaves in fp32 too), restored after (`encodec_fast.precision.torch_precision`)."""
        mode = {"tf32": "tf32", "bf16": "bf16"}.get(self.precision_name, "exact")
        with precision_modes.declare(mode), (precision_modes.torch_precision("tf32" if mode == "tf32" else "exact")
                                             if self.device.type == "cuda" else contextlib.nullcontext()), \
                (deterministic_algorithms() if self.config.deterministic else contextlib.nullcontext()):
            yield

    def forward(self, x: torch.Tensor, bandwidth: float):
        """x [B, C, T] -> (decoded [B, C, T] fp32, commitment loss, codes [K, B, frames])."""
        model = self.model
        scale = model._scale(x) if model.normalize else None
        inp = x / scale if scale is not None else x
        with self._autocast(), timing.stage("generator", x.device):
            emb = model.encoder(inp)
        with timing.stage("quantizer", x.device):
            q = model.quantizer(emb.to(self.dtype), model.frame_rate, bandwidth)
        with self._autocast(), timing.stage("generator", x.device):
            y = model.decoder(q.quantized)
        y = y.to(self.dtype)[..., :x.shape[-1]]
        if scale is not None:
            y = y * scale
        return y, q.penalty, q.codes

    def _judge(self, audio: torch.Tensor):
        """The discriminator on each channel separately: [B, C, T] -> [B*C, 1, T]."""
        with self._autocast(), timing.stage("discriminator", audio.device):
            logits, fmaps = self.disc(audio.reshape(-1, 1, audio.shape[-1]))
        return [v.to(self.dtype) for v in logits], [[f.to(self.dtype) for f in layer] for layer in fmaps]

    def _finite(self, values: tp.Iterable[float]) -> bool:
        """Whether every value is finite, on every worker."""
        ok = all(math.isfinite(v) for v in values)
        if distrib.is_distributed():
            flag = torch.tensor([float(ok)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            ok = bool(flag.item() > 0)
        return ok

    def train_step(self, step: int, batches: tp.Sequence[torch.Tensor]) -> tp.Optional[tp.Dict[str, float]]:
        """One optimizer step on `accumulate` micro-batches [b, C, T] -> logged values, or None
        when the step was skipped (non-finite losses)."""
        with self._torch_math():
            return self._train_step(step, batches)

    def _train_step(self, step: int, batches: tp.Sequence[torch.Tensor]) -> tp.Optional[tp.Dict[str, float]]:
        cfg = self.config
        bandwidth, learn_d = self.draws(step)
        self.model.train()
        self.disc.train()
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        average = None
        if distrib.is_distributed():
            def average(t: torch.Tensor) -> torch.Tensor:
                t = t.detach().clone()
                torch.distributed.all_reduce(t)
                return t / self.world
        sums: tp.Dict[str, float] = {}
        m = len(batches)
        for x in batches:
            x = x.to(self.device, self.dtype, non_blocking=True)
            y, penalty, _ = self.forward(x, bandwidth)
            # One discriminator pass per signal serves both players: the generator's losses reach
            # the model only through `y` (the balancer differentiates them with respect to `y`),
            # the discriminator's loss only its own weights (`autograd.grad` on them). Losses of
            # weight 0 are not computed; with no adversarial weight the discriminator never runs.
            w = self.weights
            real_logits = fake_logits = None
            if learn_d or w["feat"] > 0:
                with contextlib.nullcontext() if learn_d else torch.no_grad():
                    real_logits, real_fmaps = self._judge(x)
            if self.adversarial:
                fake_logits, fake_fmaps = self._judge(y)
            losses = {}
            with timing.stage("balancer", x.device):  # the losses, then their gradients with respect to y
                if w["l1"] > 0:
                    losses["l1"] = time_l1(x, y)
                if w["mel"] > 0:
                    losses["mel"] = self.mel_loss(x, y)
                if w["adv"] > 0:
                    losses["adv"] = generator_hinge_loss(fake_logits)
                if w["feat"] > 0:
                    losses["feat"] = relative_feature_matching(real_fmaps, fake_fmaps, average=average)
                d_loss = discriminator_hinge_loss(real_logits, fake_logits) if learn_d else None
                grads, norms = self.balancer.gradients(losses, y)  # nothing read, the balancer unchanged
            named = {**losses, "commit": penalty, **({"disc": d_loss} if d_loss is not None else {})}
            # the losses and the balancer's gradient norms read in one go (on a GPU: one wait for the
            # device per micro-batch); a step with any of them not finite is skipped before anything
            # (the balancer's averages included) takes them in
            read = torch.stack([v.detach().reshape(()) for v in [*named.values(), *norms.values()]]).tolist()
            values = dict(zip(named, read))
            norm_values = dict(zip(norms, read[len(named):]))
            if not self._finite(read):
                return self._skip(step, {**values, **{f"gradient norm of {k}": v for k, v in norm_values.items()}})
            if cfg.commitment_weight > 0 and penalty.requires_grad:
                with timing.stage("generator", x.device):
                    (penalty * (cfg.commitment_weight / m)).backward(retain_graph=True)
            with timing.stage("balancer", x.device):  # the backward through the generator inside is its own
                self.balancer.apply(grads, norm_values, y, scale=self.world if cfg.balancer else 1.0 / m)
            if d_loss is not None:
                with timing.stage("discriminator", x.device):
                    params = [p for p in self.disc.parameters()]
                    for p, g in zip(params, torch.autograd.grad(d_loss / m, params)):
                        p.grad = g if p.grad is None else p.grad.add_(g)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v / m
        with timing.stage("optimizers", self.device):
            distrib.average_gradients(self.model.parameters())
            self.opt_g.step()
            if learn_d:
                distrib.average_gradients(self.disc.parameters())
                self.opt_d.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.nonfinite = 0
        out = distrib.average_metrics(sums)
        out.update({"bandwidth": bandwidth, "disc_step": float(learn_d)})
        out.update({k: v for k, v in self.balancer.metrics.items()})
        return out

    def _skip(self, step: int, values: tp.Dict[str, float]) -> None:
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_d.zero_grad(set_to_none=True)
        self.nonfinite += 1
        self.skipped += 1
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if self.rank == 0:
            warnings.warn(f"step {step}: non-finite loss {bad}; step skipped "
                          f"({self.nonfinite} in a row, stop at {self.config.max_nonfinite})", RuntimeWarning)
        if self.nonfinite >= self.config.max_nonfinite:
            raise TrainingError(f"{self.nonfinite} steps in a row had non-finite losses ({bad} at step {step}); "
                                f"stopped. The last checkpoint in {self.run_dir} is intact: lower --lr, check the "
                                "data, or resume from it.")
        return None

    # -- validation ------------------------------------------------------------------------------
    def eval_model(self) -> EncodecModel:
        if self.ema is None:
            return self.model
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.ema.state_dict(self.model))
        return model

    @torch.no_grad()
    def validate(self) -> tp.List[tp.Dict[str, tp.Any]]:
        """Per bandwidth: SI-SNR, mel and multi-scale STFT distances (means over the validation
        files); codebook usage per stage at the highest bandwidth; decoded samples saved."""
        with self._torch_math():
            return self._validate()

    def _validate(self) -> tp.List[tp.Dict[str, tp.Any]]:
        if not self.valid_audio:
            return []
        model = self.eval_model().eval()
        rows = []
        sample_dir = self.run_dir / "samples" / f"step_{self.step:07d}"
        top = max(model.target_bandwidths)
        for bw in model.target_bandwidths:
            model.set_target_bandwidth(bw)
            scores: tp.Dict[str, tp.List[float]] = {"si_snr": [], "mel_distance": [], "stft_distance": []}
            codes_top = []
            for i, wav in enumerate(self.valid_audio):
                x = wav[None].to(self.device, self.dtype)
                frames = model.encode(x)
                y = model.decode(frames)[..., :x.shape[-1]].float().cpu()
                x = x.cpu()
                scores["si_snr"].append(float(si_snr(x, y)[0]))
                scores["mel_distance"].append(float(mel_distance(x, y, model.sample_rate)[0]))
                scores["stft_distance"].append(float(stft_distance(x, y)[0]))
                if bw == top:
                    codes_top.append(torch.cat([c for c, _ in frames], dim=-1)[0].cpu())
                if i < self.config.valid_samples and self.rank == 0 and bw in (min(model.target_bandwidths), top):
                    sample_dir.mkdir(parents=True, exist_ok=True)
                    save_audio(y[0], sample_dir / f"valid{i}_{bw:g}kbps.wav", model.sample_rate, rescale=True)
                    if bw == top:
                        save_audio(x[0], sample_dir / f"valid{i}_reference.wav", model.sample_rate, rescale=True)
            rows.append({"split": "valid", "step": self.step, "bandwidth": bw,
                         **{k: float(np.mean(v)) for k, v in scores.items()}})
            if bw == top:
                usage = codebook_usage(torch.cat(codes_top, dim=-1), model.quantizer.bins)
                books = [layer._codebook for layer in self.model.quantizer.vq.layers]
                dead = [int((cb.cluster_size < cb.threshold_ema_dead_code).sum()) for cb in books]
                # codewords replaced by dead-code expiry since the last such row (this rank's count:
                # under sync_statistics every rank replaces the same ones)
                replaced = [cb.replaced for cb in books]
                for cb in books:
                    cb.replaced = 0
                rows.append({"split": "codebooks", "step": self.step,
                             "perplexity": [u["perplexity"] for u in usage],
                             "unused": [u["unused"] for u in usage], "dead_ema": dead, "replaced": replaced})
        model.bandwidth = None
        return rows

    # -- the loop --------------------------------------------------------------------------------
    def _log(self, row: tp.Dict[str, tp.Any]) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None and row.get("split") in ("train", "valid"):
            tag = row["split"] + (f"/{row['bandwidth']:g}kbps" if row["split"] == "valid" else "")
            for key, value in row.items():
                if key not in ("step", "time", "bandwidth") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{tag}/{key}", value, row["step"])

    def _open_tensorboard(self):
        """A SummaryWriter in RUN_DIR/tensorboard when the tensorboard package is installed."""
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: JSON lines only
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def _stop_now(self, deadline: float, stop: GracefulStop) -> tp.Tuple[bool, int]:
        """(out of time, the signal that asks to stop or 0): every worker stops at the same step, rank 0's
        clock and signals decide (one broadcast per step under torchrun; in one process nothing goes
        through the device, so the host does not wait for the step it has queued)."""
        late, signum = time.monotonic() > deadline, int(stop.requested or 0)
        if not distrib.is_distributed():
            return late, signum
        flags = torch.tensor([float(late), float(signum)], device=self.device)
        torch.distributed.broadcast(flags, src=0)
        return bool(flags[0].item()), int(flags[1].item())

    def run(self) -> tp.Dict[str, tp.Any]:
        """Train to `config.steps` (or the time limit). SIGTERM or SIGINT stops at the end of the step in
        progress: a checkpoint of that step is written and `Interrupted` raised (a rerun with --resume
        continues bit for bit); a second signal stops at once, and the last checkpoint stands."""
        lock = OutputLock(self.run_dir / ".lock", f"run directory {self.run_dir}") if self.rank == 0 \
            else contextlib.nullcontext()
        with lock, GracefulStop() as stop:
            return self._run(stop)

    def _run(self, stop: GracefulStop) -> tp.Dict[str, tp.Any]:
        cfg = self.config
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.tensorboard = self._open_tensorboard()
            with written_then_renamed(self.run_dir / CONFIG) as tmp:
                tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            self._log({"split": "start", "step": self.step, "time": time.time(), "world": self.world,
                       "train_files": len(self.train_clips), "valid_files": len(self.valid_audio),
                       "skipped_files": len(self.skipped_files), "device": str(self.device),
                       "precision": self.precision_name, "threads": torch.get_num_threads()})
        sampler = D.StepBatches(self.step, cfg.steps, self.micro_batch, cfg.accumulate, self.rank, self.world)
        batches = iter(D.loader(self.dataset, sampler, cfg.workers, pin_memory=self.device.type == "cuda"))
        bar = _progress(cfg.steps, self.step, disable=self.quiet or self.rank != 0)
        window_start, window_steps = time.perf_counter(), 0
        audio_per_step = cfg.batch_size * cfg.segment_seconds
        last: tp.Dict[str, float] = {}
        deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes > 0 else math.inf
        signum = 0
        try:
            late = False
            while self.step < cfg.steps and not late and not signum:
                micro = [next(batches) for _ in range(cfg.accumulate)]
                for _, problems in micro:
                    for path, reason in problems:
                        self._problem(path, reason)
                values = self.train_step(self.step, [audio for audio, _ in micro])
                self.step += 1
                window_steps += 1
                if values is not None:
                    last = values
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("l1", "mel", "adv", "feat") if k in last},
                                    refresh=False)
                bar.update(1)
                late, signum = self._stop_now(deadline, stop)  # one check (a broadcast under torchrun) per step
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or late:
                    elapsed = time.perf_counter() - window_start
                    self._log({"split": "train", "step": self.step, "time": time.time(), **last,
                               "steps_per_s": window_steps / elapsed,
                               "audio_s_per_s": window_steps * audio_per_step / elapsed,
                               "skipped_steps": self.skipped})
                    window_start, window_steps = time.perf_counter(), 0
                if cfg.valid_every and self.step % cfg.valid_every == 0 and self.step < cfg.steps:
                    for row in self.validate():
                        self._log(row)
                if self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:  # a second signal, or no handler (not the main thread): mid-step
            bar.close()
            if self.rank == 0:
                print(f"encodec-fast train: interrupted during step {self.step + 1}; the last checkpoint in "
                      f"{self.run_dir} stands (continue with --resume)", file=sys.stderr)
            raise
        bar.close()
        self.save_checkpoint()
        if signum:
            raise Interrupted(signum, f"stopped after step {self.step}; checkpoint written to "
                                      f"{self.run_dir / CHECKPOINT} (continue with --resume)")
        rows = self.validate()
        for row in rows:
            self._log(row)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return {"step": self.step, "skipped_steps": self.skipped, "valid": rows}


def _progress(total: int, initial: int, disable: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=disable, unit="step", dynamic_ncols=True, desc="train")


@contextlib.contextmanager
def deterministic_algorithms() -> tp.Iterator[None]:
    """torch's deterministic algorithms inside the block (an op without one raises), cuDNN's
    deterministic convolutions without autotuning; the previous settings restored after. Our
    kernels are deterministic whatever the setting (no floating-point atomics)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def train(config: TrainConfig, run_dir: tp.Union[str, Path], resume: bool = False,
          quiet: bool = False) -> tp.Dict[str, tp.Any]:
    """Train (or with `resume`, continue) a run in `run_dir`; returns the last step, skipped steps
    and the final validation rows."""
    return Trainer(config, run_dir, resume=resume, quiet=quiet).run()
