"""Mean-field predictions for signal and gradient propagation at initialization.

Infinite-width theory for the MLPs of `resflax.models` (docs/design.md, Theory): the forward second
moments `fwd_sq[l]`, the backward second moments `act_grad_sq[l]` and the per-layer Jacobian
factors `jac_fro_sq[l]` that `resflax.diagnostics` measures (docs/design.md, Diagnostics).

References:
- Poole, Lahiri, Raghu, Sohl-Dickstein, Ganguli 2016, "Exponential expressivity in deep neural
  networks through transient chaos": the length map q^l = V(q^{l-1}) and chi_1.
- Schoenholz, Gilmer, Ganguli, Sohl-Dickstein 2017, "Deep information propagation": depth scale
  xi_c = -1/log chi_1 (at c* = 1) and the backward recursion ~q^l = ~q^{l+1} chi_1.
- Pennington, Schoenholz, Ganguli 2017, "Resurrecting the sigmoid in deep learning through
  dynamical isometry": mean squared singular value of the input-output Jacobian = prod chi_l.
- Yang & Schoenholz 2017, "Mean field residual networks: on the edge of chaos": residual
  forward/backward recursions.
- De & Smith 2020, "Batch normalization biases residual blocks towards the identity function in
  deep networks": with batch norm on the branch the variance grows linearly in depth.

Notation. `z ~ N(0, 1)`, `E[.]` the Gaussian expectation over z, `phi` an activation, `sigma_w2`
the weight variance gain (`W ~ N(0, sigma_w2 / fan_in)`; `effective_sigma_w2` maps the `init`
names of `resflax.layers` to it), `sigma_b2` the bias variance, `L` the number of blocks.

Mean-field assumptions, stated once: width -> infinity with weights and biases drawn
independently per layer; pre-activations are Gaussian across features; backward weights are
independent of forward ones (the "gradient independence" assumption of Schoenholz et al. 2017,
exact in expectation for the cross terms below); the per-example second moments of a batch are
replaced by their batch mean (exact for positively homogeneous activations - identity, relu,
leaky_relu - where E[phi(sqrt(q) z)^2] is linear in q; first order otherwise).

Quadrature. E[f(sqrt(q) z)] is a Gauss quadrature of the standard normal density *split at
z = 0*, in float64: on each half-line, `num_points` Gauss-Legendre nodes on each of 32
geometrically graded panels [0, 12 * 2^-31], ..., [3, 6], [6, 12] (the mass beyond |z| = 12 is
~4e-33). Every registry activation is smooth on each half-line, so this converges exponentially
despite kinks at 0 (relu, leaky_relu, elu, selu: piecewise polynomials are integrated exactly),
and the graded panels resolve the width-1/sqrt(q) transition of saturating activations at any
q up to ~1e16. Measured against an independent integrator: < 1e-13 relative error at
num_points = 16 for q in [1e-4, 1e6]. Plain Gauss-Hermite (`numpy.polynomial.hermite.hermgauss`)
is not used: with 100-101 points it is off by 6% for E[relu'^2] when a node sits on the kink,
by 1e-3..1e-1 for elu/selu, and by ~5e-2 for tanh/erf at q = 100. `gaussian_expectation`
can grade the rule at another kink (`kink`, e.g. relu(x - k)). The kernel map `c_map`,
E[phi(u) phi(v)] at correlation c, is Gauss-Legendre in polar coordinates about the crossing of
the two kink lines (Deep Kernel Shaping's C-map; `resflax.kernel_shaping`).
"""

from __future__ import annotations

import functools
import math
from numbers import Real
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial.legendre import leggauss

from resflax import layers
from resflax.config import ModelConfig

Activation = str | Callable[[Any], Any]

NUM_POINTS = 16  # Gauss-Legendre nodes per quadrature panel (module docstring).
_Z_MAX = 12.0  # Quadrature cut-off in units of the standard deviation.
_NUM_PANELS = 32  # Panels per half-line, graded down to _Z_MAX 2^-31 ~ 6e-9.
_Q_DIVERGED = 1e150  # q above this counts as divergence in `q_fixed_point`.
_CHI_ONE_ATOL = 1e-12  # |chi - 1| below this is chi = 1 up to quadrature rounding.

# sigma_w2 / weight_scale^2 for a dense [fan_in, fan_out] kernel, per `layers.INITIALIZERS` name.
_SIGMA_W2_FACTOR: dict[str, Callable[[int, int], float]] = {
    "normal": lambda fan_in, fan_out: 1.0,
    "he_normal": lambda fan_in, fan_out: 2.0,
    "he_uniform": lambda fan_in, fan_out: 2.0,
    "lecun_normal": lambda fan_in, fan_out: 1.0,
    "glorot_normal": lambda fan_in, fan_out: 2.0 * fan_in / (fan_in + fan_out),
    "glorot_uniform": lambda fan_in, fan_out: 2.0 * fan_in / (fan_in + fan_out),
    "orthogonal": lambda fan_in, fan_out: 1.0,
    "delta_orthogonal": lambda fan_in, fan_out: 1.0,  # A dense kernel is plain orthogonal.
    # max(1, out / in) times orthogonal's per-entry variance: exactly 1 for every shape.
    "scaled_delta_orthogonal": lambda fan_in, fan_out: 1.0,
    "zeros": lambda fan_in, fan_out: 0.0,
}


# --------------------------------------------------------------------------------------------
# Argument checks.


def _number(value: Any, name: str, *, low: float = 0.0) -> float:
    """`float(value)`, or ValueError naming `name` unless it is a finite real >= `low`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite real number")
    if value < low:
        raise ValueError(f"{name}={value!r} must be >= {low}")
    return float(value)


def _count(value: Any, name: str, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    return int(value)


def _activation(activation: Activation) -> Callable[[Any], Any]:
    if isinstance(activation, str):
        return layers.activation(activation)  # ValueError naming `activation` and the options.
    if callable(activation):
        return activation
    raise ValueError(f"activation={activation!r} must be a registry name or a callable")


def _x64():
    """Context manager: jax computes in float64 inside it (scoped, not global)."""
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # jax < 0.8.
        from jax.experimental import enable_x64 as enable
    return enable(True)


# --------------------------------------------------------------------------------------------
# Gaussian expectations.


@functools.lru_cache(maxsize=None)
def _rule(num_points: int, split: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Nodes z and weights w with sum_i w_i f(z_i) ~= E[f(z)], z ~ N(0, 1).

    Composite Gauss-Legendre, `num_points` nodes per panel, on the geometrically graded panels
    `split + R [2^-(k+1), 2^-k]` (k = 0 .. _NUM_PANELS - 1) and the innermost `[0, R 2^-K]` of
    each side of `split`, R = _Z_MAX + |split| (so the rule reaches |z| = _Z_MAX on both
    sides), weights times the normal density. split = 0 is the rule of the module docstring;
    another split puts the grading, and so the exponential convergence for a function smooth on
    each side, at a kink there. Shape [2 * _NUM_PANELS * num_points].
    """
    x, w = leggauss(num_points)
    offsets = (_Z_MAX + abs(split)) * 2.0 ** -np.arange(_NUM_PANELS - 1, -1, -1.0)
    sides = []
    for sign in (-1.0, 1.0):
        edges = np.concatenate([[0.0], offsets])
        lo, hi = edges[:-1, None], edges[1:, None]
        t = split + sign * (lo + 0.5 * (hi - lo) * (x + 1.0)).ravel()
        sides.append((t, (0.5 * (hi - lo) * w).ravel() * np.exp(-0.5 * t * t)))
    (z_left, w_left), (z_right, w_right) = sides
    z = np.concatenate([z_left[::-1], z_right])
    return z, np.concatenate([w_left[::-1], w_right]) / math.sqrt(2.0 * math.pi)


def gaussian_expectation(
    f: Callable[[Any], Any], q: float = 1.0, num_points: int = NUM_POINTS, *, kink: float = 0.0
) -> float:
    """E_z[f(sqrt(q) z)], z ~ N(0, 1), by Gauss quadrature split at `kink` (module docstring).

    `f` is elementwise and vectorised: it is called once on a float64 array of all nodes (jax
    callables run in float64 here) and must return an array of the same shape. Exact for
    polynomials and for piecewise polynomials whose only kink is at x = `kink` (e.g. |x|).

    Args:
      f: elementwise function, float64 array [n] -> array [n] (numpy or jax).
      q: the variance of the Gaussian argument, a finite real >= 0 (> 0 if `kink` != 0).
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.
      kink: the argument x = sqrt(q) z at which `f` may be non-smooth (the one point the rule
        is graded towards); 0 for every registry activation, -beta/alpha for phi(alpha x + beta).

    Returns:
      `sum_i w_i f(sqrt(q) z_i) ~= E_z[f(sqrt(q) z)]`, a Python float.

    Raises:
      ValueError: `q`, `num_points` or `kink` out of range, or `f` not elementwise (wrong shape).
    """
    q = _number(q, "q")
    num_points = _count(num_points, "num_points", low=1)
    kink = _number(kink, "kink", low=-math.inf)
    if kink != 0.0 and q == 0.0:
        raise ValueError(f"q=0.0 must be > 0 with kink={kink!r}")
    z, w = _rule(num_points, kink / math.sqrt(q) if kink else 0.0)
    with _x64():
        values = np.asarray(f(math.sqrt(q) * z), dtype=np.float64)
    if values.shape != z.shape:
        raise ValueError(f"f must be elementwise: got shape {values.shape} for {z.shape}")
    return float(w @ values)


def _sqrt(q: float) -> float:
    """sqrt(q), floored so that q = 0 means the limit q -> 0+ (relu'(0+) = 1, not relu'(0))."""
    return max(math.sqrt(q), 1e-250)


class Moments(NamedTuple):
    """Gaussian moments of an activation at pre-activation variance q, u = sqrt(q) z."""

    phi: float  # E[phi(u)]
    phi_sq: float  # E[phi(u)^2]
    dphi_sq: float  # E[phi'(u)^2]


@functools.lru_cache(maxsize=None)
def _moments_fn(phi: Callable[[Any], Any], num_points: int) -> Callable[[Any], Any]:
    """Jitted sqrt(q) -> (E[phi], E[phi^2], E[phi'^2]); call inside `_x64()` only."""
    z, w = _rule(num_points)
    dphi = jax.vmap(jax.grad(phi))  # phi'(0) is never evaluated: 0 is not a node.

    @jax.jit
    def moments(sqrt_q):
        u = sqrt_q * z
        values = phi(u)
        return w @ values, w @ (values * values), w @ (dphi(u) ** 2)

    return moments


def moments(activation: Activation, q: float, num_points: int = NUM_POINTS) -> Moments:
    """(E[phi(sqrt(q) z)], E[phi(sqrt(q) z)^2], E[phi'(sqrt(q) z)^2]) for z ~ N(0, 1).

    q = 0 is the limit q -> 0+, e.g. E[relu'^2] = 1/2 for every q >= 0.

    `activation` is a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable;
    phi' is `jax.grad` of it.

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      q: the pre-activation variance, a finite real >= 0.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      `Moments(phi, phi_sq, dphi_sq)` of Python floats, computed in float64.

    Raises:
      ValueError: an unknown activation name, or `q` / `num_points` out of range.
    """
    phi = _activation(activation)
    q = _number(q, "q")
    num_points = _count(num_points, "num_points", low=1)
    with _x64():
        return Moments(*(float(v) for v in _moments_fn(phi, num_points)(_sqrt(q))))


@functools.lru_cache(maxsize=None)
def nf_gamma(activation: str) -> float:
    """NF-ResNets' activation gain `gamma = 1 / sqrt(Var(phi(z)))`, z ~ N(0, 1) (Brock, De &
    Smith 2021, section 4.1): `gamma * phi` of a unit Gaussian has unit variance, which a
    weight-standardized (zero-mean) layer passes on whatever its mean.

    ReLU in closed form, `sqrt(2 / (1 - 1/pi))` (Var(relu(z)) = (1 - 1/pi) / 2), the others by
    quadrature (`moments`). Raises ValueError for an unknown name or a constant activation.
    """
    if activation == "relu":
        return math.sqrt(2.0 / (1.0 - 1.0 / math.pi))
    # Models ask for it while they are traced (init under jit): evaluate here and now, so the
    # result is a Python float, not a tracer of the caller's program.
    with jax.ensure_compile_time_eval():
        m = moments(activation, 1.0)
    var = m.phi_sq - m.phi**2
    if not var > 0:
        raise ValueError(f"activation={activation!r} has zero variance on N(0, 1); no NF gain")
    return 1.0 / math.sqrt(var)


# --------------------------------------------------------------------------------------------
# Kernel (C-) map: the covariance of phi at two correlated Gaussian inputs.


def c_map(
    activation: Activation,
    c: float,
    q: float = 1.0,
    num_points: int = NUM_POINTS,
    *,
    kink: float = 0.0,
) -> float:
    """E[phi(u) phi(v)] for (u, v) centred Gaussian, Var u = Var v = q, correlation c.

    With q = 1 and Q(1) = E[phi(z)^2] = 1 this is the local C-map of Martens et al. 2021 (Deep
    Kernel Shaping), the correlation of two outputs of a layer whose inputs have correlation c;
    in general it is q-weighted kernel of Poole et al. 2016 (divide by E[phi(sqrt(q) z)^2] for a
    correlation). c = 1 is E[phi(sqrt(q) z)^2].

    Quadrature: write u = sqrt(q) z1, v = sqrt(q) (c z1 + s z2), s = sqrt(1 - c^2), (z1, z2)
    standard normal. The kinks u = kink and v = kink are two lines of the z-plane that cross at
    p = (kink / sqrt(q)) (1, (1 - c) / s); in polar coordinates about p, z = p + r (cos t, sin t),
    the integrand is smooth on each of the four angular sectors between the lines (t = +-pi/2
    and t = arccos(c) +- pi/2) and, along each ray, in r. So: 4 num_points Gauss-Legendre nodes
    per sector times num_points nodes on each of the graded radial panels of the 1-D rule (up
    to r = _Z_MAX + |p|), with the density exp(-|z|^2 / 2) / (2 pi) and the Jacobian r. Exact
    for piecewise polynomials with their kink at `kink` up to the radial cut-off; against
    closed forms (relu, leaky relu, erf) and Gauss-Hermite (smooth activations) < 1e-12 at
    q = 1 (tests/test_kernel_shaping.py). Saturating activations at very large q need more
    angular nodes (a transition of width 1/sqrt(q) about each kink line).

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi.
      c: the input correlation, in [-1, 1] ((-1, 1] if `kink` != 0).
      q: the input variance, a finite real > 0.
      num_points: Gauss-Legendre nodes per panel, >= 1.
      kink: the one argument at which phi may be non-smooth (0 for registry activations).

    Returns:
      E[phi(u) phi(v)], a Python float.

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    phi = _activation(activation)
    c = _number(c, "c", low=-1.0)
    q = _number(q, "q")
    kink = _number(kink, "kink", low=-math.inf)
    num_points = _count(num_points, "num_points", low=1)
    if c > 1.0 or q == 0.0:
        raise ValueError(f"c={c!r} must be in [-1, 1] and q={q!r} > 0")
    if c == 1.0:
        return gaussian_expectation(lambda x: phi(x) ** 2, q, num_points, kink=kink)
    if c == -1.0:
        if kink != 0.0:
            raise ValueError(f"c=-1.0 needs kink=0.0 (got kink={kink!r})")
        return gaussian_expectation(lambda x: phi(x) * phi(-x), q, num_points)
    z1, z2, w = _polar_rule(num_points, c, kink / math.sqrt(q))
    root_q, s = math.sqrt(q), math.sqrt(1.0 - c * c)
    with _x64():
        values = np.asarray(phi(root_q * z1) * phi(root_q * (c * z1 + s * z2)), np.float64)
    return float(w @ values)


def _polar_rule(num_points: int, c: float, kink: float) -> tuple[np.ndarray, ...]:
    """Nodes (z1, z2) and weights of `c_map`'s rule for E[f(z1, z2)], (z1, z2) ~ N(0, I)."""
    s = math.sqrt(1.0 - c * c)
    centre = np.array([kink, kink * (1.0 - c) / s])
    theta0 = math.acos(c)
    cuts = np.sort(np.mod([0.5 * math.pi, 1.5 * math.pi, theta0 + 0.5 * math.pi,
                           theta0 + 1.5 * math.pi], 2.0 * math.pi))
    cuts = np.append(cuts, cuts[0] + 2.0 * math.pi)
    x, wx = leggauss(4 * num_points)
    lo, hi = cuts[:-1, None], cuts[1:, None]
    angle = (lo + 0.5 * (hi - lo) * (x + 1.0)).ravel()
    angle_w = (0.5 * (hi - lo) * wx).ravel()
    x, wx = leggauss(num_points)
    edges = np.concatenate(
        [[0.0], (_Z_MAX + np.linalg.norm(centre)) * 2.0 ** -np.arange(_NUM_PANELS - 1, -1, -1.0)])
    lo, hi = edges[:-1, None], edges[1:, None]
    r = (lo + 0.5 * (hi - lo) * (x + 1.0)).ravel()
    r_w = (0.5 * (hi - lo) * wx).ravel()
    z1 = centre[0] + r[:, None] * np.cos(angle)[None, :]
    z2 = centre[1] + r[:, None] * np.sin(angle)[None, :]
    density = np.exp(-0.5 * (z1 * z1 + z2 * z2)) / (2.0 * math.pi)
    w = (r_w * r)[:, None] * angle_w[None, :] * density
    return z1.ravel(), z2.ravel(), w.ravel()


# --------------------------------------------------------------------------------------------
# Plain networks: length map, fixed point, chi_1, depth scale.


def q_map(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float,
    q: float,
    num_points: int = NUM_POINTS,
) -> float:
    """Length map V(q) = sigma_w2 E[phi(sqrt(q) z)^2] + sigma_b2 (Poole et al. 2016).

    The variance of the next pre-activation h^{l+1} = W phi(h^l) + b given Var(h^l) = q.

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain, `W ~ N(0, sigma_w2 / n)`, >= 0.
      sigma_b2: bias variance, `b ~ N(0, sigma_b2)`, >= 0.
      q: the current pre-activation variance, >= 0.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      V(q), a Python float.

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    sigma_w2 = _number(sigma_w2, "sigma_w2")
    sigma_b2 = _number(sigma_b2, "sigma_b2")
    return sigma_w2 * moments(activation, q, num_points).phi_sq + sigma_b2


def layer_chi(
    activation: Activation, sigma_w2: float, q: float, num_points: int = NUM_POINTS
) -> float:
    """chi(q) = sigma_w2 E[phi'(sqrt(q) z)^2]: one plain layer's gradient factor at variance q.

    Squared backward norms scale by chi(q_l) through layer l (Schoenholz et al. 2017, backward
    mean field, equal widths), and chi(q_l) = E ||J_l||_F^2 / n for J_l = diag(phi'(h_l)) W_l.
    At the fixed point q* it is chi_1 (Poole et al. 2016).

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain, >= 0.
      q: the layer's pre-activation variance, >= 0 (0: the limit q -> 0+).
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      chi(q), a Python float.

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    sigma_w2 = _number(sigma_w2, "sigma_w2")
    return sigma_w2 * moments(activation, q, num_points).dphi_sq


class FixedPoint(NamedTuple):
    """Result of `q_fixed_point`."""

    q: float  # q* (math.inf if the iteration diverged; the last iterate if not converged).
    converged: bool
    iterations: int


def q_fixed_point(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float,
    q0: float = 1.0,
    *,
    tol: float = 1e-12,
    max_iter: int = 10_000,
    num_points: int = NUM_POINTS,
) -> FixedPoint:
    """Fixed point q* = V(q*) of the length map, by iterating q <- V(q) from q0.

    Converged when |V(q) - q| <= tol * max(1, q). The iteration finds the stable fixed point
    whose basin holds q0 (e.g. q* = 0 for tanh with sigma_b2 = 0 and sigma_w2 < 1). Near
    criticality the approach is algebraic (q ~ 1/l for tanh at sigma_w2 = 1, sigma_b2 = 0), so
    `converged` may be False after `max_iter`: check it. Divergence (q > 1e150, e.g. relu with
    sigma_w2 > 2) returns q = inf, converged = False.

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain, >= 0.
      sigma_b2: bias variance, >= 0.
      q0: the starting variance, >= 0.
      tol: relative tolerance on |V(q) - q| (absolute below q = 1), >= 0.
      max_iter: the most iterations, >= 1.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      `FixedPoint(q, converged, iterations)`: q* (inf when diverged; the last iterate when not
      converged), whether the tolerance was met, and the number of iterations taken.

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    sigma_w2 = _number(sigma_w2, "sigma_w2")
    sigma_b2 = _number(sigma_b2, "sigma_b2")
    q0 = _number(q0, "q0")
    tol = _number(tol, "tol")
    max_iter = _count(max_iter, "max_iter", low=1)
    phi = _activation(activation)
    num_points = _count(num_points, "num_points", low=1)
    with _x64():
        q, converged, iterations = _fixed_point_fn(phi, num_points)(
            sigma_w2, sigma_b2, q0, tol, max_iter
        )
    q, converged, iterations = float(q), bool(converged), int(iterations)
    if not q <= _Q_DIVERGED:  # Also catches nan.
        return FixedPoint(math.inf, False, iterations)
    return FixedPoint(q, converged, iterations)


@functools.lru_cache(maxsize=None)
def _fixed_point_fn(phi: Callable[[Any], Any], num_points: int) -> Callable[..., Any]:
    """Jitted q <- V(q) loop (`q_fixed_point`); call inside `_x64()` only."""
    moments = _moments_fn(phi, num_points)

    @jax.jit
    def run(sigma_w2, sigma_b2, q0, tol, max_iter):
        def step(state):
            q, _, i = state
            q_next = sigma_w2 * moments(jnp.maximum(jnp.sqrt(q), 1e-250))[1] + sigma_b2
            done = jnp.abs(q_next - q) <= tol * jnp.maximum(1.0, q)
            return q_next, done, i + 1

        def keep_going(state):
            q, done, i = state
            return ~done & (i < max_iter) & (q <= _Q_DIVERGED)

        return jax.lax.while_loop(keep_going, step, (q0, False, 0))

    return run


def chi_1(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float,
    q0: float = 1.0,
    num_points: int = NUM_POINTS,
) -> float:
    """chi_1 = sigma_w2 E[phi'(sqrt(q*) z)^2] at the fixed point q* (Poole et al. 2016).

    chi_1 < 1: ordered phase, gradients vanish; > 1: chaotic, they explode (Schoenholz et al.
    2017). Equal to chi_c = sigma_w2 E[phi'(u1) phi'(u2)] at the fixed point c* = 1. Uses
    `q_fixed_point(..., q0)`; if it diverged, chi is taken at q = 1e150 (its limit for
    positively homogeneous activations, e.g. sigma_w2 / 2 for relu).

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain, >= 0.
      sigma_b2: bias variance, >= 0.
      q0: the starting variance of the fixed-point iteration, >= 0.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      chi_1, a Python float (taken at the last iterate if the iteration did not converge).

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    fixed = q_fixed_point(activation, sigma_w2, sigma_b2, q0, num_points=num_points)
    return layer_chi(activation, sigma_w2, min(fixed.q, _Q_DIVERGED), num_points)


def critical_sigma_w2(
    activation: Activation,
    sigma_b2: float,
    *,
    tol: float = 1e-10,
    max_sigma_w2: float = 1e3,
    num_points: int = NUM_POINTS,
) -> float:
    """The sigma_w2 at which chi_1(activation, sigma_w2, sigma_b2) = 1: the edge of chaos.

    On that critical line gradients neither vanish nor explode through a plain net in mean
    field (Poole et al. 2016; Schoenholz et al. 2017), and orthogonal weights can add dynamical
    isometry, every end-to-end singular value near 1 (Pennington et al. 2017; Xiao et al. 2018
    for delta-orthogonal convolutions). Found by bisection; chi_1 must increase with sigma_w2
    from below 1 to above 1 on `(0, max_sigma_w2]` (true for tanh, erf and other odd
    sigmoid-like activations; relu's critical point is sigma_w2 = 2 at every sigma_b2 = 0).

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi.
      sigma_b2: bias variance, >= 0.
      tol: absolute tolerance on sigma_w2, > 0.
      max_sigma_w2: the bracket's upper end, > 0.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      sigma_w2 on the critical line, a Python float.

    Raises:
      ValueError: an argument out of range, or chi_1 does not cross 1 on the bracket.
    """
    sigma_b2 = _number(sigma_b2, "sigma_b2")
    tol = _number(tol, "tol")
    max_sigma_w2 = _number(max_sigma_w2, "max_sigma_w2")
    if tol <= 0 or max_sigma_w2 <= 0:
        raise ValueError(f"tol={tol!r} and max_sigma_w2={max_sigma_w2!r} must be > 0")
    chi = lambda w2: chi_1(activation, w2, sigma_b2, num_points=num_points)
    lo, hi = 0.0, max_sigma_w2
    if not chi(hi) >= 1.0:
        raise ValueError(f"chi_1 stays below 1 up to sigma_w2={max_sigma_w2!r} for "
                         f"sigma_b2={sigma_b2!r}: no critical point in the bracket")
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chi(mid) < 1.0 else (lo, mid)
    return 0.5 * (lo + hi)


def depth_scale(chi: float) -> float:
    """xi = -1 / log(chi) (Schoenholz et al. 2017: xi_c at c* = 1, and the gradient scale).

    Squared gradients scale like exp(-l / xi) over l layers: xi > 0 vanishing, xi < 0 exploding
    with depth scale |xi|, xi = inf at criticality (|chi - 1| <= 1e-12, quadrature rounding),
    xi = 0 for chi = 0.

    Args:
      chi: the per-layer factor of squared gradients (e.g. `chi_1`), a finite real >= 0.

    Returns:
      xi, a Python float (inf or 0 in the cases above).

    Raises:
      ValueError: `chi` negative or not finite.
    """
    chi = _number(chi, "chi")
    if abs(chi - 1.0) <= _CHI_ONE_ATOL:
        return math.inf
    if chi == 0.0:
        return 0.0
    return -1.0 / math.log(chi)


# --------------------------------------------------------------------------------------------
# Layer-wise curves.


def plain_mlp_curves(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    fwd_sq0: float,
    act_grad_sq_last: float,
    num_points: int = NUM_POINTS,
) -> dict[str, np.ndarray]:
    """Layer-wise mean-field curves of a plain MLP, from the measured stem output.

    Network: x_0 = stem(u), h_l = W_l x_{l-1} + b_l, x_l = phi(h_l) for l = 1..L, equal widths,
    W_l ~ N(0, sigma_w2 / n), b_l ~ N(0, sigma_b2). The map starts from fwd_sq0 = mean x_0^2,
    which is in general not q*, so the curves are the transient, not the fixed point:

        q_l = sigma_w2 fwd_sq[l-1] + sigma_b2                 (Poole et al. 2016 length map)
        fwd_sq[l] = E[phi(sqrt(q_l) z)^2]
        chi_l = sigma_w2 E[phi'(sqrt(q_l) z)^2]               (= E ||dx_l/dx_{l-1}||_F^2 / n)
        act_grad_sq[l-1] = chi_l act_grad_sq[l],  act_grad_sq[L] = act_grad_sq_last

    (backward: dS/dx_{l-1} = W_l^T (phi'(h_l) * dS/dx_l), E_W ||W^T v||^2 = sigma_w2 ||v||^2;
    Schoenholz et al. 2017). act_grad_sq_last, the head's gradient, is an input: the theory
    does not predict it.

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain, >= 0.
      sigma_b2: bias variance, >= 0.
      depth: the number of layers L, >= 0.
      fwd_sq0: measured `fwd_sq[0] = mean x_0^2` (stem output), >= 0.
      act_grad_sq_last: measured `act_grad_sq[L]` (the head's gradient), >= 0.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      A dict of float64 numpy arrays: 'fwd_sq' [L+1], 'act_grad_sq' [L+1] (index l = x_l),
      'q' [L] and 'chi' [L] (index l - 1 = layer l).

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    sigma_w2 = _number(sigma_w2, "sigma_w2")
    sigma_b2 = _number(sigma_b2, "sigma_b2")
    depth = _count(depth, "depth")
    fwd_sq = [_number(fwd_sq0, "fwd_sq0")]
    act_grad_sq_last = _number(act_grad_sq_last, "act_grad_sq_last")
    qs, chis = [], []
    for _ in range(depth):
        q = sigma_w2 * fwd_sq[-1] + sigma_b2
        m = moments(activation, q, num_points)
        qs.append(q)
        fwd_sq.append(m.phi_sq)
        chis.append(sigma_w2 * m.dphi_sq)
    return {
        "fwd_sq": np.asarray(fwd_sq),
        "act_grad_sq": _backward(chis, act_grad_sq_last),
        "q": np.asarray(qs),
        "chi": np.asarray(chis),
    }


def residual_mlp_curves(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    fwd_sq0: float,
    act_grad_sq_last: float,
    norm: str = "none",
    alpha: float = 1.0,
    fwd_chan_var0: float | None = None,
    num_points: int = NUM_POINTS,
) -> dict[str, np.ndarray]:
    """Layer-wise curves of a pre-activation (v2) residual MLP, one dense layer per block.

    Block l: x_l = x_{l-1} + alpha (W_l phi(N(x_{l-1})) + b_l), identity skip, equal widths,
    W_l ~ N(0, sigma_w2 / n). Cross terms between skip and branch vanish in expectation over
    W_l, which is independent of x_{l-1} (forward) and, by the gradient-independence
    assumption, of dS/dx_l (backward) (Yang & Schoenholz 2017).

    norm='none' (N = identity, b_l ~ N(0, sigma_b2)):
        fwd_sq[l] = fwd_sq[l-1] + alpha^2 (sigma_w2 E[phi(sqrt(fwd_sq[l-1]) z)^2] + sigma_b2)
        chi_l = 1 + alpha^2 sigma_w2 E[phi'(sqrt(fwd_sq[l-1]) z)^2]
      identity activation: x (1 + alpha^2 sigma_w2) per block; He relu (sigma_w2 = 2): x2.

    norm='batch' (training-mode batch norm, scale 1 and offset 0 at init, no branch bias, so
    sigma_b2 must be 0). N(x) is N(0, 1) per feature over the batch, so (De & Smith 2020)
        fwd_sq[l] = fwd_sq[l-1] + alpha^2 sigma_w2 E[phi(z)^2]       (linear in depth)
        chan_var[l] = chan_var[l-1] + alpha^2 sigma_w2 Var[phi(z)]
        chi_l = 1 + alpha^2 sigma_w2 E[phi'(z)^2] / chan_var[l-1]
      where chan_var is the per-feature variance over the batch (`fwd_chan_var` of the diagnostics),
      starting at fwd_chan_var0 (default fwd_sq0: features of x_0 with zero batch mean). The
      backward law divides by sqrt(chan_var) through batch norm (per-feature variances replaced
      by their mean, epsilon neglected) and ignores batch norm's projection of the batch mean
      and the normalized direction out of the gradient (O(1/batch) per block); chi_l is also
      E ||dx_l/dx_{l-1}||_F^2 / n of the per-example Jacobian with frozen batch statistics.

    act_grad_sq[l-1] = chi_l act_grad_sq[l], anchored at act_grad_sq[L] = act_grad_sq_last.

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain of the branch, >= 0.
      sigma_b2: branch bias variance, >= 0; must be 0 with norm='batch'.
      depth: the number of blocks L, >= 0.
      fwd_sq0: measured `fwd_sq[0] = mean x_0^2` (stem output), >= 0.
      act_grad_sq_last: measured `act_grad_sq[L]` (the head's gradient), >= 0.
      norm: 'none' or 'batch' (above).
      alpha: the residual-branch scale (any finite real; only alpha^2 enters).
      fwd_chan_var0: norm='batch' only: measured `fwd_chan_var[0]`, > 0 when depth > 0;
        None: `fwd_sq0`.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      A dict of float64 numpy arrays: 'fwd_sq' [L+1], 'act_grad_sq' [L+1] (index l = x_l),
      'q' [L] (variance of the branch pre-activation N(x_{l-1})) and 'chi' [L] (index l - 1 =
      block l); with norm='batch' also 'chan_var' [L+1].

    Raises:
      ValueError: an argument out of range, an unknown activation or norm, sigma_b2 != 0 or
        fwd_chan_var0 = 0 with norm='batch'.
    """
    sigma_w2 = _number(sigma_w2, "sigma_w2")
    sigma_b2 = _number(sigma_b2, "sigma_b2")
    depth = _count(depth, "depth")
    fwd_sq = [_number(fwd_sq0, "fwd_sq0")]
    act_grad_sq_last = _number(act_grad_sq_last, "act_grad_sq_last")
    alpha2 = _number(alpha, "alpha", low=-math.inf) ** 2
    qs, chis = [], []
    if norm == "none":
        for _ in range(depth):
            m = moments(activation, fwd_sq[-1], num_points)
            qs.append(fwd_sq[-1])
            chis.append(1.0 + alpha2 * sigma_w2 * m.dphi_sq)
            fwd_sq.append(fwd_sq[-1] + alpha2 * (sigma_w2 * m.phi_sq + sigma_b2))
        extra = {}
    elif norm == "batch":
        if sigma_b2 != 0.0:
            raise ValueError(f"sigma_b2={sigma_b2!r} must be 0 with norm='batch' (no bias)")
        if fwd_chan_var0 is None:
            fwd_chan_var0 = fwd_sq[0]
        chan_var = [_number(fwd_chan_var0, "fwd_chan_var0")]
        if chan_var[0] == 0.0 and depth > 0:
            raise ValueError("fwd_chan_var0=0.0 must be > 0 with norm='batch'")
        m = moments(activation, 1.0, num_points)
        for _ in range(depth):
            qs.append(1.0)
            chis.append(1.0 + alpha2 * sigma_w2 * m.dphi_sq / chan_var[-1])
            fwd_sq.append(fwd_sq[-1] + alpha2 * sigma_w2 * m.phi_sq)
            chan_var.append(chan_var[-1] + alpha2 * sigma_w2 * (m.phi_sq - m.phi**2))
        extra = {"chan_var": np.asarray(chan_var)}
    else:
        raise ValueError(f"norm={norm!r} is not supported; allowed values: ['batch', 'none']")
    return {
        "fwd_sq": np.asarray(fwd_sq),
        "act_grad_sq": _backward(chis, act_grad_sq_last),
        "q": np.asarray(qs),
        "chi": np.asarray(chis),
        **extra,
    }


def _backward(chis: list[float], act_grad_sq_last: float) -> np.ndarray:
    """act_grad_sq[l-1] = chis[l-1] * act_grad_sq[l], from act_grad_sq[L] = act_grad_sq_last."""
    out = [act_grad_sq_last]
    for chi in reversed(chis):
        out.append(chi * out[-1])
    return np.asarray(out[::-1])


def e2e_jacobian_mean_sq_singular_value(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float,
    depth: int,
    fwd_sq0: float,
    num_points: int = NUM_POINTS,
) -> float:
    """Mean squared singular value of J = dx_L / dx_0 of the plain MLP: prod_l chi_l.

    (1/n) E tr(J^T J) = prod_{l=1..L} sigma_w2 E[phi'(sqrt(q_l) z)^2] with the layer-wise q_l of
    `plain_mlp_curves` (Pennington et al. 2017: the first moment of the spectrum of J J^T is
    chi^L at the fixed point). It depends on sigma_w2 only, not on Gaussian versus orthogonal
    weights; the *spread* of the spectrum does (dynamical isometry needs orthogonal weights and
    chi = 1 near q* = 0). Diagnostics name: `e2e` Frobenius norm squared / dim(x_0).

    Args:
      activation: a name in `resflax.layers.ACTIVATIONS` or an elementwise jax callable phi
        (phi' is `jax.grad` of it).
      sigma_w2: weight variance gain, >= 0.
      sigma_b2: bias variance, >= 0.
      depth: the number of layers L, >= 0 (L = 0: 1.0).
      fwd_sq0: measured `fwd_sq[0] = mean x_0^2`, the start of the layer-wise q_l, >= 0.
      num_points: Gauss-Legendre nodes per quadrature panel (module docstring), >= 1.

    Returns:
      prod_l chi_l, a Python float (the prediction of `e2e_jac_fro_sq`).

    Raises:
      ValueError: an argument out of range or an unknown activation.
    """
    curves = plain_mlp_curves(activation, sigma_w2, sigma_b2, depth, fwd_sq0, 1.0, num_points)
    return float(np.prod(curves["chi"]))


# --------------------------------------------------------------------------------------------
# Model fields -> predictions.


def effective_sigma_w2(init: str, weight_scale: float, fan_in: int, fan_out: int) -> float:
    """sigma_w2 = fan_in * Var(W_ij) of a dense [fan_in, fan_out] kernel from `layers.INITIALIZERS`.

    normal, lecun_normal: weight_scale^2; he_normal, he_uniform: 2 weight_scale^2; glorot_*:
    weight_scale^2 * 2 fan_in / (fan_in + fan_out); orthogonal, delta_orthogonal (a dense
    kernel is plain orthogonal), scaled_delta_orthogonal: weight_scale^2 (second moment only;
    the spectrum differs from Gaussian, Pennington et al. 2017); zeros: 0. Uniform variants
    have the same variance.

    Args:
      init: a name in `resflax.layers.INITIALIZERS` (the model field `init`).
      weight_scale: sigma_w, the model field `weight_scale` (any finite real).
      fan_in: input features of the kernel, >= 1.
      fan_out: output features of the kernel, >= 1.

    Returns:
      sigma_w2, a Python float.

    Raises:
      ValueError: an unknown `init` or an argument out of range.
    """
    factor = layers.lookup(_SIGMA_W2_FACTOR, init, "init")
    weight_scale = _number(weight_scale, "weight_scale", low=-math.inf)
    fan_in = _count(fan_in, "fan_in", low=1)
    fan_out = _count(fan_out, "fan_out", low=1)
    return weight_scale**2 * factor(fan_in, fan_out)


def predict(
    config: ModelConfig,
    fwd_sq0: float,
    act_grad_sq_last: float,
    *,
    fwd_chan_var0: float | None = None,
    num_points: int = NUM_POINTS,
) -> dict[str, Any] | None:
    """Mean-field curves for the network of `config`, or None where the theory stops.

    Applies to family='mlp' with layers_per_block=1 and either block='plain', norm='none'
    (`plain_mlp_curves`) or block='v2', norm in {'none', 'batch'} with a fixed (not learnable)
    residual_scale (`residual_mlp_curves`, alpha = residual_scale). sigma_w2 =
    `effective_sigma_w2(init, weight_scale, width, width)`, sigma_b2 = bias_scale^2 (unused with
    batch norm: no bias). With `activation_transform` set, phi is the transformed activation
    (`resflax.kernel_shaping.activation_for`). Other fields are assumed at their defaults
    (batch-norm scale 1).

    Args:
      config: a `resflax.ModelConfig`.
      fwd_sq0: the measured `fwd_sq[0]` (stem output), the forward anchor.
      act_grad_sq_last: the measured `act_grad_sq[L]` (the head's gradient), the backward anchor.
      fwd_chan_var0: the measured `fwd_chan_var[0]` (batch norm only; defaults to `fwd_sq0`).
      num_points: Gauss-Legendre nodes per quadrature panel.

    Returns:
      Python floats/lists: `fwd_sq` [depth+1], `act_grad_sq` [depth+1], `jac_fro_sq` [depth]
      (E ||dx_l/dx_{l-1}||_F^2 / n for l = 1..depth) and `e2e_jac_fro_sq` (their product, the
      mean squared singular value of dx_L/dx_0); or None outside the theory.
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"config must be a resflax.ModelConfig, got {type(config).__name__}")
    f = config.to_dict()
    plain = f["block"] == "plain" and f["norm"] == "none"
    residual = (
        f["block"] == "v2" and f["norm"] in ("none", "batch") and not f["learnable_residual_scale"]
    )
    if f["family"] != "mlp" or f["layers_per_block"] != 1 or not (plain or residual):
        return None
    width = f["width"]
    sigma_w2 = effective_sigma_w2(f["init"], f["weight_scale"], width, width)
    if f["norm"] == "batch":
        sigma_b2 = 0.0  # Normalized branches have no bias.
    else:
        sigma_b2 = f["bias_scale"] ** 2
    # Imported here: kernel_shaping -> theory. The net's activation: phi, or its transform.
    from resflax import kernel_shaping

    activation = (f["activation"] if f["activation_transform"] == "none"
                  else kernel_shaping.activation_for(config))
    args = (activation, sigma_w2, sigma_b2, f["depth"], fwd_sq0, act_grad_sq_last)
    if plain:
        curves = plain_mlp_curves(*args, num_points=num_points)
    else:
        curves = residual_mlp_curves(
            *args,
            norm=f["norm"],
            alpha=f["residual_scale"],
            fwd_chan_var0=fwd_chan_var0,
            num_points=num_points,
        )
    return {
        "fwd_sq": curves["fwd_sq"].tolist(),
        "act_grad_sq": curves["act_grad_sq"].tolist(),
        "jac_fro_sq": curves["chi"].tolist(),
        "e2e_jac_fro_sq": float(np.prod(curves["chi"])),
    }
