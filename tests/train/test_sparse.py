"""autokd.train.sparse: masked optimizers vs torch.optim, SparsityManager masks, schedule,
exactness after every update, determinism, checkpoints and errors."""

import copy
import math

import pytest
import torch
from torch import nn

from autokd.train.sparse import (
    MaskedAdamW,
    MaskedSGD,
    SparsityManager,
    make_optimizer,
)


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # first conv: excluded by default
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 24),
        nn.ReLU(),
        nn.Linear(24, 10),  # last linear: excluded by default
    )


def train(model, opt, manager, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for step in range(1, steps + 1):
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if manager is not None:
            manager.step(step)
        opt.zero_grad(set_to_none=True)


# ---- optimizers vs torch.optim ----------------------------------------------------------------


@pytest.mark.parametrize("nesterov", [False, True])
def test_masked_sgd_all_ones_equals_torch_sgd(nesterov):
    a, b = small_net().double(), small_net().double()
    masks = {p: torch.ones_like(p, dtype=torch.bool) for p in a.parameters() if p.dim() > 1}
    kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    train(a, MaskedSGD(a.parameters(), masks=masks, **kw), None, 60)
    train(b, torch.optim.SGD(b.parameters(), **kw), None, 60)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-10)


def test_masked_adamw_all_ones_equals_torch_adamw():
    a, b = small_net().double(), small_net().double()
    masks = {p: torch.ones_like(p, dtype=torch.bool) for p in a.parameters() if p.dim() > 1}
    kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2)
    train(a, MaskedAdamW(a.parameters(), masks=masks, **kw), None, 60)
    train(b, torch.optim.AdamW(b.parameters(), **kw), None, 60)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_optimizer_state_dict_round_trip(kind):
    a = small_net()
    opt_a, man_a = (
        make_optimizer(a, kind, lr=0.01, sparsity=0.5, momentum=0.9)
        if kind == "sgd"
        else make_optimizer(a, kind, lr=0.01, sparsity=0.5)
    )
    train(a, opt_a, man_a, 5)
    # Resume order: build model, optimizer and manager, then load the three states.
    b = small_net()
    opt_b, man_b = (
        make_optimizer(b, kind, lr=0.01, sparsity=0.5, momentum=0.9)
        if kind == "sgd"
        else make_optimizer(b, kind, lr=0.01, sparsity=0.5)
    )
    b.load_state_dict(a.state_dict())
    man_b.load_state_dict(man_a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # as from torch.load
    train(a, opt_a, man_a, 5, seed=3)
    train(b, opt_b, man_b, 5, seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_torch_sgd_state_loads_into_masked_sgd():
    a = small_net()
    torch_opt = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    train(a, torch_opt, None, 2)
    ours = MaskedSGD(a.parameters(), lr=0.1, momentum=0.9)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    b = copy.deepcopy(a)
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    ref.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    train(a, ours, None, 3, seed=5)
    train(b, ref, None, 3, seed=5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ---- masks ------------------------------------------------------------------------------------


def test_default_exclusions_and_uniform_density():
    net = small_net()
    man = SparsityManager(net, sparsity=0.5)
    assert sorted(man.masks) == ["3.weight", "5.weight", "8.weight"]
    rep = man.sparsity_report()
    for name, layer in rep["layers"].items():
        assert abs(layer["kept"] - layer["numel"] / 2) <= 1, name
    assert rep["kept"] == round(0.5 * rep["sparse_params"])
    for name, p in net.named_parameters():
        if name in man.masks:
            assert torch.all(p[~man.masks[name]] == 0)
            assert torch.all(p[man.masks[name]] != 0)


def test_exclude_is_configurable():
    net = small_net()
    man = SparsityManager(net, sparsity=0.5, exclude=("8.*",))
    assert sorted(man.masks) == ["0.weight", "10.weight", "3.weight", "5.weight"]
    man = SparsityManager(small_net(), sparsity=0.5, exclude=())
    assert "0.weight" in man.masks and "1.weight" not in man.masks  # 1-D stays dense


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_erk_total_is_exact_and_favours_small_layers(sparsity):
    net = small_net()
    man = SparsityManager(net, sparsity=sparsity, distribution="erk")
    rep = man.sparsity_report()
    assert rep["kept"] == round((1 - sparsity) * rep["sparse_params"])
    dens = {n: layer["density"] for n, layer in rep["layers"].items()}
    # ERK: fewer weights per (fan-in + fan-out) in the big 3x3 convs -> lower density there
    assert dens["5.weight"] < dens["8.weight"]
    assert all(0 <= d <= 1 for d in dens.values())


@pytest.mark.parametrize("regrow", ["random", "gradient"])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_sparsity_exact_after_every_update_and_pruned_weights_zero(regrow, distribution):
    net = small_net()
    opt, man = make_optimizer(
        net,
        "sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        sparsity=0.7,
        sparsity_kwargs=dict(
            distribution=distribution,
            regrow=regrow,
            update_every=3,
            prune_fraction=0.5,
            fraction_decay="cosine",
            end_step=40,
        ),
    )
    counts = {n: int(m.sum()) for n, m in man.masks.items()}
    params = dict(net.named_parameters())
    g = torch.Generator().manual_seed(1)
    changed = 0
    for step in range(1, 46):
        x = torch.randn(4, 3, 8, 8, generator=g)
        net(x).square().mean().backward()
        before = {n: m.clone() for n, m in man.masks.items()}
        opt.step()
        for n, m in man.masks.items():  # the optimizer keeps masked weights at exactly zero
            assert torch.all(params[n][~m] == 0)
            assert torch.all(opt.state[params[n]]["momentum_buffer"][~m] == 0)
        updated = man.step(step)
        assert updated == (step % 3 == 0 and step < 40)
        for n, m in man.masks.items():
            assert int(m.sum()) == counts[n], (step, n)
            assert torch.all(params[n][~m] == 0)
            if updated:
                grown = m & ~before[n]
                assert torch.all(params[n][grown] == 0)  # regrown weights start at zero
                changed += int(grown.sum())
        opt.zero_grad(set_to_none=True)
    assert changed > 0
    assert man.updates == len([s for s in range(1, 46) if s % 3 == 0 and s < 40])


def test_prune_removes_smallest_magnitudes_and_regrow_by_gradient():
    lin = nn.Linear(10, 10, bias=False)
    net = nn.Sequential(lin, nn.Linear(10, 2))
    man = SparsityManager(
        net,
        sparsity=0.5,
        update_every=1,
        prune_fraction=0.2,
        fraction_decay="constant",
        regrow="gradient",
    )
    mask = man.masks["0.weight"].clone()  # the manager updates its own in place
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 101, dtype=torch.float32).view(10, 10))
        lin.weight.masked_fill_(~mask, 0)
    lin.weight.grad = torch.arange(100, dtype=torch.float32).view(10, 10)
    kept = lin.weight[mask].clone().sort().values
    inactive = (~mask).nonzero()
    man.step(1)
    new = man.masks["0.weight"]
    # The 10 smallest kept magnitudes are gone; the rest stayed.
    assert torch.equal(lin.weight[new & mask].sort().values, kept[10:])
    # The 10 inactive positions with the largest gradient came back.
    flat_inactive = (inactive[:, 0] * 10 + inactive[:, 1]).sort().values
    assert torch.equal((new & ~mask).flatten().nonzero().flatten(), flat_inactive[-10:])


def test_fraction_schedule():
    man = SparsityManager(
        small_net(), 0.5, prune_fraction=0.4, fraction_decay="cosine", end_step=100
    )
    assert man.fraction(0) == pytest.approx(0.4)
    assert man.fraction(50) == pytest.approx(0.2)
    assert man.fraction(100) == pytest.approx(0.0, abs=1e-12)
    lin = SparsityManager(
        small_net(), 0.5, prune_fraction=0.4, fraction_decay="linear", end_step=100
    )
    assert lin.fraction(25) == pytest.approx(0.3)
    no_end = SparsityManager(small_net(), 0.5, prune_fraction=0.4)
    assert no_end.fraction(10**6) == pytest.approx(0.4) and no_end.should_update(10**6)


def test_deterministic_with_seed():
    def run(seed):
        net = small_net()
        opt, man = make_optimizer(
            net,
            "sgd",
            lr=0.05,
            momentum=0.9,
            sparsity=0.5,
            sparsity_kwargs=dict(update_every=2, seed=seed),
        )
        train(net, opt, man, 8)
        return man.masks, [p.detach().clone() for p in net.parameters()]

    m1, p1 = run(0)
    m2, p2 = run(0)
    m3, _ = run(1)
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not all(torch.equal(m1[n], m3[n]) for n in m1)


def test_manager_state_dict_round_trip_continues_identically():
    net = small_net()
    opt, man = make_optimizer(
        net, "sgd", lr=0.05, momentum=0.9, sparsity=0.5, sparsity_kwargs=dict(update_every=2)
    )
    train(net, opt, man, 4)
    state = man.state_dict()
    net2 = small_net()
    opt2, man2 = make_optimizer(
        net2,
        "sgd",
        lr=0.05,
        momentum=0.9,
        sparsity=0.5,
        sparsity_kwargs=dict(update_every=2, seed=123),
    )
    net2.load_state_dict(net.state_dict())
    man2.load_state_dict(state)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(torch.equal(man.masks[n], man2.masks[n]) for n in man.masks)
    assert man2.sparsity_report() == man.sparsity_report()
    man.step(6), man2.step(6)  # random regrow draws from the restored generator
    assert all(torch.equal(man.masks[n], man2.masks[n]) for n in man.masks)
    # masks are restored in place: the optimizer still sees the manager's tensors
    assert all(
        opt2._masks[p] is man2.masks[n] for n, p in net2.named_parameters() if n in man2.masks
    )


def test_sparsity_zero_is_dense_and_free():
    net = small_net()
    assert SparsityManager.create(net, sparsity=0) is None
    opt, man = make_optimizer(net, "sgd", lr=0.1, momentum=0.9, sparsity=0.0)
    assert man is None and type(opt) is torch.optim.SGD
    opt, man = make_optimizer(net, "adamw", lr=0.1, sparsity=0)
    assert man is None and type(opt) is torch.optim.AdamW
    assert isinstance(SparsityManager.create(net, sparsity=0.3), SparsityManager)


def test_report_counts():
    net = small_net()
    man = SparsityManager(net, sparsity=0.5)
    rep = man.sparsity_report()
    total = sum(p.numel() for p in net.parameters())
    assert rep["model_params"] == total
    assert rep["model_sparsity"] == pytest.approx((rep["sparse_params"] - rep["kept"]) / total)
    assert math.isclose(rep["sparsity"], 1 - rep["kept"] / rep["sparse_params"])


# ---- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", True])
def test_error_sparsity_range(bad):
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        SparsityManager(small_net(), sparsity=bad)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\)"):
        make_optimizer(small_net(), sparsity=bad)


def test_error_unknown_names_list_valid_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown distribution 'erk2' \(did you mean 'erk'\?\); "
        r"valid: uniform, erk",
    ):
        SparsityManager(small_net(), distribution="erk2")
    with pytest.raises(ValueError, match=r"unknown regrow 'rigl'; valid: random, gradient"):
        SparsityManager(small_net(), regrow="rigl")
    with pytest.raises(ValueError, match=r"unknown fraction_decay 'cos'"):
        SparsityManager(small_net(), fraction_decay="cos")
    with pytest.raises(ValueError, match=r"unknown regrow 'grad'"):
        SparsityManager.create(small_net(), 0.0, regrow="grad")  # typos caught even when dense
    with pytest.raises(ValueError, match=r"unknown optimizer kind 'adam'"):
        make_optimizer(small_net(), "adam")
    with pytest.raises(
        ValueError,
        match=r"unknown SparsityManager option\(s\) \['update_evry'\]; "
        r"valid: distribution, exclude, update_every",
    ):
        make_optimizer(small_net(), sparsity=0.0, sparsity_kwargs=dict(update_evry=5))
    with pytest.raises(ValueError, match=r"exclude pattern 'head\.\*' matches no parameter"):
        SparsityManager(small_net(), exclude=("bias", "head.*"))


def test_error_other_options():
    with pytest.raises(ValueError, match=r"update_every must be an int >= 1, got 0"):
        SparsityManager(small_net(), update_every=0)
    with pytest.raises(ValueError, match=r"prune_fraction must be in \[0, 1\]"):
        SparsityManager(small_net(), prune_fraction=1.5)
    with pytest.raises(ValueError, match=r"no parameter left to sparsify"):
        SparsityManager(nn.Linear(4, 2))
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    man = SparsityManager(net, regrow="gradient", update_every=1)
    with pytest.raises(RuntimeError, match=r"regrow='gradient' needs 0.weight.grad"):
        man.step(1)


def test_error_bad_masks_for_optimizer():
    net = small_net()
    with pytest.raises(ValueError, match=r"expected a bool mask of shape \[16, 8, 3, 3\]"):
        MaskedSGD(net.parameters(), masks={net[3].weight: torch.ones(16, 8, 3, 3)}, lr=0.1)
    with pytest.raises(ValueError, match=r"not a parameter of this optimizer"):
        MaskedSGD(net[3].parameters(), masks={net[5].weight: net[5].weight > 0}, lr=0.1)
    with pytest.raises(ValueError, match=r"Nesterov momentum requires"):
        MaskedSGD(net.parameters(), lr=0.1, nesterov=True)


def test_error_load_state_dict_mismatch():
    man = SparsityManager(small_net(), 0.5)
    other = SparsityManager(small_net(), 0.5, exclude=("bias", "norm"))
    with pytest.raises(ValueError, match=r"missing \[\], unexpected \['0.weight', '10.weight'\]"):
        man.load_state_dict(other.state_dict())
