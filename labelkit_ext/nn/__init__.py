"""Thin ``nn.Module``s over the ops (layer ``ops`` <- ``nn`` <- ``methods``)."""

from labelkit_ext.nn.affine import AffineWarp, identity_theta
from labelkit_ext.nn.stn import AffineBounds, RandomAffineWarp, STNAugmenter, WarpDiscriminator

__all__ = [
    "AffineBounds",
    "AffineWarp",
    "RandomAffineWarp",
    "STNAugmenter",
    "WarpDiscriminator",
    "identity_theta",
]
