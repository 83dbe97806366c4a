"""Plain float64 numpy references, written from the equations of methods.md
("Divergences for token-level distillation"); they do not call the plugin.
``p`` teacher, ``q`` student: arrays of probabilities, classes on the last axis."""

from __future__ import annotations

import numpy as np


def _xlogy_ratio(a, b):
    """``a * log(a / b)`` elementwise, 0 where ``a = 0``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0)


def kl(p, q):
    return _xlogy_ratio(p, q).sum(-1)


def jsd(p, q, beta=0.5):
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def skew_kl(p, q, alpha=0.1):
    return kl(p, alpha * p + (1 - alpha) * q)


def skew_rkl(p, q, alpha=0.1):
    return kl(q, alpha * q + (1 - alpha) * p)


def tvd(p, q):
    return 0.5 * np.abs(p - q).sum(-1)


def akl_weights(p, q, mu=0.5):
    """Per row: sort p descending (ties: lower class index first), head = first
    class + every class whose cumulative mass (itself included) is <= mu."""
    p2, q2 = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    wh, wt = np.zeros(len(p2)), np.zeros(len(p2))
    for i, (pr, qr) in enumerate(zip(p2, q2)):
        order = np.argsort(-pr, kind="stable")
        cum = np.cumsum(pr[order])
        head = cum <= mu
        head[0] = True
        gap = np.abs(pr[order] - qr[order])
        gh, gt = gap[head].sum(), gap[~head].sum()
        if gh + gt > 0:
            wh[i], wt[i] = gh / (gh + gt), gt / (gh + gt)
    return wh.reshape(p.shape[:-1]), wt.reshape(p.shape[:-1])


def akl(p, q, mu=0.5):
    wh, wt = akl_weights(p, q, mu)
    return wh * kl(p, q) + wt * kl(q, p)


REFERENCES = {"jsd": jsd, "skew_kl": skew_kl, "skew_rkl": skew_rkl, "tvd": tvd, "akl": akl}


def softmax(z, temperature=1.0):
    z = np.asarray(z, dtype=np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)
