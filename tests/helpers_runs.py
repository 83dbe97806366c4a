"""Small configs and helpers shared by the engine and CLI tests (imported by file path)."""

from pathlib import Path

import tomli_w

from kdcore.cli import main

SMALL_DATA = {"name": "gaussian_mixture", "n": 600}


def teacher_config(epochs: int = 2) -> dict:
    return {
        "run": {"seed": 0, "epochs": epochs, "batch_size": 32, "progress": "off"},
        "data": dict(SMALL_DATA),
        "student": {"backbone": "mlp", "hidden": [32]},
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0},
        "loss": [{"name": "ce"}],
    }


def student_config(checkpoint: str, epochs: int = 3, **run) -> dict:
    return {
        "run": {"seed": 3, "epochs": epochs, "batch_size": 32, "progress": "off", **run},
        "data": dict(SMALL_DATA),
        "teacher": {"backbone": "mlp", "hidden": [32], "checkpoint": checkpoint},
        "student": {"backbone": "mlp", "hidden": [8], "dropout": 0.1},
        "optim": {"name": "sgd", "lr": 0.1, "lr_schedule": "step", "milestones": [2]},
        "loss": [{"name": "ce"},
                 {"name": "kd", "temperature": 2.0, "schedule": {"name": "linear", "start": 0.5, "end": 1.0}}],
    }


def write(path: Path, conf: dict) -> Path:
    path.write_text(tomli_w.dumps(conf))
    return path


def cli(capsys, *args: str) -> tuple[int, str]:
    """``kdcore ARGS`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    """The only line of ``err`` that is not a warning."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its bytes (to show that nothing changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
