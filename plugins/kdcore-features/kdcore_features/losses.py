"""The feature losses of kdcore-features (methods.md, "Feature-based distillation").

Each class cites the paper's equation; where the paper leaves a choice the
default follows mdistiller (megvii-research/mdistiller, its CIFAR-100 configs
and ``mdistiller/engine/cfg.py``) or RepDistiller (HobbitLong/RepDistiller), as
stated per class and in docs/methods/features.md. Loss weights (mdistiller's
``FEAT_WEIGHT``) are *not* inside the losses: they are the ``weight`` of the
``[[loss]]`` table (see the recipes in examples/features_*.toml).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdcore.common import params
from kdcore.common.errors import ConfigError
from kdcore.losses.outputs import Outputs
from kdcore_features.base import FeatureLoss, LazyConnectors, match_spatial, pool_vector


def _same_batch(name: str, fs: Tensor, ft: Tensor) -> None:
    if fs.shape[0] != ft.shape[0]:
        raise ValueError(f"{name}: batch sizes differ, student {tuple(fs.shape)} vs teacher {tuple(ft.shape)}")


# -- FitNet --------------------------------------------------------------------------------------
def conv_regressor(name: str, s_shape: torch.Size, t_shape: torch.Size) -> nn.Module:
    """FitNet's regressor from the student's feature shape to the teacher's (mdistiller ``ConvReg``:
    conv + BN + ReLU; a 3x3 stride-2 conv for a 2x larger student map, a 4x4 stride-2 transposed
    conv for a 2x smaller one, else a valid conv of kernel ``1 + s - t`` (1x1 for equal sizes)).
    ``[N, D]`` (or token ``[N, T, D]``) features get a linear map of the last dim."""
    if len(s_shape) == 4 and len(t_shape) == 4:
        (cs, hs, ws), (ct, ht, wt) = s_shape[1:], t_shape[1:]
        if hs == 2 * ht and ws == 2 * wt:
            conv = nn.Conv2d(cs, ct, 3, stride=2, padding=1)
        elif 2 * hs == ht and 2 * ws == wt:
            conv = nn.ConvTranspose2d(cs, ct, 4, stride=2, padding=1)
        elif hs >= ht and ws >= wt:
            conv = nn.Conv2d(cs, ct, (1 + hs - ht, 1 + ws - wt))
        else:
            raise ValueError(f"{name}: no regressor from student {tuple(s_shape)} to teacher {tuple(t_shape)} "
                             "(the student's map must be 2x smaller, or at least as large in both dims)")
        return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(ct), relu=nn.ReLU()))
    if len(s_shape) == len(t_shape) and len(s_shape) in (2, 3) and s_shape[1:-1] == t_shape[1:-1]:
        return nn.Linear(s_shape[-1], t_shape[-1])
    raise ValueError(f"{name}: no regressor from student {tuple(s_shape)} to teacher {tuple(t_shape)}")


class FitNet(LazyConnectors):
    """FitNets (Romero et al. 2015), hint loss: ``mean((r(f_s) - f_t)^2)`` per tap pair, summed.

    ``r`` is :func:`conv_regressor` (mdistiller ``ConvReg``), one per pair, built on
    the first call. Default taps: the second stage of each model (mdistiller
    ``HINT_LAYER = 2`` of ``[stem, stage1, stage2, ...]``); weight 100 in the recipes.
    """

    name = "fitnet"
    choose = staticmethod(lambda taps: [taps.stages[min(1, len(taps.stages) - 1)]])

    def build(self, fs, ft, student, teacher):
        for s, t in zip(fs, ft):
            _same_batch(self.name, s, t)
        return {"regressors": nn.ModuleList(conv_regressor(self.name, s.shape, t.shape) for s, t in zip(fs, ft))}

    def compute(self, fs, ft, student, teacher, target):
        total = None
        for reg, s, t in zip(self.regressors, fs, ft):
            r = reg(s)
            if r.shape != t.shape:
                raise ValueError(f"{self.name}: regressed student {tuple(r.shape)} does not match teacher "
                                 f"{tuple(t.shape)} (student {tuple(s.shape)})")
            term = F.mse_loss(r, t.to(r.dtype))
            total = term if total is None else total + term
        return total


# -- AT ------------------------------------------------------------------------------------------
class AT(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis 2017, eq. 2 with the p=2 attention map):
    ``a(f) = normalize(mean_c f^p)`` over the flattened map, ``mean((a(f_s) - a(f_t))^2)``
    per pair (mean over samples and positions), summed over pairs. A pair of different
    spatial sizes is matched by adaptive average pooling of the larger map (mdistiller).
    Default taps: every stage after the stem (mdistiller ``feats[1:]``); weight 1000.
    """

    name = "at"

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None, p: float = 2.0):
        super().__init__(student_layers, teacher_layers)
        self.p = params.positive("p", p)

    def _attention(self, f: Tensor) -> Tensor:
        return F.normalize(f.pow(self.p).mean(1).reshape(f.shape[0], -1), dim=1)

    def compute(self, fs, ft, student, teacher, target):
        total = None
        for s, t in zip(fs, ft):
            s, t = match_spatial(self.name, s, t)
            term = (self._attention(s) - self._attention(t.to(s.dtype))).pow(2).mean()
            total = term if total is None else total + term
        return total


# -- SP ------------------------------------------------------------------------------------------
class SP(FeatureLoss):
    """Similarity-preserving KD (Tung & Mori 2019, eqs. 1-4): ``G = row_normalize(F F^T)``
    with ``F`` the per-sample flattened feature, ``||G_s - G_t||_F^2 / N^2`` per pair,
    summed. Default tap: the last stage (mdistiller ``feats[-1]``); weight 3000."""

    name = "sp"
    batch_level = True
    choose = staticmethod(lambda taps: [taps.stages[-1]])

    def compute(self, fs, ft, student, teacher, target):
        total = None
        for s, t in zip(fs, ft):
            _same_batch(self.name, s, t)
            n = s.shape[0]
            s, t = s.reshape(n, -1), t.reshape(n, -1).to(s.dtype)
            gs = F.normalize(s @ s.t(), dim=1)
            gt = F.normalize(t @ t.t(), dim=1)
            term = (gs - gt).pow(2).sum() / (n * n)
            total = term if total is None else total + term
        return total


# -- PKT -----------------------------------------------------------------------------------------
def _cosine_conditional(f: Tensor, eps: float) -> Tensor:
    f = f / (f.norm(dim=1, keepdim=True) + eps)
    k = (f @ f.t() + 1.0) / 2.0
    return k / k.sum(1, keepdim=True)


class PKT(FeatureLoss):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018, eqs. 7-10) with the cosine
    kernel: ``K = (cos + 1) / 2``, row-normalised into conditionals ``p_{i|j}``;
    ``mean_{ij} p^t log((p^t + eps) / (p^s + eps))`` with the paper's ``eps = 1e-7``.
    The mean over all ``N^2`` entries (not the sum) and ``eps`` added to the norms follow
    the authors' code as kept in mdistiller. A ``[N, C, H, W]`` tap is averaged over space
    (the pooled feature mdistiller reads). Default tap: the pooled feature; weight 30000."""

    name = "pkt"
    batch_level = True
    choose = staticmethod(lambda taps: [taps.pooled])

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None, eps: float = 1e-7):
        super().__init__(student_layers, teacher_layers)
        self.eps = params.positive("eps", eps)

    def compute(self, fs, ft, student, teacher, target):
        total = None
        for s, t in zip(fs, ft):
            _same_batch(self.name, s, t)
            s, t = pool_vector(s), pool_vector(t).to(s.dtype)
            ps, pt = _cosine_conditional(s, self.eps), _cosine_conditional(t, self.eps)
            term = (pt * torch.log((pt + self.eps) / (ps + self.eps))).mean()
            total = term if total is None else total + term
        return total


# -- Relational KD -------------------------------------------------------------------------------
def _pairwise_distance(e: Tensor, squared: bool, eps: float) -> Tensor:
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1.0 - torch.eye(e.shape[0], dtype=d.dtype, device=d.device))


def _triplet_cosines(e: Tensor) -> Tensor:
    diff = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2)  # [i, j] = e_j - e_i
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


class Relational(FeatureLoss):
    """Relational KD (Park et al. 2019, eqs. 3-7), registered as ``relational``.

    Distance-wise potential: pairwise Euclidean distances divided by their mean over
    pairs ``i != j``; angle-wise: cosines of the angles ``e_j - e_i, e_k - e_i`` of every
    triplet; each compared with the Huber (smooth L1, delta = 1) loss, averaged over all
    ``N^2`` (``N^3``) entries, diagonal included (mdistiller); ``distance_weight * L_D +
    angle_weight * L_A`` with 25 and 50 (paper, mdistiller). The teacher side carries no
    gradient. A ``[N, C, H, W]`` tap is averaged over space (mdistiller reads the pooled
    feature). Default tap: the pooled feature; weight 1.
    """

    name = "relational"
    batch_level = True
    choose = staticmethod(lambda taps: [taps.pooled])

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None, distance_weight: float = 25.0,
                 angle_weight: float = 50.0, squared: bool = False, eps: float = 1e-12):
        super().__init__(student_layers, teacher_layers)
        self.distance_weight = params.non_negative("distance_weight", distance_weight)
        self.angle_weight = params.non_negative("angle_weight", angle_weight)
        self.squared = bool(squared)
        self.eps = params.positive("eps", eps)

    def compute(self, fs, ft, student, teacher, target):
        total = None
        for s, t in zip(fs, ft):
            _same_batch(self.name, s, t)
            s, t = pool_vector(s), pool_vector(t).to(s.dtype)
            term = s.new_zeros(())
            if self.distance_weight:
                with torch.no_grad():
                    td = _pairwise_distance(t, self.squared, self.eps)
                    td = td / td[td > 0].mean()
                sd = _pairwise_distance(s, self.squared, self.eps)
                sd = sd / sd[sd > 0].mean()
                term = term + self.distance_weight * F.smooth_l1_loss(sd, td)
            if self.angle_weight:
                with torch.no_grad():
                    ta = _triplet_cosines(t)
                term = term + self.angle_weight * F.smooth_l1_loss(_triplet_cosines(s), ta)
            total = term if total is None else total + term
        return total


# -- VID -----------------------------------------------------------------------------------------
class VID(LazyConnectors):
    """Variational information distillation (Ahn et al. 2019, eqs. 2-6): the Gaussian negative
    log-likelihood ``mean(0.5 * ((mu(f_s) - f_t)^2 / sigma^2 + log sigma^2))`` per pair,
    summed; ``mu`` three 1x1 convs (no bias) with ReLUs, ``sigma^2 = softplus(alpha) + eps``
    per channel, ``alpha`` starting at ``softplus^-1(init_pred_var - eps)`` (mdistiller /
    the authors' code: ``init_pred_var = 5``, ``eps = 1e-5``). Pairs of different spatial
    size are pooled to the smaller one. Default taps: every stage after the stem; weight 1.
    """

    name = "vid"

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None, init_pred_var: float = 5.0,
                 eps: float = 1e-5):
        super().__init__(student_layers, teacher_layers)
        self.init_pred_var = params.positive("init_pred_var", init_pred_var)
        self.eps = params.positive("eps", eps)
        if self.init_pred_var <= self.eps:
            raise ConfigError(f"init_pred_var: must be > eps ({self.eps}), got {init_pred_var!r}")

    def build(self, fs, ft, student, teacher):
        regs, scales = nn.ModuleList(), nn.ParameterList()
        start = math.log(math.expm1(self.init_pred_var - self.eps))
        for s, t in zip(fs, ft):
            s, t = match_spatial(self.name, s, t)
            cs, ct = s.shape[1], t.shape[1]
            regs.append(nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.ReLU(),
                                      nn.Conv2d(ct, ct, 1, bias=False), nn.ReLU(),
                                      nn.Conv2d(ct, ct, 1, bias=False)))
            scales.append(nn.Parameter(torch.full((ct,), start)))
        return {"regressors": regs, "log_scales": scales}

    def compute(self, fs, ft, student, teacher, target):
        total = None
        for reg, log_scale, s, t in zip(self.regressors, self.log_scales, fs, ft):
            s, t = match_spatial(self.name, s, t)
            mean = reg(s)
            if mean.shape != t.shape:
                raise ValueError(f"{self.name}: regressed student {tuple(mean.shape)} does not match teacher "
                                 f"{tuple(t.shape)}")
            var = (F.softplus(log_scale) + self.eps).view(1, -1, 1, 1).to(mean.dtype)
            term = (0.5 * ((mean - t.to(mean.dtype)).pow(2) / var + var.log())).mean()
            total = term if total is None else total + term
        return total


# -- CRD -----------------------------------------------------------------------------------------
class CRD(LazyConnectors):
    """Contrastive representation distillation (Tian et al. 2020, eqs. 18-19, the NCE form
    with a memory bank, as the authors' code).

    ``v_s = normalize(W_s f_s)``, ``v_t = normalize(W_t f_t)`` (linear embeddings to
    ``embed_dim = 128``, lazy connectors built on the first call); for each sample its own bank row (the
    positive, at the sample's dataset index ``outputs.index``) and ``num_negatives``
    rows drawn uniformly (``torch.randint``) from the bank; scores
    ``h = exp(<v, m> / T) / Z`` with ``Z`` fixed on the first training batch to
    ``mean(exp(...)) * num_data``; the NCE loss ``-[log h_pos / (h_pos + K/N_d) +
    sum_neg log (K/N_d) / (h_neg + K/N_d)] / N`` on the student anchor against the
    teacher bank plus the teacher anchor against the student bank. After the step the
    bank rows at the batch indices become ``normalize(m * row + (1 - m) * v)``,
    ``m = momentum``. Defaults (paper, RepDistiller, mdistiller): 16384 negatives,
    ``T = 0.07``, ``momentum = 0.5``, ``embed_dim = 128``; weight 0.8.

    ``num_data`` (the training set's size: the bank's rows) is required. The bank
    (``memory_student``, ``memory_teacher``) and ``Z`` (``normaliser``) are buffers, so
    they are checkpointed; they change only in calls made in training mode with grad
    enabled (not in the engine's shape-inference pass, not under ``no_grad``).
    RepDistiller's default ``exact`` mode draws the negatives from other classes by the
    dataset's labels; kdcore draws them uniformly (the noise distribution of the NCE
    derivation, ``P_n = 1 / N_d``).
    """

    name = "crd"
    batch_level = True
    #: parameters for kdcore.testing's checks (num_data is the training set's size; a small bank)
    testing_params = {"num_data": 8, "num_negatives": 16}
    choose = staticmethod(lambda taps: [taps.pooled])

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None, num_data: int | None = None,
                 embed_dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
                 momentum: float = 0.5):
        super().__init__(student_layers, teacher_layers)
        if num_data is None:
            raise ConfigError("num_data: required by crd (the training set's size, the memory bank's rows; "
                              "e.g. 50000 for CIFAR-100)")
        self.num_data = params.positive_int("num_data", num_data)
        self.embed_dim = params.positive_int("embed_dim", embed_dim)
        self.num_negatives = params.positive_int("num_negatives", num_negatives)
        self.temperature = params.positive("temperature", temperature)
        self.momentum = params.in_range("momentum", momentum, 0.0, 1.0)
        if len(self.student_taps or [None]) != 1 or len(self.teacher_taps or [None]) != 1:
            raise ConfigError("crd: takes one student and one teacher tap")
        stdv = 1.0 / math.sqrt(self.embed_dim / 3)
        self.register_buffer("memory_student", torch.rand(self.num_data, self.embed_dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_teacher", torch.rand(self.num_data, self.embed_dim) * (2 * stdv) - stdv)
        self.register_buffer("normaliser", torch.full((2,), -1.0))

    def build(self, fs, ft, student, teacher):
        s, t = pool_vector(fs[0]), pool_vector(ft[0])
        return {"embed_student": nn.Linear(s.shape[1], self.embed_dim),
                "embed_teacher": nn.Linear(t.shape[1], self.embed_dim)}

    def _scores(self, bank: Tensor, v: Tensor, rows: Tensor) -> Tensor:
        """``[N, K + 1]`` dot products ``bank[rows[i, j]] . v[i]``. Where the bank has at most
        4 rows per sampled one, all ``bank @ v^T`` (one matrix product) and a gather of the
        sampled entries cost less than gathering ``N (K + 1)`` bank rows (memory-bound);
        else the rows are gathered. The same values up to rounding, and the same gradient."""
        if bank.shape[0] <= 4 * rows.shape[1]:  # a copy: the bank moves before the backward pass
            return (bank.to(v.dtype, copy=True) @ v.t()).t().gather(1, rows)
        bank = bank.to(v.dtype)
        return torch.bmm(bank[rows], v[:, :, None]).squeeze(2)

    def _nce(self, h: Tensor) -> Tensor:
        k = h.shape[1] - 1
        noise = k / self.num_data
        eps = 1e-7
        pos = torch.log(h[:, 0] / (h[:, 0] + noise + eps))
        neg = torch.log(noise / (h[:, 1:] + noise + eps))
        return -(pos.sum() + neg.sum()) / h.shape[0]

    def compute(self, fs, ft, student, teacher, target):
        s, t = pool_vector(fs[0]), pool_vector(ft[0])
        _same_batch(self.name, s, t)
        index = student.index if student.index is not None else (teacher.index if teacher is not None else None)
        if index is None:
            raise ValueError("crd: needs the batch's dataset indices (outputs.index), got None")
        index = index.to(device=s.device, dtype=torch.long).reshape(-1)
        if index.numel() != s.shape[0]:
            raise ValueError(f"crd: {index.numel()} indices for a batch of {s.shape[0]}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_data):
            raise ValueError(f"crd: a dataset index is outside [0, num_data={self.num_data}) "
                             f"(got {int(index.min())}..{int(index.max())}): set num_data to the training set's size")
        vs = F.normalize(self.embed_student(s), dim=1)
        vt = F.normalize(self.embed_teacher(t.to(s.dtype)), dim=1)
        n = vs.shape[0]
        rows = torch.cat([index[:, None], torch.randint(self.num_data, (n, self.num_negatives), device=s.device)], 1)
        hs = torch.exp(self._scores(self.memory_teacher, vs, rows) / self.temperature)
        ht = torch.exp(self._scores(self.memory_student, vt, rows) / self.temperature)
        update = self.training and torch.is_grad_enabled()
        z = self.normaliser.clone()
        with torch.no_grad():
            if z[0] < 0:
                z[0] = hs.mean() * self.num_data
            if z[1] < 0:
                z[1] = ht.mean() * self.num_data
        loss = self._nce(hs / z[0].to(hs.dtype)) + self._nce(ht / z[1].to(ht.dtype))
        if update:
            with torch.no_grad():
                self.normaliser.copy_(z)
                for bank, v in ((self.memory_student, vs), (self.memory_teacher, vt)):
                    new = F.normalize(bank[index] * self.momentum + v.detach().to(bank.dtype) * (1 - self.momentum),
                                      dim=1)
                    bank.index_copy_(0, index, new)
        return loss


# -- ReviewKD ------------------------------------------------------------------------------------
class ABF(nn.Module):
    """ReviewKD's attention-based fusion block (Chen et al. 2021, sec. 3.3, fig. 3)."""

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, 1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, (h, w), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], 1))
            x = x * z[:, 0].view(n, 1, h, w) + residual * z[:, 1].view(n, 1, h, w)
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, out_size, mode="nearest")
        return self.conv2(x), x


def hcl(fs: Tensor, ft: Tensor, levels: tuple[int, ...] = (4, 2, 1)) -> Tensor:
    """ReviewKD's hierarchical context loss for one pair: the MSE at full size plus the MSEs of
    the ``l x l`` average-pooled maps (``l < H``) with weights 1/2, 1/4, ..., normalised by the weights' sum."""
    loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
    for level in levels:
        if level >= fs.shape[2]:
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, level), F.adaptive_avg_pool2d(ft, level))
        total += weight
    return loss / total


class ReviewKD(LazyConnectors):
    """Knowledge review (Chen et al. 2021, eqs. 4-6, the residual ABF + HCL framework).

    The student's taps, deepest first, are fused by attention-based fusion blocks
    (1x1 conv to ``mid = min(max_mid_channel, C_last)`` channels, fusion with the
    upsampled (nearest) residual from the deeper level by a 2-channel sigmoid
    attention, 3x3 conv to the teacher's channels at the teacher's spatial size);
    the hierarchical context loss against each teacher tap is summed over the levels.
    With ``pool_last`` (default) the last tap pair is globally average-pooled to
    ``1 x 1`` (mdistiller appends the pooled feature). Default taps: every stage after
    the stem plus the pooled tap (mdistiller ``feats[1:] + [pooled]``); weight 5 on
    resnet32x4 -> resnet8x4 (1 otherwise) with a 20-epoch warm-up (scheduler
    ``warmup``). mdistiller reads the teacher's pre-activation stage outputs, which
    module taps cannot reach in the zoo's blocks: kdcore uses the tapped (post-activation)
    outputs on both sides.
    """

    name = "reviewkd"
    choose = staticmethod(lambda taps: [*taps.stages, taps.pooled])

    def __init__(self, student_layers: Any = None, teacher_layers: Any = None, max_mid_channel: int = 512,
                 pool_last: bool = True):
        super().__init__(student_layers, teacher_layers)
        self.max_mid_channel = params.positive_int("max_mid_channel", max_mid_channel)
        self.pool_last = bool(pool_last)

    def _maps(self, fs: list[Tensor], ft: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        fs, ft = list(fs), list(ft)
        if self.pool_last:
            fs[-1] = pool_vector(fs[-1])[:, :, None, None]
            ft[-1] = pool_vector(ft[-1])[:, :, None, None]
        for s, t in zip(fs, ft):
            if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
                raise ValueError(f"{self.name}: needs [N, C, H, W] maps of one batch, got student "
                                 f"{tuple(s.shape)} and teacher {tuple(t.shape)}")
        return fs, ft

    def build(self, fs, ft, student, teacher):
        fs, ft = self._maps(fs, ft)
        mid = min(self.max_mid_channel, fs[-1].shape[1])
        last = len(fs) - 1
        return {"abfs": nn.ModuleList(ABF(s.shape[1], mid, t.shape[1], i < last)
                                      for i, (s, t) in enumerate(zip(fs, ft)))}

    def compute(self, fs, ft, student, teacher, target):
        fs, ft = self._maps(fs, ft)
        results: list[Tensor] = [None] * len(fs)  # type: ignore[list-item]
        residual = None
        for i in reversed(range(len(fs))):
            results[i], residual = self.abfs[i](fs[i], residual, tuple(ft[i].shape[-2:]))
        total = None
        for r, t in zip(results, ft):
            if r.shape != t.shape:
                raise ValueError(f"{self.name}: fused student {tuple(r.shape)} does not match teacher {tuple(t.shape)}")
            term = hcl(r, t.to(r.dtype))
            total = term if total is None else total + term
        return total


# -- USKD ----------------------------------------------------------------------------------------
class USKD(LazyConnectors):
    """Universal self-knowledge distillation (Yang et al. 2023; Yang et al. 2023; the
    authors' yzd-v/cls_KD code where the abstract is silent). No teacher.

    ``s = softmax(z)``; target soft label ``p_t = s_t^2 + 1 - mean_batch(s_t^2)`` (no
    gradient), ``loss_t = -mean(p_t log s_t)``; weak head ``w = fc(f_mid)`` (``f_mid`` the
    tapped mid feature, averaged over space) trained with ``mu * CE(w, 0.9 onehot + 0.1/C)``;
    non-target soft labels by Zipf's law: classes ranked by ``softmax(w) / (1 - w_t) +
    s / (1 - s_t)`` (probabilities, as the paper; the authors' code mixes in the student's
    log-probabilities), weight ``1 / rank``, target removed, renormalised, no gradient;
    ``loss_non = CE(zipf, softmax of the non-target logits)``;
    ``USKD = alpha loss_t + beta loss_non + loss_weak``. Defaults: the CIFAR-100 setting
    ``alpha = 0.1, beta = 0.1, mu = 0.1`` (ImageNet: 1, 0.1, 0.005). Default tap: the
    second-to-last stage. Rows whose target is -100 are ignored.
    """

    name = "uskd"
    uses_teacher = False
    batch_level = True  # p_t subtracts the batch mean of s_t^2
    choose = staticmethod(lambda taps: [taps.stages[-2] if len(taps.stages) > 1 else taps.stages[-1]])

    def __init__(self, student_layers: Any = None, alpha: float = 0.1, beta: float = 0.1, mu: float = 0.1):
        super().__init__(student_layers, None)
        if len(self.student_taps or [None]) != 1:
            raise ConfigError("uskd: takes one student tap (the mid feature)")
        self.alpha = params.non_negative("alpha", alpha)
        self.beta = params.non_negative("beta", beta)
        self.mu = params.non_negative("mu", mu)

    def build(self, fs, ft, student, teacher):
        return {"fc": nn.Linear(pool_vector(fs[0]).shape[1], student.logits.shape[-1])}

    def compute(self, fs, ft, student, teacher, target):
        if target is None:
            raise ValueError("uskd: needs the labels (target), got None")
        z = student.logits
        mid = pool_vector(fs[0])
        if z.dim() != 2 or mid.shape[0] != z.shape[0]:
            raise ValueError(f"uskd: needs [N, C] logits and a mid feature of the same batch, got logits "
                             f"{tuple(z.shape)} and feature {tuple(fs[0].shape)}")
        keep = target != -100
        if not bool(keep.all()):
            z, mid, target = z[keep], mid[keep], target[keep]
        if z.shape[0] == 0:
            return z.sum() * 0.0 + self.fc(mid).sum() * 0.0
        n, c = z.shape
        y = target.long()[:, None]
        logs = F.log_softmax(z, 1)
        log_st = logs.gather(1, y)
        with torch.no_grad():
            st2 = log_st.exp().pow(2)
            pt = st2 + 1.0 - st2.mean()
        loss_t = -(pt * log_st).mean()
        w = self.fc(mid.to(self.fc.weight.dtype)).to(z.dtype)
        logw = F.log_softmax(w, 1)
        soft = torch.full_like(z, 0.1 / c).scatter_add_(1, y, torch.full_like(log_st, 0.9))
        loss_weak = -self.mu * (soft * logw).sum(1).mean()
        with torch.no_grad():
            pw, ps = logw.exp(), logs.exp()
            score = pw / (1 - pw.gather(1, y) + 1e-6) + ps / (1 - ps.gather(1, y) + 1e-6)
            order = score.argsort(1, descending=True)
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(1, c + 1, device=z.device).expand(n, c))
            zipf = 1.0 / rank.to(z.dtype)
            zipf = zipf.scatter(1, y, 0.0)
            zipf = zipf / zipf.sum(1, keepdim=True)
        masked = z.scatter(1, y, float("-inf"))
        log_non = F.log_softmax(masked, 1).scatter(1, y, 0.0)
        loss_non = -(zipf * log_non).sum(1).mean()
        return self.alpha * loss_t + self.beta * loss_non + loss_weak
