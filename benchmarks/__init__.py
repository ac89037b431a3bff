"""Benchmarks for mtekvm: ``make bench`` (``python -m benchmarks``).

Every figure is printed beside a baseline measured in the same run, on the same
machine, at the same moment, and as the ratio of the two. Absolute numbers
move with the machine and its load; the ratios are what to compare between
commits. Nothing here asserts a time: speed is reported, never tested. On a
noisy 2-core machine treat ratio changes under about 1.5x as noise (see
shared/reference/concurrency-and-transport.md for the measured transport
figures this design is built on).

How the run is set up
    A real ``python -m hypervisor`` process on a private Unix socket (started
    the way ``mtekvm run`` starts one, through :class:`mtekvm.links.ProcessHost`),
    and a baseline peer, :mod:`benchmarks.echo_server`: a separate trio process
    that answers msgpack request maps with response envelopes of the same shape
    but does no work (a small op is echoed, ``data`` is swallowed, ``size`` is
    answered with that many zero bytes). Both are driven from this process by
    the same minimal client (``LeanClient`` in ``__main__``: pack, send,
    read until one reply is unpacked), so the client's own cost is in both
    numbers and the ratio isolates what the hypervisor adds. Each pair is
    measured in alternating slices (figure, baseline, figure, baseline, ...)
    and each side reports the median of its slices, so a change in the
    machine's load hits both alike.

The figures (columns: figure, unit, value, baseline, baseline value, ratio)

1. **Small-op round trips/s** (``rpc``). ``getpid`` request/response, one at a
   time, through the hypervisor, against the same round trip to the echo
   server. Ratio = hypervisor / echo: 1.0 would mean the hypervisor's
   validation, dispatch and kernel context cost nothing beyond the transport;
   0.5 means each op costs twice a bare msgpack round trip. A second row
   writes 16 requests at once and then reads the 16 replies (pipelining on
   one connection). The echo server answers a whole read's worth of requests
   with one write; the hypervisor runs each request in its own task (its own
   kernel context) and a writer task coalesces the replies that are ready,
   so this ratio is lower than the first: it is the price of per-request
   kernel contexts.

2. **Tagged access throughput** (``access``), in granules (16 bytes) checked
   per second.

   * ``1MiB store+load, tcf sync``: a 1 MiB store and a 1 MiB load through a
     pointer whose tag matches every granule of a VM_MTE mapping, with the
     process's TCF set to sync (65536 granules checked per access; a second
     process on the same hypervisor has TCF none), against
     the same transfer with TCF none (no check; same bytes, same pages).
     Ratio near 1.0: the check is nearly free next to moving the data.
   * the same against the raw bulk baseline: 1 MiB sent to the echo server
     and 1 MiB fetched from it (bytes / 16 = "granules" moved). Ratio =
     fraction of the socket's bulk rate the modelled accesses reach.
   * ``batch``: one ``batch`` request of 1024 small accesses (a 64-byte store
     and a 64-byte load, 4 granules each, alternating), TCF sync against TCF
     none. Measures per-access overhead inside the hypervisor without a round
     trip per access.
   * ``batch`` against ``1 request per access``: the same small tagged
     accesses sent one request each (the first 256 of them per timed call),
     in granules/s as well. Ratio > 1 is the gain from batching
     (concurrency-and-transport.md: the per-message cost dominates).

3. **Hypervisor memory per MiB touched** (``memory``), in MiB of the
   hypervisor process's RSS (``/proc/PID/status`` VmRSS, after minus before)
   per MiB of guest-visible memory touched, in a mapping 16x larger than what
   is touched. Baseline: the raw bytes, 1.0 MiB per MiB; the ratio is the
   same number read as an overhead factor (the tags alone add 1/16 = 0.0625
   in the ideal: one byte per 16-byte granule). Rows: pages written with
   nonzero data (frame + data + tags), pages tagged with STG only (frame +
   tags, data left unallocated), and pages only read (they map the shared
   zero page, so this should be close to 0).

4. **Guest tagged access throughput** (``kvm``), in granules checked per
   second, on the shared hypervisor. A VMM-like ``process`` connection does
   KVM_CREATE_VM, KVM_ENABLE_CAP(ARM_MTE), mmaps 16 MiB of shared memfd,
   registers it as memslot 0 at IPA 0x40000000 and creates a vCPU; a ``vcpu``
   connection attaches to it with the token and STGs all of guest RAM with
   tag 5 (SCTLR_EL1.ATA set). Accesses arrive after the guest's stage 1, one
   segment per 4 KiB page, tagged (Normal-Tagged) and with ``ata`` true.

   * ``vcpu-batch`` of 1024 64-byte tagged loads (4 granules each, check
     sync) against the same 1024 loads sent as one ``vcpu-access`` each.
     Ratio > 1 is the gain from batching, as in figure 2.
   * the same batch against a host process's ``batch`` of the same 1024
     loads (TCF sync, a VM_MTE mapping tagged 5): ratio = guest path /
     host-process path for small accesses.
   * a 1 MiB tagged guest load (256 segments of 4 KiB, 65536 granules) with
     check sync against check none: ratio = cost of tag checking on the guest
     path (near 1.0: the check is a ``bytes`` comparison per segment).
   * the same against a host process's 1 MiB load with TCF sync (figure 2's
     process): ratio = guest path / host-process path for bulk accesses.

   The setup also asserts that a load with a wrong pointer tag takes a
   synchronous tag check fault, so a figure cannot come from a path that
   checks nothing.

5. **KVM_ARM_MTE_COPY_TAGS FROM_GUEST dump** (``kvm-dump``), in GB (10^9
   bytes) of guest RAM covered per second. A separate hypervisor booted with
   ``ram`` = max(4 GiB, 2 x guest); the VMM maps ``--dump-mib`` (1 GiB) of
   private anonymous memory as the guest's RAM; the guest STGs one 4 KiB page
   every 16 MiB (64 pages in 1 GiB) and touches nothing else. The VMM then
   dumps all of it with ``kvm-copy-tags {flags: 1}`` in 256 MiB chunks
   (16 MiB of tags per reply = ``shared.abi.MAX_IO``), checking every reply's
   length and the number of non-zero tags. Each dump is timed once (it takes
   seconds): the 1st one GUPs every untouched page for the first time, which
   maps the shared zero page in the VMM (Linux does the same for a read GUP of
   untouched anonymous memory); the 2nd one finds every PTE present.
   Baseline: the same number of tag bytes (1/16 of guest RAM: 64 MiB) fetched
   in the same chunk sizes from the echo server over the same kind of socket,
   timed before, between and after the dumps (the median), and expressed in
   the GB of guest RAM those tags stand for. Ratio = fraction of the socket's
   bulk rate the dump reaches; what is left is the per-page cost of the
   kernel model (about 3 or 4 scheduling points, each a trio checkpoint, and
   a fault-path walk per 4 KiB page).
   The RSS rows: the hypervisor's VmRSS after each dump minus before the
   first, per MiB of guest RAM (the label gives the MiB). The ideal is the
   VMM's zero-page PTEs, about 164 bytes per page (0.04 MiB per MiB, as the
   "read only" row of figure 3); the rest is the allocator keeping the freed
   16 MiB reply buffers (tags, their ``bytes`` copy, the packed message),
   which is why the 2nd dump, which creates no kernel object, still adds some.

6. Live migration (``benchmarks/migration.py``), in seconds of wall time
   as 1/s: a ``--migrate-mib`` (1 GiB) guest, MTE on, private anonymous
   RAM, of which a quarter (256 MiB) holds data written through the VMM's
   mapping and tag 5 in every granule (COPY_TAGS TO_GUEST); the rest was
   never touched. Two private hypervisor processes (two hosts) and two
   ``python -m vmm`` processes: the destination's ``migrate-incoming``,
   then the source's ``migrate-out`` over a Unix socket, timed from the
   first request to the source's reply (pre-copy, stop-and-copy, the
   destination resumed, the source VM destroyed). Baseline: the same
   bytes (256 MiB of data and its 16 MiB of tags) fetched from the echo
   server in 16 MiB messages, before and after (the faster one). Ratio =
   raw time / migration time; the goal is at least 0.5x (at most twice the
   raw time).
7. Snapshot to a file (same guest, before it migrates): ``snapshot`` with a
   ``path``, against writing the same number of bytes (data and tags) to a
   file in the same folder with plain ``write`` calls (no fsync, as the
   snapshot does none). Ratio = raw time / snapshot time.
8. Controlled runs per second (``benchmarks/runs.py``): today's in-process path against the old one,
   the floor (the same race's kernel calls with no runner or ABI: what a framework costing nothing
   would give) against today's path, and with worker processes (see that module).
9. Dynamic tag storage (``benchmarks/physmem.py``): the first STG of each of 2048 fresh PROT_MTE
   pages in an in-process kernel, in pages/s, on a ``tag-storage = "dynamic"`` host with free tag
   storage and with tag storage full of movable data (each block claim migrates it away: the cost of
   a reservation in a pressured host). Baseline: the same on a static host. Ratio below 1: slower.
   Whether the physical-memory work slowed the static path itself shows in figures 2 and 4 read
   against a run of an older tree (docs/performance.md).

Options: ``--seconds S`` (time per figure/baseline pair, default 2), ``--touch MiB``
(default 64), ``--dump-mib MiB`` (guest RAM dumped by figure 5, default 1024; 0
skips figure 5; a quick run can use 256), ``--migrate-mib MiB`` (guest RAM of
figures 6 and 7, a multiple of 64, default 1024; 0 skips them), ``--json PATH`` (write the table as
JSON too). Figures run in the order 1, 2, 4, 5, 6, 7, 3, 8, 9 (4 and 5 need the echo
server).
"""
