"""PyTorch twin of models/src/small_cnn.rs (same state-dict names), the numerical reference for tests.

Four 3x3 convolutions (padding 1; stride 2 on conv2) each followed by ReLU and GroupNorm(8),
global mean pooling, dropout and a linear head.
"""
import torch
from torch import nn
import torch.nn.functional as F

GROUPS = 8


class SmallCnn(nn.Module):
    def __init__(self, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        w = width
        channels = [(3, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 2 * w, 1)]
        self.strides = []
        for n, (cin, cout, stride) in enumerate(channels, start=1):
            setattr(self, f"conv{n}", nn.Conv2d(cin, cout, 3, stride=stride, padding=1))
            setattr(self, f"gn{n}", nn.GroupNorm(GROUPS, cout, eps=1e-5))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * w, num_classes)

    def features(self, x):
        for n in range(1, 5):
            x = getattr(self, f"gn{n}")(F.relu(getattr(self, f"conv{n}")(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.dropout(self.features(x)))
