"""Kernel shaping: DKS and TAT transforms of an activation, solved from `resflax.theory`'s maps.

A plain deep net without normalization degenerates at init: its compound kernel (C-) map
C_f = C o ... o C (one local map C per nonlinear layer) drives every input correlation to one
fixed point, so the net forgets its input. Kernel shaping replaces the activation phi by a
transformed phi_hat whose *compound* map over the whole depth L stays tame.

Maps (Martens et al. 2021, sec. 2-3), for weights that preserve q = ||x||^2 / n exactly at init
(orthogonal / delta-orthogonal, gain 1, no biases), z ~ N(0, 1), (u, v) unit Gaussians with
correlation c:

    Q(q) = E[phi_hat(sqrt(q) z)^2]                          the local Q-map
    C(c) = E[phi_hat(u) phi_hat(v)]                         the local C-map (when Q(1) = 1)
    C'(1) = E[phi_hat'(z)^2],  C(0) = E[phi_hat(z)]^2       (Price's theorem; independence)
    Q'(1) = E[phi_hat(z) phi_hat'(z) z]                     (d/dq of Q at q = 1)

DKS (Martens, Ballard, Desjardins, Swirszcz, Dalibard, Sohl-Dickstein, Schoenholz 2021, "Rapid
training of deep neural networks without skip connections or normalization layers using Deep
Kernel Shaping"): phi_hat(x) = gamma (phi(alpha x + beta) + delta) with

    C(0) = 0       delta = -E[phi(alpha z + beta)]                   (mean zero)
    Q(1) = 1       gamma = Var[phi(alpha z + beta)]^(-1/2)
    Q'(1) = 1      }  two equations in (alpha, beta),
    C'(1) = zeta   }  zeta = xi^(1/L), so that the compound slope C_f'(1) = zeta^L = xi

(default xi = 1.5). With Q(1) = Q'(1) = 1 every layer keeps q = 1, and q near 1 stays near 1.

TAT for Leaky ReLU (Zhang, Botev, Martens 2022, "Deep learning without shortcuts: shaping the
kernel with tailored rectifiers"): phi_hat(x) = sqrt(2 / (1 + a^2)) LReLU_a(x), positively
homogeneous, so Q(q) = q exactly; its local C-map in closed form is

    C(c) = c + (1 - a)^2 / (pi (1 + a^2)) (sqrt(1 - c^2) - c arccos(c)),

and the slope a in [0, 1] is the one with C_f(0) = C^(L)(0) = eta (default eta = 0.9), found by
bisection (C_f(0) falls monotonically from the ReLU value at a = 0 to 0 at a = 1).

TAT for smooth activations (Zhang et al. 2022, sec. 4.3 and their appendix pseudocode; the
reference, google-deepmind/dks `dks/base/activation_transform.py`, `tat_params` with
"c_curve_target"): phi_hat(x) = gamma (phi(alpha x + beta) + delta) with

    Q(1) = 1       gamma = E[(phi(alpha z + beta) + delta)^2]^(-1/2)
    Q'(1) = 1      }
    C'(1) = 1      }  three equations in (alpha, beta, delta)
    C''(1) = tau / L   }  so that the compound curvature C_f''(1) = tau (default tau = 0.3)

where C''(1) = E[phi_hat''(z)^2] (Price's theorem twice). With C(1) = 1 and C'(1) = 1 at every
layer the chain rule adds the curvatures, (C o D)''(1) = C''(1) D'(1)^2 + C'(1) D''(1) =
C''(1) + D''(1), so C_f''(1) = L C''(1) on a plain net's one path. C(0) = E[phi_hat]^2 is not
constrained (delta is a free parameter here, unlike DKS). Solutions with alpha gamma >= 2 are
rejected, as the reference does (its note: they "seem to have unstable Q maps and higher kernel
approximation errors").

Conv nets (family='cifar_resnet', plain blocks, no norm): with delta-orthogonal kernels each
conv acts at init on every pixel's channel vector alone, by its centre tap, so the per-pixel
Q/C maps are the MLP's, provided that tap keeps q. `layers`' 'scaled_delta_orthogonal' (DKS's
SUO-Delta) does so exactly when a layer widens (the stem, each stage's first conv, C -> 2C);
plain 'delta_orthogonal' would halve q at every widening. Zero 'SAME' padding only meets the
off-centre taps, which are zero; a stride 2 only drops pixels. The plain net has no shortcut
(option A or otherwise). The global average pool before the linear head then averages features
of different pixels: the theory describes each pixel's kernel, not the pooled one.

`Transform` holds the solved parameters; `transformed_activation` builds phi_hat as a JAX
function; `for_config` / `activation_for` do it for a `resflax.ModelConfig` (depth L =
`nonlinear_depth(config)`). See docs/architecture.md, Kernel shaping, for the deviations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import jax
import numpy as np
from scipy import optimize

from resflax import layers, theory

if TYPE_CHECKING:
    from resflax.config import ModelConfig

TRANSFORMS = ("none", "dks", "tat")
# The targets, per kind: xi (DKS: the compound C-map slope C_f'(1)), eta (Leaky-ReLU TAT: the
# compound value C_f(0)) and tau (smooth TAT: the compound curvature C_f''(1)); the defaults are
# the papers' and the reference implementation's.
DEFAULT_TARGETS = {"xi": 1.5, "eta": 0.9, "tau": 0.3}
# DKS needs two free shape parameters (alpha, beta): smooth activations. Positively homogeneous
# ones (relu, leaky_relu) lose alpha (phi(alpha x + beta) = alpha phi(x + beta / alpha)), so
# their conditions are two equations in one unknown; elu and selu are not validated here.
DKS_ACTIVATIONS = ("erf", "gelu", "sigmoid", "softplus", "swish", "tanh")
# TAT: Leaky ReLU (its slope solved), or a smooth activation (alpha, beta, delta solved).
# Not sigmoid = (1 + tanh(x / 2)) / 2: its solutions are tanh's with alpha gamma four times
# larger (above `_TAT_MAX_GAIN`), so the reference's rejection rule leaves none.
TAT_SMOOTH_ACTIVATIONS = ("erf", "gelu", "softplus", "swish", "tanh")
TAT_ACTIVATIONS = ("leaky_relu",) + TAT_SMOOTH_ACTIVATIONS
# Families whose plain nets have a per-layer kernel map (`nonlinear_depth`): the ImageNet stem's
# max-pool has none.
SHAPED_FAMILIES = ("mlp", "cifar_resnet")

_SOLVE_TOL = 1e-12  # Residual of the DKS conditions a solution must reach.
# Starting points (log alpha, beta) of the DKS root finder, tried in order.
_DKS_STARTS = ((0.0, 0.5), (math.log(0.3), 1.0), (math.log(0.1), 0.3), (math.log(3.0), 2.0))
# Starting points (log alpha, beta, delta) of the smooth-TAT root finder, tried in order: the
# solutions of the activations here have |beta| ~ 0.5 and delta near -phi(beta).
_TAT_STARTS = tuple((la, b, d) for la in (math.log(0.3), 0.0, math.log(0.1))
                    for b, d in ((0.5, -0.5), (-0.5, 0.5), (0.5, -1.0), (1.0, -1.0), (0.0, 0.0)))
# Smooth TAT rejects solutions with alpha gamma at or above this (module docstring).
_TAT_MAX_GAIN = 2.0


def target_kind(transform: str, activation: str) -> str | None:
    """What `shaping_target` means: 'xi' (DKS), 'eta' (TAT, leaky_relu), 'tau' (TAT, smooth),
    None without a transform."""
    if transform == "none":
        return None
    if transform == "dks":
        return "xi"
    return "eta" if activation == "leaky_relu" else "tau"


@dataclasses.dataclass(frozen=True)
class Transform:
    """phi_hat(x) = output_scale * (phi(input_scale * x + input_shift) + output_shift).

    Attributes:
      method: 'dks' or 'tat'.
      activation: the registry name of phi ('leaky_relu' for TAT, whose slope is below).
      depth: L, the nonlinear layers the transform is solved for.
      target: xi = C_f'(1) (DKS), eta = C_f(0) (Leaky-ReLU TAT) or tau = C_f''(1) (smooth
        TAT).
      input_scale, input_shift, output_scale, output_shift: alpha, beta, gamma, delta.
      negative_slope: TAT's leaky-ReLU slope a (None for DKS and smooth TAT, whose phi is the
        registry's).
    """

    method: str
    activation: str
    depth: int
    target: float
    input_scale: float
    input_shift: float
    output_scale: float
    output_shift: float
    negative_slope: float | None = None


# ----------------------------------------------------------------------------- building phi_hat


def base_activation(transform: Transform) -> Callable[[Any], Any]:
    """phi: the registry activation, or for TAT the leaky ReLU of slope `negative_slope`."""
    if transform.negative_slope is not None:
        return functools.partial(jax.nn.leaky_relu, negative_slope=transform.negative_slope)
    return layers.activation(transform.activation)


@functools.lru_cache(maxsize=None)
def transformed_activation(transform: Transform) -> Callable[[Any], Any]:
    """phi_hat as an elementwise JAX function (cached: one function object per transform, so
    `theory`'s jitted quadratures and the models' traces reuse it).

    The constants are Python floats, weakly typed, so phi_hat keeps its input's dtype
    (bfloat16 models stay bfloat16).
    """
    phi = base_activation(transform)
    alpha, beta = transform.input_scale, transform.input_shift
    gamma, delta = transform.output_scale, transform.output_shift

    def phi_hat(x):
        return gamma * (phi(alpha * x + beta) + delta)

    return phi_hat


# ----------------------------------------------------------------------------- local maps


class LocalMaps(NamedTuple):
    """The defining quantities of a transform's local maps at q = 1 (module docstring)."""

    q_value: float  # Q(1)
    q_slope: float  # Q'(1)
    c_slope: float  # C'(1)
    c_zero: float  # C(0)
    c_curvature: float  # C''(1) = E[phi_hat''(z)^2]


def local_maps(transform: Transform, num_points: int = theory.NUM_POINTS) -> LocalMaps:
    """Q(1), Q'(1), C'(1), C(0), C''(1) of phi_hat by `theory`'s quadrature.

    phi_hat's only possible kink is the leaky ReLU's at 0 (TAT: beta = 0; DKS's activations are
    smooth), where `theory`'s rules are graded. C(0) is `theory.c_map` at c = 0 (not
    E[phi_hat]^2), so it checks the 2-D map itself.
    """
    phi_hat = transformed_activation(transform)
    dphi_hat = jax.vmap(jax.grad(phi_hat))
    d2phi_hat = jax.vmap(jax.grad(jax.grad(phi_hat)))
    expect = functools.partial(theory.gaussian_expectation, q=1.0, num_points=num_points)
    return LocalMaps(
        q_value=expect(lambda x: phi_hat(x) ** 2),
        q_slope=expect(lambda x: phi_hat(x) * dphi_hat(x) * x),
        c_slope=expect(lambda x: dphi_hat(x) ** 2),
        c_zero=theory.c_map(phi_hat, 0.0, num_points=num_points),
        c_curvature=expect(lambda x: d2phi_hat(x) ** 2),
    )


def local_c_map(transform: Transform, c: float, num_points: int = theory.NUM_POINTS) -> float:
    """C(c) = E[phi_hat(u) phi_hat(v)] at unit variances (`theory.c_map`)."""
    return theory.c_map(transformed_activation(transform), c, 1.0, num_points)


def compound_c_map(transform: Transform, c: float, depth: int | None = None,
                   num_points: int = theory.NUM_POINTS) -> float:
    """C_f(c) = C(C(...C(c))), `depth` times (default: the transform's L), by quadrature.

    The predicted correlation of two outputs of the L-layer plain net whose inputs have
    correlation c at q = 1.
    """
    for _ in range(transform.depth if depth is None else depth):
        # min: at c = 1, C(1) = Q(1) = 1 up to rounding, which may land a few ulps above 1.
        c = min(local_c_map(transform, c, num_points), 1.0)
    return c


# ----------------------------------------------------------------------------- DKS


class _ShapeStats(NamedTuple):
    mean: float  # E[phi(alpha z + beta)]
    var: float  # Var[phi(alpha z + beta)]
    c_slope: float  # C'(1) of the centred, normalized phi_hat
    q_slope: float  # Q'(1) of it


def _shape_stats(phi: Callable[[Any], Any], alpha: float, beta: float) -> _ShapeStats:
    """The DKS quantities of phi(alpha x + beta) before centring and scaling, by quadrature.

    With phi_hat = gamma (phi(alpha x + beta) - mean), gamma^2 = 1 / var:
    C'(1) = alpha^2 E[phi'^2] / var and Q'(1) = alpha E[(phi - mean) phi' z] / var.
    """
    dphi = jax.vmap(jax.grad(phi))
    expect = functools.partial(theory.gaussian_expectation, q=1.0)  # phi smooth: no kink.
    mean = expect(lambda x: phi(alpha * x + beta))
    var = expect(lambda x: (phi(alpha * x + beta) - mean) ** 2)
    d2 = expect(lambda x: dphi(alpha * x + beta) ** 2)
    pdz = expect(lambda x: (phi(alpha * x + beta) - mean) * dphi(alpha * x + beta) * x)
    return _ShapeStats(mean, var, alpha * alpha * d2 / var, alpha * pdz / var)


def _checked(method: str, activation: str, allowed: tuple[str, ...], depth: int, name: str,
             target: float, low: float) -> tuple[Callable[[Any], Any], int]:
    """(phi, L) after checking a solver's arguments: `activation` in `allowed`, L >= 1, and
    the target a finite number above `low`; ValueError otherwise."""
    if activation not in allowed:
        raise ValueError(f"activation={activation!r} has no {method} transform here; allowed "
                         f"values: {list(allowed)}")
    depth = int(depth)
    if depth < 1 or not (low < target < math.inf):
        raise ValueError(f"depth={depth!r} must be >= 1 and {name}={target!r} a finite number "
                         f"> {low:g}")
    return layers.activation(activation), depth


def _first_root(residuals: Callable[[Any], list], starts, accept: Callable[[Any], Any]):
    """The first `accept(x)` that is truthy over the roots x of `residuals` found from `starts`
    in turn (MINPACK's hybrid Powell method, `scipy.optimize.root`), or None.

    A root counts when its residuals are at most `_SOLVE_TOL`: judged by the residual, not
    `root.success`, which is False when MINPACK stops at rounding level short of xtol.
    """
    for start in starts:
        try:
            with np.errstate(all="ignore"):
                root = optimize.root(residuals, start, method="hybr", options=dict(xtol=1e-14))
        except (ArithmeticError, ValueError):  # A step into a degenerate shape (var = 0).
            continue
        if np.all(np.isfinite(root.x)) and max(abs(r) for r in residuals(root.x)) <= _SOLVE_TOL:
            found = accept(root.x)
            if found:
                return found
    return None


@functools.lru_cache(maxsize=None)
def solve_dks(activation: str, depth: int, xi: float = DEFAULT_TARGETS["xi"]) -> Transform:
    """The DKS transform of `activation` for L = `depth` nonlinear layers and C_f'(1) = xi.

    Solves Q'(1) = 1 and log C'(1) = log(xi) / L for (log alpha, beta) with MINPACK's hybrid
    Powell method (`scipy.optimize.root`), from a few starting points (`_DKS_STARTS`); delta
    and gamma follow in closed form (module docstring). Of the mirror solutions of an odd phi
    (beta and -beta) the first one found is kept.

    Args:
      activation: one of `DKS_ACTIVATIONS`.
      depth: L >= 1.
      xi: the target slope of the compound C-map, > 1.

    Returns:
      A `Transform` whose local maps meet the conditions to ~1e-12.

    Raises:
      ValueError: an argument out of range, or no solution (e.g. xi too large for softplus,
        gelu or swish at small L: their C'(1) stays below ReLU's pi / (pi - 1) ~ 1.467).
    """
    phi, depth = _checked("DKS", activation, DKS_ACTIVATIONS, depth, "xi", xi, 1.0)
    log_zeta = math.log(xi) / depth

    def residuals(p):
        stats = _shape_stats(phi, math.exp(p[0]), p[1])
        return [stats.q_slope - 1.0, math.log(stats.c_slope) - log_zeta]

    def accept(p):
        stats = _shape_stats(phi, math.exp(p[0]), p[1])
        return stats.var > 0 and Transform("dks", activation, depth, float(xi), math.exp(p[0]),
                                           float(p[1]), 1.0 / math.sqrt(stats.var), -stats.mean)

    transform = _first_root(residuals, _DKS_STARTS, accept)
    if transform:
        return transform
    raise ValueError(
        f"shaping_target={xi!r} is not reachable by DKS with activation={activation!r} at "
        f"depth L={depth}: no (alpha, beta) with Q'(1) = 1 and C'(1) = xi^(1/L) = "
        f"{math.exp(log_zeta):.6g} (a smaller xi or a deeper net needs a smaller C'(1))")


# ----------------------------------------------------------------------------- TAT (Leaky ReLU)


def leaky_relu_c_map(c: float, negative_slope: float) -> float:
    """C(c) of sqrt(2 / (1 + a^2)) LReLU_a, closed form (module docstring; Zhang et al. 2022).

    From LReLU_a(x) = (1 + a)/2 x + (1 - a)/2 |x|, E[uv] = c, E[u |v|] = 0 and
    E[|u| |v|] = (2 / pi) (sqrt(1 - c^2) + c arcsin c) (Cho & Saul 2009's arc-cosine kernel).
    """
    c = min(max(c, -1.0), 1.0)
    a = negative_slope
    return c + (1.0 - a) ** 2 / (math.pi * (1.0 + a * a)) * (
        math.sqrt(1.0 - c * c) - c * math.acos(c))


def leaky_relu_compound_c_zero(negative_slope: float, depth: int) -> float:
    """C_f(0) = C^(L)(0) of the TAT leaky ReLU, closed-form local maps."""
    c = 0.0
    for _ in range(depth):
        c = leaky_relu_c_map(c, negative_slope)
    return c


@functools.lru_cache(maxsize=None)
def solve_tat(depth: int, eta: float = DEFAULT_TARGETS["eta"], tol: float = 1e-15) -> Transform:
    """TAT for Leaky ReLU: the slope a in [0, 1] with C_f(0) = eta after L = `depth` layers.

    Bisection on a: C_f(0) decreases strictly from the ReLU value (a = 0) to 0 (a = 1), since
    the local map's kernel term (1 - a)^2 / (1 + a^2) does and C is increasing in c.

    Args:
      depth: L >= 1.
      eta: the target C_f(0), in (0, 1) and at most ReLU's C^(L)(0).
      tol: absolute tolerance on a.

    Returns:
      A `Transform` with alpha = 1, beta = delta = 0, gamma = sqrt(2 / (1 + a^2)).

    Raises:
      ValueError: eta out of range or above what ReLU reaches at this depth.
    """
    depth = int(depth)
    if depth < 1 or not (0.0 < eta < 1.0):
        raise ValueError(f"depth={depth!r} must be >= 1 and eta={eta!r} in (0, 1)")
    reachable = leaky_relu_compound_c_zero(0.0, depth)
    if eta > reachable:
        raise ValueError(
            f"shaping_target={eta!r} is not reachable by Leaky-ReLU TAT at depth L={depth}: "
            f"C_f(0) is at most {reachable:.6g} (ReLU, slope 0); use a smaller eta or a deeper "
            "net")
    lo, hi = 0.0, 1.0  # C_f(0) >= eta at lo, < eta at hi.
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if leaky_relu_compound_c_zero(mid, depth) >= eta else (lo, mid)
    a = 0.5 * (lo + hi)
    return Transform("tat", "leaky_relu", depth, float(eta), 1.0, 0.0,
                     math.sqrt(2.0 / (1.0 + a * a)), 0.0, negative_slope=a)


# ----------------------------------------------------------------------------- TAT (smooth)


class _TailoredStats(NamedTuple):
    output_scale: float  # gamma = E[f^2]^(-1/2), f = phi(alpha z + beta) + delta
    q_slope: float  # Q'(1) of phi_hat = gamma f
    c_slope: float  # C'(1) of it
    c_curvature: float  # C''(1) of it


def _tailored_stats(phi: Callable[[Any], Any], alpha: float, beta: float,
                    delta: float) -> _TailoredStats:
    """Smooth TAT's quantities of phi_hat = gamma (phi(alpha x + beta) + delta), Q(1) = 1.

    With f = phi(alpha x + beta) + delta and gamma^2 = 1 / E[f^2]: Q'(1) = gamma^2 alpha
    E[f phi' z], C'(1) = gamma^2 alpha^2 E[phi'^2], C''(1) = gamma^2 alpha^4 E[phi''^2], phi'
    and phi'' taken at alpha z + beta.
    """
    dphi = jax.vmap(jax.grad(phi))
    d2phi = jax.vmap(jax.grad(jax.grad(phi)))
    expect = functools.partial(theory.gaussian_expectation, q=1.0)  # phi smooth: no kink.
    m2 = expect(lambda x: (phi(alpha * x + beta) + delta) ** 2)
    fdz = expect(lambda x: (phi(alpha * x + beta) + delta) * dphi(alpha * x + beta) * x)
    d1 = expect(lambda x: dphi(alpha * x + beta) ** 2)
    d2 = expect(lambda x: d2phi(alpha * x + beta) ** 2)
    return _TailoredStats(m2 ** -0.5, alpha * fdz / m2, alpha**2 * d1 / m2, alpha**4 * d2 / m2)


@functools.lru_cache(maxsize=None)
def solve_tat_smooth(activation: str, depth: int,
                     tau: float = DEFAULT_TARGETS["tau"]) -> Transform:
    """TAT of a smooth `activation` for L = `depth` nonlinear layers and C_f''(1) = tau.

    Solves Q'(1) = 1, log C'(1) = 0 and log C''(1) = log(tau / L) (logs: at large L the
    curvature is tiny) for (log alpha, beta, delta) with MINPACK's hybrid Powell method, from
    the starting points `_TAT_STARTS`, keeping the first solution with alpha gamma <
    `_TAT_MAX_GAIN` (module docstring); gamma follows from Q(1) = 1.

    Args:
      activation: one of `TAT_SMOOTH_ACTIVATIONS`.
      depth: L >= 1.
      tau: the target curvature of the compound C-map, a finite number > 0.

    Returns:
      A `Transform` (method 'tat', `negative_slope` None) meeting the conditions to ~1e-12.

    Raises:
      ValueError: an argument out of range, or no accepted solution.
    """
    phi, depth = _checked("smooth TAT", activation, TAT_SMOOTH_ACTIVATIONS, depth, "tau", tau,
                          0.0)
    log_curvature = math.log(tau / depth)

    def residuals(p):
        stats = _tailored_stats(phi, math.exp(p[0]), p[1], p[2])
        return [stats.q_slope - 1.0, math.log(stats.c_slope),
                math.log(stats.c_curvature) - log_curvature]

    def accept(p):
        alpha, beta, delta = math.exp(p[0]), float(p[1]), float(p[2])
        gamma = _tailored_stats(phi, alpha, beta, delta).output_scale
        return alpha * gamma < _TAT_MAX_GAIN and Transform("tat", activation, depth, float(tau),
                                                           alpha, beta, gamma, delta)

    transform = _first_root(residuals, _TAT_STARTS, accept)
    if transform:
        return transform
    raise ValueError(
        f"shaping_target={tau!r} is not reachable by smooth TAT with activation={activation!r} "
        f"at depth L={depth}: no (alpha, beta, delta) with Q'(1) = 1, C'(1) = 1 and C''(1) = "
        f"tau / L = {tau / depth:.6g} (and alpha gamma < {_TAT_MAX_GAIN})")


# ----------------------------------------------------------------------------- model configs


def nonlinear_depth(config: ModelConfig) -> int:
    """L: the phi_hat applications on the (one) input-output path of `config`'s plain net.

    The transforms apply to plain nets without norm (`ModelConfig` validates it):
    - MLP: a linear stem, `depth` blocks of `layers_per_block` dense layers each followed by
      phi_hat, a linear head: L = depth * layers_per_block.
    - CIFAR (basic blocks): the stem's conv followed by phi_hat (`stems.ConvStem`), then 3n
      blocks of two convs each followed by phi_hat (`blocks.Block`, kind 'plain'), the global
      average pool and a linear head: L = 1 + 2 * 3n = depth - 1, every weight layer but the
      head (He et al.'s plain-20: 19 convs + 1 fc).
    """
    if config.family == "mlp":
        return config.depth * (config.layers_per_block or 1)
    convs_per_block = 3 if config.bottleneck else 2
    return 1 + convs_per_block * config.num_blocks


def for_config(config: ModelConfig) -> Transform | None:
    """The `Transform` of `config` (cached per activation, L and target), None for 'none'."""
    kind = target_kind(config.activation_transform, config.activation)
    if kind is None:
        return None
    depth = nonlinear_depth(config)
    if kind == "xi":
        return solve_dks(config.activation, depth, config.shaping_target)
    if kind == "eta":
        return solve_tat(depth, config.shaping_target)
    return solve_tat_smooth(config.activation, depth, config.shaping_target)


def activation_for(config: ModelConfig) -> Callable[[Any], Any]:
    """The activation every layer of `config`'s net applies: phi_hat, or the registry's phi."""
    transform = for_config(config)
    if transform is None:
        return layers.activation(config.activation)
    return transformed_activation(transform)
