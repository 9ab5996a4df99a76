"""Data sources behind one interface: a registry of datasets yielding packed LM batches.

Every source produces host-local numpy batches with the keys of
`train.step.BATCH_KEYS` (plus `target_bytes`), is deterministic (batch k is a
function of the seed and k alone) and exposes its position as a JSON-able
state that checkpoints save and restore.
"""

from train.data.base import BatchIterator, Dataset
from train.data.sources import SOURCES, RunData, build_dataset, check_data, open_data, register_source

__all__ = ["SOURCES", "BatchIterator", "Dataset", "RunData", "build_dataset", "check_data", "open_data",
           "register_source"]
