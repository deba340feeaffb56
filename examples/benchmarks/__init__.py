"""Benchmarks of lightning-worm: what the callbacks cost and what the pruned network saves.

One module per benchmark; each has ``run(settings, out_dir) -> Section``. ``run.py`` runs them all and writes
``docs/benchmarks.md``. Shared pieces (settings, the timing helper, the table writer, the environment
stamp) live in :mod:`examples.benchmarks.common`.

Example::

    from pathlib import Path
    from examples.benchmarks import BENCHMARKS
    from examples.benchmarks.common import Settings

    section = BENCHMARKS["latency"](Settings.preset("quick"), Path("out"))
    print(section.markdown)
"""

import os

# oneDNN caches 1024 CPU kernel primitives by default. Timing a dozen variants of a model interleaved
# evicts them on every forward (MobileNetV2's pruned variants then measured 1.4-1.8x *slower* than dense,
# and even a same-shape masked copy 1.5x). One deployed model never thrashes it, so the benchmarks raise the
# capacity; it must be set before the first convolution of the process.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

from examples.benchmarks import (  # noqa: E402
    defaults,
    earlybert,
    end_to_end,
    latency,
    overhead,
    sharded,
    ticket,
    transformer,
)
from examples.benchmarks.common import Section, Settings  # noqa: E402

BENCHMARKS: dict[str, Callable[[Settings, Path], Section]] = {
    "overhead": overhead.run,
    "latency": latency.run,
    "ticket": ticket.run,
    "end_to_end": end_to_end.run,
    "defaults": defaults.run,
    "transformer": transformer.run,
    "earlybert": earlybert.run,
    "sharded": sharded.run,
}

__all__ = ["BENCHMARKS", "Section", "Settings"]
