"""Every use of another project's private API, one module per dependency, each pinned by a test.

Nothing here is public API. ``lightning.py`` holds the Lightning internals (pinned by
``tests/_internals/test_lightning.py``), ``torch_pruning.py`` the torch-pruning ones (pinned by
``tests/_internals/test_torch_pruning.py``) and ``torch.py`` torch's own (pinned by
``tests/_internals/test_torch.py``); each test fails with a message naming the internal that changed.
"""

__all__ = []
