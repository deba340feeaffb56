"""Every use of another project's private API, one module per dependency, each pinned by a test.

Nothing here is public API. ``tests/test_internals.py`` checks each use against the installed release
and fails with a message naming the internal that changed.
"""
