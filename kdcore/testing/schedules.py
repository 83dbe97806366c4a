"""Checks for schedulers: time schedules (``schedule(progress) -> float``) and
gradient-aware weightings (:class:`kdcore.losses.weighting.GradientWeighting`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping

import torch

from kdcore.losses.schedule import Progress
from kdcore.losses.weighting import GradientContext, GradientWeighting, Update
from kdcore.testing.skips import skipped


def progress_grid(epochs: int = 3, steps_per_epoch: int = 4) -> list[Progress]:
    """One :class:`~kdcore.losses.schedule.Progress` per optimizer step of a short run, in order."""
    return [Progress(epoch=e, step=(e - 1) * steps_per_epoch + i, epochs=epochs, steps_per_epoch=steps_per_epoch)
            for e in range(1, epochs + 1) for i in range(steps_per_epoch)]


def check_scheduler(scheduler, skip: Iterable[str] = ()) -> None:
    """:func:`check_weighting` for a :class:`~kdcore.losses.weighting.GradientWeighting`,
    else :func:`check_schedule`."""
    if isinstance(scheduler, GradientWeighting):
        check_weighting(scheduler, skip=skip)
    else:
        check_schedule(scheduler, skip=skip)


def check_schedule(schedule, epochs: int = 3, steps_per_epoch: int = 4, skip: Iterable[str] = ()) -> None:
    """Assert that a time schedule ``schedule(progress) -> float`` behaves, over
    every step of a run of ``epochs`` x ``steps_per_epoch`` steps. Sub-checks:

    - ``number``: each value is a real number (int or float, not bool);
    - ``finite``: each value is finite;
    - ``deterministic``: a copy of the schedule gives the same values;
    - ``order_free``: the values do not depend on the order of the calls (the
      steps asked backwards give the same values: a resumed run asks from the
      middle).
    """
    skip = skipped("schedule", schedule, skip)
    grid = progress_grid(epochs, steps_per_epoch)
    fresh = copy.deepcopy(schedule)
    values = [schedule(p) for p in grid]
    if "number" not in skip:
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float))]
        assert not bad, f"a schedule returns a float, got {bad[0]!r}"
    if "finite" not in skip:
        assert all(math.isfinite(float(v)) for v in values), f"non-finite schedule values {values}"
    if "deterministic" not in skip:
        again = [copy.deepcopy(fresh)(p) for p in grid]
        assert again == values, f"a copy of the schedule gives {again}, the schedule {values}"
    if "order_free" not in skip:
        other = copy.deepcopy(fresh)
        backwards = [other(p) for p in reversed(grid)][::-1]
        assert backwards == values, f"asked backwards the schedule gives {backwards}, forwards {values}"


def _two_term_context(progress: Progress, seed: int, aux: bool) -> GradientContext:
    """A linear student with a "ce" term (cross-entropy) and a "kd" term (KL to a fixed teacher)."""
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g))
        model.bias.copy_(torch.randn(3, generator=g))
    params = list(model.parameters())

    def losses_on(batch_seed: int) -> dict[str, torch.Tensor]:
        gb = torch.Generator().manual_seed(batch_seed)
        x, y = torch.randn(6, 4, generator=gb), torch.randint(0, 3, (6,), generator=gb)
        teacher = torch.log_softmax(torch.randn(6, 3, generator=gb), -1)
        logp = torch.log_softmax(model(x), -1)
        return {"ce": torch.nn.functional.nll_loss(logp, y),
                "kd": (teacher.exp() * (teacher - logp)).sum(-1).mean()}

    def aux_losses(names=None):
        found = losses_on(seed + 100)
        return {n: found[n] for n in (names if names is not None else found)}

    return GradientContext(losses=losses_on(seed + 1), roles={"ce": "ce", "kd": "kd"}, params=params,
                           progress=progress, aux_losses=aux_losses if aux else None)


def _as_numbers(update: Update, numel: int) -> dict[str, float]:
    if update.grad is not None:
        assert update.grad.shape == (numel,), f"Update.grad has shape {tuple(update.grad.shape)}, " \
                                               f"the student's parameters {numel} entries"
        return {f"grad[{i}]": float(v) for i, v in enumerate(update.grad.tolist())}
    assert isinstance(update.coefficients, Mapping)
    return {f"coefficient {k}": float(v) for k, v in update.coefficients.items()}


def check_weighting(weighting, steps: int = 4, skip: Iterable[str] = ()) -> None:
    """Assert that a gradient-aware weighting works as the engine drives it, on a
    tiny linear student with a ``"ce"`` and a ``"kd"`` term (an auxiliary batch
    where ``needs_aux_batch``), for ``steps`` steps. Sub-checks:

    - ``update``: :meth:`combine` returns an :class:`~kdcore.losses.weighting.Update`
      whose ``grad`` has one entry per student parameter entry, or whose
      ``coefficients`` name only the context's terms; on steps where
      :meth:`wants_gradients` is false, :meth:`coefficients` names only those terms;
    - ``finite``: gradients, coefficients and logged ``info`` are finite;
    - ``deterministic``: a copy of the weighting gives the same updates;
    - ``state_dict``: a copy that loads :meth:`state_dict` after the first step
      gives the same updates afterwards.
    """
    skip = skipped("weighting", weighting, skip)
    aux = bool(getattr(weighting, "needs_aux_batch", False))

    def run(w, first: int = 0) -> list[dict[str, float]]:
        out = []
        for i, p in enumerate(progress_grid(1, steps)[first:], start=first):
            ctx = _two_term_context(p, seed=i, aux=aux)
            numel = sum(q.numel() for q in ctx.params)
            if w.wants_gradients(p):
                update = w.combine(ctx)
                if "update" not in skip:
                    assert isinstance(update, Update), f"combine() returns a kdcore.losses.weighting.Update, got {update!r}"
                    if update.coefficients is not None:
                        assert set(update.coefficients) <= set(ctx.roles), \
                            f"coefficients for unknown terms {set(update.coefficients) - set(ctx.roles)}"
                numbers = _as_numbers(update, numel)
                numbers.update({f"info {k}": float(v) for k, v in update.info.items()})
            else:
                coefficients = w.coefficients()
                if "update" not in skip:
                    assert set(coefficients) <= set(ctx.roles), f"coefficients() names unknown terms {coefficients}"
                numbers = {f"coefficient {k}": float(v) for k, v in coefficients.items()}
            if "finite" not in skip:
                bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
                assert not bad, f"step {p.step}: non-finite {bad}"
            out.append(numbers)
        return out

    fresh = copy.deepcopy(weighting)
    values = run(weighting)
    if "deterministic" not in skip:
        assert run(copy.deepcopy(fresh)) == values, "a copy of the weighting gives other updates"
    if "state_dict" not in skip and steps > 1:
        stepped, p = copy.deepcopy(fresh), progress_grid(1, steps)[0]
        if stepped.wants_gradients(p):
            stepped.combine(_two_term_context(p, seed=0, aux=aux))
        resumed = copy.deepcopy(fresh)
        resumed.load_state_dict(copy.deepcopy(stepped.state_dict()))
        assert run(resumed, first=1) == values[1:], "after load_state_dict the weighting gives other updates"
