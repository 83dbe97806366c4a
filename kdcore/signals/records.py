"""A store's records: the coding of one position's teacher distribution
(:class:`Layout`, :func:`encode`, :func:`encode_draws`, :func:`decode`), what a capture keeps
(:func:`top_k`, or K draws from the teacher: :func:`draw`), and the checks of decoded values
that no capture writes (:func:`check_values`). The record layout is described in
:mod:`kdcore.signals.store`.

A sampled record (``kind = "sample"``) holds the K ids drawn from the teacher's
distribution, sorted, repeats included, Elias-Fano coded (the coding takes a
non-decreasing sequence as it is) and nothing else: the weight of a distinct id is its
number of draws over K, exact, so the weights sum to 1 with no rounding. Decoded, a
sampled record is K slots: each distinct id's first slot holds ``log(count / K)``, its
repeats ``-inf`` (no bucket), and the tail ``-inf`` (the draws are all the teacher is
known by).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


import attrs
import numpy as np
import torch
from torch import Tensor

from kdcore.common.errors import ConfigError

VALUE_CODINGS = ("float32", "float16", "uint8")
#: what a record keeps of a position: the teacher's k most likely ids, or k draws from it
KINDS = ("top_k", "sample")
#: the most draws a sampled record holds (bounds a record's size and the capture's memory)
MAX_DRAWS = 2**16
#: uint8 codes span [0, 255]
_LEVELS = 255

#: how far above 0 a stored log-probability may be (rounding of a most likely class's log p = 0)
_LOGP_SLACK = 1e-5
#: per value coding: the relative rounding of a decoded log-probability (float16 keeps 11 bits;
#: uint8 codes add half a step, see _mass_and_slack)
_RELATIVE = {"float32": 2.0**-23, "float16": 2.0**-10, "uint8": 2.0**-22}
#: uint8: a step below float16's normal range is rounded to a multiple of 2**-24, so the
#: largest code (255) can fall short of the row's spread by up to 255 half multiples
_UINT8_CLIP = _LEVELS * 2.0**-25
#: what summing the kept mass in float32 may add to its distance from 1 (cascaded sums of up
#: to 2**17 terms err by about 17 float32 roundings, 1e-6)
_MASS_SLACK = 1e-5


class DamagedRecord(ValueError):
    """A record no capture writes: ``row`` (among the records decoded or checked) and ``reason``."""

    def __init__(self, row: int, reason: str):
        super().__init__(f"record {row}: {reason}")
        self.row, self.reason = row, reason


@attrs.frozen
class Layout:
    """How one position's record is coded (see the module docstring)."""

    num_classes: int
    k: int
    values: str       # a value coding, or "counts" (sampled: the weights are the ids' repeats)
    ids: str          # "bitmap" or "elias-fano"
    low_bits: int = 0
    kind: str = "top_k"

    @property
    def sampled(self) -> bool:
        """Whether a record holds draws from the teacher (else its top k)."""
        return self.kind == "sample"

    @property
    def full(self) -> bool:
        """Whether every class is kept (then there is no tail bucket; never for draws)."""
        return not self.sampled and self.k == self.num_classes

    @property
    def _upper_bits(self) -> int:
        return self.k + ((self.num_classes - 1) >> self.low_bits)

    @property
    def ids_bytes(self) -> int:
        bits = self.num_classes if self.ids == "bitmap" else self.k * self.low_bits + self._upper_bits
        return -(-bits // 8)

    @property
    def values_bytes(self) -> int:
        return self.k * {"float32": 4, "float16": 2, "uint8": 1, "counts": 0}[self.values]

    @property
    def header_bytes(self) -> int:
        if self.sampled:
            return 0
        return (6 if self.values == "uint8" else 0) + (0 if self.full else 4)

    @property
    def record_bytes(self) -> int:
        return self.ids_bytes + self.values_bytes + self.header_bytes

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``layout``; a top-k layout without ``kind``, as stores had it before draws."""
        d = {**attrs.asdict(self), "record_bytes": self.record_bytes}
        if not self.sampled:
            del d["kind"]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Layout":
        kind = str(d.get("kind", "top_k"))
        if kind not in KINDS:
            raise ValueError(f"unknown record kind {kind!r}")
        return cls(int(d["num_classes"]), int(d["k"]), str(d["values"]), str(d["ids"]), int(d.get("low_bits", 0)),
                   kind)


def choose_layout(num_classes: int, k: int, values: str, kind: str = "top_k") -> Layout:
    """The smallest id coding for ``k`` of ``num_classes`` ids, with the given value coding;
    for ``kind = "sample"``, ``k`` draws (repeats possible: Elias-Fano, the weights being counts)."""
    if kind == "sample":
        if not 1 <= k <= MAX_DRAWS:
            raise ConfigError(f"--sample: must be in 1 .. {MAX_DRAWS} (draws per position), got {k}")
        return min((Layout(num_classes, k, "counts", "elias-fano", low, kind)
                    for low in range(0, max(num_classes.bit_length(), 1) + 1)), key=lambda lay: lay.ids_bytes)
    if values not in VALUE_CODINGS:
        raise ConfigError(f"--values: must be one of {', '.join(VALUE_CODINGS)}, got {values!r}")
    if not 1 <= k <= num_classes:
        raise ConfigError(f"--top-k: must be in 1 .. {num_classes} (the number of classes), got {k}")
    best = Layout(num_classes, k, values, "bitmap")
    for low in range(0, max(num_classes.bit_length(), 1) + 1):
        ef = Layout(num_classes, k, values, "elias-fano", low)
        if ef.ids_bytes < best.ids_bytes:
            best = ef
    return best


# -- coding ---------------------------------------------------------------------------------------
def _bits(values: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` low bits of ``values`` ``[..., n]`` as ``[..., n * width]`` (least significant first)."""
    shifts = np.arange(width, dtype=np.int64)
    return ((values[..., None] >> shifts) & 1).astype(np.uint8).reshape(*values.shape[:-1], -1)


def _ones_positions(bits: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the set bits of each row (exactly ``k`` per row) ``[m, k]``; a row
    with another count is a :class:`DamagedRecord` (its ids cannot be told apart)."""
    rows, cols = np.nonzero(bits)
    if rows.shape[0] != bits.shape[0] * k:
        counts = bits.sum(axis=1, dtype=np.int64)
        row = int(np.nonzero(counts != k)[0][0])
        raise DamagedRecord(row, f"it codes {counts[row]} ids, not k = {k}")
    return cols.reshape(bits.shape[0], k)


def _ids_bytes(layout: Layout, ids: Tensor) -> np.ndarray:
    """The id part of records ``uint8 [m, ids_bytes]``: ``ids`` ``[m, k]`` sorted ascending
    (non-decreasing where they are draws, which only Elias-Fano codes)."""
    ids_np = ids.cpu().numpy().astype(np.int64)
    m, k = ids_np.shape
    if layout.ids == "bitmap":
        bits = np.zeros((m, layout.num_classes), dtype=np.uint8)
        np.put_along_axis(bits, ids_np, 1, axis=1)
    else:
        low = layout.low_bits
        upper = np.zeros((m, layout._upper_bits), dtype=np.uint8)
        np.put_along_axis(upper, (ids_np >> low) + np.arange(k), 1, axis=1)
        bits = np.concatenate([_bits(ids_np & ((1 << low) - 1), low), upper], axis=1)
    return np.packbits(bits, axis=1, bitorder="little")


def encode_draws(layout: Layout, draws: Tensor) -> np.ndarray:
    """Sampled records ``uint8 [m, record_bytes]`` of ``m`` positions' ``draws`` ``[m, K]`` (sorted)."""
    out = np.ascontiguousarray(_ids_bytes(layout, draws))
    assert layout.sampled and out.shape[1] == layout.record_bytes
    return out


def encode(layout: Layout, ids: Tensor, logp: Tensor, log_rest: Tensor | None) -> np.ndarray:
    """Records ``uint8 [m, record_bytes]`` of ``m`` positions: ``ids`` ``[m, k]`` sorted
    ascending, their log-probabilities ``logp`` ``[m, k]`` and ``log_rest`` ``[m]``."""
    parts = [_ids_bytes(layout, ids)]
    lp = logp.detach().double().cpu().numpy()
    if layout.values == "uint8":
        top = lp.max(axis=1).astype(np.float32)
        spread = (top.astype(np.float64)[:, None] - lp).max(axis=1)
        scale = np.where(spread > 0, spread / _LEVELS, 1.0).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(np.finfo(np.float16).tiny))  # no zero step
        q = np.rint((top.astype(np.float64)[:, None] - lp) / scale.astype(np.float64)[:, None])
        parts += [np.clip(q, 0, _LEVELS).astype(np.uint8), top[:, None].view(np.uint8),
                  scale[:, None].view(np.uint8)]
    else:
        parts.append(lp.astype(np.dtype(layout.values).newbyteorder("<")).view(np.uint8))
    if not layout.full:
        parts.append(log_rest.detach().double().cpu().numpy().astype("<f4")[:, None].view(np.uint8))
    out = np.ascontiguousarray(np.concatenate(parts, axis=1))
    assert out.shape[1] == layout.record_bytes
    return out


def decode(layout: Layout, records: np.ndarray) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(ids int64 [m, k], logp float32 [m, k], log_rest float32 [m] or None)`` from records;
    of sampled records, the draws, their weights (:func:`draw_weights`) and a ``-inf`` tail."""
    m, k = records.shape[0], layout.k
    records = np.ascontiguousarray(records)
    cut = np.cumsum([layout.ids_bytes, layout.values_bytes])
    bits = np.unpackbits(records[:, :cut[0]], axis=1, bitorder="little")
    if layout.ids == "bitmap":
        ids = _ones_positions(bits[:, :layout.num_classes], k)
    else:
        low = layout.low_bits
        low_part = bits[:, :k * low].reshape(m, k, low).astype(np.int64)
        lows = (low_part << np.arange(low, dtype=np.int64)).sum(-1) if low else np.zeros((m, k), np.int64)
        upper = bits[:, k * low:k * low + layout._upper_bits]
        ids = ((_ones_positions(upper, k) - np.arange(k)) << low) | lows
    if layout.sampled:
        draws = torch.from_numpy(ids.astype(np.int64))
        return draws, draw_weights(draws), torch.full((m,), float("-inf"))
    vals = records[:, cut[0]:cut[1]]
    at = cut[1]
    if layout.values == "uint8":
        top = records[:, at:at + 4].copy().view("<f4")
        scale = records[:, at + 4:at + 6].copy().view("<f2").astype(np.float32)
        logp = top - vals.astype(np.float32) * scale
        at += 6
    else:
        logp = vals.copy().view(np.dtype(layout.values).newbyteorder("<")).astype(np.float32)
    rest = None
    if not layout.full:
        rest = torch.from_numpy(records[:, at:at + 4].copy().view("<f4")[:, 0].astype(np.float32))
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(np.ascontiguousarray(logp)), rest


def _mass_and_slack(layout: Layout, top: Tensor, low: Tensor, logp: Tensor,
                    rest: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per row: the kept plus tail mass of decoded log-probabilities ``logp`` ``[m, k]``
    (``top`` and ``low``: their row maxima and minima, float64), and how far from 1 the value
    coding lets it be: each value is off by at most its coding's relative rounding of the
    largest magnitude, plus for uint8 half a step (the row's spread over 255) and
    ``_UINT8_CLIP``, so the kept mass by at most ``expm1`` of twice that; summing in
    float32 adds ``_MASS_SLACK``."""
    kept = logp.float().exp().sum(-1).double()
    drift = -low * _RELATIVE[layout.values]
    if layout.values == "uint8":
        drift = drift + (top - low) * (0.5 + 2.0**-10) / _LEVELS + _UINT8_CLIP
    mass, slack = kept, kept * torch.expm1(2 * drift) + _MASS_SLACK
    if rest is not None:
        r = rest.double()
        mass, slack = mass + r.exp(), slack + r.exp() * torch.expm1(2 * r.abs() * _RELATIVE["float32"])
    return mass, slack


def check_values(layout: Layout, ids: Tensor, logp: Tensor, rest: Tensor | None) -> None:
    """Raise :class:`DamagedRecord` for the first row that no capture writes: a NaN, a
    log-probability above 0, ids outside ``0 .. num_classes - 1`` or not strictly ascending
    (repeated), or kept and tail mass that do not sum to 1 within the value coding's rounding.
    ``ids``, ``logp`` ``[m, k]`` and ``rest`` ``[m]`` as :func:`decode` gives them."""
    if ids.shape[0] == 0:
        return
    if layout.sampled:
        _check_draws(layout, ids)
        return
    top, low = logp.amax(-1).double(), logp.amin(-1).double()  # NaN where the row holds one
    mass, slack = _mass_and_slack(layout, top, low, logp, rest)
    checks = [(top.isnan(), lambda r: "a log-probability is NaN"),
              (top > _LOGP_SLACK, lambda r: f"a log-probability is {top[r].item():.4g} > 0"),
              ((mass - 1).abs() > slack, lambda r: f"its kept and tail mass sum to {mass[r].item():.6g}, not 1")]
    if layout.ids != "bitmap":  # a bitmap's ids are distinct, ascending and in range by construction
        checks[2:2] = [((ids[:, 0] < 0) | (ids[:, -1] >= layout.num_classes),
                        lambda r: f"an id is {ids[r].max().item()}, outside 0..{layout.num_classes - 1}"),
                       ((ids[:, 1:] <= ids[:, :-1]).any(-1), lambda r: "its ids repeat or are out of order")]
    if rest is not None:
        checks.insert(1, (rest.isnan(), lambda r: "the tail's log-mass is NaN"))
        checks.insert(2, (rest > _LOGP_SLACK, lambda r: f"the tail's log-mass is {rest[r].item():.4g} > 0"))
    first = [(int(bad.nonzero()[0, 0]), i) for i, (bad, _) in enumerate(checks) if bool(bad.any())]
    if first:
        row, i = min(first)
        raise DamagedRecord(row, checks[i][1](row))


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The teacher's top-k of ``logits`` ``[m, C]`` at temperature 1: ids sorted ascending,
    their log-probabilities and the log of the remaining mass (None when ``k = C``), in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    _, ids = logp.topk(k, dim=-1)
    ids, _ = ids.sort(dim=-1)
    kept = logp.gather(-1, ids)
    rest = None
    if k < logits.shape[-1]:
        rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    return ids, kept, rest


# -- draws ----------------------------------------------------------------------------------------
def draw_weights(draws: Tensor) -> Tensor:
    """Per slot of sorted ``draws`` ``[m, K]``: ``log(count / K)`` at each distinct id's first
    slot (``count``: its draws), ``-inf`` at its repeats; float32. The weights are the draws'
    empirical distribution, an unbiased estimate of the distribution drawn from."""
    m, k = draws.shape
    first = torch.ones_like(draws, dtype=torch.bool)
    first[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = torch.arange(k).expand(m, k)
    start = torch.where(first, slot, 0).cummax(-1).values  # each slot's first slot of its id
    counts = torch.zeros(m, k, dtype=torch.float64).scatter_add_(-1, start, torch.ones(m, k, dtype=torch.float64))
    return torch.where(first, (counts / k).log(), float("-inf")).float()


def _check_draws(layout: Layout, ids: Tensor) -> None:
    """Raise :class:`DamagedRecord` for the first row of draws with an id outside
    ``0 .. num_classes - 1`` or out of order (Elias-Fano decodes any bits to some sequence)."""
    checks = [((ids[:, 0] < 0) | (ids[:, -1] >= layout.num_classes),
               lambda r: f"an id is {ids[r].max().item()}, outside 0..{layout.num_classes - 1}"),
              ((ids[:, 1:] < ids[:, :-1]).any(-1), lambda r: "its ids are out of order")]
    first = [(int(bad.nonzero()[0, 0]), i) for i, (bad, _) in enumerate(checks) if bool(bad.any())]
    if first:
        row, i = min(first)
        raise DamagedRecord(row, checks[i][1](row))


def draw(logits: Tensor, k: int, seed: int) -> Tensor:
    """``k`` ids drawn i.i.d. from ``softmax(logits)`` (temperature 1) per row of ``logits``
    ``[m, C]``, sorted ascending per row: ``int64 [m, k]``. Inverse-CDF sampling in float64
    from a (CPU) generator seeded with ``seed``, so the same logits and seed give the same draws
    on any machine, device and thread count. A row that is not a distribution (NaN) is a :class:`DamagedRecord`."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    bad = logp.isnan().any(-1)
    if bool(bad.any()):
        raise DamagedRecord(int(bad.nonzero()[0, 0]), "a log-probability is NaN")
    cdf = logp.exp().cumsum(-1)
    u = torch.rand(logits.shape[0], k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ids = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).clamp_(max=logits.shape[-1] - 1)
    return ids.sort(dim=-1).values


def placeholder(layout: Layout, m: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """What :func:`decode` would give for ``m`` positions a store does not hold (their target
    is -100, so every loss ignores them): a valid distribution, finite where a record's is.
    Top-k: the first k ids with equal mass (the tail's share too); draws: id 0 drawn k times."""
    if layout.sampled:
        draws = torch.zeros(m, layout.k, dtype=torch.int64)
        return draws, draw_weights(draws), torch.full((m,), float("-inf"))
    share = -math.log(layout.k + (0 if layout.full else 1))
    ids = torch.arange(layout.k).expand(m, layout.k).clone()
    return ids, torch.full((m, layout.k), share), None if layout.full else torch.full((m,), share)
