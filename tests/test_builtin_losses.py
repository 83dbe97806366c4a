"""The built-in logit losses ``ce``, ``kd`` and ``rkd`` (methods.md "Losses"), built
through ``kdcore.create``, against independent float64 references written here.

References follow the formulas of methods.md directly:

- ``ce``: ``-log q_y`` (label smoothing ``eps``: ``(1 - eps) (-log q_y) + eps/C sum_k -log q_k``);
- ``kd``: ``T^2 KL(p^T || q^T)``, ``p^T = softmax(z_t / T)``, ``q^T = softmax(z_s / T)``;
- ``rkd``: ``T^2 KL(q^T || p^T)``;

with the mean over rows whose target is not -100. They use a log-softmax written
out with a max shift in float64, never ``kdcore.losses.functional``. Reference gradients
come from autograd through those float64 formulas. Every test runs with both of
``kd_rows``'s paths (the fused function and the composite of small inputs).
"""

from __future__ import annotations

import math

import pytest
import torch

import kdcore
from kdcore.losses import functional

IGNORE = -100
NEG_INF = float("-inf")
TEMPERATURES = [0.5, 1.0, 2.0, 4.0, 10.0]


@pytest.fixture(autouse=True, params=["fused", "composite"])
def kd_path(request, monkeypatch):
    """``kd_rows`` through its fused function, or through its composite, whatever the size."""
    monkeypatch.setattr(functional, "COMPOSITE_MAX_ELEMENTS", -1 if request.param == "fused" else 1 << 62)
    return request.param


# ----------------------------------------------------------------- references

def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the last dim, written out with a max shift."""
    z = z.double()
    m = z.max(dim=-1, keepdim=True).values.detach()
    return z - m - torch.log(torch.exp(z - m).sum(dim=-1, keepdim=True))


def ref_kl(p_logp: torch.Tensor, q_logp: torch.Tensor) -> torch.Tensor:
    """``sum_k p_k (log p_k - log q_k)`` per row (finite inputs only)."""
    return (p_logp.exp() * (p_logp - q_logp)).sum(dim=-1)


def ref_mean(values: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Mean over rows whose target is not -100 (0 when none is kept)."""
    if target is None:
        return values.mean()
    kept = [values[i] for i in range(values.shape[0]) if int(target[i]) != IGNORE]
    if not kept:
        return values.sum() * 0.0
    return torch.stack(kept).mean()


def ref_ce(s, t, y, label_smoothing=0.0):
    c = s.shape[-1]
    s, y = s.reshape(-1, c), y.reshape(-1)
    logq = ref_log_softmax(s)
    rows = []
    for i in range(s.shape[0]):
        label = int(y[i]) if int(y[i]) != IGNORE else 0
        nll = -logq[i, label]
        smooth = -logq[i].sum() / c
        rows.append((1 - label_smoothing) * nll + label_smoothing * smooth)
    return ref_mean(torch.stack(rows), y)


def ref_kd(s, t, y, temperature):
    c = s.shape[-1]
    p = ref_log_softmax(t.reshape(-1, c).double() / temperature)
    q = ref_log_softmax(s.reshape(-1, c).double() / temperature)
    return ref_mean(temperature ** 2 * ref_kl(p, q), None if y is None else y.reshape(-1))


def ref_rkd(s, t, y, temperature):
    c = s.shape[-1]
    p = ref_log_softmax(t.reshape(-1, c).double() / temperature)
    q = ref_log_softmax(s.reshape(-1, c).double() / temperature)
    return ref_mean(temperature ** 2 * ref_kl(q, p), None if y is None else y.reshape(-1))


REFS = {"ce": lambda s, t, y, T: ref_ce(s, t, y), "kd": ref_kd, "rkd": ref_rkd}


def make(name: str, temperature: float, **extra):
    if name == "ce":
        return kdcore.create("loss", "ce", **extra)
    return kdcore.create("loss", name, temperature=temperature, **extra)


# ----------------------------------------------------------------- helpers

def inputs(shape, seed, scale=3.0, ignore_frac=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(*shape, generator=g)).to(dtype)
    t = (scale * torch.randn(*shape, generator=g)).to(dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore_frac:
        y = torch.where(torch.rand(shape[:-1], generator=g) < ignore_frac, torch.full_like(y, IGNORE), y)
    return s, t, y


def run_loss(loss, s, t, y, teacher_grad=True):
    """Value and input gradients of ``loss`` on fresh leaf copies."""
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(teacher_grad)
    value = loss(s, t, y)
    value.backward()
    return value, s.grad, t.grad


def run_ref(ref, s, t, y):
    s = s.detach().double().requires_grad_(True)
    t = t.detach().double().requires_grad_(True)
    value = ref(s, t, y)
    value.backward()
    return value, s.grad, t.grad


def assert_matches(name, temperature, s, t, y, rtol=1e-5, atol=1e-6, **extra):
    loss = make(name, temperature, **extra)
    value, gs, gt = run_loss(loss, s, t, y)
    ref = REFS[name] if not extra else (lambda a, b, c, T: ref_ce(a, b, c, **extra))
    rvalue, rgs, rgt = run_ref(lambda a, b, c: ref(a, b, c, temperature), s, t, y)
    assert value.dtype == torch.float32 and value.dim() == 0
    torch.testing.assert_close(value.double(), rvalue, rtol=rtol, atol=atol)
    torch.testing.assert_close(gs.double(), rgs, rtol=rtol, atol=atol)
    if name == "ce":
        assert gt is None  # ce never touches the teacher
    else:
        torch.testing.assert_close(gt.double(), rgt, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- [N, C]

@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("name", ["kd", "rkd"])
def test_kd_rkd_match_reference_on_rows(name, temperature):
    s, t, y = inputs((16, 7), seed=int(temperature * 10))
    assert_matches(name, temperature, s, t, y)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
def test_ce_matches_reference_on_rows(label_smoothing):
    s, t, y = inputs((16, 7), seed=3)
    assert_matches("ce", 1.0, s, t, y, label_smoothing=label_smoothing)


def test_ce_has_no_temperature():
    with pytest.raises(kdcore.ConfigError, match=r"^temperature: unknown parameter"):
        kdcore.create("loss", "ce", temperature=2.0)


def test_kd_differs_from_rkd():
    """Guards against both losses computing the same direction of KL."""
    s, t, y = inputs((16, 7), seed=5)
    kd = make("kd", 2.0)(s, t, y)
    rkd = make("rkd", 2.0)(s, t, y)
    assert abs(kd.item() - rkd.item()) > 1e-3


# ----------------------------------------------------------------- token level

@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("name", ["ce", "kd", "rkd"])
def test_token_level_ignores_minus_100(name, temperature):
    s, t, y = inputs((3, 5, 11), seed=7, ignore_frac=0.4)
    assert (y == IGNORE).any() and (y != IGNORE).any()
    assert_matches(name, temperature, s, t, y)
    # the ignored positions' logits have no influence on the value and get zero gradient
    loss = make(name, temperature)
    value, gs, gt = run_loss(loss, s, t, y)
    s2, t2 = s.clone(), t.clone()
    s2[y == IGNORE] = 1e3 * torch.randn_like(s2[y == IGNORE])
    t2[y == IGNORE] = -1e3
    torch.testing.assert_close(loss(s2, t2, y), value)
    assert torch.all(gs[y == IGNORE] == 0)
    if gt is not None:
        assert torch.all(gt[y == IGNORE] == 0)


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name", ["ce", "kd", "rkd"])
def test_all_ignored_gives_zero_and_finite_grads(name, chunk_size):
    s, t, _ = inputs((2, 5, 6), seed=11)
    y = torch.full((2, 5), IGNORE)
    loss = make(name, 2.0, chunk_size=chunk_size)
    value, gs, gt = run_loss(loss, s, t, y)
    assert value.item() == 0.0
    assert torch.all(gs == 0)
    if gt is not None:
        assert torch.all(gt == 0)


@pytest.mark.parametrize("shape", [(9, 6), (2, 4, 6)])
@pytest.mark.parametrize("name", ["kd", "rkd"])
def test_target_none_is_mean_over_all_rows(name, shape):
    s, t, _ = inputs(shape, seed=13)
    assert_matches(name, 2.0, s, t, None)


def test_ce_needs_target_and_kd_needs_teacher():
    s, t, y = inputs((4, 3), seed=1)
    with pytest.raises(ValueError, match="target"):
        make("ce", 1.0)(s, t, None)
    with pytest.raises(ValueError, match="teacher"):
        make("kd", 1.0)(s, None, y)


# ----------------------------------------------------------------- dtypes and extreme inputs

@pytest.mark.parametrize("name", ["ce", "kd", "rkd"])
def test_bf16_inputs_are_upcast(name):
    """bf16 logits: the value equals the float64 reference on the bf16 values
    (the loss upcasts before any arithmetic), gradients come back in bf16."""
    s, t, y = inputs((4, 6, 9), seed=17, ignore_frac=0.3, dtype=torch.bfloat16)
    loss = make(name, 2.0)
    value, gs, gt = run_loss(loss, s, t, y)
    rvalue, rgs, rgt = run_ref(lambda a, b, c: REFS[name](a, b, c, 2.0), s, t, y)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-6)
    assert gs.dtype == torch.bfloat16
    torch.testing.assert_close(gs.double(), rgs, rtol=2e-2, atol=1e-4)
    if name != "ce":
        assert gt.dtype == torch.bfloat16
        torch.testing.assert_close(gt.double(), rgt, rtol=2e-2, atol=1e-4)


PAD = 3  # padded columns at the end


def padded_inputs(seed, shape=(3, 4, 10), ignore_frac=0.25):
    s, t, y = inputs(shape, seed=seed, ignore_frac=ignore_frac)
    y = torch.where(y >= shape[-1] - PAD, y - PAD, y)  # labels are never padded columns
    s[..., -PAD:] = NEG_INF
    t[..., -PAD:] = NEG_INF
    return s, t, y


@pytest.mark.parametrize(("name", "extra"), [("ce", {}), ("ce", {"label_smoothing": 0.1}),
                                             ("kd", {}), ("rkd", {})])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_padded_minus_inf_columns(name, extra, temperature):
    """-inf logits in the same columns of both models (a padded vocabulary): the
    value and gradients are finite and equal the reference on the unpadded
    columns (padded columns are not classes: label smoothing spreads over the
    real ones); padded columns get exactly zero gradient."""
    s, t, y = padded_inputs(seed=19)
    loss = make(name, temperature, **extra)
    value, gs, gt = run_loss(loss, s, t, y)
    assert torch.isfinite(value)
    assert torch.isfinite(gs).all()
    assert torch.all(gs[..., -PAD:] == 0)
    ref = (lambda a, b, c: ref_ce(a, b, c, **extra)) if name == "ce" else \
        (lambda a, b, c: REFS[name](a, b, c, temperature))
    rvalue, rgs, rgt = run_ref(ref, s[..., :-PAD], t[..., :-PAD], y)
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs[..., :-PAD].double(), rgs, rtol=1e-5, atol=1e-6)
    if name != "ce":
        assert torch.isfinite(gt).all()
        assert torch.all(gt[..., -PAD:] == 0)
        torch.testing.assert_close(gt[..., :-PAD].double(), rgt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("name", ["kd", "rkd"])
def test_very_confident_teacher(name, temperature):
    """Teacher logits with a 1e4 spike: the other classes' probabilities
    underflow to 0 (also in float64 at T=1). Finite, and equal to the reference.
    rkd's value and gradients hold terms q_k (log q_k - log p_k) with log p_k ~ -1e4 / T,
    known in float32 to ~1e4 * 2^-24: gradients are compared relative to their largest entry."""
    s, t, y = inputs((12, 8), seed=23)
    spike = torch.randint(0, 8, (12,), generator=torch.Generator().manual_seed(0))
    t = t + 1e4 * torch.nn.functional.one_hot(spike, 8)
    loss = make(name, temperature)
    value, gs, gt = run_loss(loss, s, t, y)
    assert torch.isfinite(value) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    rvalue, rgs, rgt = run_ref(lambda a, b, c: REFS[name](a, b, c, temperature), s, t, y)
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=1e-6 * max(1.0, rgs.abs().max().item()))
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-5, atol=1e-6 * max(1.0, rgt.abs().max().item()))


def test_kd_confident_teacher_at_t1_is_student_nll():
    """With a one-hot teacher at T=1, KL(p || q) = -log q_spike (independent identity)."""
    s, _, _ = inputs((6, 5), seed=29)
    spike = torch.tensor([0, 1, 2, 3, 4, 0])
    t = 1e4 * torch.nn.functional.one_hot(spike, 5).float()
    value = make("kd", 1.0)(s, t)
    expected = -ref_log_softmax(s)[torch.arange(6), spike].mean()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- divergences of kd

class HalfSquaredL2:
    """A custom divergence: ``1/2 sum_k (p_k - q_k)^2``; records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, teacher_logp, student_logp):
        self.calls.append((teacher_logp.detach(), student_logp.detach()))
        return 0.5 * ((teacher_logp.exp() - student_logp.exp()) ** 2).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("divergence", ["kl", {"name": "kl"}, "rkl", {"name": "rkl"}])
def test_kd_divergence_by_name_and_table(divergence, temperature):
    s, t, y = inputs((3, 4, 7), seed=31, ignore_frac=0.3)
    name = divergence if isinstance(divergence, str) else divergence["name"]
    loss = make("kd", temperature, divergence=divergence)
    value, gs, gt = run_loss(loss, s, t, y)
    ref = ref_kd if name == "kl" else ref_rkd
    rvalue, rgs, rgt = run_ref(lambda a, b, c: ref(a, b, c, temperature), s, t, y)
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_custom_divergence_object(temperature):
    """An object divergence receives (teacher, student) log-probabilities at the
    loss temperature and its rows are scaled by T^2 and averaged over kept rows."""
    s, t, y = inputs((10, 6), seed=37, ignore_frac=0.3)
    div = HalfSquaredL2()
    value = make("kd", temperature, divergence=div)(s, t, y)
    (t_logp, s_logp), = div.calls
    torch.testing.assert_close(t_logp.double(), ref_log_softmax(t / temperature), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_logp.double(), ref_log_softmax(s / temperature), rtol=1e-5, atol=1e-6)
    p = ref_log_softmax(t.double() / temperature).exp()
    q = ref_log_softmax(s.double() / temperature).exp()
    rows = temperature ** 2 * 0.5 * ((p - q) ** 2).sum(-1)
    torch.testing.assert_close(value.double(), ref_mean(rows, y), rtol=1e-5, atol=1e-7)


class HalfSquaredL2FromLogits(HalfSquaredL2):
    """The same divergence with a ``from_logits`` path, which records its inputs."""

    def __init__(self):
        super().__init__()
        self.logit_calls = []

    def from_logits(self, teacher_logits, student_logits):
        self.logit_calls.append((teacher_logits, student_logits))
        return super().__call__(torch.log_softmax(teacher_logits, -1), torch.log_softmax(student_logits, -1))


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kd_uses_a_divergences_from_logits_path(temperature):
    """A divergence with ``from_logits`` gets the logits divided by T (not
    log-probabilities), and the value is the same as through ``__call__``."""
    s, t, y = inputs((10, 6), seed=38, ignore_frac=0.3)
    plain, fast = HalfSquaredL2(), HalfSquaredL2FromLogits()
    expected = make("kd", temperature, divergence=plain)(s, t, y)
    value = make("kd", temperature, divergence=fast)(s, t, y)
    (zt, zs), = fast.logit_calls
    keep = y.reshape(-1) != -100
    torch.testing.assert_close(zt[keep], t.reshape(-1, 6)[keep].float() / temperature)
    torch.testing.assert_close(zs[keep], s.reshape(-1, 6)[keep].float() / temperature)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)


def test_kd_bad_divergence():
    with pytest.raises(kdcore.UnknownComponentError, match="nope"):
        make("kd", 1.0, divergence="nope")
    with pytest.raises(kdcore.ConfigError, match=r"^divergence\.bogus"):
        make("kd", 1.0, divergence={"name": "kl", "bogus": 1})
    with pytest.raises(kdcore.ConfigError, match=r"^divergence\.name"):
        make("kd", 1.0, divergence={"bogus": 1})


# ----------------------------------------------------------------- chunked evaluation

CHUNK_CASES = [("ce", {}), ("ce", {"label_smoothing": 0.2}), ("kd", {"temperature": 4.0}),
               ("kd", {"temperature": 2.0, "divergence": "rkl"}), ("rkd", {"temperature": 2.0}),
               ("kd", {"temperature": 2.0, "transforms": [{"name": "label_smoothing", "delta": 0.1}]})]


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 7, 12, 50])
@pytest.mark.parametrize(("name", "kw"), CHUNK_CASES)
def test_chunked_equals_unchunked(name, kw, chunk_size):
    """12 rows ([3, 4, C]) with ignored positions, including a first chunk of
    ignored rows only when chunk_size is 4: values and gradients of student and
    (requiring grad) teacher match the unchunked evaluation, to float32 rounding
    (a row's exp may take the vectorised or the scalar kernel depending on where
    it sits in the tensor, so chunks can differ in the last bit)."""
    s, t, y = inputs((3, 4, 9), seed=41, ignore_frac=0.3)
    y[0, :] = IGNORE
    full = kdcore.create("loss", name, **kw)
    chunked = kdcore.create("loss", name, chunk_size=chunk_size, **kw)
    v1, gs1, gt1 = run_loss(full, s, t, y)
    v2, gs2, gt2 = run_loss(chunked, s, t, y)
    torch.testing.assert_close(v2, v1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gs2, gs1, rtol=1e-6, atol=1e-7)
    if name == "ce":
        assert gt1 is None and gt2 is None
    else:
        torch.testing.assert_close(gt2, gt1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [3, 5])
def test_chunked_teacher_without_grad_and_no_target(chunk_size):
    s, t, _ = inputs((11, 6), seed=43)
    full = make("kd", 2.0)
    chunked = make("kd", 2.0, chunk_size=chunk_size)
    v1, gs1, gt1 = run_loss(full, s, t, None, teacher_grad=False)
    v2, gs2, gt2 = run_loss(chunked, s, t, None, teacher_grad=False)
    assert gt1 is None and gt2 is None
    torch.testing.assert_close(v2, v1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gs2, gs1, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_backward_twice_with_retained_graph(chunk_size):
    """``(3 * loss).backward(retain_graph=True)`` twice accumulates twice the gradient
    (the upstream gradient is not 1, so an in-place rescaling of saved buffers would show)."""
    s, t, y = inputs((10, 5), seed=47)
    loss = make("kd", 2.0, chunk_size=chunk_size)
    s1 = s.clone().requires_grad_(True)
    (3 * loss(s1, t, y)).backward()
    once = s1.grad.clone()
    s2 = s.clone().requires_grad_(True)
    value = 3 * loss(s2, t, y)
    value.backward(retain_graph=True)
    value.backward()
    torch.testing.assert_close(s2.grad, 2 * once)


def test_chunk_size_must_be_positive_int():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(kdcore.ConfigError, match=r"^chunk_size"):
            make("kd", 1.0, chunk_size=bad)


# ----------------------------------------------------------------- teacher transforms
#
# Asserted semantics (LogitLoss docstring, methods.md "Soft-label transforms"):
# the chain acts on the teacher's log-probabilities at T=1, log p~ = chain(log softmax(z_t)),
# and the loss's own temperature then softens the result: p~^T = softmax(log p~ / T).
# So kd(T, transforms) = T^2 KL(softmax(log p~ / T) || softmax(z_s / T)).

def ref_label_smoothing(logp, delta):
    c = logp.shape[-1]
    return torch.log((1 - delta) * logp.exp() + delta / c)


def ref_temperature(logp, temperature):
    return ref_log_softmax(logp / temperature)


def ref_transformed_kd(s, t, y, temperature, chain, reverse=False):
    c = s.shape[-1]
    logp = ref_log_softmax(t.reshape(-1, c))
    for fn in chain:
        logp = fn(logp)
    p = ref_log_softmax(logp / temperature)
    q = ref_log_softmax(s.reshape(-1, c).double() / temperature)
    rows = temperature ** 2 * (ref_kl(q, p) if reverse else ref_kl(p, q))
    return ref_mean(rows, None if y is None else y.reshape(-1))


TRANSFORM_CASES = {
    "ls": ([{"name": "label_smoothing", "delta": 0.2}], [lambda lp: ref_label_smoothing(lp, 0.2)]),
    "temp": ([{"name": "temperature", "temperature": 3.0}], [lambda lp: ref_temperature(lp, 3.0)]),
    "temp_then_ls": ([{"name": "temperature", "temperature": 2.0}, {"name": "label_smoothing", "delta": 0.3}],
                     [lambda lp: ref_temperature(lp, 2.0), lambda lp: ref_label_smoothing(lp, 0.3)]),
    "ls_then_temp": ([{"name": "label_smoothing", "delta": 0.3}, {"name": "temperature", "temperature": 2.0}],
                     [lambda lp: ref_label_smoothing(lp, 0.3), lambda lp: ref_temperature(lp, 2.0)]),
    "names": (["label_smoothing", "temperature"],
              [lambda lp: ref_label_smoothing(lp, 0.1), lambda lp: ref_temperature(lp, 2.0)]),
}


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("name", ["kd", "rkd"])
@pytest.mark.parametrize("case", sorted(TRANSFORM_CASES))
def test_transforms_chain_matches_reference(case, name, temperature):
    specs, chain = TRANSFORM_CASES[case]
    s, t, y = inputs((3, 4, 8), seed=53, ignore_frac=0.3)
    loss = make(name, temperature, transforms=specs)
    value, gs, gt = run_loss(loss, s, t, y)
    ref = (lambda a, b, c: ref_transformed_kd(a, b, c, temperature, chain, reverse=name == "rkd"))
    rvalue, rgs, rgt = run_ref(ref, s, t, y)
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt.double(), rgt, rtol=1e-5, atol=1e-6)


def test_transform_order_and_stage_matter():
    """The chain order is kept, and label smoothing acts before the loss
    temperature: smoothing the already softened teacher gives another value."""
    s, t, y = inputs((20, 8), seed=59)
    a = make("kd", 4.0, transforms=TRANSFORM_CASES["temp_then_ls"][0])(s, t, y)
    b = make("kd", 4.0, transforms=TRANSFORM_CASES["ls_then_temp"][0])(s, t, y)
    assert abs(a.item() - b.item()) > 1e-3
    smoothed_late = ref_mean(16 * ref_kl(ref_label_smoothing(ref_log_softmax(t / 4.0), 0.2),
                                         ref_log_softmax(s / 4.0)), y)
    c = make("kd", 4.0, transforms=[{"name": "label_smoothing", "delta": 0.2}])(s, t, y)
    assert abs(c.item() - smoothed_late.item()) > 1e-3


def test_transform_without_effect():
    """label_smoothing with delta=0 and temperature 1 leave kd unchanged."""
    s, t, y = inputs((10, 6), seed=61)
    plain = make("kd", 2.0)(s, t, y)
    same = make("kd", 2.0, transforms=[{"name": "label_smoothing", "delta": 0.0},
                                       {"name": "temperature", "temperature": 1.0}])(s, t, y)
    torch.testing.assert_close(same, plain, rtol=1e-6, atol=1e-7)


def test_bad_transform_parameter_names_its_path():
    with pytest.raises(kdcore.ConfigError, match=r"^transforms\[1\]\.delta"):
        make("kd", 1.0, transforms=["temperature", {"name": "label_smoothing", "delta": 2.0}])


@pytest.mark.parametrize("name", ["kd", "rkd"])
def test_label_smoothing_transform_with_padded_columns(name):
    """Padded (-inf) columns are not classes: the smoothed teacher spreads delta over
    the real columns only, so the loss is finite and equals the reference on the
    unpadded columns."""
    s, t, y = padded_inputs(seed=67)
    specs, chain = TRANSFORM_CASES["ls"]
    loss = make(name, 2.0, transforms=specs)
    value, gs, gt = run_loss(loss, s, t, y)
    assert torch.isfinite(value) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    ref = (lambda a, b, c: ref_transformed_kd(a, b, c, 2.0, chain, reverse=name == "rkd"))
    rvalue, rgs, rgt = run_ref(ref, s[..., :-PAD], t[..., :-PAD], y)
    torch.testing.assert_close(value.double(), rvalue, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs[..., :-PAD].double(), rgs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gt[..., :-PAD].double(), rgt, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------- T^2 scaling

@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_student_gradient_is_t_times_q_minus_p(temperature):
    """d/dz_s of T^2 KL(p^T || q^T) is T (q^T - p^T) per row (Hinton et al. 2015, sec. 2.1),
    divided by N for the mean."""
    s, t, _ = inputs((8, 6), seed=71)
    _, gs, _ = run_loss(make("kd", temperature), s, t, None)
    p = ref_log_softmax(t / temperature).exp()
    q = ref_log_softmax(s / temperature).exp()
    torch.testing.assert_close(gs.double(), temperature * (q - p) / 8, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["kd", "rkd"])
def test_gradient_scale_is_kept_across_temperatures(name):
    """With T^2 scaling the student gradient tends, as T grows, to the logit-matching
    gradient ((z_s - mean z_s) - (z_t - mean z_t)) / (C N) (Hinton et al. 2015, eq. 3-4),
    for KL in both directions; without T^2 it would shrink like 1/T^2."""
    n, c = 8, 6
    s, t, _ = inputs((n, c), seed=73, scale=1.0)
    zs = s.double() - s.double().mean(-1, keepdim=True)
    zt = t.double() - t.double().mean(-1, keepdim=True)
    limit = (zs - zt) / (c * n)
    errors = []
    for temperature in (10.0, 100.0, 1000.0):
        _, gs, _ = run_loss(make(name, temperature), s, t, None)
        errors.append(((gs.double() - limit).norm() / limit.norm()).item())
    # the error is O(1/T): about 10x smaller for each 10x in T
    assert errors[2] < 2e-3
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5


def test_split_target_with_one_real_column_has_finite_grads():
    """A row whose only finite column is the target: log(1 - p_t) = -inf, grads 0 not NaN."""
    from kdcore.losses.functional import split_target
    z = torch.tensor([[2.0, float("-inf"), float("-inf")], [0.5, 1.0, float("-inf")]], requires_grad=True)
    log_b, log_rho = split_target(torch.log_softmax(z, -1), torch.tensor([0, 1]))
    assert log_b[0, 1] == float("-inf") and log_b[0, 0] == 0
    assert torch.allclose(log_b[1].exp(), torch.softmax(z[1].detach()[:2], -1).flip(0))
    assert log_rho[1, 0] == 0  # the renormalised non-target distribution of row 1 is one-hot
    (log_b[:, 0].sum() + log_b[1, 1]).backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kl_rows_zero_probability_terms_and_nan_inputs(teacher_grad):
    """Rows with p = 0 where log q = -inf are exact; NaN inputs stay NaN."""
    from kdcore.losses.functional import kl_rows
    inf = float("inf")
    p_logits = torch.tensor([[0.0, -inf, 1.0], [0.0, -200.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    q_logits = torch.tensor([[1.0, -inf, 0.0], [1.0, -inf, 0.0], [0.0, 1.0, 2.0], [0.0, float("nan"), 2.0]])
    p_logp = torch.log_softmax(p_logits, -1).requires_grad_(teacher_grad)
    q_logp = torch.log_softmax(q_logits, -1).requires_grad_()
    rows = kl_rows(p_logp, q_logp)
    lp, lq = p_logp.detach(), q_logp.detach()
    p = lp.exp()  # exp(-201) underflows to 0 in float32: a zero-probability term
    expected = [sum(float(p[i, k].double() * (lp[i, k].double() - lq[i, k].double()))
                    for k in range(3) if p[i, k] > 0) for i in range(2)]
    torch.testing.assert_close(rows[:2].double(), torch.tensor(expected, dtype=torch.float64))
    assert rows[2] == 0 and torch.isnan(rows[3])
    rows[:3].sum().backward()
    assert torch.isfinite(q_logp.grad[:3]).all()
    if teacher_grad:
        assert torch.isfinite(p_logp.grad[:3]).all()


@pytest.mark.parametrize("gap", [1e4, 1e8, 1e30])
def test_split_target_keeps_non_target_gaps_when_p_t_rounds_to_one(gap):
    """log p would lose the non-target gaps in float32; split_target works from the logits."""
    from kdcore.losses.functional import split_target
    z = torch.tensor([[gap, 1.0, 0.0], [2.0, 1.0, -gap]])
    log_b, log_rho = split_target(z, torch.tensor([0, 2]), temperature=1.0)
    e = math.e
    torch.testing.assert_close(log_rho[0, 1:].exp(), torch.tensor([e / (e + 1), 1 / (e + 1)]))
    torch.testing.assert_close(log_rho[1, :2].exp(), torch.tensor([e / (e + 1), 1 / (e + 1)]))
    assert log_b[0, 0] == 0 and log_b[0, 1] < -gap / 2
    assert log_b[1, 1] == 0 and log_b[1, 0] < -gap / 2


def test_split_target_temperature_and_log_probabilities_agree_with_logits():
    from kdcore.losses.functional import split_target
    z = 3 * torch.randn(5, 7, dtype=torch.float64)
    y = torch.tensor([0, 3, 6, 2, 2])
    a = split_target(z, y, temperature=2.5)
    b = split_target(torch.log_softmax(z / 2.5, -1), y)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    log_b, log_rho = a
    p = torch.softmax(z / 2.5, -1)
    pt = p.gather(-1, y[:, None]).squeeze(-1)
    torch.testing.assert_close(log_b.exp(), torch.stack([pt, 1 - pt], -1))
    rho = p.scatter(-1, y[:, None], 0.0) / (1 - pt)[:, None]
    torch.testing.assert_close(log_rho.exp(), rho)


@pytest.mark.parametrize("name", ["kd", "rkd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_gradients_of_both_models_match_float64_autograd(temperature, name):
    """kd's and rkd's fused gradients (student and teacher) against autograd on the plain formula."""
    g = torch.Generator().manual_seed(5)
    zs = 3 * torch.randn(6, 5, generator=g)
    zt = 3 * torch.randn(6, 5, generator=g)
    zs[:, 4] = zt[:, 4] = float("-inf")  # a padded column in both models
    zt[0, 0] = 200.0  # teacher probabilities that underflow in float32

    def reference(s, t):
        logp = torch.log_softmax(t / temperature, -1)
        logq = torch.log_softmax(s / temperature, -1)
        if name == "rkd":  # KL(q || p)
            logp, logq = logq, logp
        p = logp.exp()
        zero = p == 0  # those terms are 0; masking both logs keeps autograd free of NaN
        terms = p * (logp.masked_fill(zero, 0.0) - logq.masked_fill(zero, 0.0))
        return temperature ** 2 * terms.sum(-1).mean()

    s64, t64 = (x.double().requires_grad_() for x in (zs, zt))
    reference(s64, t64).backward()
    s32, t32 = (x.clone().requires_grad_() for x in (zs, zt))
    kdcore.create("loss", name, temperature=temperature)(s32, t32, None).backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(t32.grad.double(), t64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_rkd_student_zero_probability_columns_have_finite_gradients(teacher_grad):
    """rkd = KL(q || p): a column where only the student is -inf contributes 0, in value and gradient."""
    zs = torch.tensor([[1.0, 2.0, float("-inf")], [0.5, -1.0, 3.0]])
    zt = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    s, t = zs.clone().requires_grad_(), zt.clone().requires_grad_(teacher_grad)
    value = kdcore.create("loss", "rkd", temperature=2.0)(s, t, None)
    value.backward()
    s64, t64 = zs.double().requires_grad_(), zt.double().requires_grad_(teacher_grad)
    logq, logp = torch.log_softmax(s64 / 2, -1), torch.log_softmax(t64 / 2, -1)
    q = logq.exp()
    ref = 4 * (q * (logq.masked_fill(q == 0, 0) - logp.masked_fill(q == 0, 0))).sum(-1).mean()
    ref.backward()
    torch.testing.assert_close(value.double(), ref)
    torch.testing.assert_close(s.grad.double(), s64.grad)
    if teacher_grad:
        torch.testing.assert_close(t.grad.double(), t64.grad)
