"""The arithmetic coder: C++ extension and Python reference against upstream encodec 0.1.1's
`quantization.ac` (CDFs and bytes), round trips, streams back to back, bad and corrupt input."""

import io
import threading
import time
import typing as tp
import warnings

import numpy as np
import pytest
import torch
from encodec.quantization import ac as upstream

from encodec_fast import entropy, ops
from encodec_fast.ops import arith


def pdfs_of(kind: str, T: int, N: int, seed: int) -> torch.Tensor:
    """Distributions [T, N] float32: softmax of scaled noise (flat to peaked), near-one-hot rows,
    and rows with many probabilities below the 1e-8 rounding step."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, generator=g)
    if kind == "flat":
        return torch.softmax(0.1 * logits, -1)
    if kind == "peaked":
        return torch.softmax(8.0 * logits, -1)
    if kind == "near_zero":  # tails far below 1e-8: they floor to 0 and keep only min_range
        return torch.softmax(30.0 * logits, -1)
    if kind == "one_hot":
        p = torch.zeros(T, N)
        p[torch.arange(T), torch.randint(0, N, (T,), generator=g)] = 1.0
        return p
    raise ValueError(kind)


def symbols_of(p: torch.Tensor, seed: int, off_distribution: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if off_distribution:  # improbable symbols: only the min_range floor covers them
        return torch.randint(0, p.shape[1], (p.shape[0],), generator=g)
    return torch.multinomial(p.double() + 1e-30, 1, generator=g).view(-1)


def upstream_bytes(p: torch.Tensor, symbols: torch.Tensor) -> tp.Optional[bytes]:
    """Upstream's bytes, or None where its coder fails (an assertion: a CDF whose total exceeds
    2**24 because float32 probabilities sum past 1, e.g. [0.99999994, 1e-7])."""
    fo = io.BytesIO()
    coder = upstream.ArithmeticCoder(fo)
    try:
        for row, s in zip(p, symbols.tolist()):
            coder.push(s, upstream.build_stable_quantized_cdf(row, coder.total_range_bits, check=False))
    except AssertionError:
        return None
    coder.flush()
    return fo.getvalue()


@pytest.fixture(params=["cpp", "python"])
def coder(request, monkeypatch):
    monkeypatch.setenv("ENCODEC_FAST_CODER", request.param)
    assert arith.coder_backend() == request.param
    return request.param


CASES = [("flat", 1, 1024), ("peaked", 300, 1024), ("near_zero", 200, 1024), ("one_hot", 50, 1024),
         ("peaked", 400, 2), ("flat", 300, 2), ("flat", 257, 3), ("near_zero", 100, 37), ("peaked", 150, 4096)]


@pytest.mark.parametrize("kind,T,N", CASES)
def test_cdfs_equal_upstream(kind, T, N, coder):
    p = pdfs_of(kind, T, N, seed=T + N)
    ref = torch.stack([upstream.build_stable_quantized_cdf(row, 24, check=False) for row in p])
    got = entropy.build_cdfs(p)
    assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert torch.equal(arith.build_cdfs_torch(p), ref)


def test_upstream_writes_an_unreadable_stream_where_we_refuse():
    """The case the fuzzer found: a 3-symbol distribution whose quantized CDF ends above 2**24.
    Upstream's coder writes the stream and its own decoder fails on it; we refuse to write it."""
    p = torch.tensor([[0.9999999, 1e-7, 1e-7]] * 4)
    cdf = entropy.build_cdfs(p)[0]
    assert int(cdf[-1]) > 2 ** 24
    with pytest.raises(ValueError, match="refusing"):
        entropy.encode_symbols(p, [2, 2, 2, 2])
    assert torch.equal(entropy.decode_symbols(p[:3], entropy.encode_symbols(p[:3], [0, 1, 0])),
                       torch.tensor([0, 1, 0]))


def test_cdf_worked_examples():
    uniform = torch.full((1024,), 1 / 1024)
    cdf = entropy.build_cdfs(uniform)
    assert cdf[:3].tolist() == [16383, 32766, 49149] and int(cdf[-1]) == 16776192
    one_hot = torch.zeros(1024)
    one_hot[5] = 1
    cdf = entropy.build_cdfs(one_hot)
    assert (int(cdf[4]), int(cdf[5]), int(cdf[-1])) == (10, 16775180, 16777216)


def test_worked_byte_examples(coder):
    p = torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 6)
    assert entropy.encode_symbols(p, [0, 1, 2, 3, 3, 0]).hex() == "daf7bf7402"
    u = torch.full((5, 1024), 1 / 1024)
    assert entropy.encode_symbols(u, [0, 1023, 512, 7, 100]).hex() == "00fc6f00e4046a0701"


@pytest.mark.parametrize("kind,T,N", CASES)
@pytest.mark.parametrize("off_distribution", [False, True])
def test_bytes_equal_upstream_both_ways(kind, T, N, off_distribution, coder):
    p = pdfs_of(kind, T, N, seed=T * N)
    symbols = symbols_of(p, seed=T, off_distribution=off_distribution)
    ref = upstream_bytes(p, symbols)
    # A symbol whose cdf value passes 2**24 (float32 probabilities summing past 1, seen with 2-3
    # symbols): upstream's coder asserts, or writes a stream that its decoder cannot read back
    # (tools/fuzz_coder.py found one). We refuse with a clear error instead.
    over = bool((entropy.build_cdfs(p).gather(1, symbols[:, None]) > 2 ** 24).any())
    assert over or ref is not None
    if over:
        with pytest.raises(ValueError, match="refusing"):
            entropy.encode_symbols(p, symbols)
        return
    assert entropy.encode_symbols(p, symbols) == ref
    assert entropy.encode_symbols(entropy.build_cdfs(p), symbols) == ref  # from quantized CDFs
    # Ours decodes upstream's bytes, upstream decodes ours (the same bytes), and the decoder
    # stops exactly where the stream ends.
    got, end = entropy.decode_symbols(p, ref + b"\x5a\xa5", return_offset=True)
    assert torch.equal(got, symbols) and end == len(ref)
    dec = upstream.ArithmeticDecoder(io.BytesIO(ref))
    assert [dec.pull(upstream.build_stable_quantized_cdf(row, 24, check=False)) for row in p] == symbols.tolist()


def test_long_stream_equals_upstream():
    p = pdfs_of("peaked", 10_000, 64, seed=5)
    symbols = symbols_of(p, seed=6, off_distribution=False)
    ref = upstream_bytes(p, symbols)
    assert entropy.encode_symbols(p, symbols) == ref
    assert torch.equal(entropy.decode_symbols(p, ref), symbols)


def test_python_reference_and_cpp_agree_on_many_random_streams(monkeypatch):
    rng = np.random.default_rng(0)
    for trial in range(40):
        N = int(rng.integers(2, 1025))
        T = int(rng.integers(1, 200))
        p = torch.softmax(torch.from_numpy(rng.standard_normal((T, N)).astype(np.float32)) * rng.uniform(0.05, 20), -1)
        symbols = symbols_of(p, seed=trial, off_distribution=trial % 3 == 0)
        monkeypatch.setenv("ENCODEC_FAST_CODER", "cpp")
        fast = entropy.encode_symbols(p, symbols)
        monkeypatch.setenv("ENCODEC_FAST_CODER", "python")
        assert entropy.encode_symbols(p, symbols) == fast, trial
        assert torch.equal(entropy.decode_symbols(p, fast), symbols)


def test_streams_back_to_back_and_streaming_pull(coder):
    """Segments are coded one after the other in one buffer (as in .ecdc LM files): each decoder
    starts where the previous stopped. The streaming decoder takes one distribution at a time."""
    parts = [(pdfs_of("peaked", T, 1024, seed=T), None) for T in (7, 1, 120)]
    parts = [(p, symbols_of(p, seed=len(p), off_distribution=False)) for p, _ in parts]
    data = b"".join(entropy.encode_symbols(p, s) for p, s in parts)
    offset = 0
    for p, s in parts:
        dec = entropy.SymbolDecoder(data, offset)
        assert [dec.pull(row) for row in p] == s.tolist()
        offset = dec.offset
    assert offset == len(data)
    assert entropy.SymbolDecoder(data, offset).pull(parts[0][0][0]) is None  # nothing left


def test_streaming_encoder_in_pieces_gives_one_streams_bytes(coder):
    """`SymbolEncoder.push` in pieces (empty ones, single rows, pdfs and int CDF tables mixed)
    writes the bytes of one `encode_symbols` of all rows, which are upstream's."""
    p = torch.cat([pdfs_of("peaked", 300, 1024, seed=11), pdfs_of("near_zero", 100, 1024, seed=12)])
    symbols = symbols_of(p, seed=13, off_distribution=False)
    symbols[::7] = torch.randint(0, 1024, symbols[::7].shape, generator=torch.Generator().manual_seed(14))
    whole = entropy.encode_symbols(p, symbols)
    assert whole == upstream_bytes(p, symbols)
    g = torch.Generator().manual_seed(15)
    for trial in range(3):
        cuts = sorted(torch.randint(0, len(p) + 1, (6,), generator=g).tolist()) + [len(p)]
        enc, start = entropy.SymbolEncoder(), 0
        for i, end in enumerate([0, 1] + cuts):
            end = max(end, start)
            rows = p[start:end] if i % 2 else entropy.build_cdfs(p[start:end])
            enc.push(rows, symbols[start:end])
            start = end
        assert enc.finish() == whole, trial


def test_streaming_encoder_refuses_use_after_failure_or_finish(coder):
    p = torch.tensor([[0.9999999, 1e-7, 1e-7]] * 4)
    enc = entropy.SymbolEncoder()
    enc.push(p[:2], [0, 1])
    with pytest.raises(ValueError, match="refusing"):
        enc.push(p[2:], [2, 2])
    with pytest.raises(RuntimeError, match="failed"):
        enc.push(p[:1], [0])
    with pytest.raises(RuntimeError, match="failed"):
        enc.finish()
    enc = entropy.SymbolEncoder()
    with pytest.raises(ValueError, match="symbols"):
        enc.push(p[:2], [0])  # a count mismatch is caught before anything is pushed
    enc.push(p[:2], [0, 1])
    assert enc.finish() == entropy.encode_symbols(p[:2], [0, 1])
    with pytest.raises(RuntimeError, match="finished"):
        enc.finish()
    with pytest.raises(RuntimeError, match="finished"):
        enc.push(p[:1], [0])


def test_empty_streams(coder):
    p = torch.empty(0, 16)
    assert entropy.encode_symbols(p, torch.empty(0, dtype=torch.long)) == upstream_bytes(p, torch.empty(0)) == b""
    assert entropy.decode_symbols(p, b"").numel() == 0
    assert entropy.SymbolDecoder(b"").pull(torch.full((16,), 1 / 16)) is None


def test_truncated_streams_raise_eof(coder):
    p = pdfs_of("flat", 200, 1024, seed=1)
    symbols = symbols_of(p, seed=2, off_distribution=False)
    data = entropy.encode_symbols(p, symbols)
    for cut in (0, 1, len(data) // 2, len(data) - 1):
        with pytest.raises(EOFError, match="ended after"):
            entropy.decode_symbols(p, data[:cut])


def test_mismatched_distributions_are_detected_or_decode_without_crashing(coder):
    """Wrong pdfs (what a non-portable LM gives) or corrupt bytes: CorruptStreamError where the data
    falls between two symbols' intervals, EOFError where it runs out, else wrong symbols; never a
    hang or another exception. The coder alone catches few of these (here about 1 in 60); the
    file-level CRC is what catches the rest."""
    p = pdfs_of("peaked", 300, 1024, seed=3)
    symbols = symbols_of(p, seed=4, off_distribution=False)
    data = entropy.encode_symbols(p, symbols)
    cases = [(pdfs_of("peaked", 300, 1024, seed=100 + i), data) for i in range(150)]
    cases += [(p, bytes(b ^ 0xFF for b in data)), (p, data[:20] + data[21:])]
    outcomes = {"decoded": 0, "corrupt": 0, "eof": 0}
    for table, blob in cases:
        try:
            got = entropy.decode_symbols(table, blob)
            assert not torch.equal(got, symbols)
            outcomes["decoded"] += 1
        except entropy.CorruptStreamError:
            outcomes["corrupt"] += 1
        except EOFError:
            outcomes["eof"] += 1
    assert all(outcomes.values()), outcomes


def test_fuzz_decoder_on_random_bytes_for_a_bounded_time(coder):
    """Random data and random (valid) distributions for ~2 s: only the documented outcomes."""
    rng = np.random.default_rng(1234)
    deadline = time.monotonic() + 2.0
    runs = 0
    while time.monotonic() < deadline:
        N = int(rng.choice([2, 3, 16, 1024]))
        T = int(rng.integers(1, 60))
        p = torch.softmax(torch.from_numpy(rng.standard_normal((T, N)).astype(np.float32)) * 10, -1)
        blob = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
        try:
            got = entropy.decode_symbols(p, blob)
            assert got.shape == (T,) and int(got.min()) >= 0 and int(got.max()) < N
        except (entropy.CorruptStreamError, EOFError):
            pass
        runs += 1
    assert runs > 10


def test_bad_inputs_raise_clear_errors(coder):
    p = pdfs_of("flat", 4, 8, seed=0)
    bad = p.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        entropy.encode_symbols(bad, [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        entropy.build_cdfs(-p)
    with pytest.raises(ValueError, match="symbols must lie"):
        entropy.encode_symbols(p, [0, 1, 2, 8])
    with pytest.raises(ValueError, match="4 symbols for 3"):
        entropy.encode_symbols(p[:3], [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[T, N\]"):
        entropy.encode_symbols(p[0], [0])
    with pytest.raises(ValueError, match="min_range"):
        entropy.encode_symbols(torch.full((1, 2 ** 24), 2.0 ** -24), [0])
    with pytest.raises(ValueError, match="offset"):
        entropy.SymbolDecoder(b"abc", offset=4)
    with pytest.raises(TypeError):
        entropy.encode_symbols(torch.ones(2, 2, dtype=torch.bool), [0, 0])


def test_tiny_roundoff_uses_the_reference_and_matches_upstream(monkeypatch):
    """The C++ CDF needs roundoff 0 or >= 1e-9; other values run the reference transparently."""
    p = pdfs_of("near_zero", 20, 64, seed=8)
    s = symbols_of(p, seed=9, off_distribution=True)
    for roundoff in (0.0, 1e-12):
        ref = torch.stack([upstream.build_stable_quantized_cdf(row, 24, roundoff=roundoff, check=False) for row in p])
        assert torch.equal(entropy.build_cdfs(p, roundoff=roundoff), ref)
        data = entropy.encode_symbols(p, s, roundoff=roundoff)
        assert torch.equal(entropy.decode_symbols(p, data, roundoff=roundoff), s)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    p = pdfs_of("peaked", 50, 256, seed=11)
    s = symbols_of(p, seed=12, off_distribution=False)
    expected = upstream_bytes(p, s)
    monkeypatch.setattr(arith, "_extension", lambda: ImportError("no _arith here"))
    monkeypatch.setattr(arith, "_warned", False)
    with pytest.warns(RuntimeWarning, match="not built"):
        assert entropy.encode_symbols(p, s) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(entropy.decode_symbols(p, expected), s)  # warned once only
    monkeypatch.setenv("ENCODEC_FAST_CODER", "cpp")
    with pytest.raises(ImportError, match="not built"):
        entropy.encode_symbols(p, s)


def test_torch_backend_selects_the_reference(monkeypatch):
    monkeypatch.delenv("ENCODEC_FAST_CODER", raising=False)
    with ops.use_backend("torch"):
        assert arith.coder_backend() == "python"
    assert arith.coder_backend() == ("cpp" if arith.cpp_available() else "python")


def test_the_extension_is_built_here():
    """CI installs with a compiler: the C++ coder must be there (the fallback is for users)."""
    assert arith.cpp_available(), arith._extension()


def test_concurrent_encoding_from_threads():
    """The C++ coder releases the GIL; concurrent calls give each its own correct bytes."""
    jobs = [(pdfs_of("peaked", 400, 1024, seed=i), None) for i in range(4)]
    jobs = [(p, symbols_of(p, seed=i, off_distribution=False)) for i, (p, _) in enumerate(jobs)]
    expected = [entropy.encode_symbols(p, s) for p, s in jobs]
    results = [None] * len(jobs)

    def work(i):
        results[i] = entropy.encode_symbols(*jobs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
