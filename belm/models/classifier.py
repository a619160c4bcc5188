"""Small CNN classifier for the 16x16 "digits" images (used to score generated samples / Frechet distance)."""
from __future__ import annotations

import torch
from torch import nn


class DigitClassifier(nn.Module):
    """CNN on (B, 1, 16, 16) images in [-1, 1].

    ``forward(x)`` returns logits (B, num_classes); ``features(x)`` the penultimate
    ``feature_dim``-dimensional activations (for a Frechet distance between sample sets).
    """

    def __init__(self, channels=(32, 64), feature_dim: int = 64, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        c1, c2 = channels
        self.config = dict(channels=list(channels), feature_dim=feature_dim, num_classes=num_classes, dropout=dropout)
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 16, feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class indices (B,) (call in eval mode)."""
        return torch.cat([self(x[i : i + batch_size]).argmax(-1) for i in range(0, x.shape[0], batch_size)])
