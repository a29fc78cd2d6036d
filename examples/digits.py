"""The data and model the examples share: plain PyTorch, nothing of torchrepro here.

``Digits`` is scikit-learn's 1,797 8x8 digit images with random augmentation drawn in
``__getitem__`` from torch's and NumPy's global RNGs, as many real datasets do: exactly the
draws that depend on ``num_workers`` under the usual seeding recipe.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2 as T
from sklearn.datasets import load_digits
from torch import nn


class Digits(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """8x8 digit images (values in [0, 1]) and labels, augmented at random."""

    def __init__(self, limit: int | None = None) -> None:
        x, y = load_digits(return_X_y=True)
        self.images = torch.tensor(x[:limit], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        self.labels = torch.tensor(y[:limit])
        self.augment = T.Compose(
            [
                T.RandomAffine(degrees=10, translate=(0.1, 0.1)),
                T.RandomErasing(p=0.25, scale=(0.02, 0.1)),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.augment(self.images[index])  # draws from torch's global RNG
        noise = np.random.normal(0.0, 0.05, size=image.shape)  # and from NumPy's
        return image + torch.from_numpy(noise.astype(np.float32)), self.labels[index]


class Net(nn.Module):
    """A small CNN with BatchNorm and dropout (dropout draws from torch's RNG every step)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits, device: torch.device) -> float:
    """Accuracy on the un-augmented images."""
    model.eval()
    predicted = model(data.images.to(device)).argmax(1).cpu()
    return (predicted == data.labels).float().mean().item()
