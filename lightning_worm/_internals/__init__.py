"""Uses of other projects' private API, one module per dependency, each use pinned by a test."""
