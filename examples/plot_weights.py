"""Loss-weight dynamics of kdcore runs (cf. fig. 3 of cross-batch weighting paper).

Reads each run directory's ``metrics.jsonl`` and draws, per run, the
effective weight of every loss term per epoch: its time weight
``weight/<term>`` times its multiplier in the update ``weighting/coef/<term>``
logged by the gradient-aware schedulers (crossbatch: ``1/2 + lam w``; mgda:
the min-norm weights; pcgrad: the projection coefficients; 1 without a
scheduler). ``--keys`` adds other logged series (e.g. ``weighting/lam``,
``weighting/w_kd``). Both factors are epoch means.

Uses matplotlib when installed, otherwise Pillow (a plain line chart);
with neither it says what to install.

    .venv/bin/python examples/plot_weights.py RUN_DIR [RUN_DIR ...] [--out weights.png]
        [--keys weighting/lam ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def series(run: Path, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``label -> [(epoch, value)]``: each term's effective weight, then the extra keys."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        for key, w in rec.items():
            if key.startswith("weight/"):
                term = key[len("weight/"):]
                coef = rec.get(f"weighting/coef/{term}", 1.0)
                out.setdefault(f"{term} (effective)", []).append((rec["epoch"], w * coef))
        for key in keys:
            if key in rec:
                out.setdefault(key, []).append((rec["epoch"], rec[key]))
    return out


def plot_matplotlib(data: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.4), squeeze=False)
    for ax, (name, lines) in zip(axes[0], data.items()):
        for i, (label, pts) in enumerate(lines.items()):
            ax.plot(*zip(*pts), label=label, color=COLORS[i % len(COLORS)])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss weight")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_pillow(data: dict[str, dict], out: Path) -> None:
    from PIL import Image, ImageDraw

    pw, ph, pad = 360, 260, 40
    img = Image.new("RGB", (pw * len(data), ph + 110), "white")
    draw = ImageDraw.Draw(img)
    for k, (name, lines) in enumerate(data.items()):
        x0 = k * pw + pad
        pts = [p for ps in lines.values() for p in ps]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        xlo, xhi = min(xs), max(max(xs), min(xs) + 1)
        ylo, yhi = min(min(ys), 0.0), max(ys)
        yhi = yhi if yhi > ylo else ylo + 1.0

        def at(x, y, x0=x0, xlo=xlo, xhi=xhi, ylo=ylo, yhi=yhi):
            return (x0 + (x - xlo) / (xhi - xlo) * (pw - 2 * pad),
                    20 + (1 - (y - ylo) / (yhi - ylo)) * (ph - 40))

        draw.rectangle([at(xlo, yhi), at(xhi, ylo)], outline="black")
        draw.text((x0, 4), name, fill="black")
        draw.text((x0 - 35, at(xlo, yhi)[1] - 5), f"{yhi:.3g}", fill="black")
        draw.text((x0 - 35, at(xlo, ylo)[1] - 5), f"{ylo:.3g}", fill="black")
        draw.text((x0, ph - 15), f"epoch {xlo}..{xhi}", fill="black")
        for i, (label, ps) in enumerate(lines.items()):
            color = COLORS[i % len(COLORS)]
            if len(ps) > 1:
                draw.line([at(x, y) for x, y in ps], fill=color, width=2)
            else:
                x, y = at(*ps[0])
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
            draw.text((x0, ph + 5 + 14 * i), label, fill=color)
    img.save(out)


def main() -> int:
    ap = argparse.ArgumentParser(description="plot the loss-weight dynamics of kdcore runs")
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    ap.add_argument("--out", type=Path, default=Path("weights.png"))
    ap.add_argument("--keys", nargs="*", default=[], help="extra metrics.jsonl keys to draw")
    args = ap.parse_args()
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"plot_weights: no metrics.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    data = {r.name: series(r, args.keys) for r in args.runs}
    for backend in (plot_matplotlib, plot_pillow):
        try:
            backend(data, args.out)
        except ImportError:
            continue
        print(f"wrote {args.out} ({backend.__name__.removeprefix('plot_')})")
        return 0
    print("plot_weights: needs matplotlib or Pillow to draw: pip install matplotlib", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
