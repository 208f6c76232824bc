"""The ``bucket_diversity`` view shared by the per-prompt and the pooled estimates (one definition)."""

from __future__ import annotations

__all__ = ["BucketDiversityView"]


class BucketDiversityView:
    """Mixin for a result with ``bucket_diversity_{short,medium,long}`` fields (the buckets of
    :data:`canopy_rs.semantic.BUCKETS`)."""

    bucket_diversity_short: float
    bucket_diversity_medium: float
    bucket_diversity_long: float

    @property
    def bucket_diversity(self) -> dict[str, float]:
        """D inside the length buckets: {"short", "medium", "long"} (pooled for a pooled estimate)."""
        return {
            "short": self.bucket_diversity_short,
            "medium": self.bucket_diversity_medium,
            "long": self.bucket_diversity_long,
        }
