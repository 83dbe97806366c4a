"""Built-in transforms: soft-label transforms of the teacher (``temperature``,
``label_smoothing``), logit standardisation on both sides (``logit_std``) and
CTKD's learnable temperature (``ctkd``). The transform interface (``side``,
``__call__``, ``pair``, the scale, parameters, ``set_progress``) is described
in docs/methods/transforms.md."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.losses.schedule import Progress


class Temperature:
    """``temperature``: ``log_softmax(log p / T)``, a teacher-only temperature."""

    def __init__(self, temperature: float = 2.0):
        self.temperature = params.positive("temperature", temperature)

    def __call__(self, teacher_logp: Tensor, target: Tensor | None = None) -> Tensor:
        return torch.log_softmax(teacher_logp / self.temperature, dim=-1)

    def __repr__(self) -> str:
        return f"Temperature(temperature={self.temperature:g})"


class LabelSmoothing:
    """``label_smoothing``: ``log((1 - delta) p + delta / C)``, computed as a
    log-sum-exp so that it is exact for probabilities that underflow.

    Columns whose teacher log-probability is ``-inf`` are padding (e.g. a
    padded vocabulary), not classes: C counts the real columns only and the
    padded ones stay at probability 0."""

    def __init__(self, delta: float = 0.1):
        self.delta = params.in_range("delta", delta, 0.0, 1.0)

    def __call__(self, teacher_logp: Tensor, target: Tensor | None = None) -> Tensor:
        if self.delta == 0.0:
            return teacher_logp
        real = teacher_logp > float("-inf")
        log_c = real.sum(-1, keepdim=True).clamp(min=1).to(teacher_logp.dtype).log()
        smoothed = torch.logaddexp(teacher_logp + math.log1p(-self.delta), math.log(self.delta) - log_c)
        return torch.where(real, smoothed, teacher_logp)

    def __repr__(self) -> str:
        return f"LabelSmoothing(delta={self.delta:g})"


class LogitStandardisation:
    """``logit_std``: Sun et al., CVPR 2024, "Logit Standardization in Knowledge
    Distillation", its Z-score: ``Z(z) = (z - mean(z)) / std(z)`` per position over the
    classes, divided by the base ``temperature`` (default 1), on both sides.

    Conventions (the authors' code): ``std`` is Bessel-corrected (divides by
    C - 1) and ``eps = 1e-7`` is added to it. ``-inf`` columns (a padded
    vocabulary) are not classes: the statistics run over the finite columns and
    ``-inf`` stays ``-inf``. A row whose classes are all equal gives 0. The row is
    first divided by its largest ``|z|`` (and ``eps`` with it), so logits up to
    ``±1e38`` stay finite in float32; the z-score ignores a per-row shift, so it
    is the same on log-probabilities as on logits. The output is standardised
    logits, not normalised log-probabilities (the loss's ``log_softmax(x / T)``
    follows the chain)."""

    side = "both"
    #: z-scoring a stored teacher's k + 1 buckets is not z-scoring its logits
    needs_full_distribution = True
    #: ``Z(z + c) = Z(z)`` for a per-row constant ``c`` (kdcore.testing checks it)
    shift_invariant = True
    #: the output is standardised logits, not log-probabilities summing to 1
    testing_skips = ("normalised",)

    def __init__(self, temperature: float = 1.0, eps: float = 1e-7):
        self.temperature = params.positive("temperature", temperature)
        self.eps = params.non_negative("eps", eps)

    def __call__(self, logp: Tensor, target: Tensor | None = None) -> Tensor:
        real = torch.isfinite(logp)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        z = torch.where(real, logp, zero)
        detached = z.detach()
        constant = (torch.where(real, detached, -math.inf).amax(-1, keepdim=True)
                    == torch.where(real, detached, math.inf).amin(-1, keepdim=True))
        scale = detached.abs().amax(-1, keepdim=True)
        scale = torch.where(scale > 0, scale, 1.0)
        z = z / scale
        count = real.sum(-1, keepdim=True).to(logp.dtype)
        mean = z.sum(-1, keepdim=True) / count.clamp(min=1)
        centred = torch.where(real, z - mean, zero)
        var = centred.square().sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        std = torch.where(constant, 1.0, var).sqrt()  # no 0 under the root: finite gradients
        out = centred / ((std + self.eps / scale) * self.temperature)
        return torch.where(real, torch.where(constant, zero, out), logp)

    def __repr__(self) -> str:
        return f"LogitStandardisation(temperature={self.temperature:g}, eps={self.eps:g})"


class _ReverseGradient(torch.autograd.Function):
    """The identity forward; the gradient times ``-strength`` backward (Ganin and
    Lempitsky 2015), so that descent on the loss is ascent for what is upstream."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * -ctx.strength, None


def _soften(logp: Tensor, tau: Tensor) -> Tensor:
    """``log_softmax(logp / tau)`` with ``-inf`` (padding) columns kept out of the division,
    so that ``tau``'s gradient is finite (``-inf / tau`` has an infinite derivative in ``tau``)."""
    real = torch.isfinite(logp)
    x = torch.where(real, logp, 0.0) / tau
    return torch.log_softmax(torch.where(real, x, float("-inf")), dim=-1)


def curriculum_strength(progress: Progress, epochs: float, low: float, high: float) -> float:
    """CTKD's cosine curriculum (Li et al. 2023, the curriculum of the reversal strength): ``low + (high - low) / 2 *
    (1 + cos(pi (1 + min(n, E) / E)))`` with ``n`` the epochs done, fractional
    (``step / steps_per_epoch``), ``E = epochs``: ``low`` at the start, ``high`` from
    epoch ``E`` on."""
    n = progress.step / max(progress.steps_per_epoch, 1)
    return low + 0.5 * (high - low) * (1.0 + math.cos(math.pi * (1.0 + min(n, epochs) / epochs)))


class CurriculumTemperature(nn.Module):
    """``ctkd``: Li et al., AAAI 2023, "Curriculum Temperature for Knowledge
    Distillation". A learnable temperature ``tau = t_min + t_range * sigmoid(raw)``
    (the authors' bounds t_start = 1, t_end = 20: ``tau`` in (1, 21)) divides both
    sides, ``log_softmax(logp / tau)``, and the pair's scale is ``tau^2``: ``kd`` with
    ``temperature = 1`` and this transform is the paper's
    ``tau^2 KL(softmax(t / tau) || softmax(s / tau))``.

    ``raw`` passes through a gradient-reversal layer of strength ``lambda``, so the
    optimizer that minimises the loss in the student maximises it in the
    temperature (the paper's min-max objective); ``lambda`` follows the cosine curriculum from
    ``lambda_min`` to ``lambda_max`` over ``epochs`` epochs, set by the engine
    through :meth:`set_progress` before each step (``lambda_min`` until then).

    ``mode = "global"``: one learnable scalar. ``mode = "instance"``: a two-layer
    MLP (``hidden`` units, ReLU) over the detached teacher and student
    log-probabilities of a row, concatenated, gives that row's ``raw`` (its
    input width is set by the first call; ``-inf`` columns enter as 0).
    ``init``: the starting ``tau`` (the global scalar, or the instance MLP's
    output bias); None starts at the authors' ``raw = 1``."""

    side = "both"

    def __init__(self, mode: str = "global", t_min: float = 1.0, t_range: float = 20.0,
                 init: float | None = None, epochs: float = 10.0, lambda_min: float = 0.0,
                 lambda_max: float = 1.0, hidden: int = 128):
        super().__init__()
        self.mode = params.one_of("mode", mode, ("global", "instance"))
        self.t_min = params.positive("t_min", t_min)
        self.t_range = params.positive("t_range", t_range)
        self.epochs = params.positive("epochs", epochs)
        self.lambda_min = params.non_negative("lambda_min", lambda_min)
        self.lambda_max = params.non_negative("lambda_max", lambda_max)
        if self.lambda_max < self.lambda_min:
            raise ConfigError(f"lambda_max: must be >= lambda_min ({self.lambda_min:g}), got {lambda_max!r}")
        width = params.positive_int("hidden", hidden)
        raw = 1.0 if init is None else self._raw(init)
        self.strength = self.lambda_min
        if self.mode == "global":
            self.raw = nn.Parameter(torch.tensor(raw))
        else:
            self.mlp = nn.Sequential(nn.LazyLinear(width), nn.ReLU(), nn.Linear(width, 1))
            nn.init.constant_(self.mlp[2].bias, raw)

    def _raw(self, init: float) -> float:
        """``raw`` with ``tau = init``; ``init`` must lie strictly inside the bounds."""
        high = self.t_min + self.t_range
        v = params.number("init", init)
        if not self.t_min < v < high:
            raise ConfigError(f"init: must be in ({self.t_min:g}, {high:g}) (t_min, t_min + t_range), got {init!r}")
        u = (v - self.t_min) / self.t_range
        return math.log(u / (1.0 - u))

    def set_progress(self, progress: Progress) -> None:
        """The reversal strength of the step about to run (the cosine curriculum)."""
        self.strength = curriculum_strength(progress, self.epochs, self.lambda_min, self.lambda_max)

    def temperature(self, teacher_logp: Tensor, student_logp: Tensor) -> Tensor:
        """``tau``: 0-dim (global) or ``[..., 1]`` per row (instance), in the inputs' dtype,
        behind the gradient-reversal layer."""
        if self.mode == "global":
            raw = self.raw
        else:
            rows = torch.cat([teacher_logp.detach(), student_logp.detach()], dim=-1)
            rows = torch.where(torch.isfinite(rows), rows, 0.0)
            raw = self.mlp(rows.to(self.mlp[2].weight.dtype))
        raw = _ReverseGradient.apply(raw, self.strength)
        return (self.t_min + self.t_range * torch.sigmoid(raw)).to(teacher_logp.dtype)

    def pair(self, teacher_logp: Tensor, student_logp: Tensor, target: Tensor | None = None):
        """``(log_softmax(t / tau), log_softmax(s / tau), tau^2)``; the scale is ``[...]``
        per row in instance mode."""
        tau = self.temperature(teacher_logp, student_logp)
        scale = tau.square()
        return (_soften(teacher_logp, tau), _soften(student_logp, tau),
                scale if self.mode == "global" else scale.squeeze(-1))

    def forward(self, teacher_logp: Tensor, student_logp: Tensor, target: Tensor | None = None):
        """Calling the module is :meth:`pair`."""
        return self.pair(teacher_logp, student_logp, target)

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, t_min={self.t_min:g}, t_range={self.t_range:g}, epochs={self.epochs:g}, "
                f"lambda=[{self.lambda_min:g}, {self.lambda_max:g}]")
