"""Public op wrappers (``labelkit_ext.ops.<op>``): argument checks, routing to the compiled kernel
or the reference, fake kernels and autograd. Submodules are imported by ``labelkit_ext``."""
