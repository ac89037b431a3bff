"""Allocation tag memory: every read and write of a page's tags goes through here.

These are the model's versions of the arm64 tag primitives
(arch/arm64/lib/mte.S and arch/arm64/kernel/mte.c): clearing a page's tags,
copying them, packing them for swap, and the user-visible tag reads and writes
(LDG/STG, ptrace, KVM_ARM_MTE_COPY_TAGS). Keeping them in one module lets the
oracles see every tag access: each write updates the page's ghost ``shadow``
(the tags a correct kernel would hold) and each read checks that a page which
claims PG_mte_tagged really holds valid tags (NO-PUBLISH-BEFORE-VALID).

The shadow lives on the frame, so it moves with the content (swap, migration,
CoW); the end-to-end TAGS-AS-WRITTEN ghost (hypervisor/ghost.py), keyed by
what the user sees, is fed by the callers of :func:`write_tags` and
:func:`read_tags`, which know the user location.

Shadow rules: an initialising clear sets the shadow to zeros only while no
actor has written the page's tags yet (a later "initialisation" that wipes
written tags is exactly the lost-tag race); an actor's write sets it to what was
written; a copy gives the destination the source's shadow (garbage stays
garbage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypervisor.arm64.mte_lock import PG_mte_tagged
from hypervisor.page import Page
from shared.mte import MTE_GRANULES_PER_PAGE, pack_tags, unpack_tags

if TYPE_CHECKING:
    from hypervisor.kernel import Kernel

ZERO_TAGS = bytes(MTE_GRANULES_PER_PAGE)
#: A shadow byte for a granule whose tag nobody defined (garbage). Never equals a 4-bit tag.
UNKNOWN = b"\xff"

# page.initialiser doubles as the ghost record of who last defined the shadow:
# None/"init:..." for initialisation, "write" after an actor wrote tags.
#
# A shadow is either immutable ``bytes``, shared between frames (every freshly cleared frame shares
# ZERO_TAGS; copies, swap and migration share the source's), or a frame's own ``bytearray`` once tags
# are written into it (copy on write): memory per written page no longer pays for a second 256-byte copy.

_UNIFORM: dict[int, bytes] = {}


def shared_tags(tags) -> bytes:
    """``tags`` as immutable bytes, one shared object for a page of one tag (the ghost's expected tags)."""
    b = bytes(tags)
    if len(b) == MTE_GRANULES_PER_PAGE and b.count(b[:1]) == MTE_GRANULES_PER_PAGE:
        return _UNIFORM.setdefault(b[0], b)
    return b


def _share(shadow):
    # an immutable shadow is shared as it is; a frame's own bytearray is copied
    return shadow if shadow is None or type(shadow) is bytes else bytearray(shadow)


def mte_clear_page_tags(k: Kernel, page: Page) -> None:
    """mte_clear_page_tags(): zero the page's allocation tags (an initialisation)."""
    k.oracle.on_tag_write(page, "mte_clear_page_tags")
    page.tags[:] = ZERO_TAGS
    if page.initialiser != "write":
        page.shadow = ZERO_TAGS  # shared until tags are written (write_tags copies)
        page.initialiser = "init"
    else:
        k.oracle.on_tags_overwritten(page, "mte_clear_page_tags")


def mte_copy_page_tags(k: Kernel, dst: Page, src: Page) -> None:
    """mte_copy_page_tags(): dst's tags become src's (CoW, migration, collapse)."""
    k.oracle.on_tags_read(src, "mte_copy_page_tags")
    k.oracle.on_tag_write(dst, "mte_copy_page_tags")
    dst.tags[:] = src.tags
    dst.shadow = _share(src.shadow)
    dst.initialiser = "write" if src.shadow is not None else None


def mte_save_page_tags(k: Kernel, page: Page) -> tuple[bytes, bytes | bytearray | None]:
    """mte_save_page_tags(): the packed 128-byte form, plus the ghost shadow to carry."""
    k.oracle.on_tags_read(page, "mte_save_page_tags")
    return pack_tags(bytes(page.tags)), _share(page.shadow)


def mte_restore_page_tags(k: Kernel, page: Page, packed: bytes, shadow: bytes | bytearray | None) -> None:
    """mte_restore_page_tags(): unpack saved tags into the page (an initialisation)."""
    k.oracle.on_tag_write(page, "mte_restore_page_tags")
    page.tags[:] = unpack_tags(packed)
    page.shadow = _share(shadow)
    page.initialiser = "write"


def read_tags(k: Kernel, page: Page, first: int, count: int, who: str) -> bytes:
    """A user-visible read of ``count`` granule tags (LDG, PEEKMTETAGS, COPY_TAGS)."""
    if page.flags & PG_mte_tagged or (page.folio.flags & PG_mte_tagged):
        shadow = page.shadow
        if shadow is None or page.tags != shadow:  # what the oracle reports on (it checks again); else nothing
            k.oracle.on_tags_read(page, who)
    return bytes(page.tags[first:first + count])


def write_tags(k: Kernel, page: Page, first: int, tags: bytes) -> None:
    """A user-visible write of granule tags (STG, POKEMTETAGS, COPY_TAGS TO_GUEST)."""
    n = len(tags)
    k.oracle.on_tag_write(page, "a tag write")
    page.tags[first:first + n] = tags
    if page.shadow is None:
        page.shadow = bytearray(UNKNOWN * MTE_GRANULES_PER_PAGE)  # the rest stays garbage
    elif type(page.shadow) is not bytearray:
        page.shadow = bytearray(page.shadow)  # the shared shadow is copied on its first write
    page.shadow[first:first + n] = tags
    page.initialiser = "write"
