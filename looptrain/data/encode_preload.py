"""Imported once by the fork server of `looptrain prepare --workers N`, before it forks the workers.

Workers are forked from that clean single-threaded server rather than from
the caller, which may run threads (a test runner, a loader, boto's transfer
pool) whose locks a forked child would inherit held; mosaicml-streaming is
imported here once instead of in every worker.
"""

from looptrain.data.streaming_import import import_streaming

import_streaming()
