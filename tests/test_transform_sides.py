"""Transforms on the teacher, the student or both, and trainable ones: the chain's
semantics in :class:`kdcore.LogitLoss` ([N, C], [B, T, V], -100, chunks, fused
outputs), the scale of ``pair``, ``set_progress`` from the objective, and the
refusal of a full-distribution transform against a stored teacher."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import kdcore
from kdcore.common.errors import ConfigError
from kdcore.engine.capture import capture
from kdcore.engine.objective import Objective, Term
from kdcore.losses.schedule import Progress
from kdcore.signals.buckets import check_transforms
from kdcore.testing import check_transform

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def kl_rows(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(t) || softmax(s))`` per row, in float64."""
    log_p, log_q = torch.log_softmax(t.double(), -1), torch.log_softmax(s.double(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


class Sharpen:
    """``log p / 2`` on the declared side (values that differ from log-probabilities by a shift)."""

    def __init__(self, side: str):
        self.side = side

    def __call__(self, logp, target=None):
        return logp / 2.0


class RowScale:
    """A coupling transform: the teacher moved halfway to the student, a per-row scale."""

    def pair(self, teacher, student, target=None):
        return (teacher + student) / 2, student, torch.arange(1.0, teacher.shape[0] + 1, dtype=teacher.dtype)

    __call__ = pair  # a transform given as an object must be callable


def data(seed: int = 0, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(*shape, generator=g), 3 * torch.randn(*shape, generator=g)


Y = torch.tensor([1, -100, 0, 4, 2, -100])


@pytest.mark.parametrize("side", ["teacher", "student", "both"])
def test_a_transform_acts_on_the_sides_it_declares(side):
    s, t = data()
    loss = kdcore.create("loss", "kd", temperature=1.0, transforms=[Sharpen(side)])
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    ref_s = ls / 2 if side != "teacher" else s.double()
    ref_t = lt / 2 if side != "student" else lt
    torch.testing.assert_close(loss(s.double(), t.double(), Y), kl_rows(ref_t, ref_s)[Y != -100].mean())


def test_a_teacher_side_transform_leaves_the_student_logits_as_they_are():
    s, t = data()
    loss = kdcore.create("loss", "kd", transforms=["label_smoothing"])
    out_s, _, scale = loss.sides(s, t, Y)
    assert out_s is s and scale is None


def test_a_pair_transform_couples_the_sides_and_its_row_scale_multiplies_the_rows():
    s, t = data(1)
    loss = kdcore.create("loss", "kd", temperature=1.0, transforms=[RowScale()])
    ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    rows = torch.arange(1.0, 7.0, dtype=torch.float64) * kl_rows((lt + ls) / 2, ls)
    torch.testing.assert_close(loss(s.double(), t.double(), Y), rows[Y != -100].mean())


def test_an_unknown_side_is_a_config_error_naming_the_chain_position():
    class Sideways(Sharpen):
        def __repr__(self):
            return "Sideways()"

    with pytest.raises(ConfigError) as info:
        kdcore.create("loss", "kd", transforms=["temperature", Sideways("left")])
    assert str(info.value) == ("transforms[1]: a transform's side must be one of 'teacher', 'student', 'both', "
                               "got 'left' from Sideways()")


def test_a_student_side_transform_applies_to_ce_and_a_ce_term_has_none_by_default():
    s, _ = data(2)
    y = torch.tensor([1, 0, -100, 4, 2, 3])
    sharpened = kdcore.create("loss", "ce", transforms=[Sharpen("student")])(s.double(), None, y)
    by_hand = torch.nn.functional.cross_entropy(torch.log_softmax(s.double(), -1) / 2, y, ignore_index=-100)
    torch.testing.assert_close(sharpened, by_hand)
    plain = kdcore.create("loss", "ce")
    assert plain.transforms == [] and plain.sides(s, None, y)[0] is s


@pytest.mark.parametrize(("spec", "what"), [("label_smoothing", "teacher-side"), ("ctkd", "two-sided")])
def test_a_teacher_transform_on_ce_is_a_config_error_naming_the_key_path(spec, what, tmp_path, capsys):
    conf = runs.teacher_config(1)
    conf["loss"] = [{"name": "ce", "transforms": [spec]}]
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"))
    assert code == 2
    assert runs.one_line(err) == (f"kdcore: error: loss[0].transforms[0]: CrossEntropy does not use the teacher, "
                                  f"so this {what} transform has nothing to act on; give it a student-side "
                                  "transform, or none")


CHAINS = {
    "logit_std": lambda: [{"name": "logit_std"}],
    "student_and_teacher": lambda: [Sharpen("student"), "label_smoothing", {"name": "logit_std", "temperature": 2.0}],
    "ctkd_instance": lambda: [kdcore.create("transform", "ctkd", mode="instance", hidden=4)],
}


def _grads(value, tensors):
    return torch.autograd.grad(value, tensors, allow_unused=True)


@pytest.mark.parametrize("chain", CHAINS, ids=list(CHAINS))
def test_token_level_chunked_and_fused_evaluation_agree_with_flat_rows(chain):
    """[B, T, V] with -100 == the kept rows flat == chunked == fused Outputs(hidden, head),
    values and gradients (hidden states, heads, and the transform's own parameters)."""
    torch.manual_seed(0)
    b, t_len, h, v = 2, 5, 4, 7
    hs = torch.randn(b, t_len, h, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(b, t_len, h, dtype=torch.float64)
    s_head, t_head = nn.Linear(h, v).double(), nn.Linear(h, v).double()
    y = torch.randint(0, v, (b, t_len))
    y[0, 1] = y[1, 4] = -100
    dense = kdcore.create("loss", "kd", temperature=2.0, transforms=CHAINS[chain]()).double()
    dense(s_head(hs), t_head(ht), y)  # materialise lazy parameters
    assert dense.lean_kd_temperature() is None  # the lean kd chunk never runs under a transform
    params = lambda loss: [hs, *s_head.parameters(), *loss.trained_parameters()]  # noqa: E731

    ref = dense(s_head(hs), t_head(ht), y)
    ref_grads = _grads(ref, params(dense))
    keep = y != -100
    flat = dense(s_head(hs)[keep], t_head(ht)[keep], y[keep])
    torch.testing.assert_close(flat, ref)
    for chunk_size in (2, 3):
        chunked = copy.deepcopy(dense)
        chunked.chunk_size = chunk_size
        for s_in, t_in in ((s_head(hs), t_head(ht)),
                           (kdcore.Outputs(hidden=hs, head=s_head), kdcore.Outputs(hidden=ht, head=t_head))):
            value = chunked(s_in, t_in, y)
            torch.testing.assert_close(value, ref)
            for g, r in zip(_grads(value, params(chunked)), ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    assert all(g is not None for g in ref_grads)


@pytest.mark.parametrize("name", kdcore.available("transform"))
def test_every_registered_transform_follows_the_conventions(name):
    from kdcore.testing import testing_params as params_of

    check_transform(kdcore.create("transform", name, **params_of("transform", name)))


def test_the_checks_catch_a_both_side_transform_that_overflows_on_extreme_inputs():
    class Squared:
        side = "both"
        testing_skips = ("normalised",)

        def __call__(self, logp, target=None):
            return torch.where(torch.isfinite(logp), logp * logp.abs(), logp)

    with pytest.raises(AssertionError, match="non-finite|loss value"):
        check_transform(Squared())


def test_the_objective_hands_progress_to_the_transforms_before_each_step():
    ctkd = kdcore.create("transform", "ctkd", epochs=2)
    term = Term("kd", kdcore.create("loss", "kd", transforms=[ctkd]), 1.0)
    objective = Objective([Term("ce", kdcore.create("loss", "ce"), 1.0), term])
    assert objective.followers == [ctkd]
    objective.weights(Progress(epoch=2, step=10, epochs=4, steps_per_epoch=10))
    assert ctkd.strength == pytest.approx(0.5)


def test_a_plain_callable_with_set_progress_in_the_chain_follows_too():
    class Counting(Sharpen):
        seen = []

        def set_progress(self, progress):
            self.seen.append(progress.step)

    follower = Counting("teacher")
    objective = Objective([Term("kd", kdcore.create("loss", "kd", transforms=[follower]), 1.0)])
    objective.weights(Progress(epoch=1, step=3, epochs=1, steps_per_epoch=9))
    assert follower.seen == [3]


# -- a stored teacher ----------------------------------------------------------------------------
def test_check_transforms_names_the_term_and_the_chain_position():
    loss = kdcore.create("loss", "kd", transforms=["label_smoothing", "logit_std"])
    with pytest.raises(ConfigError) as info:
        check_transforms(loss, "loss[1]")
    assert str(info.value) == ("loss[1].transforms[1]: LogitStandardisation(temperature=1, eps=1e-07) needs the "
                               "teacher's full distribution, which a stored top-k teacher lacks (use a teacher "
                               "with source = \"model\")")
    check_transforms(kdcore.create("loss", "kd", transforms=["ctkd", "label_smoothing"]), "loss[1]")


def test_logit_std_against_a_stored_teacher_is_refused_with_exit_2(tmp_path, capsys):
    kdcore.train(runs.teacher_config(1), tmp_path / "teacher", quiet=True)
    conf = runs.student_config(str(tmp_path / "teacher" / "checkpoints" / "best.pt"), epochs=1)
    capture(runs.write(tmp_path / "s.toml", conf), tmp_path / "store", top_k=2, quiet=True)
    conf["teacher"].update(source="store", store=str(tmp_path / "store"))
    conf["loss"][1]["transforms"] = [{"name": "logit_std"}]
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "o"))
    assert code == 2
    assert runs.one_line(err) == ("kdcore: error: loss[1].transforms[0]: LogitStandardisation(temperature=1, "
                                  "eps=1e-07) needs the teacher's full distribution, which a stored top-k teacher "
                                  "lacks (use a teacher with source = \"model\")")
