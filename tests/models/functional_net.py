"""A user's own model, as people write them: ReLUs applied functionally (F.relu, torch.relu, x.relu(),
an in-place relu_), a residual add, a max-pool and a classifier head, and no `features` Sequential.

Loaded by spec, `tests/models/functional_net.py:make_model` (tests/test_models_sources.py); the atlas must
handle it through the graph of its forward, not through a list of modules.
"""
import torch
import torch.nn.functional as F
from torch import nn


class FunctionalNet(nn.Module):
    image_size = 32                 # the input side the atlas preprocesses to (no --image-size needed)
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.conv_a = nn.Conv2d(width, width, 3, padding=1)
        self.conv_b = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv_c = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.relu(self.conv_a(x))
        y = self.conv_b(y)
        x = (x + y).relu()              # a residual add, rectified as a method
        x = self.pool(x)
        x = self.conv_c(x).relu_()      # in place
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


def make_model(num_classes: int = 10, width: int = 8) -> nn.Module:
    return FunctionalNet(num_classes=num_classes, width=width)


def not_a_model():
    return "a string"
