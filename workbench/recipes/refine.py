"""Refine a recipe where layers interact: the latent error's gradient, an aligned-error model, measured steps.

The size-aware allocation adds each layer's *isolated* distortion; measured recipes show that layers interact
(on the demo model a recipe's measured PSNR is several dB off what the sum predicts, and the knapsack loses to the
reference's rule at some sizes; the figures are in docs/benchmarks.md). At a recipe R with latent error e
(`D = |e|**2`, the allocation's distortion), changing layer l's palette from option a to option c changes its
weight by `Δ = Q_c - Q_a` and the latent by about `v_l = J_l Δ`, so `D' = |e + sum_l v_l|**2`. Two things are
known:

- `<e, v_l>`, exactly to first order, from one backward pass at R: `lin_l = <dD/dW_l, Δ> = 2 <e, v_l>`
  (`OneStepProbe.distortion_gradient`; the one thing the isolated sweep cannot see);
- `|v_l|**2`, estimated from the sweep: the layer's measured isolated distortion per unit of importance-weighted
  weight error, `kappa_l = d_l(c) / pe_l(c)` (`pe = sum importance * (Q - W)**2`), times `pe(Δ)`; never below
  Cauchy-Schwarz's `lin_l**2 / (4 D)`.

The *aligned* model splits each `v_l` into its part along e, `alpha_l = lin_l / (2 |e|)`, and the rest, taken as
uncorrelated between layers:

    D' = (|e| + sum_l alpha_l)**2 + sum_l (|v_l|**2 - alpha_l**2)

so changes that each cancel part of e cannot together cancel more than all of it (a separable model, which adds
the `lin_l`, does exactly that and its recipes collapse, far below the recipe they started from). `exchange_steps`
searches up to K layer changes (one that fits the budget, or an upgrade paid for by a downgrade) that lower the
model's D'; each round measures the candidates for K in `ks` end to end, keeps the best if it beats R, and
linearises again there. Every candidate is a measured recipe; nothing is kept on the model's word.

Candidates are judged by their mean PSNR over prompts, so each round linearises the matching objective: the
distortion with every prompt weighted by `1 / d_p` at R (`prompt_weights`), whose relative change is the mean of
the prompts' relative changes, i.e. to first order the mean PSNR's. The unweighted D is dominated by the worst
prompt: on the demo model, with it, the search stalled at some sizes on candidates that lowered D and the mean
PSNR together, and the weighting gained several times as much over the knapsack's recipes.

Example:
    >>> space = OptionSpace(options, distortion)
    >>> refined = refine_recipe(probe, recipe, space, budget, measure, pricing=Pricing(cache, importance))
    >>> refined.psnr, [s.measured_psnr for s in refined.steps]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from workbench.models.layers import get_layer
from workbench.palettes.apply import palettized
from workbench.palettes.config import as_config
from workbench.palettes.stash import WeightStash
from workbench.recipes.pricing import Pricing, segment_of

DEFAULT_KS = (1, 2, 4, 8)  # layer changes per candidate, one measured recipe each
DEFAULT_ROUNDS = 4
PAIR_POOL = 40  # upgrades and downgrades (best per byte) paired in each exchange step


@dataclass(frozen=True)
class Change:
    """One layer's change of palette in the aligned model: `alpha` along the error, `rest` orthogonal to it."""

    layer: str
    option: Hashable
    cost: float  # bytes added (negative: saved)
    alpha: float
    rest: float


@dataclass(frozen=True)
class Step:
    """One measured candidate: its round, how many layers it changes, the model's D'/D - 1, what it measured."""

    round: int
    changes: int
    predicted_change: float
    measured_change: float
    measured_psnr: float


@dataclass
class Refinement:
    """A refined recipe and how it was found.

    Attributes:
        recipe: the best measured recipe (the start if nothing beat it).
        psnr: its measured mean PSNR.
        prompt_psnr: its measured PSNR per prompt.
        start_psnr: the start's.
        steps: every measured candidate, in order.
        rounds: linearisations made (one backward pass each).
    """

    recipe: dict
    psnr: float
    start_psnr: float
    prompt_psnr: tuple[float, ...] = ()
    steps: list[Step] = field(default_factory=list)
    rounds: int = 0

    def to_dict(self) -> dict:
        return {
            "start_psnr": self.start_psnr,
            "psnr": self.psnr,
            "rounds": self.rounds,
            "steps": [asdict(s) for s in self.steps],
        }


@dataclass(frozen=True)
class OptionSpace:
    """What a refinement chooses from.

    Attributes:
        options: layer -> option -> bytes stored (`PaletteConfig.nbytes`, float16 2 bytes a weight; or any cost in
            the budget's unit). Options are widths (16 = float16) or palette config keys.
        distortion: layer -> option -> isolated distortion per prompt (`workbench.recipes.allocation.
            layer_prompt_distortions`), or one for all prompts (`layer_distortions`); each round weighs the prompts
            by `prompt_weights` at its recipe.
    """

    options: Mapping[str, Mapping[Hashable, float]]
    distortion: Mapping[str, Mapping[Hashable, object]]


@dataclass(frozen=True)
class RefineSettings:
    """How hard a refinement searches.

    Attributes:
        rounds: linearisations at most (one backward pass each); it stops early when a round finds nothing better.
        ks: layer changes per measured candidate (one measured recipe each).
        batch_chunk: UNet batch rows per backward pass (bounds activation memory); None = the whole batch.
        min_gain: dB of mean PSNR a round must gain for another round to follow (0: any gain).
        max_evaluations: candidates measured at most (a round that would pass it is not started); None = no cap.
        checkpointing: the UNet's gradient checkpointing in each round's backward pass (the same gradient, with
            activations of about one block instead of the whole UNet's, for one more forward pass).
    """

    rounds: int = DEFAULT_ROUNDS
    ks: tuple[int, ...] = DEFAULT_KS
    batch_chunk: int | None = None
    min_gain: float = 0.0
    max_evaluations: int | None = None
    checkpointing: bool = True


@dataclass(frozen=True)
class GradientSums:
    """A layer's gradient as pricing needs it: its sum over each bin of the original weight (`LayerBins`) and its
    inner product with the original weight."""

    bins: np.ndarray
    dot: float

    def __add__(self, other: GradientSums) -> GradientSums:
        return GradientSums(self.bins + other.bins, self.dot + other.dot)


@torch.no_grad()
def layer_changes(
    unet: torch.nn.Module,
    recipe: Mapping[str, Hashable],
    options: Mapping[str, Mapping[Hashable, float]],
    distortion: Mapping[str, Mapping[Hashable, float]],
    gradients: Mapping[str, GradientSums],
    current: float,
    pricing: Pricing,
) -> dict[str, list[Change]]:
    """Every other option of every layer as a `Change` from `recipe` (the aligned model's terms), priced over the
    layer's bins (`workbench.recipes.pricing`).

    Args:
        unet: the UNet, with its original weights in place, or with `pricing.state`'s recipe in force.
        recipe: layer -> current option.
        options: layer -> option -> bytes stored.
        distortion: layer -> option -> isolated distortion (the allocation's model; 0 for float16).
        gradients: layer -> dD/dW at `recipe`, as bin sums (`GradientSums`).
        current: D at `recipe`.
        pricing (`Pricing`): the palettes, importances, and what is kept across calls.
    """
    norm = math.sqrt(max(current, 1e-300))
    out: dict[str, list[Change]] = {}
    for name, opts in options.items():
        weight = get_layer(unet, name).weight
        held = pricing.bins.get(name)
        fresh = held is None or held.segment != segment_of(tuple(weight.shape), opts)  # computed from the original
        bins = pricing.layer_bins(name, pricing.original(name, weight) if fresh else weight, opts)
        grad = gradients[name]

        def inner(q):  # <g, Q>
            return grad.dot if q is None else float(grad.bins @ q)

        a = recipe.get(name)
        qa = pricing.option_values(name, a, weight, exact=True)
        changes = []
        for c in opts:
            if c == a:
                continue
            qc = pricing.option_values(name, c, weight, exact=False)
            lin = inner(qc) - inner(qa)
            end, q_end = (c, qc) if as_config(c) is not None else (a, qa)  # the palettized end of the change
            error = bins.error(q_end, None)
            kappa = distortion[name][end] / error if error > 0 else 0.0
            norm2 = max(kappa * bins.error(qc, qa), lin * lin / (4 * max(current, 1e-300)))
            alpha = lin / (2 * norm)
            changes.append(Change(name, c, opts[c] - opts[a], alpha, max(norm2 - alpha * alpha, 0.0)))
        out[name] = changes
    return out


def exchange_steps(
    changes: Mapping[str, Sequence[Change]], spent: float, budget: float, current: float, max_changed: int
) -> list[tuple[dict[str, Hashable], float]]:
    """The greedy steps that lower the aligned model's D' within `budget`, up to `max_changed` layer changes.

    Each step takes the best of: one change that fits, or an upgrade paired with a downgrade of another layer
    (the `PAIR_POOL` best of each per byte) that fit together; it stops when nothing lowers D' or the next best step
    would change more than `max_changed` layers. Fewer changes are a prefix of the same steps (`_prefix`).

    Returns:
        `list[tuple[dict, float]]`: per step, the changes it makes (layer -> new option) and the predicted D'/D - 1
        after it.
    """
    along, rest = math.sqrt(max(current, 1e-300)), 0.0
    chosen: set[str] = set()
    steps: list[tuple[dict[str, Hashable], float]] = []

    def model(a: float, r: float) -> float:
        return a * a + r

    while len(chosen) < max_changed:
        now = model(along, rest)
        pool = [c for layer, cs in changes.items() if layer not in chosen for c in cs]

        def gain(c: Change) -> float:
            return model(along + c.alpha, rest + c.rest) - now

        best: tuple[float, list[Change]] | None = None
        for c in pool:
            if spent + c.cost <= budget and (best is None or gain(c) < best[0]):
                best = (gain(c), [c])
        ups = sorted((c for c in pool if c.cost > 0), key=lambda c: gain(c) / c.cost)[:PAIR_POOL]
        downs = sorted((c for c in pool if c.cost < 0), key=lambda c: gain(c) / -c.cost)[:PAIR_POOL]
        for u in ups:
            for d in downs:
                if d.layer == u.layer or spent + u.cost + d.cost > budget:
                    continue
                g = model(along + u.alpha + d.alpha, rest + u.rest + d.rest) - now
                if best is None or g < best[0]:
                    best = (g, [u, d])
        if best is None or best[0] >= 0 or len(chosen) + len(best[1]) > max_changed:
            break
        for c in best[1]:
            chosen.add(c.layer)
            spent += c.cost
            along += c.alpha
            rest += c.rest
        steps.append(({c.layer: c.option for c in best[1]}, model(along, rest) / max(current, 1e-300) - 1.0))
    return steps


def _prefix(steps: Sequence[tuple[dict, float]], max_changed: int) -> tuple[dict[str, Hashable], float]:
    """The steps' changes while they change at most `max_changed` layers, and the prediction after the last."""
    moves: dict[str, Hashable] = {}
    change = 0.0
    for step, after in steps:
        if len(moves) + len(step) > max_changed:
            break
        moves.update(step)
        change = after
    return moves, change


def _candidates(best: Mapping, steps: Sequence[tuple[dict, float]], ks: Sequence[int]) -> tuple[list, list]:
    """The distinct recipes of `best` with the first steps changing at most k layers, for k in `ks`, and their
    predicted changes."""
    candidates, predicted = [], []
    for k in ks:
        moves, change = _prefix(steps, k)
        candidate = {**best, **moves}
        if moves and candidate not in candidates:
            candidates.append(candidate)
            predicted.append(change)
    return candidates, predicted


def prompt_weights(psnr: Sequence[float]) -> np.ndarray:
    """Per-prompt weights `1 / d_p` (`d_p = 10**(-psnr_p / 10)`), scaled to mean 1, of the objective a round
    linearises: `D_w = mean_p w_p d_p`. Its relative change is the mean of the prompts' relative changes, so to
    first order it moves with the mean PSNR over prompts, which candidates are judged by; the unweighted D is
    dominated by the worst prompt (a step that lowers it can lower the mean PSNR)."""
    inverse = 10.0 ** (np.asarray(psnr, dtype=np.float64) / 10.0)
    return inverse / inverse.mean()


def weighted_distortion(psnr: Sequence[float], weights: np.ndarray) -> float:
    """`mean_p w_p 10**(-psnr_p / 10)`: a measurement's `D_w` (`prompt_weights`)."""
    return float(np.mean(weights * 10.0 ** (-np.asarray(psnr, dtype=np.float64) / 10.0)))


def weighted_distortions(distortion: Mapping[str, Mapping[Hashable, object]], weights: np.ndarray) -> dict:
    """layer -> option -> isolated `D_w`: a per-prompt distortion (`layer_prompt_distortions`) weighted by
    `weights` (clipped at 0), a scalar as it is (the same for every prompt, and the weights' mean is 1)."""
    out = {}
    for name, opts in distortion.items():
        out[name] = {o: max(float(np.mean(weights * np.asarray(d, dtype=np.float64))), 0.0) for o, d in opts.items()}
    return out


def refine_recipe(
    probe,
    recipe: Mapping[str, Hashable],
    space: OptionSpace,
    budget: float,
    measure: Callable[[Sequence[Mapping[str, Hashable]], int], list[Sequence[float]]],
    *,
    pricing: Pricing,
    settings: RefineSettings = RefineSettings(),
    start_psnr: Sequence[float] | None = None,
) -> Refinement:
    """Refine `recipe` within `budget` bytes by measured steps of the aligned model (see the module docstring).

    Args:
        probe (`OneStepProbe`): the analysis' one-step probe (its gradient is taken at each round's recipe); its
            UNet is palettized in place during each gradient and restored.
        recipe: layer -> option to start from (options as in `space`; 16 = float16).
        space (`OptionSpace`): each layer's options, their bytes and isolated distortions.
        budget: bytes the refined recipe may take.
        measure: `(recipes, round) -> PSNR per prompt of each`, end to end (the analysis' executor).
        pricing (`Pricing`): how changes are priced (palettes, importances, approximate palettes).
        settings (`RefineSettings`): rounds, layer changes per candidate, backward batch.
        start_psnr (`Sequence[float]`, *optional*): the start's measured PSNR per prompt, if known.

    Returns:
        `Refinement`.
    """
    first = start_psnr if start_psnr is not None else measure([dict(recipe)], 0)[0]
    result = Refinement(dict(recipe), _mean(first), _mean(first), tuple(first))
    for r in range(1, settings.rounds + 1):
        if settings.max_evaluations is not None and len(result.steps) + len(settings.ks) > settings.max_evaluations:
            break
        result.rounds, before = r, result.psnr
        if not _refine_round(probe, result, space, budget, measure, pricing, settings):
            break
        if result.psnr - before < settings.min_gain:
            break
    return result


def _gradient_sums(probe, recipe, names, space: OptionSpace, pricing: Pricing, settings, weights=None):
    """D at `recipe` and each layer's `GradientSums`, taken as each weight's gradient comes out of the backward pass
    (`distortion_gradient(consume=...)`), so the gradients of all the weights are never held at once; the originals
    they are binned by are read from the stash the recipe's palettes wait in. With `pricing.state` the recipe is
    put in force there and left in force (see `Pricing`); else for the pass only."""
    unet = probe.pipe.unet
    if pricing.state is not None:
        pricing.state.reach(recipe)
        return _binned_gradient(probe, unet, names, space, pricing, pricing.stash, settings, weights)
    stash = WeightStash() if pricing.stash is None else pricing.stash
    try:
        with palettized(unet, recipe, pricing.cache, stash=stash):
            return _binned_gradient(probe, unet, names, space, pricing, stash, settings, weights)
    finally:
        if pricing.stash is None:
            stash.close()


def _binned_gradient(probe, unet, names, space: OptionSpace, pricing: Pricing, stash, settings, weights):
    """`_gradient_sums` with the recipe in force and its originals in `stash`."""
    params = [get_layer(unet, n).weight for n in names]
    sums: dict[str, GradientSums] = {}

    def consume(i: int, grad: torch.Tensor) -> None:
        name = names[i]
        original = stash.original(name, params[i])
        bins = pricing.layer_bins(name, original, space.options[name])
        part = GradientSums(*bins.gradient_sums(original, grad))
        sums[name] = part if name not in sums else sums[name] + part

    current = probe.distortion_gradient(
        params,
        batch_chunk=settings.batch_chunk,
        weights=weights,
        consume=consume,
        checkpointing=settings.checkpointing,
    )
    return current, sums


def _mean(psnr: Sequence[float]) -> float:
    return float(sum(psnr) / len(psnr))


def _refine_round(probe, result: Refinement, space, budget, measure, pricing: Pricing, settings) -> bool:
    """One round of `refine_recipe` at `result.recipe`: linearise, measure the candidates, move `result` to the
    best if it beats the recipe. Returns whether it moved."""
    unet, best, names = probe.pipe.unet, result.recipe, list(space.options)
    weights = prompt_weights(result.prompt_psnr)
    current, grads = _gradient_sums(probe, best, names, space, pricing, settings, weights)
    table = weighted_distortions(space.distortion, weights)
    changes = layer_changes(unet, best, space.options, table, grads, current, pricing)
    spent = sum(space.options[n][best[n]] for n in names)
    ks = settings.ks
    candidates, predicted = _candidates(best, exchange_steps(changes, spent, budget, current, max(ks)), ks)
    if not candidates:
        return False
    best_d = weighted_distortion(result.prompt_psnr, weights)
    improved = None
    for candidate, change, psnr in zip(candidates, predicted, measure(candidates, result.rounds)):
        moved = sum(candidate[n] != best[n] for n in names)
        measured = weighted_distortion(psnr, weights) / best_d - 1.0
        result.steps.append(Step(result.rounds, moved, change, measured, _mean(psnr)))
        if _mean(psnr) > result.psnr and (improved is None or _mean(psnr) > improved[0]):
            improved = (_mean(psnr), candidate, tuple(psnr))
    if improved is None:
        return False
    result.psnr, result.recipe, result.prompt_psnr = improved[0], dict(improved[1]), improved[2]
    return True
