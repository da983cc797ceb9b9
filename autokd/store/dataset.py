"""Per-item dataset over a feature store, for torch DataLoader pipelines."""

from __future__ import annotations

import numpy as np
import torch

from autokd.store.augment import ReplayAugment
from autokd.store.feature_store import FeatureStore, sample_indices


class OfflineDistillDataset(torch.utils.data.Dataset):
    """Item j -> (student image augmented exactly as stored view, label, {name: teacher tensor}).

    Sample i = indices[j]; epoch e (set_epoch) uses view e % K, so K views serve K epochs before
    augmentations repeat. With persistent DataLoader workers, set the epoch before the workers
    start (or use FeatureStore.batches, which takes the epoch per call).
    """

    def __init__(self, store: FeatureStore, dataset, aug: ReplayAugment, indices=None):
        store.check_compatible(dataset, aug)
        self.store, self.dataset, self.aug = store, dataset, aug
        self.indices = sample_indices(store, indices, "autokd OfflineDistillDataset")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def view(self) -> int:
        return self.epoch % self.store.num_views

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, j):
        i = int(self.indices[j])
        if getattr(self.dataset, "streaming", False):  # a streamed folder: crop while decoding
            ds = self.dataset
            img, label = ds.normalise(ds.decode(i, self.aug, self.view)[None])[0], ds.labels[i]
        else:
            img, label = self.dataset[i]
            img = self.aug.apply(
                torch.as_tensor(img, dtype=torch.float32), self.aug.params(i, self.view)
            )
        feats = self.store.gather(np.array([i], dtype=np.int64), self.view)
        return img, int(label), {k: t[0] for k, t in feats.items()}
