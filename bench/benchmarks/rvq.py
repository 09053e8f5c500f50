"""`rvq`: the codebook search (RVQ encode) and how often the certified search rescores.

1. Rescoring, on every device, for each low precision the certified search can use (tf32, bf16x3,
   tf32x3; on CUDA also bf16x3-triton, the same arithmetic through Triton's lowering): the fraction
   of rows whose certificate fails, per stage (mean over stages and the worst stage), and the
   fraction of (64-row tile, 16-codeword block) pairs searched again in fp32 (what rescoring costs).
   Latents: the shipped small model's encoder on held-out speech and music (its own codebooks), the
   24 kHz model with random weights and data-like codebooks on speech-like audio,
   and random codebooks with latents near sums of codewords (the `kernels` benchmark's). On CPU the
   tensor cores are emulated (`encodec_fast.ops.rvq.certified_nearest_torch`: operands rounded as
   they round them); on CUDA the kernel's own counters give the fractions, on this GPU's tensor
   cores (after the timings).
2. Time, on CUDA, 64 x 10 s of 24 kHz frames (48,000 rows, D=128, K=1024), 6 and 24 kbps:
   `ours exact` (the certified search, the default, every stage in one launch), `ours exact, one
   launch per stage`, `ours exact/<lowp>` for the other low precisions,
   `ours ieee` (fp32 on CUDA cores), `ours tf32` (approximate), `torch exact` (cuBLAS, TF32 off),
   `torch tf32` (TF32 on), `torch.compile exact` (the torch path under torch.compile, max-autotune in
   the full suite, default mode otherwise: compile time counts against the budget). Each record
   carries its codes' agreement with `ours ieee` and the roofline's predicted time on H100 and H200
   (2 N K D FLOP per stage at the precision's dense peak; bytes are negligible). On CPU, only `torch
   exact` runs (our kernels need CUDA; the CPU path is the torch path).
3. FAISS, where installed (`pip install faiss-cpu`; `faiss-gpu-cu12` on a GPU): `faiss exact`, the
   same residual search with one exact flat L2 index per stage (IndexFlatL2, fp32 BLAS), timed beside
   ours with its share of frames equal to the exact search's. n/a with the reason elsewhere (cuVS:
   no wheel this suite can carry to a registry-less GPU machine).
"""

import typing as tp

import torch

from bench.core import Context, benchmark
from bench.peaks import DOT_PASSES, roofline
from encodec_fast import ops, precision
from encodec_fast.ops import rvq


def predicted_ms(rows: int, K: int, D: int, stages: int, dot: str) -> tp.Dict[str, float]:
    """The compute roofline of a search: 2 N K D FLOP per stage at the dense peak, once per pass of
    its dot precision (bench.peaks.DOT_PASSES)."""
    passes, peak = DOT_PASSES[dot]
    return roofline(2.0 * rows * K * D * stages, 0.0, peak, passes)


def _latent_sets(ctx: Context, rows: int) -> tp.Iterator[tp.Tuple[str, torch.Tensor, torch.Tensor]]:
    """(data name, latents [N, D], codebooks [Q, K, D]) for the rescoring measurements."""
    from bench import peers
    from bench.benchmarks.kernels import make_books, make_latents
    from bench.benchmarks.quality import heldout_clips
    from encodec_fast.testing import voice

    def encode(net, clips):
        with torch.no_grad():
            out = [net.encoder(c.reshape(1, 1, -1))[0].t() for c in clips]
        return torch.cat(out)[:rows]

    def books_of(net):
        return torch.stack([layer._codebook.embed.detach() for layer in net.quantizer.vq.layers])

    state, source = peers.load_state("small", None)
    small = peers.ours_model("small", state)
    clips, missing = heldout_clips(["speech", "music"], ctx.pick(1, 3, 6), 8.0)
    for kind in ("speech", "music"):
        if kind in clips:
            yield f"small model ({source}), held-out {kind}", encode(small, clips[kind]), books_of(small)
        else:
            ctx.skipped.append(f"rvq: small model on {kind}: {missing[kind]}")
    net24 = peers.ours_model("24khz", peers.random_state("24khz"))
    speech = [voice(24000, 4.0, seed=s) for s in range(ctx.pick(1, 2, 4))]
    yield "24khz random weights (data-like codebooks), voice", encode(net24, speech), books_of(net24)
    books = make_books(32, 1024, 128, seed=32, device="cpu")
    x = make_latents(books, 1, rows, seed=32)[0].t()
    yield "random codebooks, latents near sums of codewords", x, books


def _tile_blocks(candidates: torch.Tensor, tile: int = 64, block: int = 16) -> float:
    """Fraction of (tile of rows, block of codewords) pairs holding a candidate."""
    N, K = candidates.shape
    pad = (-N) % tile
    c = torch.nn.functional.pad(candidates, (0, (-K) % block, 0, pad))
    return float(c.view(-1, tile, c.shape[1] // block, block).any(3).any(1).float().mean())


def _rescoring_emulated(ctx: Context, rows: int) -> None:
    for data, x, books in _latent_sets(ctx, rows):
        ctx.check_time(f"rescoring, {data}")
        Q, K, D = books.shape
        embeds, norms = list(books), [b.pow(2).sum(1)[None] for b in books]
        ref = rvq.rvq_encode_torch(x.clone(), embeds, norms)
        for lowp in rvq.DISTINCT_LOW_PRECISION:  # bf16x3-triton: bf16x3's arithmetic, emulated once
            codes, stages = rvq.rvq_encode_certified_torch(x.clone(), embeds, norms, lowp)
            per_stage = [float(s.rescored.float().mean()) for s in stages]
            blocks = [_tile_blocks(s.candidates) for s in stages]
            params = {"data": data, "stages": Q, "frames": x.shape[0], "codes": K, "dim": D, "lowp": lowp,
                      "device": "cpu (tensor cores emulated)"}
            note = "codes equal to the fp32 reference's" if torch.equal(codes, ref) else "CODES DIFFER"
            ctx.record(params, f"ours exact/{lowp}", "rescored_rows", "fraction", [sum(per_stage) / Q],
                       higher_is_better=False, worst_stage=max(per_stage), per_stage=per_stage, note=note)
            ctx.record(params, f"ours exact/{lowp}", "exact_blocks", "fraction", [sum(blocks) / Q],
                       higher_is_better=False, worst_stage=max(blocks))


def _rescoring_on_gpu(ctx: Context, rows: int) -> None:
    """Part 1 on CUDA: the same latents through the certified kernel on this GPU's tensor cores, its
    own counters (rows rescored, blocks searched again), codes against the fp32 (`ieee`) kernel's."""
    from encodec_fast.kernels import rvq as krvq
    name = torch.cuda.get_device_name()
    for data, x, books in _latent_sets(ctx, rows):
        ctx.check_time(f"rescoring on the GPU, {data}")
        Q, K, D = books.shape
        N = x.shape[0]
        xg, books = x.t()[None].contiguous().cuda(), books.contiguous().cuda()
        norms = books.pow(2).sum(-1).contiguous()
        ieee = krvq.rvq_encode(xg, books, norms, Q, "ieee")
        tiles = -(-N // 64) * -(-K // 16)
        for lowp in rvq.LOW_PRECISION:
            codes, counts = krvq.rvq_encode(xg, books, norms, Q, "exact", lowp, stats=True)
            per_stage = (counts[:, 0].double() / N).tolist()
            params = {"data": data, "stages": Q, "frames": N, "codes": K, "dim": D, "lowp": lowp, "device": name}
            note = "codes equal to the fp32 kernel's" if torch.equal(codes, ieee) else "CODES DIFFER"
            ctx.record(params, f"ours exact/{lowp}", "rescored_rows", "fraction", [sum(per_stage) / Q],
                       higher_is_better=False, worst_stage=max(per_stage), per_stage=per_stage,
                       note=note + "; counted by the kernel on this GPU's tensor cores")
            ctx.record(params, f"ours exact/{lowp}", "exact_blocks", "fraction",
                       [float(counts[:, 1].sum()) / (tiles * Q)], higher_is_better=False,
                       worst_stage=float(counts[:, 1].max()) / tiles)


def time_kernels(ctx: Context, device: str = "cuda") -> None:
    """Part 2 (on a GPU; `device` "cpu" runs it in Triton's interpreter at the smoke suite's sizes:
    a plumbing check for the tests)."""
    from encodec_fast.kernels import rvq as krvq

    from bench.benchmarks.kernels import make_books, make_latents
    B, T = ctx.pick((2, 40), (64, 750), (64, 750))
    D, K = 128, 1024
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for kbps, Q in ((6.0, 8), (24.0, 32)):
        ctx.check_time(f"{kbps:g} kbps")
        books = make_books(Q, K, D, seed=Q, device=device)
        x = make_latents(books, B, T, seed=Q)
        norms = books.pow(2).sum(-1).contiguous()
        embeds, norm_list = list(books), [n[None] for n in norms]
        N = B * T
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
        params = {"kbps": kbps, "stages": Q, "frames": N, "batch": B, "device": name}
        exact = krvq.rvq_encode(x, books, norms, Q, "ieee")

        def torch_path(tf32: bool):
            def run():
                with ops.use_backend("torch"), precision.torch_precision("tf32" if tf32 else "exact"):
                    return rvq.rvq_encode(x, embeds, norm_list)
            return run

        mode = ctx.pick(None, "default", "max-autotune")
        compiled = None if mode is None else torch.compile(lambda r: rvq.rvq_encode_torch(r, embeds, norm_list),
                                                           mode=mode)

        def compiled_path():
            if compiled is None:
                raise RuntimeError("not in the smoke suite (compiling takes minutes)")
            with precision.torch_precision("exact"):
                return compiled(x.transpose(1, 2).reshape(-1, D).clone())

        def per_stage():
            """One launch per stage, the residual updated by torch between them (same codes)."""
            residual = x.transpose(1, 2).reshape(-1, D).clone()
            out = []
            for q in range(Q):
                out.append(krvq.rvq_encode(residual.t()[None], books[q:q + 1], norms[q:q + 1], 1, "exact",
                                           rvq.certify_with())[0])
                residual.sub_(torch.nn.functional.embedding(out[-1], books[q]))
            return torch.stack(out)

        impls: tp.Dict[str, tp.Callable[[], tp.Any]] = {
            "ours exact": lambda: krvq.rvq_encode(x, books, norms, Q, "exact", rvq.certify_with()),
            "ours exact, one launch per stage": per_stage,
            "ours ieee": lambda: krvq.rvq_encode(x, books, norms, Q, "ieee"),
            "ours tf32": lambda: krvq.rvq_encode(x, books, norms, Q, "tf32"),
            "torch exact": torch_path(False), "torch tf32": torch_path(True),
            "torch.compile exact": compiled_path}
        for lowp in rvq.LOW_PRECISION:
            if lowp != rvq.certify_with():
                impls[f"ours exact/{lowp}"] = lambda lowp=lowp: krvq.rvq_encode(x, books, norms, Q, "exact", lowp)
        dots = {"ours exact": rvq.certify_with(), "ours exact, one launch per stage": rvq.certify_with(),
                "ours ieee": "ieee", "ours tf32": "tf32", "torch exact": "ieee",
                "torch tf32": "tf32", "torch.compile exact": "ieee"}
        records = ctx.timed(params, impls, unit="ms", scale=1e3, sync=sync, reps=ctx.pick(1, 10, 20))
        for name, rec in records.items():
            if rec.get("na"):
                continue
            codes = impls[name]()
            codes = codes.view(Q, -1) if codes.dim() != 2 else codes
            rec["frames_equal_to_ieee"] = float((codes.view(Q, -1) == exact.view(Q, -1)).all(0).float().mean())
            rec.update(predicted_ms(N, K, D, Q, dots.get(name, name.split("/")[-1])))
            if mode is not None and name.startswith("torch.compile"):
                rec["compile_mode"] = mode
            rec["headline"] = name in ("ours exact", "torch exact")
        if device == "cuda":
            _faiss(ctx, params, books, x, exact, gpu=True)
        for lowp in rvq.LOW_PRECISION:
            _, counts = krvq.rvq_encode(x, books, norms, Q, "exact", lowp, stats=True)
            tiles = -(-N // 64) * -(-K // 16)
            ctx.record({**params, "lowp": lowp, "data": "random codebooks, latents near sums of codewords"},
                       f"ours exact/{lowp}", "rescored_rows", "fraction", [float(counts[:, 0].sum()) / (N * Q)],
                       higher_is_better=False, exact_blocks=float(counts[:, 1].sum()) / (tiles * Q),
                       note="counted by the kernel" + (" on this GPU's tensor cores" if device == "cuda" else
                                                       " in the interpreter (fp32 products: no rounding)"))


def faiss_search(books: torch.Tensor, gpu: bool) -> tp.Callable[[torch.Tensor], torch.Tensor]:
    """FAISS's exact flat L2 index per stage (IndexFlatL2; on a GPU its GpuIndexFlatL2) -> a function
    of latents [B, D, T] giving codes [Q, B*T], the residual updated between stages as in RVQ.
    Raises ImportError / RuntimeError with the reason where FAISS (or its GPU build) is missing."""
    import faiss
    import numpy as np
    Q, K, D = books.shape
    cpu_books = books.detach().cpu().float().numpy()
    if gpu:
        if not hasattr(faiss, "StandardGpuResources"):
            raise RuntimeError("this faiss has no GPU support (faiss-cpu); faiss-gpu-cu12 is needed")
        resources = faiss.StandardGpuResources()
        indexes = [faiss.GpuIndexFlatL2(resources, D) for _ in range(Q)]
    else:
        indexes = [faiss.IndexFlatL2(D) for _ in range(Q)]
    for index, book in zip(indexes, cpu_books):
        index.add(np.ascontiguousarray(book))

    def search(x: torch.Tensor) -> torch.Tensor:
        residual = x.transpose(1, 2).reshape(-1, D).detach().cpu().float().numpy().copy()
        codes = np.empty((Q, residual.shape[0]), dtype=np.int64)
        for q, index in enumerate(indexes):
            _, found = index.search(residual, 1)
            codes[q] = found[:, 0]
            residual -= cpu_books[q][codes[q]]
        return torch.from_numpy(codes)
    return search


def _faiss(ctx: Context, params: tp.Dict[str, tp.Any], books: torch.Tensor, x: torch.Tensor, exact: torch.Tensor,
           gpu: bool) -> None:
    """`faiss exact` timed (or n/a with the reason), with its share of frames equal to `exact` [Q, N]."""
    try:
        search = faiss_search(books, gpu)
    except (ImportError, RuntimeError) as err:
        ctx.na(params, "faiss exact", "time", "ms", f"FAISS not available here: {err}"[:300])
        return
    Q = books.shape[0]
    records = ctx.timed(params, {"faiss exact": lambda: search(x)}, unit="ms", scale=1e3,
                        note="IndexFlatL2 per stage" + (" (GPU)" if gpu else "") + "; host copies of the residual "
                        "included (FAISS takes numpy)")
    rec = records.get("faiss exact")
    if rec is not None and not rec.get("na"):
        codes = search(x)
        rec["frames_equal_to_exact"] = float((codes.view(Q, -1) == exact.cpu().view(Q, -1)).all(0).float().mean())


@benchmark("rvq", "RVQ search: certified tensor-core search vs fp32, cuBLAS and torch.compile; rescoring rates",
           priority=15)
def run(ctx: Context) -> None:
    if ctx.device == "cuda":  # timings first (the headline); the emulation is the CPU run's
        time_kernels(ctx)
        _rescoring_on_gpu(ctx, rows=ctx.pick(256, 20000, 20000))
        return
    _rescoring_emulated(ctx, rows=ctx.pick(256, 3000, 20000))
    # CPU: the torch path is what runs here (ours is the same code on CPU)
    from bench.benchmarks.kernels import make_books, make_latents
    B, T = ctx.pick((2, 40), (8, 750), (64, 750))
    for kbps, Q in ((6.0, 8), (24.0, 32)):
        ctx.check_time(f"{kbps:g} kbps")
        books = make_books(Q, 1024, 128, seed=Q, device="cpu")
        x = make_latents(books, B, T, seed=Q)
        embeds, norms = list(books), [b.pow(2).sum(-1)[None] for b in books]
        params = {"kbps": kbps, "stages": Q, "frames": B * T, "batch": B, "device": "cpu"}
        ctx.timed(params, {"torch exact": lambda: rvq.rvq_encode(x, embeds, norms)}, unit="ms", scale=1e3)
        _faiss(ctx, params, books, x, rvq.rvq_encode(x, embeds, norms).view(Q, -1), gpu=False)
        ctx.na(params, "ours exact", "time", "ms",
               "the Triton search needs a CUDA device (on CPU ours is the torch path)")
