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
                 emission_concentration: float = 0.02, train_size: int | None = None,
                 split_tokens: int = 0) -> DataSplits:
    """The HMM language of ``seed``, ``n`` sequences of ``length`` tokens.

    Splits are :class:`kdcore.data.TensorSplit` with inputs ``{"input_ids": [n, T]}``
    and shifted targets ``[n, T]``; val and test carry ``posterior`` ``[n, T, V]``
    (the exact next-token law, float32). ``meta`` holds the ``hmm``, and the true
    per-token NLL and perplexity of the test split (``true_nll``, ``true_ppl``:
    what a perfect model scores). ``train_size`` keeps only the first
    ``train_size`` training sequences (few data for a student; val and test unchanged).

    ``split_tokens = S > 0``: the same language in the student's tokenisation of
    :class:`SplitTokens` (tokens ``0 .. S - 1`` written as two pieces each; ``num_classes``
    is the student's vocabulary), ``length`` student tokens per sequence, with the exact
    law of that tokenisation as ``posterior`` and ``meta["split"]`` the
    :class:`SplitTokens` (cross-tokenizer distillation, docs/lm.md).
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
    two_ways = split_tokens_of(vocab_size, split_tokens)
    hmm = HMM.random(states, vocab_size, seed, tc, ec)
    tokens = hmm.sample(n, length + 1, seed)
    if split_tokens:  # the student's pieces, cut to length + 1 (never fewer than the tokens)
        tokens = torch.tensor([two_ways.to_student(row.tolist())[:length + 1] for row in tokens], dtype=torch.long)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    parts = []
    for i, (a, b) in enumerate(cuts):
        if b <= a:
            parts.append(None)
            continue
        post = None if i == 0 else _posterior(hmm, two_ways, inputs[a:b]).float()
        parts.append(TensorSplit({"input_ids": inputs[a:b]}, targets[a:b], post))
    if parts[0] is None:
        raise ConfigError("split: the training split is empty")
    if train_size is not None:
        if train_size > len(parts[0]):
            raise ConfigError(f"train_size: {train_size} is more than the {len(parts[0])} training sequences")
        parts[0] = TensorSplit({"input_ids": inputs[:train_size]}, targets[:train_size], None)
    a, b = cuts[2] if parts[2] is not None else cuts[1] if parts[1] is not None else cuts[0]
    if split_tokens:
        law = student_law(hmm, two_ways, inputs[a:b]).gather(-1, targets[a:b].unsqueeze(-1))
        nll = float(-law.log().mean())
    else:
        nll = hmm.entropy_rate(tokens[a:b])
    meta = {"hmm": hmm, "true_nll": nll, "true_ppl": float(np.exp(nll))}
    if split_tokens:
        meta["split"] = two_ways
    return DataSplits(*parts, num_classes=two_ways.student_size if split_tokens else vocab_size,
                      input_shape=(length,), meta=meta)


def _posterior(hmm: HMM, split: SplitTokens, inputs: torch.Tensor) -> torch.Tensor:
    """The exact next-token law at every position of ``inputs`` in their tokenisation."""
    return student_law(hmm, split, inputs) if split.split_tokens else hmm.next_token_probs(inputs)


#: the characters the two tokenisations of ``synthetic_lm`` write: a whole token, a split
#: token's head (shared by two tokens) and its tail (one of two)
_WHOLE, _HEAD, _TAIL = 0x4E00, 0x3400, 0x3100


@attrs.frozen
class SplitTokens:
    """``synthetic_lm`` tokenised two ways: the language's own tokens (the teacher's
    tokenisation, ``vocab_size`` ids) and a finer one (the student's) in which each of the
    tokens ``0 .. split_tokens - 1`` is written as two pieces, a head shared by tokens
    ``2h`` and ``2h + 1`` and one of two tails. Student ids: the whole tokens
    ``split_tokens ..`` first (``k - split_tokens``), then the heads, then the tails.
    As text, a whole token is one character, a split token a head and a tail character."""

    vocab_size: int
    split_tokens: int

    @property
    def heads(self) -> int:
        return (self.split_tokens + 1) // 2

    @property
    def student_size(self) -> int:
        return self.vocab_size - self.split_tokens + self.heads + min(self.split_tokens, 2)

    def head(self, k: int) -> int:
        return self.vocab_size - self.split_tokens + k // 2

    def tail(self, k: int) -> int:
        return self.vocab_size - self.split_tokens + self.heads + k % 2

    def teacher_strings(self) -> list[str]:
        return [chr(_HEAD + k // 2) + chr(_TAIL + k % 2) if k < self.split_tokens else chr(_WHOLE + k)
                for k in range(self.vocab_size)]

    def student_strings(self) -> list[str]:
        return ([chr(_WHOLE + k) for k in range(self.split_tokens, self.vocab_size)]
                + [chr(_HEAD + h) for h in range(self.heads)]
                + [chr(_TAIL + t) for t in range(min(self.split_tokens, 2))])

    def to_student(self, tokens: Sequence[int]) -> list[int]:
        """The student's ids of the language's ``tokens``."""
        out = []
        for k in tokens:
            out += [self.head(k), self.tail(k)] if k < self.split_tokens else [k - self.split_tokens]
        return out

    def maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``first [V, Vs]``: token -> its first student piece; ``tails [V, Vs]``: split token ->
        its tail; ``members [heads, V]``: the tokens each head begins (float64 0/1)."""
        V, S, Vs = self.vocab_size, self.split_tokens, self.student_size
        first, tails = torch.zeros(V, Vs, dtype=torch.float64), torch.zeros(V, Vs, dtype=torch.float64)
        members = torch.zeros(max(self.heads, 1), V, dtype=torch.float64)
        for k in range(V):
            first[k, self.head(k) if k < S else k - S] = 1.0
            if k < S:
                tails[k, self.tail(k)] = 1.0
                members[k // 2, k] = 1.0
        return first, tails, members

    def parse(self, student_ids: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
        """For a student sequence: the language's tokens it spells (a final lone head spells
        none), and per student position the index of the token it belongs to and its head
        number (-1 where the position is not a head)."""
        base, heads = self.vocab_size - self.split_tokens, self.heads
        tokens, owner, head = [], [], []
        pending = None
        for s in student_ids:
            s = int(s)
            if pending is not None:
                if not base + heads <= s < base + heads + 2:
                    raise ValueError(f"student id {s} follows a head but is no tail")
                tokens.append(2 * pending + s - base - heads)
                owner.append(len(tokens) - 1)
                head.append(-1)
                pending = None
            elif s < base:
                tokens.append(s + self.split_tokens)
                owner.append(len(tokens) - 1)
                head.append(-1)
            elif s < base + heads:
                pending = s - base
                owner.append(len(tokens))
                head.append(pending)
            else:
                raise ValueError(f"student id {s} is a tail without a head")
        return tokens, owner, head


def split_vocabulary(side: str = "teacher", vocab_size: int = 256, split_tokens: int = 0):
    """The tokenizer of one side of :class:`SplitTokens` as a
    :class:`kdcore_lm.align.CharVocabulary` (built here: nothing is downloaded)."""
    from kdcore_lm.align import CharVocabulary

    tokens = split_tokens_of(vocab_size, split_tokens)
    if side not in ("teacher", "student"):
        raise ConfigError(f"side: must be \"teacher\" or \"student\", got {side!r}")
    return CharVocabulary(tokens.teacher_strings() if side == "teacher" else tokens.student_strings())


def split_tokens_of(vocab_size: int, split_tokens: int) -> SplitTokens:
    """:class:`SplitTokens` with its parameters checked (``0 <= split_tokens <= vocab_size``)."""
    params.positive_int("vocab_size", vocab_size)
    if isinstance(split_tokens, bool) or not isinstance(split_tokens, int) or not 0 <= split_tokens <= vocab_size:
        raise ConfigError(f"split_tokens: must be an integer from 0 to vocab_size ({vocab_size}), got {split_tokens!r}")
    return SplitTokens(vocab_size, split_tokens)


def token_laws(hmm: HMM, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, T + 1, V]``: at index ``j`` the law of token ``j`` given tokens ``< j`` (index 0:
    the first token's law)."""
    first = (hmm.pi @ hmm.B).expand(tokens.shape[0], 1, -1)
    if tokens.shape[1] == 0:
        return first.clone()
    return torch.cat([first, hmm.next_token_probs(tokens)], 1)


def student_law(hmm: HMM, split: SplitTokens, student_ids: torch.Tensor) -> torch.Tensor:
    """The exact next-token law of the student's tokenisation at every position of
    ``student_ids`` ``[n, T]``: ``[n, T, Vs]`` (float64). After a whole token or a tail the
    next token is the first piece of the language's next token (``p_next @ first``);
    after a head it is the tail of one of the head's two tokens (their probabilities
    renormalised)."""
    parsed = [split.parse(row.tolist()) for row in student_ids]
    width = max(max((len(t) for t, _, _ in parsed), default=0), 1)
    tokens = torch.zeros(len(parsed), width, dtype=torch.long)
    for r, (toks, _, _) in enumerate(parsed):
        tokens[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
    laws = token_laws(hmm, tokens)  # [n, width + 1, V]
    owner = torch.tensor([o for _, o, _ in parsed], dtype=torch.long)
    head = torch.tensor([h for _, _, h in parsed], dtype=torch.long)
    first, tails, members = split.maps()
    is_head = head >= 0
    at = torch.where(is_head, owner, owner + 1)
    p = laws.gather(1, at.unsqueeze(-1).expand(-1, -1, laws.shape[-1]))  # [n, T, V]
    mid = p * members[head.clamp(min=0)]
    mid = (mid @ tails) / mid.sum(-1, keepdim=True).clamp(min=1e-300)
    return torch.where(is_head.unsqueeze(-1), mid, p @ first)


class Law(torch.nn.Module):
    """The exact next-token law of ``synthetic_lm`` as a model (backbone ``synthetic_lm_law``):
    the logits are ``log p*`` (floored at ``1e-30``) of the language's own tokens, or of the
    student's tokenisation where ``split_tokens > 0``. A teacher that knows the truth; it
    has no weights (``pretrained``: a run needs no checkpoint for it)."""

    pretrained = True

    def __init__(self, hmm: HMM, split: SplitTokens | None):
        super().__init__()
        self.hmm, self.split = hmm, split
        self.register_buffer("anchor", torch.zeros(0))  # follows .to(device): the outputs' device

    def forward(self, input_ids: torch.Tensor, attention_mask=None, position_ids=None) -> torch.Tensor:
        ids = input_ids.cpu()
        if self.split is None:
            probs = token_laws(self.hmm, ids)[:, 1:]
        else:
            probs = student_law(self.hmm, self.split, ids)
        return probs.clamp(min=1e-30).log().float().to(self.anchor.device)


def synthetic_lm_law(num_classes: int | None = None, *, vocab_size: int = 256, states: int = 24, seed: int = 0,
                     transition_concentration: float = 0.05, emission_concentration: float = 0.02,
                     split_tokens: int = 0) -> Law:
    """Backbone ``synthetic_lm_law``: :class:`Law` of the language ``synthetic_lm`` builds
    with the same parameters (its tokens, or the student's tokenisation with ``split_tokens``)."""
    split = split_tokens_of(vocab_size, split_tokens)
    width = split.student_size if split_tokens else vocab_size
    if num_classes is not None and num_classes != width:
        raise ConfigError(f"num_classes: the law has {width} tokens but the data {num_classes}; give the "
                          "same vocab_size and split_tokens as the dataset")
    hmm = HMM.random(params.positive_int("states", states), vocab_size, seed,
                     params.positive("transition_concentration", transition_concentration),
                     params.positive("emission_concentration", emission_concentration))
    return Law(hmm, split if split_tokens else None)
