"""synthetic_lm: the HMM language, its exact next-token law (forward algorithm) and the metrics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import kdcore
from kdcore_lm.metrics import evaluate_lm, kl_to_truth
from kdcore_lm.synthetic import HMM, synthetic_lm


def brute_force_next(hmm: HMM, tokens: list[int]) -> torch.Tensor:
    """p(x_{T} | x_{<T}) by summing over every hidden path (float64)."""
    S, V = hmm.states, hmm.vocab_size
    joint = torch.zeros(V, dtype=torch.float64)
    for path in itertools.product(range(S), repeat=len(tokens) + 1):
        p = hmm.pi[path[0]]
        for t, x in enumerate(tokens):
            p = p * hmm.B[path[t], x] * hmm.A[path[t], path[t + 1]]
        joint += p * hmm.B[path[-1]]
    return joint / joint.sum()


def test_forward_algorithm_equals_brute_force():
    hmm = HMM.random(3, 5, seed=4, transition_concentration=0.5, emission_concentration=0.5)
    tokens = hmm.sample(4, 4, seed=1)
    probs = hmm.next_token_probs(tokens)
    for i in range(4):
        for t in range(4):
            torch.testing.assert_close(probs[i, t], brute_force_next(hmm, tokens[i, :t + 1].tolist()))


def test_splits_targets_and_truth():
    d = synthetic_lm(n=200, length=12, vocab_size=40, states=6, seed=3)
    assert d.num_classes == 40 and d.input_shape == (12,)
    assert [len(s) for s in (d.train, d.val, d.test)] == [180, 10, 10]
    for s in (d.train, d.val, d.test):
        ids = s.inputs["input_ids"]
        assert ids.shape == s.targets.shape and ids.dtype == torch.long
        assert torch.equal(s.targets[:, :-1], ids[:, 1:])  # target at t is the token at t + 1
        assert (s.targets >= 0).all()  # every position is kept
    assert d.train.posterior is None
    post = d.test.posterior
    assert post.shape == (10, 12, 40) and post.dtype == torch.float32
    torch.testing.assert_close(post.sum(-1), torch.ones(10, 12))
    assert 0 < d.meta["true_nll"] < math.log(40) and d.meta["true_ppl"] == pytest.approx(math.exp(d.meta["true_nll"]))


def test_seeded_and_registered():
    a = kdcore.create("dataset", "synthetic_lm", n=50, length=8, vocab_size=30, states=4, seed=1)
    b = synthetic_lm(n=50, length=8, vocab_size=30, states=4, seed=1)
    c = synthetic_lm(n=50, length=8, vocab_size=30, states=4, seed=2)
    assert torch.equal(a.train.inputs["input_ids"], b.train.inputs["input_ids"])
    assert torch.equal(a.val.posterior, b.val.posterior)
    assert not torch.equal(a.train.inputs["input_ids"], c.train.inputs["input_ids"])
    with pytest.raises(kdcore.ConfigError, match="split"):
        synthetic_lm(split=[0.5, 0.5])
    with pytest.raises(kdcore.ConfigError, match="vocab_size"):
        kdcore.create("dataset", "synthetic_lm", vocab_size=0)


def test_default_generation_is_fast():
    import time

    t0 = time.perf_counter()
    d = synthetic_lm()
    assert time.perf_counter() - t0 < 5.0
    assert d.val.posterior.shape == (102, 32, 256)


class Oracle(torch.nn.Module):
    """Returns the exact law's log-probabilities as logits (looked up by row)."""

    def __init__(self, split, temper=1.0):
        super().__init__()
        self.table = {tuple(r.tolist()): p for r, p in zip(split.inputs["input_ids"], split.posterior)}
        self.temper = temper

    def forward(self, input_ids):
        return torch.stack([self.table[tuple(r.tolist())].clamp(min=1e-30).log() * self.temper for r in input_ids])


def test_metrics_are_zero_for_the_truth_and_positive_otherwise():
    d = synthetic_lm(n=100, length=10, vocab_size=30, states=5, seed=0)
    oracle = Oracle(d.test)
    m = evaluate_lm(oracle, d.test, teacher=oracle, batch_size=3)
    assert m["kl_to_truth"] == pytest.approx(0.0, abs=1e-5)
    assert m["agreement"] == 1.0 and m["teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["ppl"] == pytest.approx(math.exp(m["nll"]))
    flat = Oracle(d.test, temper=0.5)
    assert kl_to_truth(flat, d.test) > 0.01
    with pytest.raises(ValueError, match="posterior"):
        kl_to_truth(oracle, d.train)
