"""Scoring: blockwise over stored train features, to a memmap or as top-k per query."""

from .blockwise import TopK, stream_scores, topk_merge

__all__ = ["TopK", "stream_scores", "topk_merge"]
