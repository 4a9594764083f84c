"""`osteo-node bench`: what this machine does with the node's real parts, one measurement each,
one module per section:

- `receive`: images/s durably stored by the node's receiver from DCMTK storescu over 1 and 4
  associations, 512 x 512 DX and full-size CR, against DCMTK `storescp -od DIR` on the same files.
- `pipeline`: per-stage seconds of `pipeline.screen` (+ send to a local storescp), and the floor:
  the classifier's bare forward + backward (down to the Grad-CAM target layer) on the same tensor.
- `node`: an in-process node (receiver + worker, `osteo_node.node.Node`) with storescp as the PACS:
  the worker draining a full queue (throughput) and, one image at a time, C-STORE received ->
  results accepted by the PACS.
- `memory`: peak RSS (VmHWM) of `osteo-node receive` and `osteo-node work` subprocesses.
- `workers` (only when asked for): images/s of 1, 2, 4 ... `osteo-node work` processes sharing
  one queue: how many workers a host (a GPU host) needs.

`run.run_bench` runs the sections and gathers their frozen results into one JSON-ready dict;
`table.format_table` prints it. The shared parts: `common` (counts, scratch databases, the node's
settings for a run), `dcmtk` (the reference tools) and `processes` (`osteo-node` subprocesses and
their config files, shared with the tests). Nothing is kept: every database, store and port is
temporary.
"""

from .common import FULL, QUICK, Counts, ScratchDatabases, summary
from .run import OPTIONAL_SECTIONS, SECTIONS, run_bench
from .table import format_table
from .workers import worker_counts

__all__ = ["FULL", "OPTIONAL_SECTIONS", "QUICK", "SECTIONS", "Counts", "ScratchDatabases",
           "format_table", "run_bench", "summary", "worker_counts"]
