"""Property-based tests (hypothesis) over the `ModelConfig` space.

- Every valid config (small sizes, every block kind, activation, initializer, norm, shortcut,
  dtype, conv implementation, ...) builds and runs a train-mode forward pass: logits
  `[B, num_classes]`, signals `x_0 .. x_L` (`num_blocks + 1` along the leading axes).
- Every config with exactly one field broken raises a `ValueError` naming that field, and
  nothing else (no TypeError / KeyError from deep inside).

Shortcut option A zero-pads and cannot *reduce* features, but no topology of the three families
ever asks it to (widths only grow: the stem outputs `width`, each stage keeps or doubles it,
bottlenecks expand 4x), so every (block, shortcut) combination is valid and is generated, except
the norm-free kinds' own constraints: 'fixup' and 'nf' need norm='none', and 'nf' shortcut 'B' or
'C' (its transition blocks project).

Deterministic (`derandomize=True`, no example database). Forward passes compile one XLA program
per distinct net, so those properties run few examples on tiny nets.
"""

import math

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings

import resflax
from resflax import config as config_lib
from resflax import conv, kernel_shaping, layers
from resflax.blocks import BLOCK_KINDS, NORM_FREE_KINDS, SHORTCUTS
from resflax.config import FAMILIES, FIELDS, IMAGENET_DEPTHS, ModelConfig
from resflax.topology import segments

BATCH = 2
COMPILING = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
CHEAP = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

CHOICES = {  # Fields with a fixed set of allowed values.
    "family": FAMILIES,
    "block": BLOCK_KINDS,
    "shortcut": SHORTCUTS,
    "activation": tuple(layers.ACTIVATIONS),
    "init": tuple(layers.INITIALIZERS),
    "norm": tuple(layers.NORMS),
    "dtype": tuple(config_lib.DTYPES),
    "param_dtype": tuple(config_lib.DTYPES),
    "conv_impl": conv.IMPLS,
    "bn_running_var": layers.BN_RUNNING_VARS,
    "activation_transform": kernel_shaping.TRANSFORMS,
}
INTEGERS = ("depth", "width", "num_classes")
SCALES = ("weight_scale", "bias_scale", "nf_alpha")  # Finite numbers >= 0.
BOOLEANS = ("zero_init_residual", "learnable_residual_scale", "remat", "scan")
# Dtypes of the generated nets: float16's range is too small for finite-logit checks at every
# sigma_w, and float64 needs jax_enable_x64 (without it an invalid config, generated below).
VALID_DTYPES = ("float32", "bfloat16")


def maybe(value_strategy):
    """A field's value, or None (unset: the family's default)."""
    return st.one_of(st.none(), value_strategy)


@st.composite
def valid_fields(draw, family=None, shaped=False):
    """Fields of a valid, small `ModelConfig` (a dict; None values left out); `shaped`: a
    kernel-shaped plain MLP (`shaping_fields`), otherwise sometimes one."""
    family = "mlp" if shaped else family or draw(st.sampled_from(FAMILIES))
    block = "plain" if shaped else draw(st.sampled_from(BLOCK_KINDS))
    fields = dict(family=family, block=block)
    if family == "mlp":
        fields.update(depth=draw(st.integers(1, 4)), width=draw(st.integers(1, 8)),
                      layers_per_block=draw(maybe(st.integers(1, 2))),
                      bottleneck=draw(st.sampled_from([None, False])))
    elif family == "cifar_resnet":
        bottleneck = draw(st.sampled_from([None, False, True]))
        depth = 9 * 1 + 2 if bottleneck else 6 * draw(st.integers(1, 2)) + 2
        fields.update(depth=depth, width=draw(st.integers(1, 4)), bottleneck=bottleneck)
    else:
        fields.update(depth=18, width=draw(st.integers(1, 2)),
                      bottleneck=draw(st.sampled_from([None, False])))
    plain = block == "plain"
    # Fixup and NF set their own branch multiplier, like a plain block has none.
    fixed_scale = plain or block in NORM_FREE_KINDS
    fields.update(
        activation=draw(maybe(st.sampled_from(CHOICES["activation"]))),
        init=draw(maybe(st.sampled_from(CHOICES["init"]))),
        norm=draw(maybe(st.sampled_from(CHOICES["norm"]))),
        shortcut=draw(maybe(st.sampled_from(SHORTCUTS))),
        zero_init_residual=draw(maybe(st.booleans())),
        residual_scale=None if fixed_scale else draw(maybe(st.floats(-2.0, 2.0))),
        learnable_residual_scale=False if fixed_scale else draw(maybe(st.booleans())),
        weight_scale=draw(maybe(st.floats(0.0, 2.0))),
        bias_scale=draw(maybe(st.floats(0.0, 1.0))),
        num_classes=draw(st.integers(1, 5)),
        dtype=draw(maybe(st.sampled_from(VALID_DTYPES))),
        param_dtype=draw(maybe(st.sampled_from(VALID_DTYPES))),
        scan=draw(maybe(st.booleans())),
        remat=draw(maybe(st.booleans())),
        conv_impl=draw(maybe(st.sampled_from(conv.IMPLS))),
        bn_running_var=draw(maybe(st.sampled_from(layers.BN_RUNNING_VARS))),
    )
    if shaped or (family == "mlp" and plain and draw(st.booleans())):
        fields.update(draw(shaping_fields()))
    if fixed_scale and draw(st.booleans()):
        fields["residual_scale"] = 1.0  # The one value these blocks allow, given explicitly.
    if block in NORM_FREE_KINDS:  # They replace normalization (and NF needs projections).
        fields["norm"] = "none"
        if block == "nf":
            fields["shortcut"] = draw(st.sampled_from(["B", "C"]))
            fields["nf_alpha"] = draw(maybe(st.floats(0.0, 1.0)))
    return {k: v for k, v in fields.items() if v is not None}


@st.composite
def shaping_fields(draw):
    """The fields that make a small plain MLP a kernel-shaped one (DKS or Leaky-ReLU TAT):
    q-preserving weights, no norm, no bias, an activation and target the transform reaches at
    depth L >= 1 (TAT's eta <= 1/pi, ReLU's C(0) after one layer)."""
    fields = dict(init=draw(st.sampled_from(["orthogonal", "delta_orthogonal"])),
                  weight_scale=draw(st.sampled_from([None, 1.0])),
                  bias_scale=draw(st.sampled_from([None, 0.0])), norm=draw(maybe(st.just("none"))),
                  zero_init_residual=draw(st.sampled_from([None, False])))
    if draw(st.sampled_from(["dks", "tat"])) == "dks":
        fields.update(activation_transform="dks",
                      activation=draw(st.sampled_from(["tanh", "erf", "sigmoid"])),
                      shaping_target=draw(st.sampled_from([None, 1.1, 1.5])))
    else:
        fields.update(activation_transform="tat", activation="leaky_relu",
                      shaping_target=draw(st.sampled_from([0.1, 0.3])))
    return fields


def input_shape(config: ModelConfig, draw_large: bool = False):
    if config.family == "mlp":
        return (BATCH, 5)
    if config.family == "cifar_resnet":
        return (BATCH, 8, 8, 3)
    return (BATCH, 32, 32, 3) if draw_large else (BATCH, 16, 16, 3)


def check_forward(fields, large_input=False):
    config = ModelConfig.from_dict(fields)
    model = resflax.build_model(config)
    x = jax.random.normal(jax.random.key(1), input_shape(config, large_input))

    def forward(key, x):  # One program: half the compile time of two, none of eager dispatch.
        variables = model.init(key, x)
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    (logits, signals), updates = jax.jit(forward)(jax.random.key(0), x)
    assert logits.shape == (BATCH, config.num_classes)
    assert logits.dtype == config_lib.DTYPES[config.dtype]
    assert sum(s.shape[0] for s in signals) == config.num_blocks + 1
    assert all(s.shape[1] == BATCH for s in signals)
    assert np.all(np.isfinite(np.asarray(logits, np.float32)))
    assert set(updates) <= {"batch_stats"}
    assert bool(updates.get("batch_stats")) == (config.norm == "batch")


@COMPILING
@given(st.one_of(valid_fields("mlp"), valid_fields(shaped=True)))
def test_every_valid_mlp_config_runs(fields):
    check_forward(fields)


@settings(COMPILING, max_examples=12)
@given(valid_fields("cifar_resnet"))
def test_every_valid_cifar_resnet_config_runs(fields):
    check_forward(fields)


@settings(COMPILING, max_examples=6)
@given(valid_fields("imagenet_resnet"), st.booleans())
@example(dict(family="imagenet_resnet", depth=50, width=1, block="v2", num_classes=3), False)
def test_every_valid_imagenet_resnet_config_runs(fields, large_input):
    check_forward(fields, large_input)


@CHEAP
@given(st.one_of(valid_fields(), valid_fields(shaped=True)))
def test_valid_configs_resolve_and_round_trip(fields):
    config = ModelConfig.from_dict(fields)
    assert all(getattr(config, k) == v for k, v in fields.items())
    assert all(getattr(config, k) is not None for k in FIELDS
               if (k != "layers_per_block" or config.family == "mlp")
               and (k != "shaping_target" or config.activation_transform != "none"))
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_json(config.to_json()) == config
    assert config_lib.from_config_dict(config_lib.config_dict(**fields)) == config
    assert config.replace() == config
    assert sum(seg.length for seg in segments(config)) == config.num_blocks


# ----------------------------------------------------------------------------- invalid configs


def not_in(allowed):
    """Values outside `allowed`: unknown strings, and values of other types."""
    allowed = list(allowed)
    others = st.one_of(st.integers(-3, 3), st.booleans(), st.floats(allow_nan=False),
                       st.just(b"relu"), st.just(["mlp"]), st.just({}))
    unknown = st.text(max_size=8).filter(lambda s: s not in allowed)
    near = [s.swapcase() for s in allowed if s.swapcase() not in allowed] + [
        s + " " for s in allowed]  # Wrong case, a trailing space.
    return st.one_of(unknown, st.sampled_from(near), others)


BAD_INTS = st.one_of(st.integers(-5, 0), st.booleans(), st.floats(0.5, 8.0), st.just("3"),
                     st.just([4]))
BAD_SCALES = st.one_of(st.floats(max_value=-1e-9), st.sampled_from([math.inf, math.nan]),
                       st.booleans(), st.just("1.0"), st.just([1.0]))
BAD_BOOLS = st.one_of(st.integers(0, 1), st.sampled_from(["True", "False", "yes", 1.0]))


@st.composite
def broken_fields(draw):
    """(fields, name): a valid config's fields with exactly the field `name` made invalid."""
    fields = draw(st.one_of(valid_fields(), valid_fields(shaped=True)))
    family, block = fields["family"], fields["block"]
    kinds = ["choice", "int", "scale", "bool", "residual_scale", "bottleneck_bool"]
    if family == "mlp":
        kinds += ["mlp_layers_per_block", "mlp_bottleneck"]
    else:
        kinds += ["conv_layers_per_block", "conv_depth"]
    if family == "cifar_resnet":
        kinds += ["cifar_bottleneck_depth"]
    if family == "imagenet_resnet":
        kinds += ["imagenet_bottleneck"]
    if block == "plain":
        kinds += ["plain_residual_scale", "plain_learnable"]
    if fields.get("activation_transform", "none") != "none":
        kinds += ["shaping"]
    if block in NORM_FREE_KINDS:
        kinds += ["normfree_norm", "normfree_residual_scale", "normfree_learnable"]
    if block == "nf":
        kinds += ["nf_shortcut"]
    if not jax.config.read("jax_enable_x64"):
        kinds += ["float64"]
    kind = draw(st.sampled_from(kinds))

    if kind == "choice":
        name = draw(st.sampled_from(sorted(CHOICES)))
        value = draw(not_in(CHOICES[name]))
    elif kind == "int":
        name = draw(st.sampled_from(INTEGERS + (("layers_per_block",) if family == "mlp" else ())))
        value = draw(BAD_INTS)
    elif kind == "scale":
        name, value = draw(st.sampled_from(SCALES)), draw(BAD_SCALES)
    elif kind == "bool":
        name, value = draw(st.sampled_from(BOOLEANS)), draw(BAD_BOOLS)
    elif kind == "residual_scale":
        name = "residual_scale"
        value = draw(st.one_of(st.sampled_from([math.inf, -math.inf, math.nan, "1.0", True]),
                               st.just([1.0])))
    elif kind == "bottleneck_bool":
        name, value = "bottleneck", draw(BAD_BOOLS)
    elif kind == "mlp_layers_per_block":
        name, value = "layers_per_block", draw(st.integers(3, 10))
    elif kind == "mlp_bottleneck":
        name, value = "bottleneck", True
    elif kind == "conv_layers_per_block":
        name, value = "layers_per_block", draw(st.integers(1, 3))
    elif kind == "conv_depth":
        name = "depth"
        if family == "imagenet_resnet":
            value = draw(st.integers(1, 300).filter(lambda d: d not in IMAGENET_DEPTHS))
        else:
            per = 9 if fields.get("bottleneck") else 6
            value = draw(st.integers(1, 300).filter(lambda d: d < per + 2 or (d - 2) % per))
    elif kind == "cifar_bottleneck_depth":
        # 6n+2 is not 9n+2 (and back) unless 18 divides n: the depth no longer fits the block.
        name = "bottleneck"
        value = not fields.get("bottleneck", False)
        fields["depth"] = 6 * draw(st.integers(1, 2)) + 2 if value else 11
    elif kind == "imagenet_bottleneck":
        name, value = "bottleneck", True  # Depth 18 is basic.
    elif kind == "plain_residual_scale":
        name, value = "residual_scale", draw(st.floats(-3, 3).filter(lambda a: a != 1.0))
    elif kind == "plain_learnable":
        name, value = "learnable_residual_scale", True
    elif kind == "shaping":  # A field the kernel-shaping theory rules out.
        name, value = draw(st.sampled_from([
            ("init", "he_normal"), ("norm", "batch"), ("block", "v1"), ("weight_scale", 0.5),
            ("bias_scale", 0.1), ("zero_init_residual", True), ("activation", "relu"),
            ("shaping_target", 1.0),
            ("shaping_target", -0.5)]))
    elif kind == "normfree_norm":
        name, value = "norm", draw(st.sampled_from(["batch", "layer", "group"]))
    elif kind == "normfree_residual_scale":
        name, value = "residual_scale", draw(st.floats(-3, 3).filter(lambda a: a != 1.0))
    elif kind == "normfree_learnable":
        name, value = "learnable_residual_scale", True
    elif kind == "nf_shortcut":
        name, value = "shortcut", "A"
    else:  # float64 without 64-bit JAX.
        name, value = draw(st.sampled_from(["dtype", "param_dtype"])), "float64"
    fields[name] = value
    return fields, name


def assert_names_field(error: ValueError, name: str):
    message = str(error)
    assert name in message, message
    # The convention: the message starts with `<field>=<value>`, except the conflict of
    # `bottleneck` and a CIFAR depth, which is the depth's error (naming bottleneck's rule).
    if not message.startswith("depth="):
        assert message.startswith(f"{name}="), message


@CHEAP
@given(broken_fields())
def test_one_broken_field_is_a_value_error_naming_it(case):
    fields, name = case
    with pytest.raises(ValueError) as err:
        ModelConfig(**fields)
    assert type(err.value) is ValueError
    assert_names_field(err.value, name)
    # The same error through every entry point, with the section prefix where there is one.
    with pytest.raises(ValueError) as err:
        resflax.build_model(fields)
    assert_names_field(err.value, name)
    with pytest.raises(ValueError) as err:
        config_lib.from_config_dict(fields)
    assert str(err.value).startswith("config.model: ")
    assert_names_field(ValueError(str(err.value).removeprefix("config.model: ")), name)


@settings(CHEAP, max_examples=50)
@given(valid_fields(), st.text(min_size=1, max_size=12).filter(lambda s: s not in FIELDS))
def test_unknown_field_names_are_a_value_error_naming_them(fields, unknown):
    for make in (ModelConfig.from_dict, resflax.build_model, config_lib.from_config_dict):
        with pytest.raises(ValueError) as err:
            make(dict(fields, **{unknown: 1}))
        assert type(err.value) is ValueError
        assert repr(unknown) in str(err.value) and "unknown model field" in str(err.value)
