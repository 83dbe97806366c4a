"""Dataset ``synthetic_lm``: an embedded language whose next-token law is known exactly.

The language is a random hidden Markov model (seeded): ``states`` hidden
states, a vocabulary of ``vocab_size`` tokens, an initial law ``pi``,
transitions ``A[z, z']`` and emissions ``B[z, x]`` drawn from sparse Dirichlet
laws (small concentrations: each state moves to few states and emits few
tokens, so the language is learnable yet ambiguous). Sequences of ``length +
1`` tokens are sampled; ``input_ids`` are the first ``length`` tokens and the
target at position ``t`` is the token at ``t + 1`` (every position is kept).

The forward algorithm gives the exact next-token law at every position,
``p*(x_{t+1} | x_{<=t}) = (alpha_t A) B`` with ``alpha_t`` the filtered state
posterior; the val and test splits carry it as ``posterior`` ``[n, T, V]``,
the language-model analogue of ``gaussian_mixture``'s Bayes posterior (the
engine's evaluation reports the per-token TV and L2 distances to it, and
:func:`kdcore_lm.metrics.kl_to_truth` the KL).
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np
import torch

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits, TensorSplit

#: every probability of the language is mixed with this much of the uniform law
#: (no exact zeros, so every token stays possible and KL to the truth is finite)
FLOOR = 1e-4


@attrs.frozen
class HMM:
    """The language: ``pi [S]``, ``A [S, S]``, ``B [S, V]`` (float64 rows summing to 1)."""

    pi: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor

    @property
    def states(self) -> int:
        return self.A.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.B.shape[1]

    @classmethod
    def random(cls, states: int, vocab_size: int, seed: int, transition_concentration: float = 0.05,
               emission_concentration: float = 0.02) -> "HMM":
        rng = np.random.default_rng([seed, 0x11A])

        def dirichlet(alpha: float, rows: int, cols: int) -> torch.Tensor:
            p = rng.dirichlet(np.full(cols, alpha), size=rows)
            p = np.nan_to_num(p, nan=0.0)
            p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
            p = (1 - FLOOR) * p + FLOOR / cols
            return torch.from_numpy(p / p.sum(-1, keepdims=True))

        pi = dirichlet(1.0, 1, states)[0]
        return cls(pi, dirichlet(transition_concentration, states, states),
                   dirichlet(emission_concentration, states, vocab_size))

    def sample(self, n: int, length: int, seed: int) -> torch.Tensor:
        """``n`` sequences of ``length`` tokens ``[n, length]`` (int64), vectorised over sequences."""
        rng = np.random.default_rng([seed, 0x5E9])
        cum_a = np.cumsum(self.A.numpy(), -1)
        cum_b = np.cumsum(self.B.numpy(), -1)

        def draw(cum: np.ndarray) -> np.ndarray:  # one draw per row of ``cum`` [n, K]
            u = rng.random((cum.shape[0], 1)) * cum[:, -1:]
            return np.minimum((cum < u).sum(-1), cum.shape[1] - 1)

        z = draw(np.broadcast_to(np.cumsum(self.pi.numpy()), (n, self.states)))
        out = np.empty((n, length), dtype=np.int64)
        for t in range(length):
            out[:, t] = draw(cum_b[z])
            z = draw(cum_a[z])
        return torch.from_numpy(out)

    def next_token_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``p*(x_{t+1} | x_{<=t})`` for every position ``t`` of ``tokens`` ``[n, T]``: ``[n, T, V]`` (float64)."""
        n, T = tokens.shape
        out = torch.empty(n, T, self.vocab_size, dtype=torch.float64)
        prior = self.pi.expand(n, -1)  # p(z_t | x_{<t})
        for t in range(T):
            alpha = prior * self.B[:, tokens[:, t]].T  # p(z_t, x_t | x_{<t})
            alpha = alpha / alpha.sum(-1, keepdim=True)
            prior = alpha @ self.A
            out[:, t] = prior @ self.B
        return out

    def entropy_rate(self, tokens: torch.Tensor) -> float:
        """Mean true negative log-likelihood (nats per token) of the sequences' next tokens."""
        probs = self.next_token_probs(tokens[:, :-1])
        p = probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
        return float(-p.log().mean())


def _check_split(split) -> tuple[float, float, float]:
    if not isinstance(split, Sequence) or isinstance(split, str) or len(split) != 3 \
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in split) \
            or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"split: must be three non-negative fractions summing to 1, got {split!r}")
    return tuple(float(s) for s in split)


def synthetic_lm(n: int = 2048, length: int = 32, vocab_size: int = 256, states: int = 24, seed: int = 0,
                 split: Sequence[float] = (0.9, 0.05, 0.05), transition_concentration: float = 0.05,
                 emission_concentration: float = 0.02, train_size: int | None = None) -> DataSplits:
    """The HMM language of ``seed``, ``n`` sequences of ``length`` tokens.

    Splits are :class:`kdcore.data.TensorSplit` with inputs ``{"input_ids": [n, T]}``
    and shifted targets ``[n, T]``; val and test carry ``posterior`` ``[n, T, V]``
    (the exact next-token law, float32). ``meta`` holds the ``hmm``, and the true
    per-token NLL and perplexity of the test split (``true_nll``, ``true_ppl``:
    what a perfect model scores). ``train_size`` keeps only the first
    ``train_size`` training sequences (few data for a student; val and test unchanged).
    """
    params.positive_int("train_size", train_size, optional=True)
    params.positive_int("n", n)
    params.positive_int("length", length)
    params.positive_int("vocab_size", vocab_size)
    params.positive_int("states", states)
    if vocab_size < 2:
        raise ConfigError(f"vocab_size: must be at least 2, got {vocab_size}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    tc = params.positive("transition_concentration", transition_concentration)
    ec = params.positive("emission_concentration", emission_concentration)
    fractions = _check_split(split)
    hmm = HMM.random(states, vocab_size, seed, tc, ec)
    tokens = hmm.sample(n, length + 1, seed)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    parts = []
    for i, (a, b) in enumerate(cuts):
        if b <= a:
            parts.append(None)
            continue
        post = None if i == 0 else hmm.next_token_probs(inputs[a:b]).float()
        parts.append(TensorSplit({"input_ids": inputs[a:b]}, targets[a:b], post))
    if parts[0] is None:
        raise ConfigError("split: the training split is empty")
    if train_size is not None:
        if train_size > len(parts[0]):
            raise ConfigError(f"train_size: {train_size} is more than the {len(parts[0])} training sequences")
        parts[0] = TensorSplit({"input_ids": inputs[:train_size]}, targets[:train_size], None)
    a, b = cuts[2] if parts[2] is not None else cuts[1] if parts[1] is not None else cuts[0]
    nll = hmm.entropy_rate(tokens[a:b])
    return DataSplits(*parts, num_classes=vocab_size, input_shape=(length,),
                      meta={"hmm": hmm, "true_nll": nll, "true_ppl": float(np.exp(nll))})
