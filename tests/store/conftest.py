import numpy as np
import pytest
import torch
from torch import nn


class TinyTeacher(nn.Module):
    """Small conv net with BatchNorm (eval statistics matter) and nested module paths."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.layer1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, classes)
        with torch.no_grad():
            self.stem[1].running_mean.uniform_(-0.5, 0.5)
            self.stem[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class ListDataset(torch.utils.data.Dataset):
    """Plain (image, int label) items: the generic path of load_batch."""

    def __init__(self, n=23, c=3, h=8, w=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, c, h, w, generator=g)
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


@pytest.fixture
def teacher():
    torch.manual_seed(1)
    return TinyTeacher()


@pytest.fixture
def dataset():
    return ListDataset()


@pytest.fixture
def tensor_dataset(dataset):
    return torch.utils.data.TensorDataset(dataset.images, dataset.labels)


def all_records(store):
    n, k = store.num_samples, store.num_views
    idx = np.tile(np.arange(n), k)
    views = np.repeat(np.arange(k), n)
    return idx, views, store.gather(idx, views)
