"""What curate does with a gallery image whose bytes changed since the index was built.

Every read of a gallery image compares its bytes with the content hash its index row records
(`index.ranged`): other bytes are 'changed', a location that no longer holds the image is
'stale_location' (`index.ranged.CHANGED_REASONS`). The embeddings, similarities and crop recipes of
such an image describe the old one, so by default curate refuses it, naming the images, before any
transfer shard is written (`refuse`); `skip` leaves them out like unreadable images (backfilled) and
counts them in the manifest (``counts.removed_changed``) and the summary line.
"""
from __future__ import annotations

from index.core.errors import UserError
from index.ranged import CHANGED_REASONS

CHANGED_POLICIES = ("refuse", "skip")
SHOWN = 10   # image ids named in the message


class ChangedImagesError(UserError, ValueError):
    pass


def check_policy(policy: str) -> str:
    if policy not in CHANGED_POLICIES:
        raise ValueError(f"changed_images must be one of {', '.join(CHANGED_POLICIES)}; got {policy!r}")
    return policy


def changed_since_indexing(unreadable: dict[str, str], policy: str, index: str) -> set[str]:
    """The ids among `unreadable` ({image id: reason}) whose reason says the gallery changed; raises
    `ChangedImagesError` naming them when `policy` is 'refuse'."""
    changed = sorted(i for i, why in unreadable.items() if why in CHANGED_REASONS)
    if changed and check_policy(policy) == "refuse":
        more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
        raise ChangedImagesError(
            f"{len(changed)} gallery image(s) changed since the index {index} was built (their bytes differ "
            f"from the content hash recorded then, or their recorded location no longer holds them): "
            f"{', '.join(changed[:SHOWN])}{more}. Rebuild the index over the gallery as it is now, or pass "
            "--changed-images skip to leave them out and count them.")
    return set(changed)
