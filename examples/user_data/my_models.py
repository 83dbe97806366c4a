"""A model class of one's own, used by python_model.toml as
``backbone = "python:my_models:Net"`` (found beside the config, no packaging)."""

from torch import nn


class Net(nn.Module):
    """A two-layer perceptron with a tanh hidden layer of ``width`` units.

    ``num_classes`` and ``in_features`` are filled in from the dataset."""

    def __init__(self, num_classes: int, in_features: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)
