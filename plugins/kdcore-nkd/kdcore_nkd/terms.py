"""The terms of the NKD loss (TAND paper eq. 7) on per-row log-probabilities.

``L_NKD = -p_t log q_t - gamma * sum_{k != t} rho^t_k log rho^s_k``: the
student's target log-likelihood weighted by the teacher's target probability
(at T = 1), plus ``gamma`` times the cross entropy of the student's normalised
non-target distribution ``rho^s`` under the teacher's ``rho^t`` (at T, times
``T^2``; methods.md conventions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdcore.losses.functional import TargetSplit, ce_rows

#: ``(log_b [n, 2], log_rho [n, C])`` as returned by ``kdcore.losses.functional.split_target``
Split = tuple[Tensor, Tensor]


def target_term(teacher_log_pt: Tensor, student_log_qt: Tensor) -> Tensor:
    """``-p_t log q_t`` per row from the target log-probabilities ``log p_t``,
    ``log q_t`` ``[n]`` (TAND paper eq. 7, first term). 0 where ``p_t = 0``, also
    when ``log q_t = -inf`` (a padded target column in both models)."""
    p_t = teacher_log_pt.exp()
    return -p_t * student_log_qt.masked_fill(p_t == 0, 0.0)


def normalized_nontarget_term(teacher_log_rho: Tensor, student_log_rho: Tensor,
                              divergence: Any = None) -> Tensor:
    """The non-target term of TAND paper eq. 7 (without ``gamma``) per row, from
    the renormalised non-target log-distributions ``log rho``.

    With ``divergence=None`` it is the paper's cross entropy
    ``-sum_{k != t} rho^t_k log rho^s_k``; otherwise ``divergence(rho^t, rho^s)``.
    ``CE(rho^t, rho^s) = KL(rho^t || rho^s) + H(rho^t)``, so the ``kl``
    divergence gives the same student gradients and a value lower by the
    teacher's non-target entropy.
    """
    if divergence is None:
        return ce_rows(teacher_log_rho, student_log_rho)
    return divergence(teacher_log_rho, student_log_rho)


def target_log_prob(logits: Tensor, target: Tensor) -> Tensor:
    """``log softmax(z)_t`` per row at T = 1, without materialising the log-softmax."""
    return logits.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def nkd_rows(teacher: Tensor, student: Tensor, target: Tensor, teacher_split: Split,
             student_split: Split, temperature: float, gamma: float, divergence: Any = None) -> Tensor:
    """Per-row NKD loss ``-p_t log q_t + gamma * T^2 * CE(rho^t(T), rho^s(T))``.

    ``teacher`` / ``student`` are the logits (or log-probabilities) at T = 1 and
    ``*_split`` their ``split_target`` pieces at ``temperature``; at T = 1 the
    target log-probabilities are read from the pieces instead of recomputed.
    """
    if temperature == 1.0:
        log_pt, log_qt = teacher_split[0][..., 0], student_split[0][..., 0]
    else:
        log_pt, log_qt = target_log_prob(teacher, target), target_log_prob(student, target)
    nontarget = normalized_nontarget_term(teacher_split[1], student_split[1], divergence)
    return target_term(log_pt, log_qt) + (gamma * temperature * temperature) * nontarget


def split_nkd_rows(teacher: Tensor, student: Tensor, target: Tensor, split: TargetSplit, temperature: float,
                   gamma: float) -> Tensor:
    """:func:`nkd_rows` from a :class:`kdcore.losses.functional.TargetSplit` (fused forward and
    backward): the non-target term is ``CE(rho^t, rho^s) = KL(rho^t || rho^s) + H(rho^t)``
    where the split carries the entropy, else ``KL(rho^t || rho^s)`` (the ``kl`` divergence);
    at T = 1 the target log-probabilities are read from the split."""
    nontarget = split.nckd if split.entropy is None else split.nckd + split.entropy
    if temperature == 1.0:
        log_pt, log_qt = split.log_pt, split.log_qt
    else:
        log_pt, log_qt = target_log_prob(teacher, target), target_log_prob(student, target)
    return target_term(log_pt, log_qt) + (gamma * temperature * temperature) * nontarget

