"""The loss ``uld`` (Universal Logit Distillation) against a float64 numpy
reference written from its definition, its identities, extreme inputs and the
logit-loss conventions, with teacher and student vocabularies of different sizes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.testing import assert_finite_with_grads, check_component, extreme_batches, random_logits
from kdcore_lm.uld import ULD


def reference(student, teacher, target=None, temperature=1.0, top_k=None):
    """ULD from the definition, in float64: per kept position, softmax at T, sort
    decreasing (keep the first top_k), pad the shorter with zeros, L1; mean over kept."""
    zs = np.asarray(student, dtype=np.float64).reshape(-1, student.shape[-1])
    zt = np.asarray(teacher, dtype=np.float64).reshape(-1, teacher.shape[-1])
    keep = np.ones(zs.shape[0], bool) if target is None else np.asarray(target).reshape(-1) != -100
    values = []
    for s_row, t_row in zip(zs[keep], zt[keep]):
        ranked = []
        for z in (s_row, t_row):
            e = np.exp(z / temperature - np.max(z / temperature))
            r = np.sort(e / e.sum())[::-1]
            ranked.append(r if top_k is None else r[:top_k])
        width = max(len(r) for r in ranked)
        q, p = (np.concatenate([r, np.zeros(width - len(r))]) for r in ranked)
        values.append(np.abs(p - q).sum())
    return float(np.mean(values)) if values else 0.0


def uld(student, teacher, target=None, **params):
    return kdcore.create("loss", "uld", **params)(student, teacher, target)


@pytest.mark.parametrize("vs,vt", [(7, 7), (5, 11), (11, 5), (1, 4)])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_matches_the_reference_on_rows(vs, vt, temperature):
    zs, zt = random_logits(6, vs, seed=1), random_logits(6, vt, seed=2)
    y = torch.tensor([0, -100, 0, 0, -100, 0])
    got = uld(zs, zt, y, temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference(zs, zt, y, temperature), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("vs,vt", [(6, 10), (10, 6)])
def test_token_level_with_ignored_positions(vs, vt):
    zs, zt = random_logits(2, 4, vs, seed=3), random_logits(2, 4, vt, seed=4)
    y = torch.tensor([[1, -100, 2, 0], [-100, -100, 3, 1]])
    got = uld(zs, zt, y, temperature=2.0)
    assert got.item() == pytest.approx(reference(zs, zt, y, 2.0), rel=1e-5, abs=1e-6)
    flat = uld(zs.reshape(-1, vs), zt.reshape(-1, vt), y.reshape(-1), temperature=2.0)
    torch.testing.assert_close(got, flat)


def test_without_target_every_position_counts():
    zs, zt = random_logits(3, 5, 8, seed=5), random_logits(3, 5, 12, seed=6)
    assert uld(zs, zt).item() == pytest.approx(reference(zs, zt), rel=1e-5)


def test_ignored_positions_get_zero_gradient_even_when_all_minus_inf():
    zs, zt = random_logits(3, 6, seed=7), random_logits(3, 9, seed=8)
    zs[1], zt[1] = float("-inf"), float("-inf")  # a padded position: no finite logit at all
    assert_finite_with_grads(kdcore.create("loss", "uld"), zs, zt, torch.tensor([0, -100, 2]))


@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_top_k_compares_only_the_k_largest(top_k):
    zs, zt = random_logits(5, 6, seed=9), random_logits(5, 13, seed=10)
    got = uld(zs, zt, top_k=top_k)
    assert got.item() == pytest.approx(reference(zs, zt, top_k=top_k), rel=1e-5, abs=1e-6)
    assert got.item() <= uld(zs, zt).item() + 1e-6  # the dropped ranks only add to the full value


def test_top_k_at_least_the_vocabulary_is_the_full_loss():
    zs, zt = random_logits(4, 6, seed=11), random_logits(4, 9, seed=12)
    torch.testing.assert_close(uld(zs, zt, top_k=9), uld(zs, zt))


def test_zero_when_the_student_is_a_permutation_of_the_teacher():
    zt = random_logits(2, 3, 10, seed=13)
    zs = zt[..., torch.randperm(10, generator=torch.Generator().manual_seed(0))]
    assert not torch.equal(zs, zt)
    assert uld(zs, zt).item() == pytest.approx(0.0, abs=1e-6)


def test_zero_when_the_extra_vocabulary_has_no_mass():
    """A teacher with more columns, all -inf, and the student's probabilities permuted: 0."""
    zs = random_logits(4, 5, seed=14)
    zt = torch.cat([zs.flip(-1), torch.full((4, 3), float("-inf"))], dim=-1)
    assert uld(zs, zt).item() == pytest.approx(0.0, abs=1e-6)


def test_symmetric_when_the_vocabularies_match():
    zs, zt = random_logits(2, 4, 9, seed=15), random_logits(2, 4, 9, seed=16)
    y = torch.tensor([[0, 1, -100, 2], [3, -100, 4, 5]])
    torch.testing.assert_close(uld(zs, zt, y, temperature=2.0), uld(zt, zs, y, temperature=2.0))


@pytest.mark.parametrize("vs,vt", [(8, 8), (4, 16), (16, 4)])
def test_between_zero_and_two(vs, vt):
    """Sharp students against flat and sharp teachers: every row in [0, 2]."""
    zs = random_logits(50, vs, seed=17, scale=20.0)
    zt = random_logits(50, vt, seed=18) * torch.logspace(-2, 1.5, 50)[:, None]
    rows = kdcore.create("loss", "uld").rows(zs, zt)
    assert (rows >= 0).all() and (rows <= 2 + 1e-6).all()


def test_two_when_the_mass_sits_on_different_ranks():
    """Student one-hot, teacher spread evenly over a larger vocabulary: 2 - 2 / V."""
    zs = torch.tensor([[1e4, 0.0, 0.0]])
    zt = torch.zeros(1, 4)
    assert uld(zs, zt).item() == pytest.approx(2 - 2 / 4, abs=1e-6)


def test_gradients_match_finite_differences():
    zs = random_logits(3, 5, seed=19).double().requires_grad_()
    zt = random_logits(3, 8, seed=20).double().requires_grad_()
    loss = kdcore.create("loss", "uld", temperature=1.5)
    assert torch.autograd.gradcheck(lambda s, t: loss(s, t, torch.tensor([0, -100, 1])), (zs, zt))


@settings(max_examples=60, deadline=None)
@given(batch=extreme_batches(), extra=st.integers(-3, 3), temperature=st.sampled_from([0.5, 1.0, 4.0]),
       top_k=st.sampled_from([None, 1, 4]))
def test_finite_values_and_grads_on_extreme_inputs(batch, extra, temperature, top_k):
    """Logits up to 1e30, shared -inf columns, confident teachers; the vocabularies made
    to differ by appending copies of a model's own first columns to one side."""
    zs, zt, y = batch
    if extra > 0:
        zt = torch.cat([zt, zt[:, :extra]], dim=-1)
    elif extra < 0:
        zs = torch.cat([zs, zs[:, :-extra]], dim=-1)
    loss = kdcore.create("loss", "uld", temperature=temperature, top_k=top_k)
    value = assert_finite_with_grads(loss, zs, zt, y)
    assert 0.0 <= value.item() <= 2.0 + 1e-5


def test_follows_the_logit_loss_conventions():
    check_component("loss", "uld")
    check_component("loss", "uld", temperature=2.0, top_k=3)


def test_registered_by_the_lm_plugin():
    from kdcore.plugins import default_registry

    assert default_registry().get("loss", "uld").plugin == "lm"
    assert isinstance(kdcore.create("loss", "uld"), ULD)


@pytest.mark.parametrize("params,message", [
    ({"temperature": 0.0}, "temperature: must be > 0, got 0.0"),
    ({"top_k": 0}, "top_k: must be a positive integer, got 0"),
    ({"top_k": 2.5}, "top_k: must be a positive integer, got 2.5"),
])
def test_bad_parameters_name_the_parameter(params, message):
    with pytest.raises(kdcore.ConfigError) as err:
        kdcore.create("loss", "uld", **params)
    assert str(err.value) == message


def test_positions_that_do_not_match_are_refused():
    """Sequences of different lengths are not aligned here: the message says to align them."""
    with pytest.raises(ValueError) as err:
        uld(torch.zeros(2, 5, 7), torch.zeros(2, 4, 9), torch.zeros(2, 5, dtype=torch.long))
    assert str(err.value) == ("uld: teacher logits (2, 4, 9) and student logits (2, 5, 7) cover different "
                              "positions (all dims but the vocabulary must match); align the two sequences "
                              "by position in the data")
    assert "\n" not in str(err.value)


def test_target_that_does_not_match_is_refused():
    with pytest.raises(ValueError, match=r"^uld: target shape \(2, 4\) does not match logits \(2, 5, 7\) "
                                         r"\(expected \(2, 5\)\)$"):
        uld(torch.zeros(2, 5, 7), torch.zeros(2, 5, 9), torch.zeros(2, 4, dtype=torch.long))
