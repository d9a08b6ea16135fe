"""Optimizer pieces that the reference trains with but ``torch.optim`` lacks.

:class:`AdaBelief` reproduces ``optax.adabelief`` (the reference's optimizer), so that PyTorch
training follows the same update rule as the reference's JAX code. Works with any
``torch.optim.lr_scheduler`` and with ``state_dict()`` / ``load_state_dict()`` checkpoints.
:func:`parameter_groups` splits a network's parameters into weights (weight decay) and
everything else; :class:`ExponentialDecay` is the reference's learning-rate decay.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable, Optional, Union

import math

import torch
from torch import nn
from torch.optim import Optimizer

__all__ = ["AdaBelief", "ExponentialDecay", "parameter_groups"]

ParamsT = Union[Iterable[torch.Tensor], Iterable[dict[str, Any]]]


class AdaBelief(Optimizer):
    r"""AdaBelief (Zhuang et al. 2020) exactly as ``optax.adabelief`` computes it.

    For each parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...``::

        m     = b1 * m + (1 - b1) * g
        s     = b2 * s + (1 - b2) * (g - m)**2 + eps_root      # new m, as optax
        m_hat = m / (1 - b1**t)
        s_hat = s / (1 - b2**t)
        p     = p - lr * m_hat / (sqrt(s_hat) + eps)

    ``m`` and ``s`` start at zero. Unlike the AdaBelief paper's PyTorch package there is no
    weight decay, no rectification and ``eps`` is added outside the square root only (``eps_root``
    inside ``s``), with optax's defaults ``eps = eps_root = 1e-16``.

    Args:
        params: parameters or parameter groups (dicts), as for any ``torch.optim`` optimizer.
        lr: learning rate (a learning-rate scheduler may change it per group).
        betas: ``(b1, b2)``, decay rates of the gradient mean and of the "belief" variance.
        eps: added to ``sqrt(s_hat)`` in the denominator.
        eps_root: added to ``s`` at every step.

    State per parameter (in ``state_dict()``): ``step`` (int), ``exp_avg`` (``m``) and
    ``exp_avg_var`` (``s``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        eps_root: float = 1e-16,
    ):
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float, not a tensor")
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate lr={lr!r}; it must be >= 0")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas={betas!r}; both must be in [0, 1)")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps={eps!r}; it must be >= 0")
        if not eps_root >= 0.0:
            raise ValueError(f"invalid eps_root={eps_root!r}; it must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, eps_root=eps_root)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Update every parameter that has a gradient (parameters with ``grad=None`` are skipped,
        their step count does not advance).

        Args:
            closure: optional function that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, eps_root = group["lr"], group["eps"], group["eps_root"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("AdaBelief does not support sparse gradients")
                if torch.is_complex(param):
                    raise RuntimeError("AdaBelief supports real parameters only")
                state = self.state[param]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_var"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                state["step"] = int(state["step"]) + 1
                step = state["step"]
                exp_avg, exp_avg_var = state["exp_avg"], state["exp_avg_var"]

                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                prediction_error = grad - exp_avg
                exp_avg_var.mul_(beta2).addcmul_(
                    prediction_error, prediction_error, value=1.0 - beta2
                ).add_(eps_root)

                m_hat = exp_avg / (1.0 - beta1**step)
                s_hat = exp_avg_var / (1.0 - beta2**step)
                param.addcdiv_(m_hat, s_hat.sqrt_().add_(eps), value=-lr)
        return loss


# torch modules whose ``weight`` is a weight matrix / kernel (not a scale, as in norm layers).
_TORCH_WEIGHT_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


def _decayed_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own parameters that are weights (subject to weight decay).

    Spiking layers list theirs in ``weight_decay_parameters`` (initial states are not weights:
    decaying them would pull the neurons' starting states towards 0, e.g. theta phases towards
    the spike); torch's linear and convolution layers decay ``weight``.
    """
    declared = getattr(type(module), "weight_decay_parameters", None)
    if declared is not None:
        return tuple(declared)
    if isinstance(module, _TORCH_WEIGHT_MODULES):
        return ("weight",)
    return ()


def parameter_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer parameter groups: weights with ``weight_decay``, all else with 0.

    A parameter is a weight if it is a spiking layer's weight matrix (the names in the layer
    class's ``weight_decay_parameters``, e.g. ``SpikingLinear.weight``) or the ``weight`` of a
    ``torch.nn`` linear or convolution layer. Initial states, biases and normalisation scales
    are never decayed. Decided by what a parameter is, not by its shape: ``initial_state`` is
    ``[D, N]`` like a matrix. Shared parameters appear once (in the first group that has them).

    Use as ``torch.optim.AdamW(parameter_groups(net, 0.1), lr=...)``.

    Returns:
        ``[{"params": weights, "weight_decay": weight_decay},
        {"params": others, "weight_decay": 0.0}]`` (empty lists kept, so that group indices
        are stable for schedulers and checkpoints).
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    decayed: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for submodule in module.modules():
        for name in _decayed_names(submodule):
            parameter = submodule._parameters.get(name)
            if parameter is not None and id(parameter) not in seen:
                seen.add(id(parameter))
                decayed.append(parameter)
    others = []
    for parameter in module.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            others.append(parameter)
    return [
        {"params": decayed, "weight_decay": float(weight_decay)},
        {"params": others, "weight_decay": 0.0},
    ]


class ExponentialDecay:
    """``LambdaLR`` factor ``exp(-step / decay_steps)``: the reference's learning-rate decay.

    The reference uses ``optax.exponential_decay(lr, decay_steps, 1/e)`` with ``decay_steps =
    int(100 epochs * steps per epoch)``; step the scheduler once per optimizer step. A class (not
    a lambda) so that it pickles and its ``decay_steps`` is part of the scheduler's state dict.
    ``decay_steps = inf`` gives a constant learning rate.
    """

    def __init__(self, decay_steps: float):
        if not decay_steps > 0:
            raise ValueError(f"decay_steps must be positive (inf: no decay), got {decay_steps}")
        self.decay_steps = float(decay_steps)

    def __call__(self, step: int) -> float:
        return math.exp(-step / self.decay_steps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(decay_steps={self.decay_steps})"
