"""resflax: plain, ResNet v1 and pre-activation v2 networks in Flax, and exact diagnostics of why
deep plain networks are hard to train."""

from resflax.blocks import Block
from resflax.config import FAMILY_DEFAULTS, FIELDS, ModelConfig
from resflax.models import Network, build_model
from resflax.topology import segments, stage_plan

__all__ = [
    "Block", "FAMILY_DEFAULTS", "FIELDS", "ModelConfig", "Network", "build_model", "segments",
    "stage_plan",
]
__version__ = "0.1.0"
