"""Python face of the memory-mapped teacher feature store (format and guarantees:
csrc/engine/store/store.h). Building runs the teacher once over every (sample, view); reading
gathers batches of stored features straight into torch tensors, with the GIL released.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from autokd import _engine
from autokd.nn.taps import FeatureTaps, find_module
from autokd.store.augment import ReplayAugment

StoreError = _engine.StoreError

# When a reader checks the data against the chunk checksums (csrc/engine/store/store.h):
# "touch" checks each chunk the first time a gather reads from it, "open" checks every chunk
# when the store is opened, "none" never (benchmarks and tests only). Either way no damaged
# byte leaves gather(). "touch" is the default because it measured cheaper in every case
# (benchmarks/results/store.md, "Verification on the read path"): it hashes only the chunks a
# process reads (a search's proxy reads a subset of the samples in few views), spreads the cost
# over the first epoch, and costs one atomic load per record afterwards, while "open" reads the
# whole file (every view) before the first batch.
VERIFY_MODES = ("touch", "open", "none")
DEFAULT_VERIFY = "touch"

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LOGITS = "logits"


def teacher_hash(model: torch.nn.Module) -> str:
    """Stable identity of a model's weights: SHA-256 over its state_dict entries in name order
    (name, dtype, shape, raw bytes). Equal weights give equal hashes across processes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def pinned_teacher_hash(teachers: Sequence) -> str | list[str]:
    """The teachers' identity as a journal or checkpoint pins it, from their ``.hash``
    (``teacher_hash`` of each; ``autokd.pipeline.TeacherInfo``): one teacher's hash (the key a
    one-teacher run always had), or the list of every teacher's hash in order."""
    return teachers[0].hash if len(teachers) == 1 else [t.hash for t in teachers]


def _as_index_array(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise ValueError(f"autokd.store: expected {what} of an integer dtype, got {a.dtype}")
    return np.ascontiguousarray(a.reshape(-1), dtype=np.int64)


def _byte_view(t: torch.Tensor) -> np.ndarray:
    """Shares memory with t; numpy has no bfloat16, so 2-byte dtypes travel as int16."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.view(torch.int16)
    return t.numpy()


def load_batch(dataset, indices: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images [B, C, H, W] float32 and labels [B] int64 of dataset items at `indices`."""
    if isinstance(dataset, torch.utils.data.TensorDataset) and len(dataset.tensors) >= 2:
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return dataset.tensors[0][idx].float(), dataset.tensors[1][idx].long()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor):
        # autokd.data's in-memory splits: one index, not a Python loop over items
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return images[idx].float(), labels[idx].long()
    items = [dataset[int(i)] for i in indices]
    imgs = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.int64)
    return imgs, labels


def _content_id(dataset, batch_size: int) -> str:
    h = hashlib.sha256()
    n = len(dataset)
    for s in range(0, n, batch_size):
        imgs, labels = load_batch(dataset, np.arange(s, min(n, s + batch_size)))
        h.update(imgs.contiguous().numpy())
        h.update(labels.numpy())
    return f"content:{n}:{h.hexdigest()[:32]}"


class FeatureStore:
    """A read-only, memory-mapped store of teacher features and logits per (sample, view).

    Create with :meth:`build` (runs the teacher) or :meth:`open` (an existing file). The object
    pickles by path (DataLoader workers with spawn re-open the file); forked workers share the
    parent's read-only mapping.
    """

    def __init__(
        self,
        path,
        *,
        expect_teacher_hash=None,
        expect_dataset_id=None,
        expect_schema=None,
        num_threads: Optional[int] = None,
        verify: str = DEFAULT_VERIFY,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(
                f"autokd store: expected verify one of {', '.join(VERIFY_MODES)}, got {verify!r}"
            )
        if num_threads is None:
            num_threads = min(4, os.cpu_count() or 1)
        self._open_args = dict(
            path=os.fspath(path),
            expect_teacher_hash=expect_teacher_hash or "",
            expect_dataset_id=expect_dataset_id or "",
            expect_fields=None if expect_schema is None else _normalise_schema(expect_schema),
            num_threads=int(num_threads),
            verify=verify,
        )
        self._reader = None
        self._reader = self._get_reader()

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path,
        expect_teacher_hash: Optional[str] = None,
        expect_dataset_id: Optional[str] = None,
        expect_schema: Optional[Sequence] = None,
        num_threads: Optional[int] = None,
        verify: str = DEFAULT_VERIFY,
    ) -> "FeatureStore":
        """Map an existing store. Raises StoreError (a ValueError) naming path, check, expected
        and found when the file is damaged or does not match the given expectations.

        ``verify``: when the data chunks are checked against their checksums, "touch" (each
        chunk before its first read in this process) or "open" (all of them now); a damaged
        chunk raises StoreError naming the chunk, its byte range and both checksums."""
        path = os.fspath(path)
        if not os.path.exists(path):
            extra = ""
            if os.path.exists(path + ".partial"):
                extra = (
                    f"; {path}.partial exists: a build was interrupted or is running, build again"
                )
            raise FileNotFoundError(f"autokd store {path}: no such file{extra}")
        return cls(
            path,
            expect_teacher_hash=expect_teacher_hash,
            expect_dataset_id=expect_dataset_id,
            expect_schema=expect_schema,
            num_threads=num_threads,
            verify=verify,
        )

    def _get_reader(self):
        if self._reader is None:
            self._reader = _engine.StoreReader(**self._open_args)
            self._schema = [(n, d, list(s)) for n, d, s in self._reader.fields]
        return self._reader

    def __getstate__(self):
        return {"_open_args": self._open_args}

    def __setstate__(self, state):
        self._open_args = state["_open_args"]
        self._reader = None  # mapped lazily in the process that uses it

    # -- metadata --------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self._open_args["path"]

    @property
    def num_samples(self) -> int:
        return self._get_reader().num_samples

    @property
    def num_views(self) -> int:
        return self._get_reader().num_views

    @property
    def schema(self) -> List[Tuple[str, str, List[int]]]:
        """[(name, dtype, per-sample shape)], taps in build order, then ("logits", dtype, [K])."""
        self._get_reader()
        return [(n, d, list(s)) for n, d, s in self._schema]

    @property
    def taps(self) -> List[str]:
        return [n for n, _, _ in self.schema if n != LOGITS]

    @property
    def teacher_hash(self) -> str:
        return self._get_reader().teacher_hash

    @property
    def dataset_id(self) -> str:
        return self._get_reader().dataset_id

    @property
    def augment_id(self) -> str:
        return self._get_reader().augment_id

    @property
    def record_bytes(self) -> int:
        return self._get_reader().record_bytes

    @property
    def num_chunks(self) -> int:
        return self._get_reader().num_chunks

    @property
    def chunks_checked(self) -> int:
        """Data chunks that have matched their checksum in this process so far."""
        return self._get_reader().chunks_checked

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self):
        return (
            f"FeatureStore({self.path!r}, samples={self.num_samples}, views={self.num_views}, "
            f"schema={self.schema})"
        )

    # -- reading ---------------------------------------------------------------------------
    def empty_batch(self, batch_size: int, pin_memory: bool = False) -> Dict[str, torch.Tensor]:
        """Output tensors for gather(out=...), to reuse across batches (pinned for CUDA copies)."""
        return {
            name: torch.empty((batch_size, *shape), dtype=_TORCH_DTYPES[dt], pin_memory=pin_memory)
            for name, dt, shape in self.schema
        }

    def gather(
        self,
        indices,
        views,
        out: Optional[Dict[str, torch.Tensor]] = None,
        pin_memory: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Records (indices[b], views[b]) -> {name: tensor [B, *shape]} in the stored dtype.

        views is one int for the whole batch or one per index. `out` tensors (CPU, contiguous,
        stored dtype, first dim >= B) are filled in place and their first B rows returned.
        """
        reader = self._get_reader()
        idx = _as_index_array(indices, "indices")
        n = idx.size
        if isinstance(views, (int, np.integer)):
            v = np.full(n, int(views), dtype=np.int64)
        else:
            v = _as_index_array(views, "views")
            if v.size == 1 and n != 1:
                v = np.full(n, int(v[0]), dtype=np.int64)
        result, bufs = {}, []
        for name, dt, shape in self._schema:
            want = _TORCH_DTYPES[dt]
            if out is None:
                t = torch.empty((n, *shape), dtype=want, pin_memory=pin_memory)
            else:
                if name not in out:
                    raise ValueError(
                        f"autokd store gather: expected out[{name!r}], got keys {sorted(out)}"
                    )
                t = out[name]
                if (
                    t.device.type != "cpu"
                    or t.dtype != want
                    or list(t.shape[1:]) != list(shape)
                    or t.dim() == 0
                    or t.shape[0] < n
                    or not t.is_contiguous()
                ):
                    raise ValueError(
                        f"autokd store gather: expected out[{name!r}] a contiguous CPU {want} "
                        f"tensor of shape [>={n}, {', '.join(map(str, shape))}], "
                        f"got {t.device} {t.dtype} {list(t.shape)}"
                    )
                t = t[:n]
            result[name] = t
            bufs.append(_byte_view(t))
        reader.gather(idx, v, bufs)
        return result

    def verify(self) -> None:
        """Checksum every data chunk now (whatever was checked before); raises StoreError naming
        the first damaged chunk, its file byte range and the expected and found checksums."""
        self._get_reader().verify()

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
    ) -> "StoreBatches":
        """Iterable of (imgs_aug [B, C, H, W], labels [B], {name: feats [B, ...]}) for one epoch,
        view epoch % K, one gather per batch. See StoreBatches."""
        return StoreBatches(
            self,
            dataset,
            aug,
            batch_size=batch_size,
            indices=indices,
            epoch=epoch,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
            pin_memory=pin_memory,
        )

    def check_compatible(self, dataset, aug: ReplayAugment) -> None:
        """The student must see the augmentation and samples the teacher saw."""
        if aug.identity() != self.augment_id:
            raise ValueError(
                f"autokd store {self.path}: augmentation: expected {self.augment_id!r}, "
                f"got {aug.identity()!r}"
            )
        if dataset is not None and len(dataset) != self.num_samples:
            raise ValueError(
                f"autokd store {self.path}: data set size: expected {self.num_samples}, "
                f"got {len(dataset)}"
            )

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        path,
        teacher: torch.nn.Module,
        dataset,
        taps: Iterable[str] = (),
        views: int = 1,
        dtype: str = "fp16",
        batch_size: int = 256,
        augment: Optional[ReplayAugment] = None,
        dataset_id: Optional[str] = None,
        progress: bool = True,
        device="cpu",
        logits_dtype: Optional[str] = None,
        chunk_bytes: int = 1 << 20,
        num_threads: Optional[int] = None,
    ) -> "FeatureStore":
        """Run `teacher` (eval mode, no_grad) over every sample of `dataset` in every view and
        store the outputs of the modules named in `taps` plus the logits (teacher output).

        dataset items are (image float32 [C, H, W] un-augmented, label). View v of sample i is
        augment.apply_batch(image, i, v). The file appears atomically at `path` when complete; a
        killed build leaves `<path>.partial`, which the next build truncates and restarts. A
        complete store already at `path` is replaced atomically (readers that have it mapped keep
        the old file).
        dataset_id defaults to a hash of the data set's contents.
        """
        path = os.fspath(path)
        taps = list(taps)
        for name, value, ok in (
            ("dtype", dtype, dtype in _TORCH_DTYPES),
            ("logits_dtype", logits_dtype, logits_dtype is None or logits_dtype in _TORCH_DTYPES),
            ("views", views, isinstance(views, int) and views >= 1),
            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
        ):
            if not ok:
                raise ValueError(
                    f"autokd store build: expected {name} "
                    f"{'fp16, bf16 or fp32' if 'dtype' in name else 'an int >= 1'}, got {value!r}"
                )
        n = len(dataset)
        if n == 0:
            raise ValueError("autokd store build: expected a non-empty data set, got 0 samples")
        for tap in taps:
            if tap == LOGITS:
                raise ValueError(
                    f"autokd store build: tap name {LOGITS!r} is reserved for the teacher output"
                )
            find_module(teacher, tap, "autokd store build: teacher")
        if len(set(taps)) != len(taps):
            raise ValueError(f"autokd store build: expected distinct taps, got {taps}")
        augment = (
            augment if augment is not None else ReplayAugment(seed=0, crop_padding=0, flip=False)
        )
        if dataset_id is None:
            dataset_id = _content_id(dataset, batch_size)
        t_hash = teacher_hash(teacher)
        device = torch.device(device)
        store_dtypes = {tap: dtype for tap in taps}
        store_dtypes[LOGITS] = logits_dtype or dtype

        hooks = FeatureTaps(teacher, taps, "autokd store build: teacher")
        was_training = teacher.training
        teacher.eval()
        writer = None
        bar = None
        try:
            from tqdm.auto import tqdm  # only when a progress bar is asked for

            bar = tqdm(
                total=n * views,
                unit="rec",
                desc=f"store {os.path.basename(path)}",
                disable=not progress,
            )
            # a streamed folder (autokd.data.stream) decodes and crops in DataLoader workers,
            # exactly as its training loader does
            stream = (
                dataset.loader(augment, device=device)
                if getattr(dataset, "streaming", False)
                else None
            )
            with torch.no_grad():
                for v in range(views):
                    for idx, x in _augmented_batches(
                        dataset, augment, n, batch_size, v, device, stream
                    ):
                        hooks.take()
                        logits = teacher(x)
                        if not isinstance(logits, torch.Tensor):
                            raise TypeError(
                                "autokd store build: expected the teacher to return a logits "
                                f"tensor, got {type(logits).__name__}"
                            )
                        captured = hooks.take()
                        outputs = {t: captured[t] for t in taps}
                        outputs[LOGITS] = logits
                        if writer is None:
                            fields = [
                                (name, store_dtypes[name], list(o.shape[1:]))
                                for name, o in outputs.items()
                            ]
                            writer = _engine.StoreWriter(
                                path,
                                fields,
                                n,
                                views,
                                t_hash,
                                dataset_id,
                                augment.identity(),
                                chunk_bytes,
                            )
                        bufs = [
                            _byte_view(
                                o.detach().to(_TORCH_DTYPES[store_dtypes[name]]).cpu().contiguous()
                            )
                            for name, o in outputs.items()
                        ]
                        writer.append(bufs, len(idx))
                        bar.update(len(idx))
            writer.finish()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
            hooks.remove()
            teacher.train(was_training)
        return cls.open(
            path, expect_teacher_hash=t_hash, expect_dataset_id=dataset_id, num_threads=num_threads
        )


def _augmented_batches(dataset, augment, n: int, batch_size: int, view: int, device, stream):
    """(sample ids, images of view ``view`` on ``device``) for every batch of the data set."""
    batches = [
        np.arange(s, min(n, s + batch_size), dtype=np.int64) for s in range(0, n, batch_size)
    ]
    if stream is not None:
        for idx, (x, _) in zip(batches, stream.batches(batches, view)):
            yield idx, x
        return
    for idx in batches:
        imgs, _ = load_batch(dataset, idx)
        yield idx, augment.apply_batch(imgs, idx, view).to(device)


def sample_indices(store: "FeatureStore", indices, who: str) -> np.ndarray:
    """``indices`` as an int64 array checked against the store's samples (all when None)."""
    if indices is None:
        return np.arange(store.num_samples, dtype=np.int64)
    out = _as_index_array(indices, "indices")
    if out.size and (out.min() < 0 or out.max() >= store.num_samples):
        raise ValueError(
            f"{who}: expected indices in [0, {store.num_samples}), got [{out.min()}, {out.max()}]"
        )
    return out


def _normalise_schema(schema) -> list:
    out = []
    for entry in schema:
        name, dt, shape = entry
        if dt not in _TORCH_DTYPES:
            raise ValueError(f"autokd store: expected schema dtypes fp16, bf16 or fp32, got {dt!r}")
        out.append((str(name), dt, [int(d) for d in shape]))
    return out


class StoreBatches:
    """One epoch of (imgs_aug, labels, feats) batches read from a store: view epoch % K, order a
    permutation drawn from numpy's PCG64 seeded with (seed, epoch) when shuffle, one gather per
    batch. Iterating twice gives the same batches."""

    def __init__(
        self,
        store: FeatureStore,
        dataset,
        aug: ReplayAugment,
        batch_size: int = 128,
        indices=None,
        epoch: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        pin_memory: bool = False,
    ):
        store.check_compatible(dataset, aug)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"autokd store batches: expected batch_size an int >= 1, got {batch_size!r}"
            )
        self.store, self.dataset, self.aug = store, dataset, aug
        self.indices = sample_indices(store, indices, "autokd store batches")
        self.batch_size, self.epoch, self.shuffle, self.seed = (
            batch_size,
            int(epoch),
            shuffle,
            int(seed),
        )
        self.drop_last, self.pin_memory = drop_last, pin_memory

    @property
    def view(self) -> int:
        return self.epoch % self.store.num_views

    def __len__(self) -> int:
        m = self.indices.size
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def order(self) -> np.ndarray:
        """The sample ids of this epoch in the order the batches take them."""
        if not self.shuffle:
            return self.indices
        return self.indices[
            np.random.default_rng([self.seed, self.epoch]).permutation(self.indices.size)
        ]

    def batch(self, idx) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """(imgs_aug, labels, feats) of the samples ``idx`` in this epoch's view (a data-parallel
        rank builds its share of each batch with it)."""
        idx = np.asarray(idx, dtype=np.int64)
        if getattr(self.dataset, "streaming", False):  # a streamed folder: decoded here
            ds = self.dataset
            imgs = ds.normalise(torch.stack([ds.decode(int(i), self.aug, self.view) for i in idx]))
            labels = ds.labels[torch.from_numpy(idx)]
        else:
            imgs, labels = load_batch(self.dataset, idx)
            imgs = self.aug.apply_batch(imgs, idx, self.view)
        feats = self.store.gather(idx, self.view, pin_memory=self.pin_memory)
        return imgs, labels, feats

    def __iter__(self):
        order = self.order()
        for b in range(len(self)):
            yield self.batch(order[b * self.batch_size : (b + 1) * self.batch_size])
