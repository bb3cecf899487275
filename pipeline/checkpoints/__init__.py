"""Checkpoints: the store (store.py), its file format (tensorfile.py) and the ledger (ledger.py)."""

from pipeline.checkpoints.ledger import Ledger
from pipeline.checkpoints.store import Checkpoint, CheckpointStore, Part

__all__ = ["Checkpoint", "CheckpointStore", "Ledger", "Part"]
