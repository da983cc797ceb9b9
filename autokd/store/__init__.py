"""autokd.store: offline teacher knowledge.

A FeatureStore holds a teacher's features (at chosen module paths) and logits for every
(sample, augmentation view) of a data set in one memory-mapped file (format: csrc/engine/store/
store.h). ReplayAugment makes view v of sample i a pure function of (seed, i, v), so the student
sees exactly the image the stored teacher features came from; ReplayResizedCrop does the same
for the random-resized crops of streamed image folders (autokd.data.stream).
"""

from autokd.store.augment import AugParams, CropParams, ReplayAugment, ReplayResizedCrop
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
    "CropParams",
    "FeatureStore",
    "OfflineDistillDataset",
    "ReplayAugment",
    "ReplayResizedCrop",
    "StoreBatches",
    "StoreError",
    "TeacherStoreBatches",
    "TeacherStores",
    "load_batch",
    "pinned_teacher_hash",
    "teacher_hash",
]
