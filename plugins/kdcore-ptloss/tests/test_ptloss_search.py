"""The coefficient search (PTLoss paper alg. 1, eq. 11), its API and its command."""

import json

import numpy as np
import pytest
import torch

import kdcore
from kdcore import ConfigError
from kdcore.cli import main
from kdcore_ptloss import proxy_teacher, search

kdcore.reload_plugins()


def data(seed=0, n=60, c=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = 2.0 * torch.randn(n, c, generator=g) + 3.0 * torch.nn.functional.one_hot(labels, c)
    return logits, labels


def plain_score(proxy, labels):
    """Eq. 11 written out: (mean_n ||p_n - y_n||_2)^2 + mean_n (p_n . log p_n)^2."""
    dist, ent = [], []
    for p, y in zip(proxy, labels):
        onehot = np.eye(len(p))[y]
        dist.append(np.sqrt(np.sum((p - onehot) ** 2)))
        ent.append(np.sum([v * np.log(v) for v in p if v > 0]) ** 2)
    return np.mean(dist) ** 2 + np.mean(ent)


def test_structure_and_best():
    logits, labels = data()
    r = search(logits, labels, orders=3, draws=7, seed=1, progress=False)
    assert [d.order for d in r.scores] == [1] * 7 + [2] * 7 + [3] * 7
    assert all(len(d.eps) == d.order for d in r.scores)
    assert all(-1.0 <= e <= 10.0 for d in r.scores for e in d.eps)
    best = min(r.scores, key=lambda d: d.score)
    assert r.score == best.score and r.eps == best.eps and r.order == best.order
    assert all(d.converged == 1.0 for d in r.scores)
    assert r["eps"] == r.eps and r.scores[0]["score"] == r.scores[0].score
    json.dumps(r.to_dict())


def test_scores_match_per_draw_reference():
    logits, labels = data(1)
    r = search(logits, labels, orders=2, draws=4, space=(-0.5, 4.0), seed=3, progress=False)
    for d in r.scores[::3]:
        proxy = proxy_teacher(logits.double(), d.eps).exp().numpy()
        assert d.score == pytest.approx(plain_score(proxy, labels.numpy()), rel=1e-9)
    teacher = torch.softmax(logits.double(), -1).numpy()
    assert r.teacher_score == pytest.approx(plain_score(teacher, labels.numpy()), rel=1e-12)


def test_per_class_and_seed():
    logits, labels = data(2, c=4)
    r = search(logits, labels, orders=2, draws=3, per_class=True, space=(0.0, 1.0), progress=False)
    assert all(len(d.eps) == 4 and all(len(row) == d.order for row in d.eps) for d in r.scores)
    assert all(0.0 <= e <= 1.0 for d in r.scores for row in d.eps for e in row)
    again = search(logits, labels, orders=2, draws=3, per_class=True, space=(0.0, 1.0), progress=False)
    other = search(logits, labels, orders=2, draws=3, per_class=True, space=(0.0, 1.0), seed=5, progress=False)
    assert again.scores == r.scores and other.scores != r.scores


def test_token_level_with_ignored_labels():
    logits, labels = data(3, n=24)
    labels[::5] = -100
    flat = search(logits[labels != -100], labels[labels != -100], orders=1, draws=4, progress=False)
    tokens = search(logits.reshape(4, 6, 3), labels.reshape(4, 6), orders=1, draws=4, progress=False)
    assert flat.scores == tokens.scores


def test_search_improves_an_overconfident_teacher():
    from kdcore.builtin.datasets import gaussian_mixture

    val = gaussian_mixture(n=4000).val
    logits = 4.0 * torch.log(val.posterior)         # sharpened Bayes posterior
    r = search(logits, val.targets, orders=2, draws=20, progress=False)
    assert r.score < r.teacher_score


@pytest.mark.parametrize("kwargs, match", [
    ({"orders": 0}, "orders"), ({"draws": 1.5}, "draws"), ({"space": (3.0, 1.0)}, "space"),
    ({"space": 4}, "space"), ({"seed": "x"}, "seed"),
])
def test_bad_arguments(kwargs, match):
    logits, labels = data()
    with pytest.raises(ConfigError, match=match):
        search(logits, labels, progress=False, **kwargs)


def test_bad_inputs():
    logits, labels = data()
    with pytest.raises(ConfigError, match="labels"):
        search(logits, labels[:-1], progress=False)
    with pytest.raises(ConfigError, match="labels"):
        search(logits, labels + 3, progress=False)
    with pytest.raises(ConfigError, match="labels"):
        search(logits, torch.full_like(labels, -100), progress=False)


def test_command_with_tensors(tmp_path, capsys):
    logits, labels = data()
    torch.save({"teacher_logits": logits, "labels": labels}, tmp_path / "val.pt")
    out = tmp_path / "eps.json"
    code = main(["ptloss-search", "--tensors", str(tmp_path / "val.pt"), "--orders", "2", "--draws", "3",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    saved = json.loads(out.read_text())
    want = search(logits, labels, orders=2, draws=3, progress=False)
    assert saved["eps"] == want.eps and saved["score"] == want.score and len(saved["scores"]) == 6
    assert saved["samples"] == 60


def test_command_user_errors(tmp_path, capsys):
    assert main(["ptloss-search", "--tensors", str(tmp_path / "missing.pt")]) == 2
    torch.save({"logits": torch.zeros(3, 2)}, tmp_path / "bad.pt")
    assert main(["ptloss-search", "--tensors", str(tmp_path / "bad.pt")]) == 2
    torch.save({"logits": torch.zeros(3, 2), "labels": torch.tensor([0, 1, 5])}, tmp_path / "lab.pt")
    assert main(["ptloss-search", "--tensors", str(tmp_path / "lab.pt"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing.pt" in err and "labels" in err and "Traceback" not in err


def test_command_with_config_and_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = kdcore.create("backbone", "mlp", num_classes=3, in_features=30, hidden=[8])
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    (tmp_path / "run.toml").write_text(
        '[data]\nname = "gaussian_mixture"\nn = 400\n\n[student]\nbackbone = "mlp"\nhidden = [8]\n\n'
        '[[loss]]\nname = "ce"\n')
    out = tmp_path / "eps.json"
    args = ["ptloss-search", "--config", str(tmp_path / "run.toml"), "--orders", "1", "--draws", "2",
            "--no-progress", "--out", str(out)]
    assert main(args) == 2                                  # no checkpoint
    assert main(args + ["--checkpoint", str(tmp_path / "teacher.pt")]) == 0
    saved = json.loads(out.read_text())
    assert saved["samples"] == 20 and len(saved["scores"]) == 2


def scipy_proxy(z, eps):
    """Proxy teacher of one row by a plain BFGS solve of argmin_q l_PT(p, q)
    (eq. 7) over C - 1 free logits, from the teacher, in numpy float64."""
    from scipy.optimize import minimize

    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    m = np.arange(1, eps.shape[1] + 1)

    def l_pt(v):
        w = np.append(v, 0.0)
        logq = w - w.max() - np.log(np.exp(w - w.max()).sum())
        return np.sum(p * (np.log(p) - logq)) + np.sum(p * np.sum(eps * (1 - np.exp(logq))[:, None] ** m, 1))

    start = np.log(p)
    v = minimize(l_pt, start[:-1] - start[-1], method="BFGS", options={"gtol": 1e-11, "maxiter": 10000}).x
    w = np.append(v, 0.0)
    return np.exp(w - w.max()) / np.exp(w - w.max()).sum()


@pytest.mark.parametrize("per_class", [False, True])
def test_against_independent_algorithm_1(per_class):
    """Every draw's eq. 11 score, and the winner, from proxies solved by scipy."""
    logits, labels = data(4, n=10)
    r = search(logits, labels, orders=2, draws=3, per_class=per_class, seed=7, progress=False)
    z = logits.double().numpy()
    want = []
    for d in r.scores:
        eps = np.array(d.eps if per_class else [d.eps] * 3, dtype=np.float64)
        want.append(plain_score(np.stack([scipy_proxy(row, eps) for row in z]), labels.numpy()))
    np.testing.assert_allclose([d.score for d in r.scores], want, rtol=1e-6)  # BFGS reaches ~1e-8
    assert r.score == r.scores[int(np.argmin(want))].score


def test_progress_bar(capsys):
    logits, labels = data()
    search(logits, labels, orders=1, draws=2, progress=True)
    assert "ptloss-search" in capsys.readouterr().err
    search(logits, labels, orders=1, draws=2, progress=False)
    assert capsys.readouterr().err == ""


def test_command_checks_output_before_searching(tmp_path, capsys):
    logits, labels = data()
    torch.save({"teacher_logits": logits, "labels": labels}, tmp_path / "val.pt")
    code = main(["ptloss-search", "--tensors", str(tmp_path / "val.pt"), "--no-progress",
                 "--out", str(tmp_path / "missing" / "eps.json")])
    assert code == 2 and "--out" in capsys.readouterr().err
