"""Thin ``nn.Module``s over the ops (layer ``ops`` <- ``nn`` <- ``methods``)."""

from labelkit_ext.nn.affine import AffineWarp, identity_theta

__all__ = ["AffineWarp", "identity_theta"]
