"""autokd.store: offline teacher knowledge.

A FeatureStore holds a teacher's features (at chosen module paths) and logits for every
(sample, augmentation view) of a data set in one memory-mapped file (format: csrc/engine/store/
store.h). ReplayAugment makes view v of sample i a pure function of (seed, i, v), so the student
sees exactly the image the stored teacher features came from.
"""

from autokd.store.augment import AugParams, ReplayAugment
from autokd.store.dataset import OfflineDistillDataset
from autokd.store.feature_store import (
    FeatureStore,
    StoreBatches,
    StoreError,
    load_batch,
    pinned_teacher_hash,
    teacher_hash,
)
from autokd.store.multi import TeacherStoreBatches, TeacherStores

__all__ = [
    "AugParams",
    "FeatureStore",
    "OfflineDistillDataset",
    "ReplayAugment",
    "StoreBatches",
    "StoreError",
    "TeacherStoreBatches",
    "TeacherStores",
    "load_batch",
    "pinned_teacher_hash",
    "teacher_hash",
]
