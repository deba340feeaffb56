"""Every use of another project's private API, one module per dependency, each pinned by a test.

Nothing here is public API. ``lightning.py`` holds the Lightning internals (pinned by
``tests/test_internals.py``), ``torch_pruning.py`` the torch-pruning ones (pinned by
``tests/test_torch_pruning_internals.py``) and ``torch.py`` torch's own (pinned by
``tests/test_torch_internals.py``); each test fails with a message naming the internal that changed.
"""

__all__ = []
