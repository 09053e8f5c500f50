"""The quantizer's training path: the CPU scatter statistics against upstream's one-hot product,
and the two opt-in fixes of upstream's training behaviour (its issues #61 and #25), each shown
to have the effect it claims while the default keeps upstream's behaviour."""

import copy
import threading

import pytest
import torch

from encodec_fast.ops import rvq
from encodec_fast.quantization import ResidualVectorQuantizer
from encodec_fast.quantization.core_vq import EuclideanCodebook


@pytest.mark.parametrize("N,K,D", [(1, 16, 4), (600, 1024, 128), (257, 64, 33)])
def test_scatter_statistics_equal_the_one_hot_product(N, K, D):
    g = torch.Generator().manual_seed(N + K)
    x, embed = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    norms = embed.pow(2).sum(-1)
    codes, quant, counts, sums = rvq.vq_assign_torch(x, embed, norms, stats=True)
    s_codes, s_quant, s_counts, s_sums = rvq.vq_assign_torch(x, embed, norms, stats=True, scatter=True)
    assert torch.equal(codes, s_codes) and torch.equal(quant, s_quant) and torch.equal(counts, s_counts)
    torch.testing.assert_close(s_sums, sums, rtol=1e-6, atol=1e-6)


def test_dispatch_takes_scatter_on_cpu_and_onehot_on_request(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, embed = torch.randn(300, 16, generator=g), torch.randn(64, 16, generator=g)
    norms = embed.pow(2).sum(-1)
    monkeypatch.delenv("ENCODEC_FAST_VQ_STATS", raising=False)
    from encodec_fast import ops
    with ops.use_backend("torch"):
        default = rvq.vq_assign(x, embed, norms, stats=True)
        monkeypatch.setenv("ENCODEC_FAST_VQ_STATS", "onehot")
        upstream_bits = rvq.vq_assign(x, embed, norms, stats=True)
        monkeypatch.setenv("ENCODEC_FAST_VQ_STATS", "bogus")
        with pytest.raises(ValueError):
            rvq.vq_assign(x, embed, norms, stats=True)
    assert torch.equal(default[3], rvq.vq_assign_torch(x, embed, norms, True, scatter=True)[3])
    assert torch.equal(upstream_bits[3], rvq.vq_assign_torch(x, embed, norms, True, scatter=False)[3])


def _codebook_with_dead_codes(revive: bool, threshold: int = 2) -> EuclideanCodebook:
    torch.manual_seed(0)
    cb = EuclideanCodebook(dim=8, codebook_size=16, kmeans_init=False, threshold_ema_dead_code=threshold,
                           revive_dead_codes=revive).train()
    with torch.no_grad():
        cb.cluster_size.fill_(100.0)
        cb.cluster_size[:4] = 0.5                       # codes 0-3 are dead
        cb.embed[:4] = 50.0                             # and far from any data
        cb.embed_avg.copy_(cb.embed * cb.cluster_size[:, None])
    return cb


def test_dead_code_revival_is_a_no_op_by_default_and_works_with_the_flag():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    upstream, never, fixed = (_codebook_with_dead_codes(False), _codebook_with_dead_codes(False, threshold=0),
                              _codebook_with_dead_codes(True))
    for cb in (upstream, never, fixed):
        torch.manual_seed(5)
        cb(x)
    # Upstream (issue #61): the expiry's replacement vanishes in the same call.
    assert torch.equal(upstream.embed, never.embed)
    assert (upstream.embed[:4] > 40).all()
    # The fix: each dead codeword is now (within the EMA's smoothing) one of the batch's vectors;
    # from there the EMA trains it like any other: it stays among the data and gets used.
    dists = torch.cdist(fixed.embed[:4], x).min(dim=1).values
    assert (dists < 1e-2).all(), dists
    for _ in range(3):
        _, codes = fixed(x)
    assert (torch.cdist(fixed.embed[:4], x).min(dim=1).values < 1.0).all()
    assert torch.isin(torch.arange(4), codes).any()


def _stage_gradients(commitment_all_stages: bool):
    torch.manual_seed(0)
    q = ResidualVectorQuantizer(dimension=8, n_q=4, bins=16, kmeans_init=False,
                                commitment_all_stages=commitment_all_stages).train()
    x = torch.randn(2, 8, 30, requires_grad=True)
    quantized, _, losses = q.vq(x, n_q=4)
    grads = [torch.autograd.grad(losses[i].sum(), [x], retain_graph=True)[0] for i in range(4)]
    (ste,) = torch.autograd.grad(quantized.sum(), [x])
    return grads, ste


def test_commitment_reaches_the_encoder_from_every_stage_only_with_the_flag():
    with pytest.warns(UserWarning, match="issues/25"):
        upstream, ste = _stage_gradients(False)
    assert upstream[0].abs().sum() > 0 and all(g.abs().sum() == 0 for g in upstream[1:])  # issue #25
    assert torch.equal(ste, torch.ones_like(ste))
    fixed, ste = _stage_gradients(True)
    assert all(g.abs().sum() > 0 for g in fixed)
    assert torch.equal(ste, torch.ones_like(ste))  # still a straight-through estimator


def test_fixes_leave_inference_and_state_dict_unchanged():
    torch.manual_seed(0)
    plain = ResidualVectorQuantizer(dimension=8, n_q=4, bins=16, kmeans_init=False)
    fixed = ResidualVectorQuantizer(dimension=8, n_q=4, bins=16, kmeans_init=False, revive_dead_codes=True,
                                    commitment_all_stages=True)
    fixed.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert plain.state_dict().keys() == fixed.state_dict().keys()
    x = torch.randn(2, 8, 30)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x, 75).codes, fixed.eval()(x, 75).codes)


def test_kmeans_assignment_in_blocks_has_upstream_bits(monkeypatch):
    """k-means assigns rows a block at a time (bounded memory); the result must be the bits of
    upstream's one-shot expression, whatever the block size."""
    from encodec_fast.quantization import core_vq
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(301, 16, generator=gen)
    means = x[torch.randint(0, 301, (64,), generator=gen)] + 0.01 * torch.randn(64, 16, generator=gen)
    expected = (-((x[:, None, :] - means[None, :, :]) ** 2).sum(dim=-1)).max(dim=-1).indices
    for elements in (1, 64 * 16 * 7, 1 << 24):
        monkeypatch.setattr(core_vq, "KMEANS_CHUNK_ELEMENTS", elements)
        assert torch.equal(core_vq._nearest_mean(x, means), expected)



def _trained_quantizer(steps: int, defer: bool, monkeypatch, sync: bool = False):
    """A 6-stage quantizer after `steps` training steps (k-means on the first), and the sizes of the
    all-reduces its steps made (counted in a single process, where they change nothing)."""
    from encodec_fast import distrib
    from encodec_fast.quantization import core_vq
    calls = []
    monkeypatch.setattr(distrib, "all_reduce_sum_", lambda t: calls.append(t.numel()) or t)
    monkeypatch.setattr(core_vq, "DEFER_UPDATES", defer)
    torch.manual_seed(0)
    q = ResidualVectorQuantizer(dimension=16, n_q=6, bins=64, kmeans_init=True, kmeans_iters=3,
                                threshold_ema_dead_code=2).train()
    for layer in q.vq.layers:
        layer._codebook.sync_statistics = sync
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        q(torch.randn(2, 16, 40, generator=g), 75, 6.0)
    monkeypatch.undo()
    return q, calls


def test_deferred_updates_equal_stage_by_stage_updates(monkeypatch):
    """Every stage searches before any stage's EMA update (so one all-reduce can carry them all):
    the same bits as updating stage by stage, expiry draws included."""
    deferred, _ = _trained_quantizer(5, True, monkeypatch)
    staged, _ = _trained_quantizer(5, False, monkeypatch)
    replaced = sum(layer._codebook.replaced for layer in deferred.vq.layers)
    assert replaced > 0, "expiry must have replaced codewords for the draws to be compared"
    assert replaced == sum(layer._codebook.replaced for layer in staged.vq.layers)
    for (name, a), (_, b) in zip(deferred.state_dict().items(), staged.state_dict().items()):
        assert torch.equal(a, b), name


def test_one_all_reduce_per_step_for_every_stage(monkeypatch):
    _, deferred = _trained_quantizer(3, True, monkeypatch, sync=True)
    _, staged = _trained_quantizer(3, False, monkeypatch, sync=True)
    per_stage = 64 + 64 * 16  # counts and sums of one stage
    # step 1 runs k-means, stage by stage (two all-reduces per stage); then one per step
    assert deferred == [64, 64 * 16] * 6 + [6 * per_stage] * 2
    assert staged == [64, 64 * 16] * 6 * 3


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("fix", [False, True])
@pytest.mark.parametrize("n_q,T", [(6, 40), (1, 37), (32, 9)])
def test_fused_training_stages_equal_the_stage_by_stage_path(backend, fix, n_q, T, monkeypatch):
    """Every training stage at once (the Triton backend: one launch each way, CUDA by default; the
    torch backend on CPU: their torch twins in one autograd node) against the same backend stage
    by stage: the same codes, straight-through output and EMA state bit for bit, the commitment
    losses and the encoder's gradient to fp32 rounding (another order of additions), for upstream's
    gradient and with `commitment_all_stages`; and the same bits on a second run. (The CPU torch
    path and the kernels may break fp32 ties differently: k-means on 80 rows leaves late stages
    whose residuals are rounding noise.)"""
    import warnings

    from encodec_fast import ops
    from encodec_fast.ops import rvq as rvq_ops
    warnings.simplefilter("ignore")
    calls = []
    fused = rvq_ops.rvq_train
    monkeypatch.setattr(rvq_ops, "rvq_train", lambda *a: calls.append(1) or fused(*a))
    torch.manual_seed(0)
    bins = 64 if n_q < 32 else 16
    q = ResidualVectorQuantizer(dimension=16, n_q=n_q, bins=bins, kmeans_init=True, kmeans_iters=3,
                                commitment_all_stages=fix).train()
    g = torch.Generator().manual_seed(n_q)
    q(torch.randn(2, 16, T, generator=g), 75, None)  # the k-means step (stage by stage on both)
    ref, got, again = copy.deepcopy(q), copy.deepcopy(q), copy.deepcopy(q)
    for _ in range(3):
        x = torch.randn(2, 16, T, generator=g) * torch.logspace(-1, 1, 16)[:, None]
        results = []
        for model in (ref, got, again):
            xin = x.clone().requires_grad_(True)
            with ops.use_backend(backend), monkeypatch.context() as m:
                if model is ref:
                    m.setattr(ref.vq, "_fused_training", lambda *a: False)
                res = model(xin, 75, None)
            (res.quantized.pow(2).mean() + 3.0 * res.penalty).backward()
            results.append((res, xin.grad))
        (r, gr), (k, gk), (k2, gk2) = results
        assert torch.equal(r.codes, k.codes) and torch.equal(r.quantized, k.quantized)
        torch.testing.assert_close(k.penalty, r.penalty, rtol=1e-5, atol=0)
        torch.testing.assert_close(gk, gr, rtol=1e-5, atol=1e-6 * float(gr.abs().max()))
        assert torch.equal(k.quantized, k2.quantized) and torch.equal(gk, gk2) and torch.equal(k.penalty, k2.penalty)
    assert len(calls) == 6
    for (name, a), b, c in zip(ref.state_dict().items(), got.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(b, c), name


def test_cpu_argmin_takes_torch_rule_for_ties_nan_and_inf():
    """`argmin_rows` (numpy on CPU) against torch's argmin: first index of the minimum, first NaN."""
    g = torch.Generator().manual_seed(0)
    d = torch.randint(0, 4, (300, 64), generator=g).float()  # ties everywhere
    d[5, 10] = d[5, 20] = float("nan")
    d[6] = float("inf")
    d[7, 3] = d[7, 9] = -float("inf")
    d[8] = float("nan")
    d[9, 0], d[9, 1:] = 0.0, -0.0
    d[10] = torch.randn(64, generator=g)
    for t in (d, d.double(), d[:, :1], d[:0], d.t(), d[:, ::3]):
        got = rvq.argmin_rows(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmin(-1))


def test_a_kernel_training_step_reads_nothing(monkeypatch):
    """On the kernels' path (CUDA's default; the interpreter here) a training step of every stage
    reads no value from the device (`HostReads`): every stage's count of codewords to expire was
    counted after the previous step's update and copied to the host then (read from host memory,
    by numpy, which refuses device tensors); where a count may have changed since (a state dict
    loaded), all are read in one go. Whether the codebooks are initialised is read until it is
    seen True, then remembered while the buffer stays the same (a state dict loaded is read again).
    The codebooks are the same as when the counts are read each step."""
    from encodec_fast import ops
    from encodec_fast.quantization import core_vq
    from encodec_fast.testing import HostReads
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, 16, 40, generator=g) for _ in range(5)]
    states = []
    for ahead in (True, False):
        torch.manual_seed(0)
        q = ResidualVectorQuantizer(dimension=16, n_q=6, bins=64, kmeans_init=True, kmeans_iters=3,
                                    threshold_ema_dead_code=2).train()
        with monkeypatch.context() as m, ops.use_backend("triton"):
            if not ahead:  # every step's counts read when its update runs
                m.setattr(core_vq.ResidualVectorQuantization, "_count_expiry_ahead", lambda self: None)
            q(inputs[0], 75, 6.0)  # k-means initialisation
            with HostReads() as first:
                q(inputs[1], 75, 6.0)
            assert [op for op, _ in first.reads] == ["_local_scalar_dense"] * 6 + ["tolist"]  # `inited`; counts
            x = inputs[2].clone().requires_grad_()
            reads = HostReads()
            with reads:
                out = q(x, 75, 6.0)
                (out.quantized.square().sum() + out.penalty).backward()
                q(inputs[3], 75, 3.0)  # fewer stages
            assert [op for op, _ in reads.reads] == ([] if ahead else ["tolist"] * 2), reads.reads
            q.vq.layers[2]._codebook.threshold_ema_dead_code = 3  # a threshold changed: counts read again
            with HostReads() as changed:
                q(inputs[3], 75, 6.0)
            assert [op for op, _ in changed.reads] == ["tolist"], changed.reads
            with HostReads() as mixed:  # counted ahead again, stage by stage (thresholds differ)
                q(inputs[2], 75, 6.0)
            assert [op for op, _ in mixed.reads] == ([] if ahead else ["tolist"]), mixed.reads
            q.load_state_dict(q.state_dict())  # `inited` and the counts may have changed: read again
            with HostReads() as loaded:
                q(inputs[4], 75, 6.0)
            assert [op for op, _ in loaded.reads] == ["_local_scalar_dense"] * 6 + ["tolist"], loaded.reads
        assert x.grad is not None and sum(layer._codebook.replaced for layer in q.vq.layers) > 0
        states.append(q.state_dict())
        assert (q.vq._expiry_ahead is not None) == ahead
        if ahead:  # on CUDA the counts ahead come with an event, which cannot be copied (a lock neither)
            keys, values, _ = q.vq._expiry_ahead
            q.vq._expiry_ahead = (keys, values, threading.Lock())
            assert copy.deepcopy(q).vq._expiry_ahead is None and q.vq._expiry_ahead is not None
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    books = [layer._codebook for layer in q.vq.layers]
    assert all(cb.is_inited() for cb in books)
    state = {k: v.clone() for k, v in q.state_dict().items()}
    state["vq.layers.3._codebook.inited"].zero_()
    q.load_state_dict(state)
    assert [cb.is_inited() for cb in books] == [True, True, True, False, True, True]
    books[3].inited.fill_(1.0)
    assert books[3].is_inited()
