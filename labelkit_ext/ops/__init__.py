"""Public op wrappers (``labelkit_ext.ops.<op>``): argument checks, routing to the compiled kernel
or the reference, fake kernels and autograd.

``import labelkit_ext.ops`` registers every op under ``torch.ops.labelkit`` with its fake kernel
and autograd, for code that calls the ops directly or loads a program that does (``torch.export``).
A bare ``import labelkit_ext`` does not: it imports torch only when a public name is first used.
"""

from labelkit_ext.ops import affine, entropy, pretext, scoring  # noqa: F401
