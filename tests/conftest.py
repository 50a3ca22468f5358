"""Test set-up: ``tests/helpers.py`` importable as ``helpers``, and the device.

Plain ``make test`` runs on the CPU even on a GPU machine (CI has none, and
results must not depend on whether one is present); with
``SLIMVL_TEST_DEVICE=cuda`` the training and evaluation tests run on the GPU.
"""
import os
import sys
from pathlib import Path

# Make tests/helpers.py importable as `helpers`.
sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("SLIMVL_TEST_DEVICE", "cpu") not in ("cpu", "cuda"):
    raise SystemExit(f"SLIMVL_TEST_DEVICE={os.environ['SLIMVL_TEST_DEVICE']!r}: expected 'cpu' or 'cuda'")
if os.environ.get("SLIMVL_TEST_DEVICE", "cpu") == "cpu":
    # Hide GPUs before anything initialises CUDA, so that "auto" means CPU
    # for subprocesses too.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
