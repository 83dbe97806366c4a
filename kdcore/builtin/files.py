"""Built-in datasets that read a user's local files: ``tensors``, ``csv``, ``hf_disk``.

Each loads the whole file into memory (:class:`kdcore.data.TensorSplit`, the
engine's fast path), validates shapes, dtypes, label range and split sizes,
and reports a problem in one line naming the file and the key or column.
Splits come from the files (``val_path`` / ``test_path``, or a dataset
directory's own splits) or from a ``split`` fraction drawn with ``seed``.
"""

from __future__ import annotations

import csv as csvlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcore.common.errors import ConfigError
from kdcore.data import DataSplits, TensorSplit

INPUT_KEYS = ("inputs", "x", "features", "data")
TARGET_KEYS = ("targets", "y", "labels", "label", "target")


def _existing(name: str, path: Any) -> Path:
    if not isinstance(path, (str, Path)) or not str(path):
        raise ConfigError(f"{name}: must be a file path, got {path!r}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{name}: file not found: {p}")
    return p


def _check_split(split: Any) -> tuple[float, float, float]:
    if not isinstance(split, Sequence) or isinstance(split, str) or len(split) != 3 \
            or any(isinstance(s, bool) or not isinstance(s, (int, float)) or s < 0 for s in split) \
            or abs(sum(split) - 1.0) > 1e-6:
        raise ConfigError(f"split: must be three non-negative fractions summing to 1, got {split!r}")
    return tuple(float(s) for s in split)


def _sample(i: int) -> str:
    """Where sample ``i`` (counted from 0) of a tensor is, for messages."""
    return f"sample {i}"


def _labels(name: str, y: Any, num_classes: int | None,
            where: Callable[[int], str] = _sample) -> tuple[torch.Tensor, int]:
    """Integer class labels ``[n]`` in ``0..C-1`` and ``C``; a bad label is named with
    ``where(i)`` (its sample, or its line of a CSV file).

    Without ``num_classes``, ``C`` is the largest label + 1, and a label that would
    make more classes than there are samples is refused: one typo such as
    2000000000 would otherwise ask the models for two billion outputs."""
    y = torch.as_tensor(y)
    if y.dim() != 1:
        raise ConfigError(f"{name}: labels must be one per sample (shape [n]), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not torch.isfinite(y).all() or not torch.equal(y, y.round()):
            raise ConfigError(f"{name}: labels must be integers, got non-integer values")
        y = y.long()
    elif y.dtype == torch.bool or y.is_complex():
        raise ConfigError(f"{name}: labels must be integers, got dtype {y.dtype}")
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        i = int(y.argmin())
        raise ConfigError(f"{name}: labels must be >= 0, found {int(y[i])} at {where(i)}")
    i = int(y.argmax()) if y.numel() else 0
    seen = int(y[i]) + 1 if y.numel() else 0
    if num_classes is None:
        if seen > y.numel():
            raise ConfigError(f"{name}: label {seen - 1} at {where(i)} is beyond the {y.numel():,} samples (it "
                              f"would make {seen:,} classes); correct it, or give num_classes")
        num_classes = seen
    elif seen > num_classes:
        raise ConfigError(f"{name}: label {seen - 1} at {where(i)} is out of range for num_classes = {num_classes}")
    if num_classes < 2:
        raise ConfigError(f"{name}: needs at least 2 classes, found {num_classes}")
    return y, num_classes


def _inputs(name: str, x: Any) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() < 2:
        raise ConfigError(f"{name}: inputs must be [n, ...] with one row per sample, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ConfigError(f"{name}: inputs must be numbers, got dtype {x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ConfigError(f"{name}: inputs hold NaN or infinite values")
    return x


def _fractions(x: torch.Tensor, y: torch.Tensor, split, seed: int, origin: str) -> list[TensorSplit | None]:
    n = y.shape[0]
    fr = _check_split(split)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(round(fr[0] * n)), int(round(fr[1] * n))
    cuts = [(0, n_train), (n_train, n_train + n_val), (n_train + n_val, n)]
    parts = [TensorSplit(x[perm[a:b]], y[perm[a:b]]) if b > a else None for a, b in cuts]
    if parts[0] is None:
        raise ConfigError(f"split: the training split of {origin} is empty ({n} samples)")
    return parts


def _splits(parts: list[TensorSplit | None], num_classes: int, origin: str, **meta) -> DataSplits:
    shapes = {tuple(p.inputs.shape[1:]) for p in parts if p is not None}
    if len(shapes) > 1:
        raise ConfigError(f"path: {origin}: the splits' inputs differ in shape: {sorted(shapes)}")
    return DataSplits(*parts, num_classes=num_classes, input_shape=shapes.pop(), meta={"source": origin, **meta})


# -- tensors ------------------------------------------------------------------------------------
def _pick(name: str, mapping: dict, key: str | None, candidates: Sequence[str], what: str) -> tuple[str, Any]:
    """The key and value of the inputs (or targets) in a file's mapping."""
    if key is not None:
        if key not in mapping:
            raise ConfigError(f"{name}: no {what} {key!r} (has: {', '.join(sorted(map(str, mapping)))})")
        return key, mapping[key]
    for k in candidates:
        if k in mapping:
            return k, mapping[k]
    raise ConfigError(f"{name}: no {what} found (looked for {', '.join(candidates)}; has: "
                      f"{', '.join(sorted(map(str, mapping)))}); name it with {what.split()[0]}_key")


def _read_tensors(name: str, path: Path, inputs_key: str | None, targets_key: str | None):
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            obj = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as f:
                obj = {k: f[k] for k in f.files}
        else:
            raise ConfigError(f"{name}: {path} is not a .pt or .npz file (for .npy files give inputs and targets)")
    except ConfigError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{name}: cannot read {path} ({first})") from None
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        picked = [("the pair's inputs", obj[0]), ("the pair's targets", obj[1])]
    elif isinstance(obj, dict):
        picked = [_pick(name, obj, inputs_key, INPUT_KEYS, "inputs key"),
                  _pick(name, obj, targets_key, TARGET_KEYS, "targets key")]
    else:
        raise ConfigError(f"{name}: {path} must hold a mapping of inputs and targets, or a pair")
    for key, value in picked:
        _dense(name, path, key, value)
    return picked[0][1], picked[1][1]


def _dense(name: str, path: Path, key: str, value: Any) -> None:
    """Refuse a sparse tensor in one line (torch's own errors on one run to a hundred lines)."""
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        raise ConfigError(f"{name}: {path}: {key} is a sparse tensor; save it dense (tensor.to_dense())")


def _read_npy(name: str, path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{name}: cannot read {path} ({first})") from None


def tensors(path: str | None = None, inputs_path: str | None = None, targets_path: str | None = None,
            val_path: str | None = None, test_path: str | None = None, inputs_key: str | None = None,
            targets_key: str | None = None, split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0,
            num_classes: int | None = None) -> DataSplits:
    """``tensors``: inputs and integer labels from a ``.pt`` (loaded with
    ``weights_only=True``) or ``.npz`` file holding a mapping (keys ``inputs`` /
    ``x`` / ``features`` and ``targets`` / ``y`` / ``labels``, or named with
    ``inputs_key`` / ``targets_key``) or an ``(inputs, targets)`` pair, or from
    two ``.npy`` files (``inputs_path``, ``targets_path``). Splits: ``val_path`` /
    ``test_path`` files of the same form, or else ``split`` fractions."""
    if (path is None) == (inputs_path is None and targets_path is None):
        raise ConfigError("path: give either path (a .pt / .npz file) or inputs_path and targets_path (.npy files)")
    if path is not None:
        p = _existing("path", path)
        x, y = _read_tensors("path", p, inputs_key, targets_key)
        origin = str(p)
        x_file = y_file = f"path: {p}"
    else:
        if inputs_path is None or targets_path is None:
            raise ConfigError("targets_path: .npy inputs need a targets file too" if targets_path is None
                              else "inputs_path: .npy targets need an inputs file too")
        x = _read_npy("inputs_path", _existing("inputs_path", inputs_path))
        y = _read_npy("targets_path", _existing("targets_path", targets_path))
        origin = str(inputs_path)
        x_file, y_file = f"inputs_path: {inputs_path}", f"targets_path: {targets_path}"
    x = _inputs(f"{x_file}: inputs", x)
    y, classes = _labels(f"{y_file}: targets", y, num_classes)
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"{y_file}: {x.shape[0]} inputs but {y.shape[0]} targets")
    if val_path is None and test_path is None:
        return _splits(_fractions(x, y, split, seed, origin), classes, origin)
    parts: list[TensorSplit | None] = [TensorSplit(x, y)]
    for key, extra in (("val_path", val_path), ("test_path", test_path)):
        if extra is None:
            parts.append(None)
            continue
        ep = _existing(key, extra)
        ex, ey = _read_tensors(key, ep, inputs_key, targets_key)
        ex, (ey, _) = _inputs(f"{key}: {ep}: inputs", ex), _labels(f"{key}: {ep}: targets", ey, classes)
        if ex.shape[0] != ey.shape[0]:
            raise ConfigError(f"{key}: {ep}: {ex.shape[0]} inputs but {ey.shape[0]} targets")
        parts.append(TensorSplit(ex, ey))
    return _splits(parts, classes, origin)


# -- csv ----------------------------------------------------------------------------------------
def _integer(text: str) -> int | None:
    """``text`` as an integer class label (``3``, also ``3.0`` as spreadsheets write it),
    else None (also for integers beyond what a tensor of labels holds)."""
    try:
        number = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            return None
        if not value.is_integer():
            return None
        number = int(value)
    return number if -2**63 <= number < 2**63 else None


def _header(p: Path, row: list[str]) -> list[str]:
    """The column names; a repeated one is refused (reading by name would drop all but one)."""
    header = [h.strip() for h in row]
    first: dict[str, int] = {}
    for i, h in enumerate(header):
        if h in first:
            raise ConfigError(f"path: {p}: column {h!r} appears twice in the header (columns {first[h] + 1} "
                              f"and {i + 1}); give each column its own name")
        first[h] = i
    return header


def _class_numbers(p: Path, label: str, cells: list[str], label_names: bool) -> tuple[list[int], list[str] | None]:
    """The label column as class numbers, and the class names where ``label_names``.

    Without ``label_names`` every label must be an integer: a typo such as ``1O`` is
    refused with its line instead of silently turning every label into a name."""
    for r, cell in enumerate(cells):
        if not cell:
            raise ConfigError(f"path: {p} line {r + 2}, column {label!r}: the label is empty")
    if label_names:
        classes = sorted(set(cells))
        number = {name: k for k, name in enumerate(classes)}
        return [number[cell] for cell in cells], classes
    numbers = [_integer(cell) for cell in cells]
    bad = [r for r, n in enumerate(numbers) if n is None]
    if len(bad) == len(cells):
        raise ConfigError(f"label_names: {p}: column {label!r} holds names ({cells[0]!r}, ...), not class "
                          "numbers; set label_names = true to number the names in sorted order")
    if bad:
        r = bad[0]
        raise ConfigError(f"path: {p} line {r + 2}, column {label!r}: {cells[r]!r} is not an integer class "
                          "label; correct it, or set label_names = true if the labels are names")
    return numbers, None


def csv(path: str, label: str = "label", features: Sequence[str] | None = None, delimiter: str = ",",
        split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, num_classes: int | None = None,
        label_names: bool = False) -> DataSplits:
    """``csv``: one sample per row, a header row naming the columns; ``label``
    names the class column (integers ``0..C-1``; with ``label_names = true``,
    names, numbered in sorted order: ``meta["classes"]``), ``features`` the input
    columns (default: every other column), all numeric. Splits by ``split`` fractions."""
    p = _existing("path", path)
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ConfigError(f"delimiter: must be one character, got {delimiter!r}")
    if not isinstance(label_names, bool):
        raise ConfigError(f"label_names: must be true or false, got {label_names!r}")
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csvlib.reader(f, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csvlib.Error) as exc:
        raise ConfigError(f"path: cannot read {p} as CSV ({exc})") from None
    if len(rows) < 2:
        raise ConfigError(f"path: {p} needs a header row and at least one data row")
    header = _header(p, rows[0])
    if label not in header:
        raise ConfigError(f"label: {p} has no column {label!r} (columns: {', '.join(header)})")
    cols = [h for h in header if h != label] if features is None else list(features)
    if not cols:
        raise ConfigError(f"features: {p} has no feature columns besides {label!r}")
    for c in cols:
        if c not in header:
            raise ConfigError(f"features: {p} has no column {c!r} (columns: {', '.join(header)})")
    li, fi = header.index(label), [header.index(c) for c in cols]
    values = np.empty((len(rows) - 1, len(cols)), dtype=np.float32)
    cells: list[str] = []
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ConfigError(f"path: {p} line {r} has {len(row)} fields, the header has {len(header)}")
        for j, i in enumerate(fi):
            try:
                values[r - 2, j] = float(row[i])
            except ValueError:
                raise ConfigError(f"path: {p} line {r}, column {header[i]!r}: {row[i]!r} is not a number") from None
        cells.append(row[li].strip())
    if not np.isfinite(values).all():
        raise ConfigError(f"path: {p} holds NaN or infinite feature values")
    numbers, classes = _class_numbers(p, label, cells, label_names)
    y, n_classes = _labels(f"path: {p}: column {label!r}", torch.tensor(numbers), num_classes,
                           where=lambda i: f"line {i + 2}")
    parts = _fractions(torch.from_numpy(values), y, split, seed, str(p))
    return _splits(parts, n_classes, str(p), columns=cols, **({"classes": classes} if classes else {}))


# -- hf_disk ------------------------------------------------------------------------------------
def hf_disk(path: str, inputs: str | Sequence[str] = "inputs", label: str = "label",
            split: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, num_classes: int | None = None) -> DataSplits:
    """``hf_disk``: a Hugging Face dataset saved with ``save_to_disk``
    (``datasets`` needed: ``pip install 'kdcore[hf]'``). ``inputs`` names the
    input column (arrays) or several numeric columns (stacked as features),
    ``label`` the class column. A ``DatasetDict`` gives its ``train``,
    ``validation`` (or ``val``) and ``test`` splits; a single dataset is split
    by ``split`` fractions."""
    p = _existing("path", path)
    try:
        import datasets
    except ImportError:
        raise ConfigError("data: the hf_disk dataset needs the 'datasets' package "
                          "(pip install 'kdcore[hf]' or pip install datasets)") from None
    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"path: {p} is not a saved Hugging Face dataset ({first})") from None
    columns = [inputs] if isinstance(inputs, str) else list(inputs)

    def table(ds, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        for c in [*columns, label]:
            if c not in ds.column_names:
                key = "label" if c == label else "inputs"
                raise ConfigError(f"{key}: {where} has no column {c!r} (columns: {', '.join(ds.column_names)})")
        try:
            arrays = [np.asarray(ds[c], dtype=np.float32) for c in columns]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"inputs: {where} column(s) {', '.join(columns)} are not numeric arrays ({exc})") \
                from None
        x = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=1)
        if x.ndim == 1:
            x = x[:, None]
        return _inputs(f"path: {where}: inputs", x), torch.as_tensor(np.asarray(ds[label]))

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"path: {p} has no 'train' split (splits: {', '.join(loaded)})")
        x, y = table(loaded["train"], f"{p} [train]")
        y, classes = _labels(f"path: {p} [train]: column {label!r}", y, num_classes)
        parts: list[TensorSplit | None] = [TensorSplit(x, y)]
        for names in (("validation", "val"), ("test",)):
            found = next((n for n in names if n in loaded), None)
            if found is None:
                parts.append(None)
                continue
            ex, ey = table(loaded[found], f"{p} [{found}]")
            ey, _ = _labels(f"path: {p} [{found}]: column {label!r}", ey, classes)
            parts.append(TensorSplit(ex, ey))
        return _splits(parts, classes, str(p))
    x, y = table(loaded, str(p))
    y, classes = _labels(f"path: {p}: column {label!r}", y, num_classes)
    return _splits(_fractions(x, y, split, seed, str(p)), classes, str(p))
