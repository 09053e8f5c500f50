"""The loss balancer of EnCodec (Défossez et al. 2022, §3.4, eq. 5), with the constructor options
and behaviour of upstream's `encodec.balancer.Balancer` (on its main branch, not in 0.1.1).

For losses ℓ_k that reach the parameters only through one tensor `input` (the decoder output):
g_k = ∂ℓ_k/∂input; ‖g_k‖ is the L2 norm per batch item averaged over the batch
(`per_batch_item`, else one norm over everything); ⟨‖g_k‖⟩ is its exponential moving average
(decay `ema_decay`, bias-corrected, kept as Python floats and averaged across workers weighted by
their batch sizes). Then `input.backward(Σ_k g_k · w_k / Σ_j w_j · total_norm / (epsilon + ⟨‖g_k‖⟩))`,
so each loss's share of the output gradient follows its weight whatever its scale; with
`rescale_grads=False`, plainly `input.backward(Σ_k w_k g_k)`. The commitment loss stays outside:
backpropagate it on its own (weight 1), as upstream's maintainers do.
"""

import typing as tp

import torch

from .. import distrib, timing


class Balancer:
    """weights: {loss name: weight}; `backward(losses, input)` with the same names (a subset is
    allowed; a name without a weight is an error, as is a loss with no gradient to `input`).
    `metrics` holds, with `monitor=True`, each loss's share of the averaged gradient norms
    (`ratio_<name>`). `state_dict()`/`load_state_dict()` carry the moving averages."""

    def __init__(self, weights: tp.Dict[str, float], rescale_grads: bool = True, total_norm: float = 1.0,
                 ema_decay: float = 0.999, per_batch_item: bool = True, epsilon: float = 1e-12,
                 monitor: bool = False):
        self.weights = dict(weights)
        self.rescale_grads, self.total_norm, self.ema_decay = rescale_grads, total_norm, ema_decay
        self.per_batch_item, self.epsilon, self.monitor = per_batch_item, epsilon, monitor
        self._total: tp.Dict[str, float] = {}
        self._fix: tp.Dict[str, float] = {}
        self.metrics: tp.Dict[str, float] = {}

    def _average(self, norms: tp.Dict[str, float]) -> tp.Dict[str, float]:
        """Bias-corrected EMA: total = β total + value, fix = β fix + 1, average = total / fix."""
        out = {}
        for name, value in norms.items():
            self._total[name] = self._total.get(name, 0.0) * self.ema_decay + value
            self._fix[name] = self._fix.get(name, 0.0) * self.ema_decay + 1.0
            out[name] = self._total[name] / self._fix[name]
        return out

    def backward(self, losses: tp.Dict[str, torch.Tensor], input: torch.Tensor, scale: float = 1.0) -> None:
        """`scale` multiplies the output gradient (not in upstream; 1 is upstream's behaviour). The
        trainer passes the world size under data parallelism, where gradients are averaged across
        workers: each example's balanced gradient does not depend on the batch size, so N workers
        whose gradients are averaged need the factor N to equal one worker with all the examples.
        The same as `gradients` then `apply` with the norms read (in one go: on a GPU one wait for
        the device, not one per loss)."""
        grads, on_device = self.gradients(losses, input)
        norms = dict(zip(on_device, torch.stack(list(on_device.values())).tolist())) if on_device else {}
        self.apply(grads, norms, input, scale)

    def gradients(self, losses: tp.Dict[str, torch.Tensor], input: torch.Tensor
                  ) -> tp.Tuple[tp.Dict[str, torch.Tensor], tp.Dict[str, torch.Tensor]]:
        """Each loss's gradient with respect to `input` and its norm (0-d tensors on the device,
        not read); nothing in the balancer's state changes. `apply` takes them with the norms read,
        so a caller can read them together with its own values."""
        unknown = sorted(set(losses) - set(self.weights))
        if unknown:
            raise KeyError(f"losses without a weight: {unknown}")
        grads, on_device = {}, {}
        for name, loss in losses.items():
            (grad,) = torch.autograd.grad(loss, [input], retain_graph=True)
            if self.per_batch_item:
                norm = grad.flatten(1).norm(dim=1).mean() if grad.dim() > 1 else grad.norm()
            else:
                norm = grad.norm()
            grads[name], on_device[name] = grad, norm
        return grads, on_device

    def apply(self, grads: tp.Dict[str, torch.Tensor], norms: tp.Dict[str, float], input: torch.Tensor,
              scale: float = 1.0) -> None:
        """The moving averages updated with `norms` (floats, from `gradients`) and the balanced
        gradient sent back through `input` (`backward`'s second half)."""
        averaged = distrib.average_metrics(self._average(norms), count=len(input))
        if self.monitor:
            total = sum(averaged.values())
            self.metrics = {f"ratio_{name}": value / total for name, value in averaged.items()}
        weight_sum = sum(self.weights[name] for name in averaged)
        out_grad = torch.zeros_like(input)
        for name, grad in grads.items():
            if self.rescale_grads:
                ratio = self.weights[name] / weight_sum * self.total_norm / (self.epsilon + averaged[name])
            else:
                ratio = self.weights[name]
            out_grad.add_(grad, alpha=ratio * scale)
        with timing.stage("generator", input.device):  # the backward through the model that made `input`
            input.backward(out_grad)

    def state_dict(self) -> tp.Dict[str, tp.Any]:
        return {"total": dict(self._total), "fix": dict(self._fix)}

    def load_state_dict(self, state: tp.Dict[str, tp.Any]) -> None:
        self._total, self._fix = dict(state["total"]), dict(state["fix"])
