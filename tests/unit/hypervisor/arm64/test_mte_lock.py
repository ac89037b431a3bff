"""The two-bit tag lock (asm/mte.h) under every interleaving of two and three contexts.

Reference section 2.2: ``try_page_mte_tagging`` test-and-sets PG_mte_lock; the
one winner initialises the tags and calls ``set_page_mte_tagged``; losers
wait until PG_mte_tagged and return False. Each scenario below is run under
*every* schedule the ControlledScheduler can produce (tests/unit/support.py
``explore``), and the invariants are stated once, as the ``assert_*`` helpers.
The historical bug modes (``no-tag-lock``, ``flag-before-init``) must break
them in at least one interleaving.
"""

from __future__ import annotations

import attrs
import pytest
from support import explore, invariants, run_once

from hypervisor.arm64.mte import mte_sync_tags
from hypervisor.arm64.mte_lock import (
    PG_mte_lock,
    PG_mte_tagged,
    folio_set_hugetlb_mte_tagged,
    folio_test_hugetlb_mte_tagged,
    folio_try_hugetlb_mte_tagging,
    page_mte_tagged,
    set_page_mte_tagged,
    tag_state,
    try_page_mte_tagging,
)
from hypervisor.arm64.tags import ZERO_TAGS, mte_clear_page_tags, read_tags, write_tags
from hypervisor.kernel import Kernel
from hypervisor.page import Page
from shared.errno import Deadlock

ACTORS = {2: ("a", "b"), 3: ("a", "b", "c")}


# ---- scenario state and the invariants, stated once ---------------------------


@attrs.define
class LockRun:
    """What the contexts of one interleaving saw."""

    page: Page  # the page (or hugetlb folio head) whose lock is contended
    pages: list  # the pages whose tags the winner initialises
    won: dict = attrs.Factory(dict)  # actor -> try_* result
    at_return: dict = attrs.Factory(dict)  # actor -> (PG_mte_tagged, tags valid) when try_* returned
    inits: int | None = 0  # initialisations performed (None: the scenario does not count them)
    owners: set = attrs.Factory(set)  # actors between winning and set_*_tagged
    locked_without_owner: bool = False  # seen at some scheduling point
    saw_locked: bool = False  # LOCKED was observed at some scheduling point
    last_writer_tag: int | None = None  # the tag the last STG-like write stored


def tags_valid(run: LockRun) -> bool:
    """The initialised value (zeros) is in every page's tag memory."""
    return all(bytes(p.tags) == ZERO_TAGS for p in run.pages)


def assert_exactly_one_winner(st: LockRun) -> None:
    """Exactly one context got True from try_*."""
    winners = [a for a, w in st.won.items() if w]
    assert len(winners) == 1, f"winners: {winners}"


def assert_losers_return_after_publish(st: LockRun) -> None:
    """Every False came back only once PG_mte_tagged was set and the tags were valid."""
    for actor, won in st.won.items():
        if not won:
            flagged, valid = st.at_return[actor]
            assert flagged, f"{actor} returned False before PG_mte_tagged was set"
            assert valid, f"{actor} returned False while the tags were still stale"


def assert_initialised_once(st: LockRun) -> None:
    """The tags were initialised exactly once (and the oracle's ghost count agrees)."""
    if st.inits is not None:
        assert st.inits == 1, f"{st.inits} initialisations"
    assert st.page.inits == 1, f"{st.page.inits} initialisations (ghost count)"


def assert_not_locked_at_rest(k: Kernel, st: LockRun) -> None:
    """At rest the page is TAGGED (never LOCKED), and the oracle is silent."""
    assert tag_state(st.page) == "TAGGED"
    assert st.page.flags & PG_mte_tagged
    assert not st.locked_without_owner, "LOCKED was observed with no initialiser in progress"
    assert invariants(k) == []


def check_locked_has_owner(k: Kernel, st: LockRun) -> None:
    """Called at every scheduling decision: LOCKED only while exactly one initialiser is in progress."""
    if tag_state(st.page) == "LOCKED":
        st.saw_locked = True
        if len(st.owners) != 1:
            st.locked_without_owner = True


def loser_saw_stale_tags(run) -> bool:
    """Some context that got False from try_* found the tags not yet initialised."""
    st = run.state
    return any(not st.at_return[a][1] for a, w in st.won.items() if not w)


SYNC_INIT_LABELS = ("mte_sync_tags:clear", "mte_sync_tags:set")


def check_locked_has_sync_owner(k: Kernel, st: LockRun) -> None:
    """At every decision: LOCKED only while exactly one context is parked inside mte_sync_tags' init."""
    if tag_state(st.page) == "LOCKED":
        st.saw_locked = True
        inside = [a for a in k.sched.parked if a.label in SYNC_INIT_LABELS]
        if len(inside) != 1:
            st.locked_without_owner = True


def assert_lock_invariants(run) -> None:
    """All of the above for one interleaving of a correct kernel."""
    assert run.failure is None, run.failure
    assert_exactly_one_winner(run.state)
    assert_losers_return_after_publish(run.state)
    assert_initialised_once(run.state)
    assert_not_locked_at_rest(run.k, run.state)


# ---- scenarios -------------------------------------------------------------------


def page_lock_scenario(n: int):
    """``n`` contexts run the page protocol (try, clear, set) on one page."""

    def setup(k: Kernel):
        page = k.alloc.alloc_page()
        st = LockRun(page=page, pages=[page])
        return st, {a: _page_initialiser(a) for a in ACTORS[n]}

    return setup


def _page_initialiser(actor: str):
    async def body(k: Kernel, st: LockRun) -> None:
        won = await try_page_mte_tagging(k, st.page)
        st.won[actor] = won
        st.at_return[actor] = (page_mte_tagged(k, st.page), tags_valid(st))
        if won:
            st.owners.add(actor)
            st.inits += 1
            await k.sched.point("test:clear")
            mte_clear_page_tags(k, st.page)
            await k.sched.point("test:set")
            set_page_mte_tagged(k, st.page)
            st.owners.discard(actor)
        else:
            read_tags(k, st.page, 0, 256, f"{actor} (trusts PG_mte_tagged)")

    return body


def folio_lock_scenario(n: int):
    """``n`` contexts run the hugetlb folio protocol, each through a different subpage."""

    def setup(k: Kernel):
        head = k.alloc.alloc_hugetlb_folio()
        st = LockRun(page=head, pages=list(head.subpages))
        subs = [head, head.subpages[1], head.subpages[511]]
        return st, {a: _folio_initialiser(a, subs[i]) for i, a in enumerate(ACTORS[n])}

    return setup


def _folio_initialiser(actor: str, sub: Page):
    async def body(k: Kernel, st: LockRun) -> None:
        won = await folio_try_hugetlb_mte_tagging(k, sub)
        st.won[actor] = won
        st.at_return[actor] = (folio_test_hugetlb_mte_tagged(k, sub), tags_valid(st))
        if won:
            st.owners.add(actor)
            st.inits += 1
            await k.sched.point("test:clear")
            for p in st.pages:
                mte_clear_page_tags(k, p)
            await k.sched.point("test:set")
            folio_set_hugetlb_mte_tagged(k, sub)
            st.owners.discard(actor)

    return body


STG_TAG = 5


def sync_then_stg_scenario(n: int):
    """Race 2.3(b): process ``a`` maps a MAP_SHARED page tagged and STGs; the others only map it tagged.

    Each context runs ``set_pte_at`` -> ``mte_sync_tags``; ``a`` then stores
    tag 5 over the page, as a process does right after its fault. A correct
    kernel never loses that store, whatever the others' mprotect(PROT_MTE) does.
    """

    def setup(k: Kernel):
        page = k.alloc.alloc_page()
        st = LockRun(page=page, pages=[page], inits=None)
        bodies = {a: _sync_only(a) for a in ACTORS[n]}
        bodies["a"] = _sync_then_stg("a")
        return st, bodies

    return setup


def _sync_only(actor: str):
    async def body(k: Kernel, st: LockRun) -> None:
        await mte_sync_tags(k, st.page)  # set_pte_at of a tagged PTE (mprotect(PROT_MTE))
        st.at_return[actor] = (page_mte_tagged(k, st.page), tags_valid(st))

    return body


def _sync_then_stg(actor: str):
    async def body(k: Kernel, st: LockRun) -> None:
        await mte_sync_tags(k, st.page)
        st.at_return[actor] = (page_mte_tagged(k, st.page), tags_valid(st))
        write_tags(k, st.page, 0, bytes([STG_TAG]) * 256)  # the process's STG after the fault
        st.last_writer_tag = STG_TAG

    return body


def tag_lost(run) -> bool:
    """The page no longer holds the tags process ``a`` stored."""
    return bytes(run.state.page.tags) != bytes([STG_TAG]) * 256


# ---- tests -----------------------------------------------------------------------


class TestLockHelpersSequential:
    """The helpers of asm/mte.h, one context, no contention."""

    async def test_try_on_new_page_wins_and_locks(self):
        """A fresh page goes UNINIT -> LOCKED on try (True) and -> TAGGED on set."""
        k = Kernel()
        page = k.alloc.alloc_page()
        assert tag_state(page) == "UNINIT"
        assert await try_page_mte_tagging(k, page) is True
        assert tag_state(page) == "LOCKED" and page.flags == PG_mte_lock
        assert not page_mte_tagged(k, page)
        set_page_mte_tagged(k, page)
        assert tag_state(page) == "TAGGED" and page_mte_tagged(k, page)

    async def test_try_on_tagged_page_returns_false_at_once(self):
        """try on a TAGGED page returns False without waiting and without changing state."""
        k = Kernel()
        page = k.alloc.alloc_page()
        assert await try_page_mte_tagging(k, page)
        set_page_mte_tagged(k, page)
        flags = page.flags
        assert await try_page_mte_tagging(k, page) is False
        assert page.flags == flags

    async def test_tag_state_names(self):
        """tag_state names the four (PG_mte_lock, PG_mte_tagged) states of reference section 2.2."""
        k = Kernel()
        page = k.alloc.alloc_page()
        for flags, name in ((0, "UNINIT"), (PG_mte_lock, "LOCKED"), (PG_mte_lock | PG_mte_tagged, "TAGGED"),
                            (PG_mte_tagged, "TAGGED")):
            page.flags = flags
            assert tag_state(page) == name

    async def test_free_resets_both_bits(self):
        """Freeing a page clears PG_mte_tagged and PG_mte_lock, so the next owner initialises again."""
        k = Kernel()
        page = k.alloc.alloc_page()
        assert await try_page_mte_tagging(k, page)
        set_page_mte_tagged(k, page)
        k.alloc.free_page(page)
        again = k.alloc.alloc_page()
        assert again is page and tag_state(again) == "UNINIT"
        assert await try_page_mte_tagging(k, again) is True

    async def test_free_keeps_stale_tags(self):
        """The allocator never clears tag memory: a reused frame holds its previous owner's tags."""
        k = Kernel()
        page = k.alloc.alloc_page()
        write_tags(k, page, 0, bytes([9]) * 256)
        k.alloc.free_page(page)
        again = k.alloc.alloc_page()
        assert again is page and bytes(again.tags) == bytes([9]) * 256

    async def test_boot_tags_are_garbage(self):
        """A never-initialised frame holds nonzero stale tags (so stale-tag bugs are visible)."""
        k = Kernel()
        page = k.alloc.alloc_page()
        assert bytes(page.tags) != ZERO_TAGS and all(1 <= t <= 15 for t in page.tags)

    async def test_folio_flags_live_on_the_head_only(self):
        """folio_try/set through a tail page change only the head's flags."""
        k = Kernel()
        head = k.alloc.alloc_hugetlb_folio()
        tail = head.subpages[7]
        assert await folio_try_hugetlb_mte_tagging(k, tail) is True
        assert head.flags == PG_mte_lock and tail.flags == 0
        folio_set_hugetlb_mte_tagged(k, tail)
        assert head.flags == PG_mte_lock | PG_mte_tagged
        assert all(p.flags == 0 for p in head.subpages[1:])
        assert folio_test_hugetlb_mte_tagged(k, tail)
        assert await folio_try_hugetlb_mte_tagging(k, head.subpages[300]) is False

    async def test_page_helpers_warn_on_hugetlb(self):
        """Each page_* helper warns once when given a hugetlb page (VM_WARN_ON_ONCE)."""
        k = Kernel()
        head = k.alloc.alloc_hugetlb_folio()
        await try_page_mte_tagging(k, head.subpages[1])
        set_page_mte_tagged(k, head.subpages[1])
        page_mte_tagged(k, head.subpages[1])
        joined = " | ".join(k.warnings)
        for name in ("try_page_mte_tagging", "set_page_mte_tagged", "page_mte_tagged"):
            assert f"{name}() on a hugetlb page" in joined

    async def test_folio_test_warns_on_non_hugetlb(self):
        """folio_test_hugetlb_mte_tagged warns when given an ordinary page."""
        k = Kernel()
        page = k.alloc.alloc_page()
        folio_test_hugetlb_mte_tagged(k, page)
        assert any("non-hugetlb" in w for w in k.warnings)

    async def test_folio_try_and_set_warn_on_non_hugetlb(self):
        """folio_try_hugetlb_mte_tagging and folio_set_hugetlb_mte_tagged warn on an ordinary page, as all folio_*
        helpers do (asm/mte.h)."""
        k = Kernel()
        page = k.alloc.alloc_page()
        await folio_try_hugetlb_mte_tagging(k, page)
        assert any("folio_try_hugetlb_mte_tagging" in w for w in k.warnings), k.warnings
        folio_set_hugetlb_mte_tagged(k, page)
        assert any("folio_set_hugetlb_mte_tagged" in w for w in k.warnings), k.warnings

    async def test_waiter_outside_a_context_cannot_block(self):
        """A loser outside any controlled context would spin forever, which the scheduler reports as Deadlock."""
        from hypervisor.sched import ControlledScheduler

        k = Kernel(sched=ControlledScheduler(seed=1))
        page = k.alloc.alloc_page()
        assert await try_page_mte_tagging(k, page)
        with pytest.raises(Deadlock):
            await try_page_mte_tagging(k, page)


class TestPageLockAllInterleavings:
    """try_page_mte_tagging / set_page_mte_tagged raced by 2 and 3 contexts."""

    @pytest.mark.parametrize("n", [2, 3])
    async def test_every_interleaving_keeps_the_protocol(self, n):
        """Under every schedule: one winner, losers return after publication, one init, never LOCKED at rest."""
        runs = await explore(page_lock_scenario(n), on_decision=check_locked_has_owner)
        assert len(runs) > (10 if n == 2 else 500)  # the state space really was explored
        for run in runs:
            assert_lock_invariants(run)
        assert any(r.state.saw_locked for r in runs)  # the per-decision check was not vacuous
        # every context wins in some interleaving (no context is favoured)
        assert {a for r in runs for a, w in r.state.won.items() if w} == set(ACTORS[n])

    async def test_losers_really_wait(self):
        """Some interleaving has a loser arrive while the winner is mid-initialisation (it parks, then returns
        False)."""
        runs = await explore(page_lock_scenario(2))
        assert any(any(t.label == "try_page_mte_tagging:spin" for t in r.trace) for r in runs)

    async def test_recorded_schedules_replay_exactly(self):
        """Every explored 2-context schedule string, replayed, reproduces the same trace and winner."""
        runs = await explore(page_lock_scenario(2))
        assert len({r.schedule for r in runs}) == len(runs)  # distinct interleavings, distinct schedules
        for run in runs:
            again, _ = await run_once(page_lock_scenario(2), schedule=run.schedule)
            assert again.failure is None
            assert again.trace == run.trace
            assert again.state.won == run.state.won

    async def test_winner_that_never_sets_deadlocks_its_waiters(self):
        """Rule 1: a winner that never calls set_page_mte_tagged leaves LOCKED at rest and its waiters deadlock."""

        def setup(k):
            page = k.alloc.alloc_page()
            st = LockRun(page=page, pages=[page])

            async def forgetful(k, st):
                st.won["a"] = await try_page_mte_tagging(k, page)

            async def waiter(k, st):
                await k.sched.point("waiter:start")
                st.won["b"] = await try_page_mte_tagging(k, page)

            return st, {"a": forgetful, "b": waiter}

        runs = await explore(setup)
        deadlocked = [r for r in runs if isinstance(r.failure, Deadlock)]
        assert deadlocked and all("try_page_mte_tagging:spin" in str(r.failure) for r in deadlocked)
        for r in runs:
            assert "LOCK-LIVENESS" in invariants(r.k)

    async def test_no_tag_lock_lets_two_initialisers_in(self):
        """With ``no-tag-lock`` some 2-context interleaving has two winners and two initialisations."""
        runs = await explore(page_lock_scenario(2), bugs=["no-tag-lock"])
        broken = [r for r in runs if sum(r.state.won.values()) > 1]
        assert broken, "no-tag-lock never produced two winners"
        for r in broken:
            with pytest.raises(AssertionError):
                assert_exactly_one_winner(r.state)
            with pytest.raises(AssertionError):
                assert_initialised_once(r.state)
            assert "EXCLUSIVE-INIT" in invariants(r.k)
        # ... and the protocol still holds in the interleavings without overlap
        assert any(sum(r.state.won.values()) == 1 for r in runs)

    async def test_no_tag_lock_three_winners(self):
        """With ``no-tag-lock`` and three contexts, some interleaving lets all three initialise."""
        runs = await explore(page_lock_scenario(3), bugs=["no-tag-lock"],
                             until=lambda r: sum(r.state.won.values()) == 3)
        assert sum(runs[-1].state.won.values()) == 3 and runs[-1].state.inits == 3

    @pytest.mark.parametrize("n", [2, 3])
    async def test_flag_before_init_publishes_stale_tags(self, n):
        """With ``flag-before-init`` some loser returns False while the tags are still stale."""
        runs = await explore(page_lock_scenario(n), bugs=["flag-before-init"])
        broken = [r for r in runs if loser_saw_stale_tags(r)]
        assert broken, "flag-before-init never exposed stale tags"
        for r in broken:
            with pytest.raises(AssertionError):
                assert_losers_return_after_publish(r.state)
            assert any(v.invariant == "NO-PUBLISH-BEFORE-VALID" for v in r.k.oracle.violations)
        # without the bug, no interleaving does
        assert not any(loser_saw_stale_tags(r) for r in await explore(page_lock_scenario(n)))


class TestFolioLockAllInterleavings:
    """folio_try_hugetlb_mte_tagging / folio_set_hugetlb_mte_tagged through different subpages."""

    @pytest.mark.parametrize("n", [2, 3])
    async def test_every_interleaving_keeps_the_protocol(self, n):
        """Under every schedule the folio lock has one winner, one init of all 512 subpages, head-only flags."""
        runs = await explore(folio_lock_scenario(n), on_decision=check_locked_has_owner)
        assert len(runs) > (5 if n == 2 else 100)
        for run in runs:
            assert_lock_invariants(run)
            assert all(p.flags == 0 for p in run.state.pages[1:]), "a tail page got flags"
        assert any(r.state.saw_locked for r in runs)

    async def test_no_tag_lock_breaks_the_folio_lock(self):
        """With ``no-tag-lock`` two subpage paths both initialise the folio in some interleaving."""
        runs = await explore(folio_lock_scenario(2), bugs=["no-tag-lock"])
        assert any(r.state.inits == 2 for r in runs)

    async def test_flag_before_init_breaks_the_folio_lock(self):
        """With ``flag-before-init`` a folio loser can observe the flag before the subpages are cleared."""
        runs = await explore(folio_lock_scenario(2), bugs=["flag-before-init"])
        assert any(loser_saw_stale_tags(r) for r in runs)


class TestMteSyncTagsAllInterleavings:
    """The real caller: concurrent set_pte_at -> mte_sync_tags on one MAP_SHARED page, one STG (race 2.3(b))."""

    @pytest.mark.parametrize("n", [2, 3])
    async def test_no_written_tag_is_ever_lost(self, n):
        """Under every schedule the stored tags survive, every mapper returns with the page tagged, one init."""
        runs = await explore(sync_then_stg_scenario(n), on_decision=check_locked_has_sync_owner)
        for run in runs:
            assert run.failure is None
            assert not tag_lost(run)
            assert all(flagged for flagged, _ in run.state.at_return.values())
            assert run.state.at_return["a"][1], "process a's set_pte_at returned before the tags were zeroed"
            assert_initialised_once(run.state)
            assert_not_locked_at_rest(run.k, run.state)
            assert run.k.oracle.violations == []
        assert any(r.state.saw_locked for r in runs)

    @pytest.mark.parametrize("n", [2, 3])
    async def test_no_tag_lock_wipes_written_tags(self, n):
        """With ``no-tag-lock`` a late initialiser zeroes the tags process a already stored."""
        runs = await explore(sync_then_stg_scenario(n), bugs=["no-tag-lock"], until=tag_lost)
        r = runs[-1]
        assert tag_lost(r) and bytes(r.state.page.tags) == ZERO_TAGS
        assert {"PRESERVE-ON-MAP", "LAST-TAG-WRITTEN"} <= set(invariants(r.k))

    @pytest.mark.parametrize("n", [2, 3])
    async def test_flag_before_init_lets_a_clear_overwrite_a_store(self, n):
        """With ``flag-before-init`` process a sees the flag, stores, and another mapper's late clear wipes it."""
        runs = await explore(sync_then_stg_scenario(n), bugs=["flag-before-init"], until=tag_lost)
        r = runs[-1]
        assert tag_lost(r)
        assert "PRESERVE-ON-MAP" in invariants(r.k)
