"""``run.best_metric``: which evaluation best.pt keeps, its state across resume, and the final line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore.common.errors import ConfigError
from kdcore.engine.best import BestMetric, resolve
from kdcore.engine.loop import summary_line

_spec = importlib.util.spec_from_file_location("helpers_runs", Path(__file__).with_name("helpers_runs.py"))
runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runs)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("metric, pick", [("val_acc", max), ("val_nll", min), ("val_tv", min)])
def test_best_pt_holds_the_epoch_best_by_the_metric(tmp_path, metric, pick):
    conf = runs.teacher_config(epochs=4)
    conf["run"]["best_metric"] = metric
    conf["optim"]["lr"] = 3e-2  # a noisy run: the metrics disagree on the best epoch
    summary = kdcore.train(conf, tmp_path, quiet=True)
    recs = records(tmp_path)
    best = pick(recs, key=lambda r: r[metric])
    assert summary["best_metric"] == metric and summary["best_value"] == best[metric]
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_acc"] == best["val_acc"]
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert (saved["epoch"], saved["metric"], saved["value"]) == (best["epoch"], metric, best[metric])


def test_auto_is_accuracy_for_classes_and_nll_for_tokens():
    assert resolve("auto", token_level=False, has_truth=False) == "val_acc"
    assert resolve("auto", token_level=True, has_truth=False) == "val_nll"


@pytest.mark.parametrize("name, flags, message", [
    ("val_los", {}, "run.best_metric: unknown metric 'val_los'; choose one of auto, val_acc,"),
    ("val_kl", {"has_truth": False}, "run.best_metric: val_kl is a distance to the true distribution"),
    ("val_ppl", {"token_level": False}, "run.best_metric: val_ppl is reported for token-level data only"),
])
def test_a_metric_the_run_cannot_give_is_a_config_error(name, flags, message):
    kwargs = {"token_level": True, "has_truth": True, **flags}
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        resolve(name, **kwargs)


def test_unknown_metric_exits_2_naming_the_key(tmp_path, capsys):
    conf = runs.teacher_config(epochs=1)
    conf["run"]["best_metric"] = "val_kl"
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "r"))
    # gaussian_mixture knows its posterior, so val_kl is accepted there; an unknown name is not
    assert code == 0
    conf["run"]["best_metric"] = "accuracy"
    code, err = runs.cli(capsys, "train", str(runs.write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "r2"))
    assert code == 2 and runs.one_line(err).startswith("kdcore: error: run.best_metric: unknown metric 'accuracy'")


def test_nan_never_becomes_the_best():
    best = BestMetric("val_nll")
    assert best.improves({"val_nll": 2.0}, 1)
    assert not best.improves({"val_nll": float("nan")}, 2)
    assert not best.improves({"val_nll": 2.5}, 3)
    assert best.improves({"val_nll": 1.5}, 4) and (best.value, best.epoch) == (1.5, 4)


def test_old_checkpoint_state_restores_accuracy_only():
    """A last.pt written before run.best_metric kept best_val_acc and best_epoch."""
    old = {"best_val_acc": 0.8, "best_epoch": 3}
    acc, nll = BestMetric("val_acc"), BestMetric("val_nll")
    acc.load_state_dict(old)
    nll.load_state_dict(old)
    assert (acc.value, acc.epoch) == (0.8, 3) and (nll.value, nll.epoch) == (None, None)


def test_resume_keeps_the_best_value(tmp_path):
    conf = runs.teacher_config(epochs=4)
    conf["run"]["best_metric"] = "val_nll"
    whole = kdcore.train(conf, tmp_path / "whole", quiet=True)
    conf["run"]["epochs"] = 2
    kdcore.train(conf, tmp_path / "part", quiet=True)
    conf["run"]["epochs"] = 4
    resumed = kdcore.train(conf, tmp_path / "part", quiet=True, resume=True)
    for key in ("best_metric", "best_value", "best_epoch", "best_val_acc"):
        assert resumed[key] == whole[key], key


def test_final_line_reports_nll_and_perplexity_for_tokens():
    summary = {"report_split": "test", "test_acc": 0.3, "test_nll": 2.5, "test_ppl": 12.182, "test_kl": 0.05,
               "teacher_test_acc": 0.4, "teacher_test_nll": 2.0, "teacher_test_ppl": 7.389,
               "best_metric": "val_nll", "best_value": 2.4, "best_epoch": 3}
    assert summary_line(summary) == (
        "done: student test_nll 2.5000 (ppl 12.18, kl to the truth 0.0500), teacher test_nll 2.0000 "
        "(ppl 7.39); best val_nll 2.4000 (epoch 3)")


def test_final_line_reports_accuracy_for_classes():
    summary = {"report_split": "val", "val_acc": 0.81, "val_tv": 0.06, "best_metric": "val_acc",
               "best_value": 0.82, "best_epoch": 9}
    assert summary_line(summary) == ("done: student val_acc 0.8100 (tv to the truth 0.0600) (no test split: "
                                     "validation split); best val_acc 0.8200 (epoch 9)")
