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
    the way ``mtekvm run`` starts one, through :class:`vmm.hostlink.ProcessHost`),
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

Options: ``--seconds S`` (time per figure/baseline pair, default 2), ``--touch MiB``
(default 64), ``--json PATH`` (write the table as JSON too).
"""
