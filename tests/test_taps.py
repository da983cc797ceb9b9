"""FeatureTaps, the one forward-hook recorder behind the Distiller, the feature store build and
forward_all: the tap syntax (module path, ':KEY' into dict/list outputs) and one message for a
tap that names no module, the same from all three places."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from autokd.distill import Distiller
from autokd.nn.taps import FeatureTaps
from autokd.store import FeatureStore
from autokd.train.loop import forward_all


class Pyramid(nn.Module):
    """A body whose stage returns a dict of maps (as torchvision's FPN) and a list."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.stem(x)
        return OrderedDict([("0", a), ("1", self.down(a)), ("nested", [a, a * 2])])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Pyramid()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.body(x)["1"].mean(dim=(2, 3)))


def test_taps_record_module_outputs_and_entries_of_dict_and_list_outputs():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 1, 8, 8)
    a = net.body.stem(x)
    taps = FeatureTaps(net, ["body.stem", "body:0", "body:1", "body:nested:1", "body:nested:-2"])
    net(x)
    out = taps.take()
    assert torch.equal(out["body.stem"], a) and torch.equal(out["body:0"], a)
    assert out["body:1"].shape == (2, 6, 4, 4)
    assert torch.equal(out["body:nested:1"], 2 * a) and torch.equal(out["body:nested:-2"], a)
    assert taps.take() == {}
    assert len(net.body._forward_hooks) == 1  # one hook per module, however many keys
    taps.remove()
    net(x)
    assert taps.take() == {} and not net.body._forward_hooks


def test_a_tap_that_names_no_module_gives_one_line_with_close_matches_and_valid_paths():
    with pytest.raises(ValueError) as e:
        FeatureTaps(Net(), ["body.stm"], "Distiller: student")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "Distiller: student: 'body.stm' names no module of Net; did you mean 'body.stem', "
    )
    assert "Module paths: body, fc, body.stem, body.down (4 in all" in msg
    with pytest.raises(
        ValueError,
        match=r"'neck' \(tap 'neck:0': module path, then ':KEY' "
        r"entries of its output\) names no module of Net\.",
    ):
        FeatureTaps(Net(), ["neck:0"])


@pytest.mark.parametrize(
    "tap,match",
    [
        (
            "body",
            (
                r"tap 'body' gave OrderedDict with keys \['0', '1', 'nested'\], expected a tensor; "
                r"pick one entry, e.g. 'body:0'"
            ),
        ),
        (
            "body:2",
            (
                r"tap 'body:2': 'body' returned OrderedDict with keys \['0', '1', 'nested'\]; "
                r"no key '2'"
            ),
        ),
        (
            "body:nested:5",
            (
                r"tap 'body:nested:5': 'body:nested' returned list of 2; expected an index "
                r"in \[-2, 1\], got '5'"
            ),
        ),
        ("body.stem:0", r"tap 'body.stem:0': 'body.stem' returned Tensor, which has no entries"),
        ("body:nested", r"gave list of 2, expected a tensor; pick one entry, e.g. 'body:nested:0'"),
    ],
)
def test_a_tap_without_a_tensor_says_what_it_got_and_how_to_pick(tap, match):
    net = Net()
    FeatureTaps(net, [tap], "model")  # its hooks stay on the model
    with pytest.raises(ValueError, match=match):
        net(torch.randn(1, 1, 8, 8))


def test_the_three_users_give_the_same_message():
    net = Net()
    x = torch.randn(2, 1, 8, 8)
    expect = r"'body.stm' names no module of Net; did you mean 'body.stem', "
    with pytest.raises(ValueError, match="Distiller: student: " + expect):
        Distiller(
            "fitnet", net, ["body.stm"], teacher=Net(), teacher_taps=["body.stem"], example_input=x
        )
    with pytest.raises(ValueError, match="Distiller: teacher 0: " + expect):
        Distiller(
            "fitnet", net, ["body.stem"], teacher=Net(), teacher_taps=["body.stm"], example_input=x
        )
    with pytest.raises(ValueError, match="forward_all: " + expect):
        forward_all(net, x, ["body.stm"])
    data = torch.utils.data.TensorDataset(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="autokd store build: teacher: " + expect):
        FeatureStore.build("unused.akds", net, data, taps=["body.stm"], progress=False)


def test_distiller_and_forward_all_read_keyed_taps():
    torch.manual_seed(0)
    s, t, x = Net(), Net(), torch.randn(3, 1, 8, 8)
    d = Distiller("fitnet", s, ["body:1"], teacher=t, example_input=x[:2])
    out = d(x)
    assert out.student_features["body:1"].shape == (3, 6, 4, 4)
    assert torch.isfinite(out.loss_kd) and out.loss_kd > 0
    logits, feats = forward_all(t, x, ["body:0"])
    assert logits.shape == (3, 3) and feats["body:0"].shape == (3, 4, 8, 8)
