"""What does not apply to a component: ``testing_skips``.

Each check function runs named sub-checks (listed in its docstring and in
:data:`CHECKS`). A component declares the ones that do not apply to it with a
class (or function) attribute ``testing_skips``, a set of those names, and a
test may add more with the check's ``skip=`` argument. Exactly the named
sub-checks are skipped; a name that the check does not have is an error, so a
typo never silently turns a check off.
"""

from __future__ import annotations

from collections.abc import Iterable

#: the sub-checks of every check function, by the function's topic
CHECKS: dict[str, tuple[str, ...]] = {
    "loss": ("token_level", "ignored_rows", "all_ignored", "bfloat16", "chunking", "outputs"),
    "outputs_loss": ("taps", "value", "gradients", "teacher_detached", "float64"),
    "divergence": ("per_row", "zero_on_equal", "non_negative", "token_level", "zero_probability_columns"),
    "transform": ("shape", "normalised", "padding_kept", "token_level", "finite_gradients", "extreme_inputs",
                  "in_loss", "one_side", "shift_invariant"),
    "schedule": ("number", "finite", "deterministic", "order_free"),
    "weighting": ("update", "finite", "deterministic", "state_dict"),
    "backbone": ("num_classes", "batch_rows", "taps", "gradients", "deterministic"),
    "dataset": ("splits", "lengths", "item_schema", "targets", "input_shape", "deterministic", "posterior"),
}


def skipped(topic: str, component: object, extra: Iterable[str] = ()) -> frozenset[str]:
    """The sub-checks of ``topic`` to skip for ``component``: its ``testing_skips`` plus ``extra``.

    Raises :class:`ValueError` for a name that ``topic`` has no sub-check for.
    """
    declared = getattr(component, "testing_skips", None) or ()
    if isinstance(declared, str):
        declared = (declared,)
    extra = (extra,) if isinstance(extra, str) else tuple(extra)
    names = frozenset(declared) | frozenset(extra)
    unknown = sorted(names - set(CHECKS[topic]))
    if unknown:
        raise ValueError(f"testing_skips: no {topic} check is named {', '.join(map(repr, unknown))} "
                         f"(the {topic} checks: {', '.join(CHECKS[topic])})")
    return names
