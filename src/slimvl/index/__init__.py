"""Nearest-neighbour search over embeddings with faiss: one index
(:mod:`.store`) and a gallery's index folder on disk (:mod:`.gallery`)."""
from __future__ import annotations

from .gallery import GalleryIndex, GalleryIndexError, Hits, weights_checksum
from .store import INDEX_KINDS, IndexParams, VectorIndex, VectorIndexError

__all__ = ["INDEX_KINDS", "IndexParams", "VectorIndex", "VectorIndexError", "GalleryIndex", "GalleryIndexError",
           "Hits", "weights_checksum"]
