from vit.model import ViT, ViTConfig, count_parameters
from vit.timm_fuse import FuseReport, fuse, unfuse
from vit.timm_interop import from_timm, to_timm

__all__ = ["ViT", "ViTConfig", "count_parameters", "to_timm", "from_timm", "fuse", "unfuse", "FuseReport"]
