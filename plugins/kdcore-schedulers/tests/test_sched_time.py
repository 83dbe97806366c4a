"""Time schedules: values at known points, registry names, parameter errors."""

import math

import pytest

import kdcore
from kdcore.losses.schedule import Progress, TimeSchedule

SPE = 10  # steps per epoch


def at(epoch: int, step_in_epoch: int = 0, epochs: int = 100) -> Progress:
    return Progress(epoch=epoch, step=(epoch - 1) * SPE + step_in_epoch, epochs=epochs, steps_per_epoch=SPE)


def make(name, **kw):
    return kdcore.create("scheduler", name, **kw)


def test_registered_and_time_schedules():
    names = kdcore.available("scheduler")
    for n in ["cosine", "step", "switch", "distill_decay", "crossbatch", "mgda", "pcgrad"]:
        assert n in names
    for n, kw in [("cosine", {}), ("step", {}), ("switch", {"epoch": 3}),
                  ("distill_decay", {"role": "kd"})]:
        s = make(n, **kw)
        assert isinstance(s, TimeSchedule) and callable(s)
        assert repr(s).startswith(type(s).__name__ + "(")


def test_cosine_values():
    s = make("cosine", start=1.0, end=0.1)
    assert s(at(1)) == pytest.approx(1.0)
    total = 100 * SPE
    for step in [0, 1, 250, 500, 999]:
        p = Progress(epoch=step // SPE + 1, step=step, epochs=100, steps_per_epoch=SPE)
        want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total))
        assert s(p) == pytest.approx(want, abs=1e-12)
    assert s(at(51)) == pytest.approx(0.55)
    short = make("cosine", start=0.0, end=2.0, epochs=10)
    assert short(at(6)) == pytest.approx(1.0)
    assert short(at(11)) == pytest.approx(2.0) and short(at(90)) == pytest.approx(2.0)


def test_step_values():
    s = make("step", start=1.0, end=0.0, milestones=[10, 20, 30, 40])
    assert [s(at(e)) for e in (1, 10, 11, 20, 21, 31, 40, 41, 100)] == \
        pytest.approx([1, 1, 0.75, 0.75, 0.5, 0.25, 0.25, 0.0, 0.0])
    one = make("step", start=0.2, end=3.0, milestones=[5])
    assert one(at(5, 9)) == 0.2 and one(at(6)) == 3.0


def test_switch_tand_recipe():
    kd = make("switch", epoch=50, before=1, after=0)
    tand = make("switch", epoch=50, before=0, after=1)
    for e, want in [(1, 1.0), (50, 1.0), (51, 0.0), (100, 0.0)]:
        assert kd(at(e, SPE - 1)) == want
        assert tand(at(e, SPE - 1)) == 1.0 - want


def test_distill_decay_roles():
    kd, ce = make("distill_decay", role="kd"), make("distill_decay", role="ce")
    reg = make("distill_decay", role="reg", beta=0.3)
    total = 100 * SPE
    for step in [0, 1, 100, 250, 499, 500, 501, 800, 999]:
        p = Progress(epoch=step // SPE + 1, step=step, epochs=100, steps_per_epoch=SPE)
        f = step / total
        alpha = 0.9 * (1 - f / 0.5) if f < 0.5 else 0.0
        assert kd(p) == pytest.approx(alpha, abs=1e-12)
        assert ce(p) == pytest.approx(1 - alpha, abs=1e-12)
        assert reg(p) == (0.3 if f >= 0.5 else 0.0)
    assert kd(at(1)) == pytest.approx(0.9) and ce(at(1)) == pytest.approx(0.1)
    assert make("distill_decay", role="reg")(at(99)) == 1.0
    early = make("distill_decay", role="kd", start=0.5, midpoint=0.25)
    assert early(at(13)) == pytest.approx(0.5 * (1 - 0.12 / 0.25)) and early(at(30)) == 0.0


@pytest.mark.parametrize("name, kw, key", [
    ("cosine", {"epochs": 0}, "epochs"),
    ("step", {"milestones": [20, 10]}, "milestones"),
    ("step", {"milestones": []}, "milestones"),
    ("switch", {"epoch": 0}, "epoch"),
    ("switch", {"epoch": 5, "after": "x"}, "after"),
    ("distill_decay", {"role": "kl"}, "role"),
    ("distill_decay", {"role": "kd", "beta": 0.1}, "beta"),
    ("distill_decay", {"role": "kd", "midpoint": 0}, "midpoint"),
    ("distill_decay", {"role": "ce", "start": 1.5}, "start"),
])
def test_bad_parameters(name, kw, key):
    with pytest.raises(kdcore.ConfigError, match=key):
        make(name, **kw)
