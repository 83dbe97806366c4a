"""Cross-tokenizer alignment and projection (kdcore_lm.align), the two tokenisations of
synthetic_lm and their exact laws (kdcore_lm.synthetic), against hand-written expectations
and float64 references computed here by brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore_lm.align import CharVocabulary, Projection, align
from kdcore_lm.synthetic import HMM, SplitTokens, student_law, synthetic_lm


def aligned(teacher_strings, student_strings, text, match="prefix"):
    t, s = CharVocabulary(teacher_strings), CharVocabulary(student_strings)
    projection = Projection(t, s, match)
    s_ids, s_spans = s.encode(text)
    _, t_spans = t.encode(text)
    return align(s_spans, s_ids, t_spans, projection), projection


def test_char_vocabulary_takes_the_longest_token_and_skips_unknown_characters():
    v = CharVocabulary(["x", "xy", "z"])
    assert v.encode("xyxq z") == ([1, 0, 2], [(0, 2), (2, 3), (5, 6)])
    assert v.decode([1, 2, 0]) == ("xyzx", [(0, 2), (2, 3), (3, 4)])


def test_coinciding_boundaries_map_to_the_teacher_position_before_the_next_token():
    """Teacher "xy" | "z" | "x", student x | y | z | x: the student's first position sits
    inside the teacher's first token, which no teacher position predicts."""
    pairs, projection = aligned(["", "xy", "x", "z"], ["x", "y", "z"], "xyzx")
    assert projection.nodes == {(): 0, (0,): 1}
    assert pairs == [(-1, -1), (0, 0), (1, 0), (2, 0)]


def test_a_student_position_inside_a_teacher_token_gets_the_pieces_it_has_seen():
    pairs, _ = aligned(["", "xy", "x", "z"], ["x", "y", "z"], "zxy")
    assert pairs == [(0, 0), (0, 1), (1, 0)]


def test_a_student_token_across_a_teacher_boundary_is_unserved():
    """Teacher "xy" | "zw", student x | "yz" | w: "yz" straddles the teacher's boundary."""
    pairs, _ = aligned(["xy", "zw"], ["x", "yz", "w"], "xyzw")
    assert pairs == [(-1, -1), (-1, -1), (1, 0)]


def test_exact_match_serves_coinciding_boundaries_only():
    pairs, projection = aligned(["", "xy", "x", "z"], ["x", "y", "z"], "zxy", match="exact")
    assert pairs == [(0, 0), (-1, -1), (1, 0)]
    assert projection.nodes == {(): 0}


def reference_projection(teacher_strings, student_strings, p, seen, match):
    """Float64 reference: the teacher's probability of each token moved to the student token
    that follows the ``seen`` pieces in the token's text (prefix), or to the identical
    student token (exact); then renormalised."""
    out = torch.zeros(len(student_strings), dtype=torch.float64)
    s = CharVocabulary(student_strings)
    for w, text in enumerate(teacher_strings):
        if not text:
            continue
        if match == "exact":
            if text in student_strings and not seen:
                out[student_strings.index(text)] += p[w]
            continue
        ids, spans = s.encode(text)
        if sum(e - a for a, e in spans) == len(text) and len(ids) > len(seen) and tuple(ids[:len(seen)]) == seen:
            out[ids[len(seen)]] += p[w]
    return out / out.sum()


@pytest.mark.parametrize("match", ["prefix", "exact"])
def test_projection_matches_a_float64_reference(match):
    """Merging ("xy", "xz" and "x" all start with x), splitting (inside "xy"), a special
    token and a token the student cannot spell ("q"): their mass is dropped."""
    teacher = ["", "xy", "xz", "x", "z", "q", "zz"]
    student = ["x", "y", "z", "zz"]
    p = torch.softmax(torch.randn(7, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 0)
    projection = Projection(CharVocabulary(teacher), CharVocabulary(student), match)
    for seen in [(), (0,), (2,)]:
        node = projection.node(seen)
        expected = reference_projection(teacher, student, p, seen, match)
        if node < 0:
            assert match == "exact" and seen or seen == (2,)  # "z" ends every token it begins
            continue
        got = projection.apply(p[None], torch.tensor([node]))[0]
        torch.testing.assert_close(got / got.sum(), expected)
    expected_root = {"prefix": [p[1] + p[2] + p[3], 0, p[4], p[6]], "exact": [p[3], 0, p[4], p[6]]}[match]
    root = projection.apply(p[None], torch.tensor([0]))[0]
    torch.testing.assert_close(root, torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in expected_root]))


@settings(max_examples=40, deadline=None)
@given(scale=st.sampled_from([1.0, 30.0, 1e4, 1e30]), seed=st.integers(0, 2**16))
def test_projected_probabilities_sum_to_at_most_one_and_stay_finite(scale, seed):
    teacher = ["", "xy", "xz", "x", "z", "q", "zz"]
    student = ["x", "y", "z", "zz"]
    projection = Projection(CharVocabulary(teacher), CharVocabulary(student))
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(seed)) * scale
    probs = torch.softmax(logits, -1)
    out = projection.apply(probs, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.isfinite(out).all()
    assert (out.sum(-1) <= 1 + 1e-6).all() and (out >= 0).all()


# -- synthetic_lm tokenised two ways ---------------------------------------------------------------

def brute_force_student_law(hmm: HMM, split: SplitTokens, length: int):
    """Float64 reference, independent of the forward algorithm: every sequence of ``length``
    tokens with its probability summed over every hidden path, tokenised the student's way;
    ``P(next piece | student prefix)`` by counting. Returns {student prefix: law}."""
    V, S = hmm.vocab_size, hmm.states
    joint: dict[tuple[int, ...], float] = {}
    for xs in itertools.product(range(V), repeat=length):
        total = 0.0
        for zs in itertools.product(range(S), repeat=length):
            p = float(hmm.pi[zs[0]])
            for t in range(length):
                p *= float(hmm.B[zs[t], xs[t]]) * (float(hmm.A[zs[t], zs[t + 1]]) if t + 1 < length else 1.0)
            total += p
        pieces = tuple(split.to_student(xs))[:length]  # the first `length` pieces are determined
        joint[pieces] = joint.get(pieces, 0.0) + total
    laws = {}
    for pieces, p in joint.items():
        for i in range(1, length):
            law = laws.setdefault(pieces[:i], torch.zeros(split.student_size, dtype=torch.float64))
            law[pieces[i]] += p
    return {k: v / v.sum() for k, v in laws.items()}


def test_student_law_equals_brute_force_enumeration():
    hmm = HMM.random(2, 3, seed=5, transition_concentration=0.5, emission_concentration=0.5)
    split = SplitTokens(3, 2)  # tokens 0 and 1 share a head; token 2 stays whole
    reference = brute_force_student_law(hmm, split, 4)
    prefixes = sorted(k for k in reference if len(k) == 3)
    ids = torch.tensor(prefixes)
    law = student_law(hmm, split, ids)
    for r, prefix in enumerate(prefixes):
        for i in range(3):
            torch.testing.assert_close(law[r, i], reference[prefix[:i + 1]], rtol=1e-9, atol=1e-12)


def test_split_tokens_keep_the_language_and_change_its_tokens():
    plain = synthetic_lm(n=40, length=10, vocab_size=12, states=4, seed=3)
    two = synthetic_lm(n=40, length=10, vocab_size=12, states=4, seed=3, split_tokens=4)
    split = two.meta["split"]
    assert two.num_classes == split.student_size == 12 - 4 + 2 + 2
    assert two.train.inputs["input_ids"].shape == (36, 10)
    tokens = plain.meta["hmm"].sample(40, 11, 3)
    first = torch.tensor(split.to_student(tokens[0].tolist())[:11])
    torch.testing.assert_close(two.train.inputs["input_ids"][0], first[:-1])
    torch.testing.assert_close(two.train.targets[0], first[1:])
    post = two.test.posterior.double()
    torch.testing.assert_close(post.sum(-1), torch.ones(post.shape[:-1], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("params,message", [
    ({"split_tokens": 13}, "data.split_tokens: must be an integer from 0 to vocab_size (12), got 13"),
    ({"split_tokens": -1}, "data.split_tokens: must be an integer from 0 to vocab_size (12), got -1"),
])
def test_bad_split_tokens_name_the_key(params, message):
    from kdcore.engine.models import build_data
    from kdcore.config import from_dict

    conf = from_dict({"data": {"name": "synthetic_lm", "vocab_size": 12, **params},
                      "student": {"backbone": "synthetic_lm_law", "vocab_size": 12},
                      "optim": {"name": "sgd", "lr": 0.1}, "loss": [{"name": "ce"}]})
    with pytest.raises(kdcore.ConfigError) as err:
        build_data(conf, kdcore.plugins.default_registry())
    assert str(err.value) == message


def test_spread_gives_the_unplaced_mass_to_the_tokens_no_teacher_token_reaches():
    """Exact match: "xy" has no student token of its text; with unplaced = "spread" its
    probability goes evenly to y and w (the student tokens nothing reaches at a boundary);
    inside a token (node 1, prefix match) nothing is spread."""
    teacher, student = ["", "xy", "x", "z"], ["x", "y", "z", "w", ""]
    p = torch.tensor([[0.1, 0.4, 0.3, 0.2]], dtype=torch.float64)
    exact = Projection(CharVocabulary(teacher), CharVocabulary(student), "exact")
    assert exact.orphans.tolist() == [1, 3]
    got = exact.apply(p, torch.tensor([0]), "spread")[0]
    torch.testing.assert_close(got, torch.tensor([0.3, 0.25, 0.2, 0.25, 0.0], dtype=torch.float64))
    prefix = Projection(CharVocabulary(teacher), CharVocabulary(student), "prefix")
    assert prefix.orphans.tolist() == [1, 3]
    inside = prefix.apply(p, torch.tensor([1]), "spread")[0]
    torch.testing.assert_close(inside, torch.tensor([0.0, 0.4, 0.0, 0.0, 0.0], dtype=torch.float64))
