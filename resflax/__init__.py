"""resflax: plain, ResNet v1 and pre-activation v2 networks in Flax, and exact diagnostics of why
deep plain networks are hard to train."""

from resflax.blocks import Block
from resflax.models import FAMILY_DEFAULTS, FIELDS, Network, build_model, resolve_fields

__all__ = ["Block", "FAMILY_DEFAULTS", "FIELDS", "Network", "build_model", "resolve_fields"]
__version__ = "0.1.0"
