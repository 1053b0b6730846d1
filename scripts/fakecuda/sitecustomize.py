# Loaded by Python at start-up when this folder is on PYTHONPATH: with FAKECUDA_SUB=1, child
# processes (the bench smoke tests, the device-assert test) run under the fake CUDA device too.
import os
import sys

if os.environ.get("FAKECUDA_SUB") == "1":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fakecuda  # noqa: F401
