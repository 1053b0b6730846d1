"""Pure-PyTorch references: the fallback when no kernel exists, the test oracle and the
benchmark baseline. They assume validated arguments (the public wrappers check)."""
