"""Write the example data files of examples/user_data/ (a CSV, a .npz, a saved
Hugging Face dataset), so the configs beside this script run:

    python examples/user_data/make_files.py
    kdcore train examples/user_data/csv.toml
    kdcore train examples/user_data/npz.toml
    kdcore train examples/user_data/hf_disk.toml        # needs: pip install 'kdcore[hf]'
    kdcore train examples/user_data/python_model.toml   # my_models.py:Net as the student

The data: 3 Gaussian blobs in 6 dimensions, 600 samples.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def blobs(n: int = 600, dim: int = 6, classes: int = 3, seed: int = 0):
    g = np.random.default_rng(seed)
    y = g.integers(0, classes, n)
    x = (g.normal(size=(n, dim)) + 1.5 * np.eye(classes, dim)[y]).astype(np.float32)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder to write into")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = blobs()
    names = ["setosa", "versicolor", "virginica"]
    with (out / "blobs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"f{i}" for i in range(x.shape[1])), "species"])
        w.writerows([*map(float, row), names[label]] for row, label in zip(x, y))
    np.savez(out / "blobs.npz", inputs=x, targets=y)
    try:
        import datasets
    except ImportError:
        print("datasets is not installed: skipped blobs_hf/ (pip install 'kdcore[hf]')")
    else:
        full = datasets.Dataset.from_dict({"features": x.tolist(), "label": y.tolist()})
        datasets.DatasetDict({"train": full.select(range(480)), "validation": full.select(range(480, 540)),
                              "test": full.select(range(540, 600))}).save_to_disk(str(out / "blobs_hf"))
    print(f"wrote {out / 'blobs.csv'}, {out / 'blobs.npz'} and {out / 'blobs_hf'}")


if __name__ == "__main__":
    main()
