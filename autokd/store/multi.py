"""Several teachers' feature stores read together (``--teacher a,b`` with offline trials).

Each teacher keeps its own store file (``autokd.pipeline.open_or_build_stores`` explains why
one file per teacher rather than one file of all teachers). ``TeacherStores`` reads them as
one: the same batches interface as ``FeatureStore``, whose ``batch(idx)`` gives the images
(augmented once, for every teacher: the stores were built with the same replayable
augmentation, which ``TeacherStores`` checks) and one ``{name: tensor}`` per teacher, in the
teachers' order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from autokd.store.augment import ReplayAugment
from autokd.store.feature_store import FeatureStore, StoreBatches


class TeacherStores:
    """The feature stores of several teachers of one run, one per teacher, in order."""

    def __init__(self, stores: Sequence[FeatureStore]):
        stores = list(stores)
        if len(stores) < 2:
            raise ValueError(
                f"TeacherStores: expected the stores of 2 or more teachers, got "
                f"{len(stores)}; one teacher reads its FeatureStore directly"
            )
        first = stores[0]
        # Every store must describe the same records: (sample i, view v) of one data set under
        # one augmentation, or teacher j's features would belong to other images.
        for j, s in enumerate(stores[1:], start=1):
            for what in ("num_samples", "num_views", "dataset_id", "augment_id"):
                a, b = getattr(first, what), getattr(s, what)
                if a != b:
                    raise ValueError(
                        f"TeacherStores: teacher {j + 1}'s store {s.path} has {what} {b!r}, "
                        f"teacher 1's ({first.path}) has {a!r}; the stores of one run must be "
                        "built on the same data, views and augmentation"
                    )
        self.stores = stores

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.stores]

    @property
    def num_samples(self) -> int:
        return self.stores[0].num_samples

    @property
    def num_views(self) -> int:
        return self.stores[0].num_views

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self):
        return f"TeacherStores({self.paths!r})"

    def check_compatible(self, dataset, aug: ReplayAugment) -> None:
        for s in self.stores:
            s.check_compatible(dataset, aug)

    def batches(
        self,
        dataset,
        aug: ReplayAugment,
        batch_size: int = 128,
        indices=None,
        epoch: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> TeacherStoreBatches:
        """One epoch of (imgs_aug, labels, [feats of teacher 1, feats of teacher 2, ...])."""
        self.check_compatible(dataset, aug)
        return TeacherStoreBatches(
            self,
            StoreBatches(
                self.stores[0],
                dataset,
                aug,
                batch_size=batch_size,
                indices=indices,
                epoch=epoch,
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
                pin_memory=pin_memory,
            ),
        )


class TeacherStoreBatches:
    """``StoreBatches`` over several stores: the order, images and labels of the first store's
    batches (every store has the same records), the features of each store."""

    def __init__(self, stores: TeacherStores, first: StoreBatches):
        self.stores, self.first = stores, first

    @property
    def view(self) -> int:
        return self.first.view

    def __len__(self) -> int:
        return len(self.first)

    def order(self) -> np.ndarray:
        return self.first.order()

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
        imgs, labels, feats = self.first.batch(idx)
        idx = np.asarray(idx, dtype=np.int64)
        rest = [
            s.gather(idx, self.view, pin_memory=self.first.pin_memory)
            for s in self.stores.stores[1:]
        ]
        return imgs, labels, [feats, *rest]

    def __iter__(self):
        order, b = self.order(), self.first.batch_size
        for k in range(len(self)):
            yield self.batch(order[k * b : (k + 1) * b])
