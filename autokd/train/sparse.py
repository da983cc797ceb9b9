"""Sparse student training: masked optimizers and dynamic sparsity (prune and regrow).

Auto-KD's second acceleration trains each proxy student with half of its weights forced to zero:
a random mask at the start, then a dynamic topology that prunes and regrows connections.

Weights stay dense tensors holding zeros (no sparse storage): a bool keep-mask per sparse
parameter lives in a :class:`SparsityManager`, and :class:`MaskedSGD` / :class:`MaskedAdamW`
update every parameter in one fused call (``autokd.ops.masked_sgd_step`` /
``masked_adamw_step``) that keeps masked weights and their optimizer state exactly zero and
ignores their gradients.

The trainer plugs it in with ONE option, ``sparsity`` (0 means dense: plain ``torch.optim``
and no manager, so it costs nothing)::

    opt, sparse = make_optimizer(student, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                 nesterov=True, sparsity=cfg.sparsity, total_steps=steps)
    for step, (x, y) in enumerate(loader, start=1):
        loss = criterion(student(x), y)
        loss.backward()
        opt.step()
        if sparse is not None:
            sparse.step(step)          # after opt.step(), before zero_grad (gradient regrow)
        opt.zero_grad(set_to_none=True)

Topology schedule (SET: Mocanu et al. 2018; RigL: Evci et al. 2020):
- initial masks: per-layer densities from ``distribution`` ("uniform": every layer 1 - s;
  "erk": Erdos-Renyi-Kernel, density of a layer proportional to sum(shape) / prod(shape), layers
  that would exceed density 1 made dense and the rest rescaled), rounded to whole weights by
  largest remainders so the total count of kept weights is exactly round((1 - s) * N) over the
  N sparse weights; the kept positions of each layer are drawn uniformly at random.
- every ``update_every`` steps while ``step < end_step``: in each layer with k kept weights,
  prune the n = round(f(t) * k) kept weights of smallest magnitude and regrow n positions among
  those inactive before the prune (just-pruned ones are not eligible), chosen at random
  ("random", SET) or by largest gradient magnitude ("gradient", RigL). Every layer keeps exactly
  k weights after every update. Regrown weights start at zero (as in RigL), and so do their
  optimizer states (the fused step zeroes the state of masked entries every step).
- f(t) = prune_fraction * decay(t / end_step) with decay "cosine" (0.5 (1 + cos(pi x))),
  "linear" (1 - x) or "constant". Without ``end_step`` updates never stop and the fraction stays
  at ``prune_fraction`` (a decay needs a horizon); ``make_optimizer`` sets end_step to 75% of
  ``total_steps`` (RigL's choice) when it is given.

Only parameters with 2 or more dimensions are ever masked; 1-D parameters stay dense.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from autokd.ops import masked_adamw_step, masked_sgd_step

__all__ = [
    "DISTRIBUTIONS",
    "EXCLUDE_KEYS",
    "FRACTION_DECAYS",
    "REGROW",
    "MaskedAdamW",
    "MaskedSGD",
    "SparsityManager",
    "make_optimizer",
]

DISTRIBUTIONS = ("uniform", "erk")
REGROW = ("random", "gradient")
FRACTION_DECAYS = ("cosine", "linear", "constant")
# Keywords of `exclude`; anything else in `exclude` is an fnmatch pattern on parameter names.
EXCLUDE_KEYS = ("bias", "norm", "first_conv", "last_linear")
OPTIMIZERS = ("sgd", "adamw")

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)


def _choice(what: str, value, valid: Sequence[str]) -> str:
    if isinstance(value, str) and value in valid:
        return value
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown {what} {value!r}{hint}; valid: {', '.join(valid)}")


def _check_sparsity(sparsity) -> float:
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not (0.0 <= float(sparsity) < 1.0)
    ):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _largest_remainder(targets: Sequence[float], caps: Sequence[int], total: int) -> List[int]:
    """Whole counts near ``targets`` (each <= its cap) that sum to exactly ``total``."""
    counts = [min(int(math.floor(t)), c) for t, c in zip(targets, caps)]
    order = sorted(range(len(targets)), key=lambda i: (-(targets[i] - math.floor(targets[i])), i))
    left = total - sum(counts)
    while left > 0:
        moved = False
        for i in order:
            if left == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
                moved = True
        if not moved:
            break
    return counts


def _erk_densities(shapes: Sequence[torch.Size], density: float) -> List[float]:
    """Erdos-Renyi-Kernel densities (RigL): d_l = eps * sum(shape_l) / prod(shape_l), layers with
    d_l > 1 fixed dense and eps solved again until none exceeds 1; total kept = density * N."""
    numels = [math.prod(s) for s in shapes]
    raw = [sum(s) / math.prod(s) for s in shapes]
    dense: set = set()
    while True:
        budget = density * sum(numels) - sum(numels[i] for i in dense)
        denom = sum(raw[i] * numels[i] for i in range(len(shapes)) if i not in dense)
        if denom <= 0 or budget <= 0:
            eps = 0.0
            break
        eps = budget / denom
        over = [i for i in range(len(shapes)) if i not in dense and eps * raw[i] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda i: raw[i]))
    return [1.0 if i in dense else eps * raw[i] for i in range(len(shapes))]


class SparsityManager:
    """Keep-masks for the weights of ``model`` at a target sparsity, with dynamic prune/regrow.

    Args:
        model: any ``nn.Module``; its parameters with >= 2 dims not excluded become sparse.
        sparsity: fraction of zero weights over the sparse parameters, in [0, 1).
        distribution: "uniform" (every layer at ``sparsity``) or "erk".
        exclude: parameters kept dense: "bias", "norm" (parameters of normalisation modules),
            "first_conv" (the first convolution's weight), "last_linear" (the last Linear's
            weight), and any fnmatch pattern on the parameter name (e.g. "head.*"); a pattern
            matching nothing is an error (a typo would otherwise silently do nothing).
        update_every: steps between topology updates.
        prune_fraction: fraction of each layer's kept weights replaced at the first update.
        fraction_decay: "cosine", "linear" or "constant" decay of that fraction to ``end_step``.
        end_step: last step (exclusive) with topology updates; None: never stop, no decay.
        regrow: "random" (SET) or "gradient" (RigL; needs ``.grad`` when ``step`` is called).
        seed: seed of the manager's own generator (initial masks, random regrowth).

    Use ``SparsityManager.create`` for the one-option form: sparsity 0 gives None (dense).
    """

    def __init__(
        self,
        model: nn.Module,
        sparsity: float = 0.5,
        distribution: str = "uniform",
        exclude: Iterable[str] = EXCLUDE_KEYS,
        update_every: int = 100,
        prune_fraction: float = 0.3,
        fraction_decay: str = "cosine",
        end_step: Optional[int] = None,
        regrow: str = "random",
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.sparsity = _check_sparsity(sparsity)
        self.distribution = _choice("distribution", distribution, DISTRIBUTIONS)
        self.regrow = _choice("regrow", regrow, REGROW)
        self.fraction_decay = _choice("fraction_decay", fraction_decay, FRACTION_DECAYS)
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = tuple(exclude)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1, got {update_every!r}")
        if not isinstance(prune_fraction, (int, float)) or not 0.0 <= prune_fraction <= 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1], got {prune_fraction!r}")
        if end_step is not None and (
            isinstance(end_step, bool) or not isinstance(end_step, int) or end_step < 1
        ):
            raise ValueError(f"end_step must be None or an int >= 1, got {end_step!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.update_every = update_every
        self.prune_fraction = float(prune_fraction)
        self.end_step = end_step
        self.seed = seed

        self._names, self._params = self._select(model)
        self._total_params = sum(p.numel() for p in model.parameters())
        self._generator = torch.Generator().manual_seed(seed)
        self.updates = 0
        self.last_step = 0
        # name -> bool mask; the optimizer holds the same tensors, updated in place.
        self.masks: Dict[str, torch.Tensor] = {}
        self._by_param: Dict[torch.Tensor, torch.Tensor] = {}
        self._init_masks()
        self.apply_masks()

    @classmethod
    def create(
        cls, model: nn.Module, sparsity: float = 0.0, **kwargs
    ) -> Optional["SparsityManager"]:
        """A manager, or None when ``sparsity`` is 0 (dense training costs nothing extra)."""
        valid = [
            k
            for k in inspect.signature(cls.__init__).parameters
            if k not in ("self", "model", "sparsity")
        ]
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown SparsityManager option(s) {unknown}; valid: {', '.join(valid)}"
            )
        if _check_sparsity(sparsity) == 0.0:
            # Still catch typos in the other options of a config that happens to be dense.
            for key, valid in (
                ("distribution", DISTRIBUTIONS),
                ("regrow", REGROW),
                ("fraction_decay", FRACTION_DECAYS),
            ):
                if key in kwargs:
                    _choice(key, kwargs[key], valid)
            return None
        return cls(model, sparsity, **kwargs)

    # ---- selection and initial masks ---------------------------------------------------------

    def _select(self, model: nn.Module) -> Tuple[List[str], Dict[str, nn.Parameter]]:
        keywords = [e for e in self.exclude if e in EXCLUDE_KEYS]
        patterns = [e for e in self.exclude if e not in EXCLUDE_KEYS]
        for e in self.exclude:
            if not isinstance(e, str) or not e:
                raise ValueError(f"exclude entries must be non-empty strings, got {e!r}")
        modules = list(model.named_modules())
        convs = [m for _, m in modules if isinstance(m, nn.modules.conv._ConvNd)]
        linears = [m for _, m in modules if isinstance(m, nn.Linear)]
        excluded_ids = set()
        if "first_conv" in keywords and convs:
            excluded_ids.add(id(convs[0].weight))
        if "last_linear" in keywords and linears:
            excluded_ids.add(id(linears[-1].weight))
        if "norm" in keywords:
            for _, m in modules:
                if isinstance(m, _NORM_TYPES):
                    excluded_ids.update(id(p) for p in m.parameters(recurse=False))
        names, params, seen = [], {}, set()
        all_names = []
        for name, p in model.named_parameters():
            all_names.append(name)
            if id(p) in seen:  # tied weights: masked once
                continue
            seen.add(id(p))
            if p.dim() < 2 or id(p) in excluded_ids:
                continue
            if "bias" in keywords and name.rsplit(".", 1)[-1] == "bias":
                continue
            if any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
                continue
            names.append(name)
            params[name] = p
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(n, pat) for n in all_names):
                raise ValueError(
                    f"exclude pattern {pat!r} matches no parameter of the model; keywords are "
                    f"{', '.join(EXCLUDE_KEYS)}, anything else is an fnmatch pattern on names "
                    f"such as {all_names[0]!r}"
                    if all_names
                    else "(model has no parameters)"
                )
        if not names:
            raise ValueError(
                f"no parameter left to sparsify after exclude={self.exclude!r} (only parameters "
                "with >= 2 dims are masked)"
            )
        return names, params

    def _init_masks(self) -> None:
        shapes = [self._params[n].shape for n in self._names]
        numels = [math.prod(s) for s in shapes]
        density = 1.0 - self.sparsity
        if self.distribution == "uniform":
            densities = [density] * len(shapes)
        else:
            densities = _erk_densities(shapes, density)
        total = int(round(density * sum(numels)))
        counts = _largest_remainder([d * n for d, n in zip(densities, numels)], numels, total)
        self._counts: Dict[str, int] = {}
        for name, n, k in zip(self._names, numels, counts):
            p = self._params[name]
            flat = torch.zeros(n, dtype=torch.bool)
            flat[torch.randperm(n, generator=self._generator)[:k]] = True
            mask = flat.view(p.shape).to(p.device)
            self.masks[name] = mask
            self._by_param[p] = mask
            self._counts[name] = k

    # ---- the trainer's calls -----------------------------------------------------------------

    @property
    def param_masks(self) -> Dict[torch.Tensor, torch.Tensor]:
        """parameter -> mask (the form MaskedSGD / MaskedAdamW read)."""
        return self._by_param

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero every masked weight (after loading weights, or after a dense optimizer step)."""
        for name in self._names:
            self._params[name].masked_fill_(~self.masks[name], 0)

    def fraction(self, step: int) -> float:
        """Fraction of each layer's kept weights replaced by an update at ``step``."""
        if self.end_step is None or self.fraction_decay == "constant":
            return self.prune_fraction
        x = min(max(step / self.end_step, 0.0), 1.0)
        if self.fraction_decay == "cosine":
            return self.prune_fraction * 0.5 * (1.0 + math.cos(math.pi * x))
        return self.prune_fraction * (1.0 - x)

    def should_update(self, step: int) -> bool:
        return (
            step > 0
            and step % self.update_every == 0
            and (self.end_step is None or step < self.end_step)
        )

    def step(self, step: int) -> bool:
        """Hook after ``optimizer.step()``: ``step`` is the count of optimizer steps done (1 after
        the first). Updates the topology when it is due; returns whether it did."""
        self.last_step = int(step)
        if not self.should_update(step):
            return False
        self._update(self.fraction(step))
        self.updates += 1
        return True

    @torch.no_grad()
    def _update(self, fraction: float) -> None:
        for name in self._names:
            p, mask, k = self._params[name], self.masks[name], self._counts[name]
            n_total = mask.numel()
            n = min(int(round(fraction * k)), k, n_total - k)
            if n <= 0:
                continue
            flat_mask = mask.view(-1)
            # Prune: the n kept weights of smallest magnitude.
            mag = p.detach().abs().reshape(-1).float()
            mag = mag.masked_fill(~flat_mask, float("inf"))
            drop = torch.topk(mag, n, largest=False, sorted=False).indices
            # Regrow among positions inactive before the prune.
            if self.regrow == "random":
                score = torch.rand(n_total, generator=self._generator).to(p.device)
            else:
                if p.grad is None:
                    raise RuntimeError(
                        f"SparsityManager: regrow='gradient' needs {name}.grad; call step() "
                        "after optimizer.step() and before zero_grad()"
                    )
                score = p.grad.detach().abs().reshape(-1).float()
            score = score.masked_fill(flat_mask, float("-inf"))
            grow = torch.topk(score, n, largest=True, sorted=False).indices
            flat_mask[drop] = False
            flat_mask[grow] = True
            grown = torch.zeros_like(flat_mask)
            grown[grow] = True
            # Pruned and regrown weights both restart at zero.
            p.masked_fill_(grown.view(p.shape) | ~mask, 0)

    # ---- reporting and checkpoints -----------------------------------------------------------

    def sparsity_report(self) -> Dict[str, object]:
        """Per-layer and total counts, from the masks."""
        layers = {}
        kept = total = 0
        for name in self._names:
            m = self.masks[name]
            nz = int(m.sum())
            layers[name] = {
                "shape": tuple(m.shape),
                "numel": m.numel(),
                "kept": nz,
                "density": nz / m.numel(),
            }
            kept += nz
            total += m.numel()
        return {
            "layers": layers,
            "sparse_params": total,
            "kept": kept,
            "sparsity": 1.0 - kept / total,
            "model_params": self._total_params,
            "model_sparsity": (total - kept) / self._total_params,
            "updates": self.updates,
            "last_step": self.last_step,
        }

    def state_dict(self) -> Dict[str, object]:
        return {
            "masks": {n: self.masks[n].detach().cpu().clone() for n in self._names},
            "generator": self._generator.get_state(),
            "updates": self.updates,
            "last_step": self.last_step,
            "config": {
                "sparsity": self.sparsity,
                "distribution": self.distribution,
                "exclude": list(self.exclude),
                "update_every": self.update_every,
                "prune_fraction": self.prune_fraction,
                "fraction_decay": self.fraction_decay,
                "end_step": self.end_step,
                "regrow": self.regrow,
                "seed": self.seed,
            },
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restores masks (in place: optimizers keep seeing them), counts, generator and step;
        masked weights are zeroed. The schedule options stay those of this manager."""
        masks = state["masks"]
        missing = sorted(set(self._names) - set(masks))
        unexpected = sorted(set(masks) - set(self._names))
        if missing or unexpected:
            raise ValueError(
                f"SparsityManager.load_state_dict: masks do not match the sparse parameters: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for name in self._names:
            m = masks[name]
            if m.shape != self.masks[name].shape or m.dtype != torch.bool:
                raise ValueError(
                    f"SparsityManager.load_state_dict: expected mask {name!r} of shape "
                    f"{list(self.masks[name].shape)} and dtype bool, got {list(m.shape)} {m.dtype}"
                )
        for name in self._names:
            self.masks[name].copy_(masks[name])
            self._counts[name] = int(self.masks[name].sum())
        self._generator.set_state(state["generator"])
        self.updates = int(state["updates"])
        self.last_step = int(state["last_step"])
        self.apply_masks()


# ---- optimizers -------------------------------------------------------------------------------

MaskSource = Union[None, SparsityManager, Mapping[torch.Tensor, torch.Tensor]]


class _MaskedOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults, masks: MaskSource):
        super().__init__(params, defaults)
        if masks is None:
            self._masks: Mapping[torch.Tensor, torch.Tensor] = {}
        elif isinstance(masks, SparsityManager):
            self._masks = masks.param_masks  # the manager's live dict: updates are seen
        elif isinstance(masks, Mapping):
            self._masks = dict(masks)
        else:
            raise ValueError(
                "masks must be None, a SparsityManager or a dict parameter -> bool mask, got "
                f"{type(masks).__name__}"
            )
        own = {p for g in self.param_groups for p in g["params"]}
        for p, m in self._masks.items():
            if p not in own:
                raise ValueError(
                    f"{type(self).__name__}: a mask is given for a tensor of shape "
                    f"{list(p.shape)} that is not a parameter of this optimizer"
                )
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != p.shape:
                got = f"{list(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m)
                raise ValueError(
                    f"{type(self).__name__}: expected a bool mask of shape "
                    f"{list(p.shape)}, got {got}"
                )

    def _grads(self, group):
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            yield p, p.grad


class MaskedSGD(_MaskedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, weight decay, Nesterov) with keep-masks: masked
    weights and their momentum stay exactly zero and their gradients are ignored. Parameters
    without a mask are updated densely in the same fused call. The state (``momentum_buffer``)
    has torch.optim.SGD's layout, so state_dicts load either way. Parameters must be
    contiguous."""

    def __init__(
        self,
        params,
        masks: MaskSource = None,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
        super().__init__(params, defaults, masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mom = group["momentum"]
            buckets: Dict[tuple, tuple] = {}
            for p, g in self._grads(group):
                state = self.state[p]
                first = False
                if mom != 0 and state.get("momentum_buffer") is None:
                    # Never read on the first step: the kernel writes it from the update.
                    state["momentum_buffer"] = torch.empty_like(
                        p, memory_format=torch.contiguous_format
                    )
                    first = True
                lists = buckets.setdefault((p.device, p.dtype, first), ([], [], [], []))
                lists[0].append(p)
                lists[1].append(g)
                lists[2].append(self._masks.get(p))
                if mom != 0:
                    lists[3].append(state["momentum_buffer"])
            for (_, _, first), (ps, gs, ms, bs) in buckets.items():
                masked_sgd_step(
                    ps,
                    gs,
                    ms,
                    bs,
                    group["lr"],
                    mom,
                    group["dampening"],
                    group["weight_decay"],
                    group["nesterov"],
                    first,
                )
        return loss


class MaskedAdamW(_MaskedOptimizer):
    """``torch.optim.AdamW`` (amsgrad=False) with keep-masks: masked weights, exp_avg and
    exp_avg_sq stay exactly zero and their gradients are ignored. The state (``step``,
    ``exp_avg``, ``exp_avg_sq``) has torch.optim.AdamW's layout. Parameters must be
    contiguous."""

    def __init__(
        self,
        params,
        masks: MaskSource = None,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas} (each in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, masks)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            buckets: Dict[tuple, tuple] = {}
            for p, g in self._grads(group):
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                t = int(state["step"].item())
                lists = buckets.setdefault((p.device, p.dtype, t), ([], [], [], [], []))
                lists[0].append(p)
                lists[1].append(g)
                lists[2].append(self._masks.get(p))
                lists[3].append(state["exp_avg"])
                lists[4].append(state["exp_avg_sq"])
            for (_, _, t), (ps, gs, ms, m1, m2) in buckets.items():
                masked_adamw_step(
                    ps,
                    gs,
                    ms,
                    m1,
                    m2,
                    t,
                    group["lr"],
                    beta1,
                    beta2,
                    group["eps"],
                    group["weight_decay"],
                )
        return loss


def make_optimizer(
    model: nn.Module,
    kind: str = "sgd",
    lr: float = 0.1,
    *,
    sparsity: float = 0.0,
    sparsity_kwargs: Optional[Mapping[str, object]] = None,
    total_steps: Optional[int] = None,
    no_decay: Optional[Iterable[str]] = None,
    **optim_kwargs,
) -> Tuple[torch.optim.Optimizer, Optional[SparsityManager]]:
    """The trainer's one entry: ``(optimizer, manager_or_None)`` for ``model``.

    ``sparsity == 0``: plain ``torch.optim.SGD`` / ``AdamW`` and None (dense costs nothing).
    Otherwise a :class:`SparsityManager` (``sparsity_kwargs`` are its options; ``end_step``
    defaults to 75% of ``total_steps`` when that is given) and the masked optimizer over all of
    ``model``'s parameters. ``optim_kwargs`` go to the optimizer (momentum, weight_decay,
    nesterov, dampening for "sgd"; betas, eps, weight_decay for "adamw"). ``no_decay``: names
    of parameters (as ``named_parameters()``) put in a second group with weight decay 0
    (biases, norms, position embeddings of a ViT under AdamW).
    """
    kind = _choice("optimizer kind", kind, OPTIMIZERS)
    sparsity = _check_sparsity(sparsity)
    kwargs = dict(sparsity_kwargs or {})
    params = _param_groups(model, no_decay)
    if sparsity == 0.0:
        SparsityManager.create(model, 0.0, **kwargs)  # validates the names only
        cls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
        return cls(params, lr=lr, **optim_kwargs), None
    if total_steps is not None and kwargs.get("end_step") is None:
        kwargs["end_step"] = max(1, int(0.75 * total_steps))
    manager = SparsityManager.create(model, sparsity, **kwargs)
    cls = MaskedSGD if kind == "sgd" else MaskedAdamW
    return cls(params, masks=manager, lr=lr, **optim_kwargs), manager


def _param_groups(model: nn.Module, no_decay: Optional[Iterable[str]]):
    """``model.parameters()``, or two groups (decayed, then weight decay 0) for ``no_decay``."""
    if no_decay is None:
        return model.parameters()
    skip = set(no_decay)
    named = dict(model.named_parameters())
    unknown = sorted(skip - set(named))
    if unknown:
        raise ValueError(f"no_decay: {unknown} are not parameters of {type(model).__name__}")
    decay = [p for n, p in named.items() if n not in skip]
    rest = [p for n, p in named.items() if n in skip]
    return [g for g in ({"params": decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]
