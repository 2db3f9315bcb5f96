"""The optimizer side of a train step, in numpy: AdamW, learning-rate schedules, clipping by global norm.

The train graph returns gradients only; the update runs here because the deltas are a few hundred KB
(cheap in numpy) and because ONNX optimizers fold AdamW's tiny eps away (see the export notes).
Every formula follows torch (``torch.optim.AdamW``, ``clip_grad_norm_``) and the warmup schedules
of ``transformers``, so a run is comparable step for step with torch + PEFT.
"""

from __future__ import annotations

import math

import numpy as np

from edgepeft.errors import TrainError

SCHEDULES = ("linear", "cosine", "constant")
ADAM_EPS = 1e-8  # torch's default


def _anchor(params: dict[str, np.ndarray], prox: float) -> dict[str, np.ndarray]:
    """The point a proximal pull (FedProx) holds the parameters near: their values when the optimizer is built."""
    if prox < 0 or not math.isfinite(prox):
        raise TrainError(f"prox must be a non-negative number, got {prox}")
    return {k: v.copy() for k, v in params.items()} if prox else {}


class AdamW:
    """AdamW with bias correction and decoupled weight decay, updating float32 arrays in place.

    ``prox`` > 0 adds a decoupled pull toward the starting values (FedProx's proximal term, Li et al. 2020, applied
    the way AdamW applies weight decay: ``p -= lr·prox·(p - p0)`` beside the decay, outside Adam's normalisation), so a
    fleet device's update stays near the version it started from however Adam scales its gradient steps.
    """

    def __init__(self, params: dict[str, np.ndarray], *, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = ADAM_EPS, weight_decay: float = 0.01, prox: float = 0.0) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise TrainError(f"AdamW betas must lie in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise TrainError(f"AdamW needs eps > 0 and weight decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        self.params = params
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.prox, self.anchor = prox, _anchor(params, prox)
        self.step_count = 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}  # first moments
        self.v = {k: np.zeros_like(v) for k, v in params.items()}  # second moments

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        """One update of every parameter with its gradient at learning rate ``lr`` (torch's order of operations)."""
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.step_count)
        for name, p in self.params.items():
            g = grads[name]
            m, v = self.m[name], self.v[name]
            if self.prox:  # decoupled like the decay, before it: torch AdamW's decay of (p - p0) when weight decay is 0
                p -= np.float32(lr * self.prox) * (p - self.anchor[name])
            p *= np.float32(1.0 - lr * self.weight_decay)  # decoupled: decay the weight, not the gradient
            m += (g - m) * np.float32(1.0 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
            v *= np.float32(b2)
            v += g * g * np.float32(1.0 - b2)
            denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(self.eps)
            p -= np.float32(lr / bc1) * (m / denom)

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Moments (``m.<slot>``, ``v.<slot>``) and the step count, for a checkpoint."""
        arrays = {f"m.{k}": v for k, v in self.m.items()} | {f"v.{k}": v for k, v in self.v.items()}
        return arrays, {"step": self.step_count}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, int]) -> None:
        """Restore what :meth:`state` returned (shapes checked, so a foreign checkpoint fails here)."""
        for k, p in self.params.items():
            for prefix, store in (("m", self.m), ("v", self.v)):
                a = arrays.get(f"{prefix}.{k}")
                if a is None or a.shape != p.shape:
                    raise TrainError(f"checkpoint optimizer state lacks or misshapes {prefix}.{k}")
                store[k] = np.array(a, dtype=np.float32)
        self.step_count = int(scalars["step"])


class SGD:
    """SGD as torch's (weight decay added to the gradient; momentum without dampening), updating float32 arrays in place.

    A step is proportional to the gradient, where AdamW's first steps are sign-like whatever the gradient's size: a
    fleet device whose loss is already small (one label, logit-adjusted) then moves the shared adapter little.
    ``prox`` > 0 adds FedProx's proximal term ``prox/2·||p - p0||²`` to the loss (its gradient ``prox·(p - p0)``
    joins the gradient, as weight decay does here), pulling the update toward the starting values.
    """

    def __init__(self, params: dict[str, np.ndarray], *, weight_decay: float = 0.0, momentum: float = 0.0,
                 prox: float = 0.0) -> None:
        if weight_decay < 0:
            raise TrainError(f"SGD needs weight decay >= 0, got {weight_decay}")
        if not 0.0 <= momentum < 1.0:
            raise TrainError(f"SGD momentum must lie in [0, 1), got {momentum}")
        self.params, self.weight_decay, self.momentum, self.step_count = params, weight_decay, momentum, 0
        self.prox, self.anchor = prox, _anchor(params, prox)
        self.buf = {k: np.zeros_like(v) for k, v in params.items()} if momentum else {}

    def step(self, grads: dict[str, np.ndarray], lr: float) -> None:
        """One update of every parameter with its gradient at learning rate ``lr``."""
        self.step_count += 1
        for name, p in self.params.items():
            g = grads[name] + np.float32(self.weight_decay) * p if self.weight_decay else grads[name]
            if self.prox:
                g = g + np.float32(self.prox) * (p - self.anchor[name])
            if self.momentum:  # torch: the buffer starts as the first gradient, then buf = momentum·buf + g
                buf = self.buf[name]
                if self.step_count == 1:
                    buf[...] = g
                else:
                    buf *= np.float32(self.momentum)
                    buf += g
                g = buf
            p -= np.float32(lr) * g

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """The momentum buffers (``buf.<slot>``, none without momentum) and the step count, for a checkpoint."""
        return {f"buf.{k}": v for k, v in self.buf.items()}, {"step": self.step_count}

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, int]) -> None:
        """Restore what :meth:`state` returned (shapes checked, so a foreign checkpoint fails here); buffers
        without momentum are refused, not dropped: they mean the checkpoint was made by another optimizer."""
        if not self.momentum and any(k.startswith("buf.") for k in arrays):
            raise TrainError("checkpoint holds SGD momentum buffers but this run has momentum 0; resume with the "
                             "checkpoint's --momentum")
        for k in self.buf:
            a = arrays.get(f"buf.{k}")
            if a is None or a.shape != self.params[k].shape:
                raise TrainError(f"checkpoint optimizer state lacks or misshapes buf.{k}")
            self.buf[k] = np.array(a, dtype=np.float32)
        self.step_count = int(scalars["step"])


OPTIMIZERS = {"adamw": AdamW, "sgd": SGD}


def build_optimizer(name: str, params: dict[str, np.ndarray], *, weight_decay: float, prox: float = 0.0,
                    momentum: float = 0.0, adam_eps: float = ADAM_EPS) -> AdamW | SGD:
    """The optimizer a run asked for; an option the other optimizer owns is refused, not silently ignored."""
    if name not in OPTIMIZERS:
        raise TrainError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    if name == "adamw":
        if momentum:
            raise TrainError("--momentum is SGD's; AdamW's first moment plays its part (use --optimizer sgd)")
        return AdamW(params, eps=adam_eps, weight_decay=weight_decay, prox=prox)
    if adam_eps != ADAM_EPS:
        raise TrainError("--adam-eps is AdamW's; SGD has no epsilon (drop it or use --optimizer adamw)")
    return SGD(params, weight_decay=weight_decay, momentum=momentum, prox=prox)


def lr_at(step: int, *, base_lr: float, total: int, warmup: int, schedule: str) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup from 0, then linear or cosine decay to 0."""
    if schedule not in SCHEDULES:
        raise TrainError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return base_lr * step / max(1, warmup)
    if schedule == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def clip_by_global_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their joint L2 norm is at most ``max_norm``; return the norm before."""
    # torch computes the norm of the per-tensor norms in float32 and always multiplies by the clamped factor
    norms = np.array([np.linalg.norm(g.reshape(-1)) for g in grads.values()], dtype=np.float32)
    total = float(np.linalg.norm(norms))
    if not math.isfinite(total):
        raise TrainError(f"gradient norm is {total}; the loss diverged (lower --lr)")
    coef = np.float32(min(1.0, max_norm / (total + 1e-6)))
    for g in grads.values():
        g *= coef
    return total
