"""Built-in backbone ``mlp``: a ReLU multi-layer perceptron on flattened inputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kdcore.common import params
from kdcore.common.errors import ConfigError


class MLP(nn.Module):
    """``mlp``: ``in_features -> hidden[0] -> ... -> num_classes`` with ReLU
    (the 2-layer, 128-unit MLP of PTLoss paper appendix A.5 by default).
    ``in_features`` is filled in by the engine from the dataset's input shape."""

    def __init__(self, num_classes: int, in_features: int = 30, hidden: Sequence[int] = (128, 128),
                 dropout: float = 0.0):
        super().__init__()
        params.positive_int("num_classes", num_classes)
        params.positive_int("in_features", in_features)
        if not isinstance(hidden, Sequence) or isinstance(hidden, (str, bytes)) or \
                not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ConfigError(f"hidden: must be a list of positive integers, got {hidden!r}")
        dropout = params.in_range("dropout", dropout, 0.0, 1.0)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
