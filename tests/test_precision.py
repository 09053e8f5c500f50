"""Named precision modes (encodec_fast.precision) and the measured convolution dispatch
(encodec_fast.ops.dispatch): torch's switches set and restored, the modes reaching our ops, the
model's encode / decode in each mode, and `auto` taking our kernel only where it was measured faster."""

import pytest
import torch

import encodec_fast
from encodec_fast import ops, precision
from encodec_fast.ops import conv, dispatch
from encodec_fast.testing import voice_batch

needs_fp32_precision = pytest.mark.skipif(not precision._has_fp32_precision(),
                                          reason="torch < 2.9 has no per-leaf fp32_precision switches")


@needs_fp32_precision
@pytest.mark.parametrize("mode,value", [("exact", "ieee"), ("tf32", "tf32"), ("bf16", "ieee"), ("fp16", "ieee")])
def test_torch_switches_follow_the_mode_and_are_restored(mode, value):
    leaves = [torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul]
    before = [leaf.fp32_precision for leaf in leaves]
    with precision.torch_precision(mode):
        assert [leaf.fp32_precision for leaf in leaves] == [value] * 3
        with precision.torch_precision("tf32" if mode != "tf32" else "exact"):
            assert leaves[0].fp32_precision != value
        assert [leaf.fp32_precision for leaf in leaves] == [value] * 3
    assert [leaf.fp32_precision for leaf in leaves] == before
    with pytest.raises(RuntimeError), precision.torch_precision(mode):
        raise RuntimeError("restored on errors too")
    assert [leaf.fp32_precision for leaf in leaves] == before
    assert precision.torch_settings(mode)["cudnn.conv.fp32_precision"] == value


def test_scope_sets_the_mode_for_our_ops_and_autocast_for_bf16(monkeypatch):
    monkeypatch.delenv("ENCODEC_FAST_CONV_PRECISION", raising=False)
    assert precision.current() is None and conv.conv_precision() == "ieee"
    with precision.scope("tf32", "cpu"):
        assert precision.current() == "tf32" and conv.conv_precision() == "tf32"
        with precision.scope("exact", "cpu"):
            assert conv.conv_precision() == "ieee"
        monkeypatch.setenv("ENCODEC_FAST_CONV_PRECISION", "tf32x3")  # an explicit setting wins
        assert conv.conv_precision() == "tf32x3"
    assert precision.current() is None
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with precision.scope(mode, "cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == dtype
            y = torch.nn.functional.linear(torch.randn(2, 8), torch.randn(4, 8))
            assert y.dtype == dtype and precision.current() == mode
        assert not torch.is_autocast_enabled("cpu")
        assert precision.torch_settings(mode)["autocast"] == str(dtype).replace("torch.", "")
    with pytest.raises(ValueError, match="unknown precision mode"):
        with precision.scope("fp8", "cpu"):
            pass


def test_fp16_overflow_is_redone_in_exact():
    """Audio far outside [-1, 1] overflows fp16's range (65504) in the encoder: the call is redone in
    exact, with a warning, and its codes are exact's, bit for bit, one call or a batch of clips; bf16
    (fp32's range) needs no redo. A decoder whose values overflow fp16 is redone in exact too
    (`decode` and `decode_batch`). A stream cannot redo a call: it raises a clear error instead of codes from inf."""
    import warnings

    from encodec_fast.streaming import StreamingEncoder, encode_pieces
    model = encodec_fast.EncodecModel.encodec_model_24khz_small()
    model.set_target_bandwidth(6.0)
    loud = 1e5 * voice_batch(24000, 1.0, 1, batch=2)
    exact = model.encode(loud)[0][0]
    exact_batch = model.encode_batch([loud[0], loud[1, :, :20_000]])
    with precision.scope("fp16", "cpu"):
        assert not torch.isfinite(model.encoder(loud)).all()  # the case is real: fp16 overflows
    model.set_precision("fp16")
    with pytest.warns(RuntimeWarning, match="fp16 overflowed in the encoder"):
        got = model.encode(loud)[0][0]
    assert torch.equal(got, exact)
    with pytest.warns(RuntimeWarning, match="fp16 overflowed in the encoder"):
        batch = model.encode_batch([loud[0], loud[1, :, :20_000]])
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(batch, exact_batch))
    # queued (`encode_batch_async`): the check is read by result(), and only the call that
    # overflowed is redone (on CPU each clip is a call of its own)
    quiet_clip = loud[1, :, :20_000] / 1e5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pending = model.encode_batch_async([loud[0], quiet_clip])
    with pytest.warns(RuntimeWarning, match="fp16 overflowed in the encoder") as record:
        got = pending.result()
    assert sum("fp16 overflowed" in str(w.message) for w in record) == 1
    assert torch.equal(got[0][0][0], exact_batch[0][0][0])
    assert torch.equal(got[1][0][0], model.encode(quiet_clip[None])[0][0])  # fp16's own codes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_precision("bf16").encode(loud)
        quiet = model.set_precision("fp16").encode(loud / 1e5)  # in range: no redo
    assert not torch.equal(quiet[0][0], model.set_precision("exact").encode(loud / 1e5)[0][0])

    model.set_precision("fp16")
    with pytest.raises(FloatingPointError, match="fp16 overflowed in the streaming encoder"):
        encode_pieces(model, iter([loud[:, :, :24_000]]), 24_000, chunk_seconds=0.4)
    with pytest.raises(FloatingPointError, match="fp16 overflowed in the streaming encoder"):
        StreamingEncoder(model, exact=False).push(loud[0])

    codes = model.set_precision("exact").encode(voice_batch(24000, 1.0, 1, batch=1))
    with torch.no_grad():  # the decoder's first convolution made loud: its values overflow fp16
        model.decoder.model[0].conv.conv.weight_g.mul_(1e5)
    ref = model.decode(codes)
    ref_batch = model.decode_batch([codes, [(codes[0][0][:, :, :30], None)]])
    model.set_precision("fp16")
    with precision.scope("fp16", "cpu"), torch.no_grad():
        assert not torch.isfinite(model.decoder(model.quantizer.decode(codes[0][0].transpose(0, 1)))).all()
    with pytest.warns(RuntimeWarning, match="fp16 overflowed in the decoder"):
        audio = model.decode(codes)
    assert audio.dtype == torch.float32 and torch.equal(audio, ref)  # the whole call redone in exact
    with pytest.warns(RuntimeWarning, match="fp16 overflowed in the decoder"):
        batch = model.decode_batch([codes, [(codes[0][0][:, :, :30], None)]])
    assert all(torch.equal(a, b) for a, b in zip(batch, ref_batch))


def test_model_modes_on_cpu():
    """exact is the default; tf32 is exact on CPUs; bf16 runs the encoder and decoder in bf16 with
    the search in fp32: most codes agree with exact on real-ish audio, the audio comes back fp32."""
    model = encodec_fast.EncodecModel.encodec_model_24khz_small()
    model.set_target_bandwidth(6.0)
    x = voice_batch(24000, 1.0, 1, batch=2)
    assert model.precision == "exact"
    exact = model.encode(x)
    tf32 = model.set_precision("tf32").encode(x)
    assert torch.equal(exact[0][0], tf32[0][0])
    bf16 = model.set_precision("bf16").encode(x)
    agree = (bf16[0][0] == exact[0][0]).double().mean().item()
    assert 0.5 < agree < 1.0, agree  # bf16 arithmetic changes some codes, not most
    first = (bf16[0][0][:, 0] == exact[0][0][:, 0]).double().mean().item()
    assert first > 0.9, first  # the first stage barely moves
    audio = model.decode(bf16)
    assert audio.dtype == torch.float32 and torch.isfinite(audio).all()
    assert not torch.is_autocast_enabled("cpu")
    # fp16: the same tensor-core rate on GPUs, 3 more mantissa bits: more of exact's codes than bf16
    fp16 = model.set_precision("fp16").encode(x)
    agree16 = (fp16[0][0] == exact[0][0]).double().mean().item()
    assert agree < agree16 < 1.0, (agree, agree16)
    audio16 = model.decode(fp16)
    assert audio16.dtype == torch.float32 and torch.isfinite(audio16).all()
    with pytest.raises(ValueError, match="unknown precision mode"):
        model.set_precision("half")


def test_dispatch_takes_our_kernel_only_where_measured_faster(monkeypatch):
    monkeypatch.delenv("ENCODEC_FAST_CONV_PRECISION", raising=False)
    # enc res k1 + skip: ours faster in exact fp32 (2.84 vs 5.83 ms) and bf16; enc down s4 slower in both
    assert conv.auto_choice("conv1d", (32, 16, 1), 1, torch.float32) == "triton"
    assert conv.auto_choice("conv1d", (32, 16, 1), 1, torch.bfloat16) == "triton"
    assert conv.auto_choice("conv1d", (128, 64, 8), 4, torch.float32) == "cudnn"
    assert conv.auto_choice("conv1d", (128, 64, 8), 4, torch.bfloat16) == "cudnn"
    # dec up s4 (transposed: weight [C_in, C_out, K]) faster in both; dec up s2 in exact only
    assert conv.auto_choice("conv_transpose1d", (128, 64, 8), 4, torch.float32) == "triton"
    assert conv.auto_choice("conv_transpose1d", (64, 32, 4), 2, torch.float32) == "triton"
    assert conv.auto_choice("conv_transpose1d", (64, 32, 4), 2, torch.bfloat16) == "cudnn"
    # unmeasured: another mode, dtype, layer or stride
    assert conv.auto_choice("conv1d", (32, 16, 1), 1, torch.float16) == "cudnn"
    with precision.scope("tf32", "cpu"):
        assert conv.auto_choice("conv1d", (32, 16, 1), 1, torch.float32) == "cudnn"
    assert conv.auto_choice("conv1d", (64, 32, 1), 1, torch.float32) == "cudnn"
    assert conv.auto_choice("conv1d", (32, 16, 1), 2, torch.float32) == "cudnn"
    monkeypatch.setenv("ENCODEC_FAST_CONV_KERNEL", "gemm")  # the table measured the direct family only
    assert conv.auto_choice("conv1d", (32, 16, 1), 1, torch.float32) == "cudnn"
    rows = dispatch.table()
    assert len(rows) == 2 * len(dispatch.CONV_MS)
    assert {r["runs"] for r in rows} == {"ours", "cuDNN"}
    assert all((r["runs"] == "ours") == (r["ours_ms"] < r["cudnn_ms"]) for r in rows)


def test_forced_backends_bypass_the_measured_dispatch():
    """`auto` consults the table on CUDA only: on CPU, and with a forced backend, nothing changes."""
    x = torch.randn(1, 16, 40)
    w = torch.randn(32, 16, 1)
    assert ops.conv_backend(x, w, "conv1d", 1) == "torch"
    with ops.use_backend("triton"):
        assert ops.conv_backend(x, w, "conv1d", 1) == "triton"
        assert ops.conv_backend(x, torch.randn(64, 32, 8), "conv1d", 4) == "triton"


def test_codec_benchmark_gpu_variants_run_and_say_their_settings(tmp_path):
    """The codec benchmark's CUDA implementations, built and run on CPU (the torch.compile ones are
    only built: compiling costs minutes here): each precision mode of ours and of the torch path,
    settings recorded, agreement with the CPU fp32 codes."""
    from bench import core, peers
    from bench.benchmarks import codec
    state, _ = peers.load_state("small", None)
    ours = peers.build("ours", "small", state)
    variants = peers.gpu_variants(ours)
    assert set(variants) == ({f"{impl} {mode}" for impl in ("ours", "torch", "torch.compile") for mode in peers.MODES}
                             | {f"ours gemm {mode}" for mode in peers.GEMM_MODES})
    live = {name: variants[name] for name in ("ours exact", "ours bf16", "torch tf32", "torch bf16", "ours gemm bf16",
                                              "ours fp16")}
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, benchmark="codec")
    x = voice_batch(24000, 0.5, 1, batch=3)
    params = codec._params("small", "encode", 3, 0.5, 6.0, "cpu")
    timed = ctx.timed(params, {name: (lambda c=c: c.encode(x, 6.0)) for name, c in live.items()}, reps=1)
    codec._settings(timed, live)
    assert timed["ours bf16"]["settings"]["mode"] == "bf16" and timed["torch tf32"]["settings"]["backend"] == "torch"
    assert timed["torch tf32"]["settings"]["cudnn.conv.fp32_precision"] == "tf32"
    assert timed["ours gemm bf16"]["settings"]["conv_kernel"] == "gemm"
    assert timed["ours gemm bf16"]["settings"]["backend"] == "triton"
    assert timed["ours bf16"]["settings"]["conv_kernel"] == "direct"
    assert timed["ours fp16"]["settings"]["autocast"] == "float16"
    encoded = {name: c.encode(x, 6.0) for name, c in live.items()}
    codec._agreement_with_cpu(ctx, live, encoded, ours, x, 6.0, params)
    agree = {r["implementation"]: r["median"] for r in ctx.records if r["metric"] == "codes_equal_cpu_fp32"}
    assert agree["ours exact"] == 100.0 and agree["torch tf32"] == 100.0  # CPU: tf32 is exact
    assert 50.0 < agree["ours bf16"] < 100.0 and 50.0 < agree["torch bf16"] < 100.0
    assert 50.0 < agree["ours gemm bf16"] <= 100.0 and 50.0 < agree["ours fp16"] <= 100.0
    assert variants["ours exact"].decode(encoded["ours exact"]).dtype == torch.float32


def test_codec_benchmark_measures_each_mode_on_real_audio(tmp_path):
    """The codec benchmark's agreement part: the shipped model on held-out speech and music in each
    mode against the CPU fp32 codes (exact agrees fully; bf16 is recorded, whatever it gives)."""
    from bench import core
    from bench.benchmarks import codec
    ctx = core.Context(suite="smoke", device="cpu", workdir=tmp_path, benchmark="codec")
    codec._mode_agreement(ctx)
    got = {(r["params"]["audio"], r["params"]["kbps"], r["implementation"]): r for r in ctx.records}
    assert {impl for *_, impl in got} == {"ours exact", "ours bf16", "ours fp16"}  # no tf32 on CPUs
    for (audio, kbps, impl), r in got.items():
        if r.get("na"):
            assert "speech" in audio and "espeak" in r["na"]
            continue
        assert r["settings"]["mode"] == impl.split()[1]
        if impl == "ours exact":
            assert r["median"] == 100.0
        else:
            assert 0.0 < r["median"] < 100.0
    for (audio, kbps, impl), r in got.items():  # fp16 keeps more of exact's codes than bf16
        if impl == "ours fp16" and not r.get("na"):
            assert r["median"] > got[(audio, kbps, "ours bf16")]["median"], (audio, kbps)
    assert any(not r.get("na") for (audio, *_), r in got.items() if "music" in audio)


def test_precision_study_emulates_autocast():
    """tools/precision_study: its emulation of autocast's arithmetic (operands rounded, products in
    fp64, activations rounded where written) moves the codes as much as torch's CPU autocast does, in
    bf16 and fp16; without rounding the codes are fp32's but for near-ties."""
    from tools import precision_study as study
    names = ["fp64 products (no rounding)", "bf16 everywhere (autocast's arithmetic)",
             "fp16 everywhere (autocast's arithmetic)"]
    result = study.study(1, 1.0, variants=names, progress=False)
    by = {(r["variant"], r["kind"], r["kbps"]): r for r in result["rows"]}
    assert "music" in result["clips"]
    for kind in result["clips"]:
        assert by[(names[0], kind, 6.0)]["codes_equal"] >= 99.0
        assert by[(names[0], kind, 6.0)]["latent_rel_err"] < 1e-5
        for emulated, real in ((names[1], "torch CPU autocast bfloat16"), (names[2], "torch CPU autocast float16")):
            a, b = by[(emulated, kind, 6.0)], by[(real, kind, 6.0)]
            assert abs(a["codes_equal"] - b["codes_equal"]) <= 6.0, (kind, a, b)
            assert 0.5 < a["latent_rel_err"] / b["latent_rel_err"] < 2.0, (kind, a, b)
        assert by[(names[2], kind, 6.0)]["codes_equal"] > by[(names[1], kind, 6.0)]["codes_equal"]
    assert "| fp16 everywhere (autocast's arithmetic) |" in study.markdown(result)


def test_the_command_offers_every_precision_mode():
    """`tokenize --precision` lists the modes by hand (the command imports no torch to parse its
    arguments): the same set as `precision.MODES`."""
    from encodec_fast.cli import tokenize_parser
    action = next(a for a in tokenize_parser()._actions if a.dest == "precision")
    assert tuple(action.choices) == precision.MODES
