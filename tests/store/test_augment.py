import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autokd.data import load_data
from autokd.data.augment import default_padding
from autokd.pipeline import make_augment
from autokd.store import AugParams, ReplayAugment


def test_params_are_a_function_of_seed_index_view_only():
    a, b = ReplayAugment(seed=5), ReplayAugment(seed=5)
    first = [a.params(i, v) for i in range(50) for v in range(4)]
    torch.manual_seed(123)
    np.random.seed(9)
    second = [b.params(i, v) for i in reversed(range(50)) for v in range(4)]
    assert first == [p for i in range(50) for p in second[(49 - i) * 4 : (50 - i) * 4]]
    assert [ReplayAugment(seed=6).params(i, 0) for i in range(50)] != [
        a.params(i, 0) for i in range(50)
    ]


def test_params_cover_the_range_and_flip_both_ways():
    aug = ReplayAugment(seed=0, crop_padding=4)
    dy, dx, flip = aug.params_batch(np.arange(2000), 1)
    assert set(dy.tolist()) == set(range(9)) and set(dx.tolist()) == set(range(9))
    assert 0.4 < flip.mean() < 0.6
    # Views of one sample differ: view 0 is augmented too.
    views = {ReplayAugment(seed=0).params(7, v) for v in range(8)}
    assert len(views) > 1
    assert not ReplayAugment(seed=0, flip=False).params_batch(np.arange(100), 0)[2].any()


def test_apply_known_params():
    aug = ReplayAugment(seed=0, crop_padding=2)
    img = torch.arange(2 * 4 * 5, dtype=torch.float32).reshape(2, 4, 5) + 1
    assert torch.equal(aug.apply(img, AugParams(2, 2, False)), img)
    assert torch.equal(aug.apply(img, AugParams(2, 2, True)), img.flip(-1))
    shifted = aug.apply(img, AugParams(0, 3, False))  # 2 rows down, 1 column left
    assert torch.equal(shifted[:, 2:, :4], img[:, :2, 1:])
    assert (shifted[:, :2] == 0).all() and (shifted[:, :, 4] == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    pad=st.integers(0, 5),
    flip=st.booleans(),
    idx=st.lists(st.integers(0, 10**9), min_size=1, max_size=6),
    view=st.integers(0, 100),
)
def test_apply_batch_matches_apply(seed, pad, flip, idx, view):
    aug = ReplayAugment(seed=seed, crop_padding=pad, flip=flip)
    imgs = torch.randn(len(idx), 3, 6, 7)
    batch = aug.apply_batch(imgs, np.array(idx), view)
    single = torch.stack([aug.apply(imgs[b], aug.params(i, view)) for b, i in enumerate(idx)])
    assert torch.equal(batch, single)


def test_identity_names_every_parameter_and_bad_args():
    assert ReplayAugment(1, 4, True).identity() != ReplayAugment(1, 4, False).identity()
    assert ReplayAugment(1, 4, True).identity() != ReplayAugment(2, 4, True).identity()
    assert "crop_padding=3" in ReplayAugment(0, 3).identity()
    with pytest.raises(ValueError, match="crop_padding"):
        ReplayAugment(0, -1)
    with pytest.raises(ValueError, match="one view per index"):
        ReplayAugment(0).params_batch([1, 2, 3], [0, 1])
    with pytest.raises(ValueError, match="integer"):
        ReplayAugment(0).params_batch([1.5], 0)


@pytest.mark.parametrize("hw", [(16, 40), (40, 16)])
def test_store_views_pad_crops_as_teacher_training_does_on_non_square_images(tmp_path, hw):
    # One padding rule (1/8 of the shorter side): the views a store replays for the search and
    # for distillation (pipeline.make_augment) are cropped like the teacher's training images
    # (train/teacher.py, default_padding), whichever side of the image is the longer.
    rng = np.random.default_rng(0)
    path = tmp_path / "nonsquare.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (12, *hw, 3), dtype=np.uint8),
        y_train=np.arange(12) % 2,
        x_test=rng.integers(0, 256, (4, *hw, 3), dtype=np.uint8),
        y_test=np.arange(4) % 2,
    )
    data = load_data(f"npz:{path}")
    assert data.image_size == hw
    assert make_augment(data, 0).crop_padding == default_padding(data.image_size) == 2
