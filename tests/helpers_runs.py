"""Small configs shared by the engine and CLI tests (imported by file path)."""

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
