"""The activation store: per-sample frontier tensors of a frozen prefix, keyed by what the prefix was fed.

Keys are 128-bit BLAKE2b fingerprints of each sample's actual input to the frozen prefix (its bytes, dtype and
shape, plus any batch-wide inputs), so a changed input can never hit. A GPU input is not copied to the host to
be hashed: the row-fingerprint kernel reduces each of its rows to 128 bits on the GPU first (a single changed
bit always changes it; otherwise it is well mixed but not cryptographic), and BLAKE2b hashes those.
Optionally the user supplies sample ids instead, together with an explicit promise that inputs are
deterministic (`CacheConfig(key="sample_id", deterministic_inputs=True)`): then a sample id *is* the key, and a
changed input behind the same id would be served stale -- that is the contract the user signs.

Entries live in fixed-size chunks of preallocated tensors (CPU memory, or `CacheConfig(device=...)`, e.g. the
GPU, from which the gather-and-cast kernel serves them), one set per frozen prefix ("level") and per
per-sample shape. Memory is bounded by a byte budget; beyond it, chunks can spill to memory-mapped files in a
private temporary folder, removed when the store is garbage-collected or the process exits. A slot is entered
in the in-memory index only after its bytes are written, and the index is never persisted, so a crash leaves
nothing any process could read back as a cache entry; folders left by dead processes are removed on start.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

CHUNK_SLOTS = 256            # slots of a group's first chunk
MAX_CHUNK_BYTES = 256 << 20  # later chunks grow (half the capacity so far), up to this size: few chunks to gather
# Inputs and entries on these devices go through the Triton kernels (row fingerprint, gather-and-cast) where
# they are; tests add "cpu" to run them in Triton's interpreter.
KERNEL_DEVICES = frozenset({"cuda"})


def _available_memory(device=None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class CacheConfig:
    """Options of the activation cache (`frzcompile.optimize(..., cache=CacheConfig(...))`).

    memory_bytes: memory for entries; default a quarter of the memory available (on `device`) when the cache
        starts.
    device: where entries live: None (default) is CPU memory; e.g. "cuda" keeps them on the GPU, where serving a
        batch is one gather-and-cast kernel (no spilling then).
    spill_dir: folder in which a private subfolder of memory-mapped spill files is made (removed on exit);
        None (default) means no spilling: entries beyond the memory budget are simply not stored.
    disk_bytes: budget of the spill files.
    storage_dtype: store floating tensors in this dtype (e.g. torch.bfloat16) and cast back when serving.
        None (default) stores exact values.
    key: "input" (default): fingerprint of each sample's input; "sample_id": ids given with `fm.sample_ids(...)`.
    deterministic_inputs: must be True with key="sample_id": your promise that a sample id always comes with
        the same input (no random augmentation, fixed tokenization).
    min_hit_rate: below this hit rate, judged once samples could repeat (after the store is full, over as many
        further lookups as it holds entries; or after two passes over `dataset_size` samples), the cache turns
        itself off and says why; 0 keeps it on.
    dataset_size: number of samples the model sees per epoch (evaluation calls included), if known; lets the
        hit-rate check start earlier. Unknown, the cache estimates it from the first batch of 32 or more of a
        call with autograd on (training, not evaluation under no_grad) that a level holds whole (with shuffled
        data the level then holds about 90-99% of the epoch).
    store_deeper_after: when the frozen prefix deepens, a batch whose rows a shallower prefix's entries hold (at
        least half of them; the others run that prefix alone and are stored at its level) is served from them,
        only the newly frozen units running, and the deeper prefix's outputs are stored once it has held for this
        many epochs; 0 (the default) stores them at once: a level stored serves its own prefix from the next epoch
        and, when the prefix deepens again sooner, the deeper one's batches (MiniLM on TREC under SmartFRZ, a new
        level every 30 steps of 32-step epochs: 1.26x with 0 against 1.22x with 1 and 1.18x without the cache,
        453 MB held against 239). Batches the shallower entries hold less of, and every batch while the epoch's
        size is unknown, are stored at once.
    check_cost: time computing the frozen prefix, serving a batch and storing one, and stay off unless a batch
        stored once and served once costs less than computing it twice (the reason, with the three times, is in
        `explain` and `fm.cache.report()["decision"]`); on CPU, check again with the times measured inside the
        run after 16 stored batches (again at 32, 64... while fewer were served) and after 16 served ones, and
        turn off a call signature that does not pay; serve a batch held in part only when the store holds at
        least half of it and that costs less than computing it whole (False: always).
    verify: recompute every batch uncached and raise if a served activation differs (debugging; slow).
    watch_data: at every call, compare a content digest (the sum of each tensor's values) of the frozen prefix's
        weights and buffers and of everything else it reads: catches `.data` edits (EMA, pruning, loading weights
        through `.data`), which move no version counter. It reads those tensors once per call (the cost is
        part of the serving cost the cache measures). False trusts version counters alone.
    """

    memory_bytes: int | None = None
    spill_dir: str | None = None
    disk_bytes: int = 8 << 30
    storage_dtype: torch.dtype | None = None
    device: str | torch.device | None = None
    key: str = "input"
    deterministic_inputs: bool = False
    min_hit_rate: float = 0.2
    dataset_size: int | None = None
    store_deeper_after: float = 0.0
    check_cost: bool = True
    verify: bool = False
    watch_data: bool = True

    def __post_init__(self):
        if self.key not in ("input", "sample_id"):
            raise ConfigError(f"CacheConfig.key must be 'input' or 'sample_id', not {self.key!r}")
        if self.key == "sample_id" and not self.deterministic_inputs:
            raise ConfigError(
                "CacheConfig(key='sample_id') serves whatever was stored under an id; set "
                "deterministic_inputs=True to promise that an id always comes with the same input "
                "(no random augmentation), or keep the default key='input'"
            )
        if self.device is not None:
            self.device = torch.device(self.device)
            if self.device.type == "cpu":
                self.device = None
        if self.spill_dir is not None:
            existing = os.path.abspath(self.spill_dir)  # the path itself, or the nearest part of it that exists
            while not os.path.exists(existing) and os.path.dirname(existing) != existing:
                existing = os.path.dirname(existing)
            if not os.path.isdir(existing):
                raise ConfigError(f"spill_dir={self.spill_dir!r}: {existing!r} exists and is not a folder: give a "
                                  "folder (it is made if missing) for the cache's spill files")
        if self.device is not None and self.spill_dir is not None:
            raise ConfigError("spill_dir= spills CPU entries to disk; it cannot be combined with device="
                             f"{str(self.device)!r}")
        if self.memory_bytes is None:
            self.memory_bytes = _available_memory(self.device) // 4
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise ConfigError("CacheConfig budgets must be >= 0 bytes")
        if self.storage_dtype is not None and not self.storage_dtype.is_floating_point:
            raise ConfigError(f"storage_dtype must be a floating dtype, not {self.storage_dtype}")
        if self.storage_dtype is not None and torch.finfo(self.storage_dtype).max < 1e38:  # float32's exponent range
            raise ConfigError(f"storage_dtype={self.storage_dtype} cannot hold float32's range (activations above "
                              f"{torch.finfo(self.storage_dtype).max:g} would be served as inf): use torch.bfloat16, "
                              "which halves the bytes with float32's range")
        if not self.store_deeper_after >= 0:
            raise ConfigError(f"store_deeper_after must be >= 0 (epochs), not {self.store_deeper_after}")
        if not 0.0 <= self.min_hit_rate <= 1.0:
            raise ConfigError(f"min_hit_rate must be in [0, 1], not {self.min_hit_rate}")


def _as_bytes_rows(t: torch.Tensor) -> np.ndarray:
    """(B, nbytes) uint8 view of a batch-first tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(t.shape[0], -1).view(torch.uint8).numpy()


def _describe(value) -> bytes:
    """Bytes that identify a batch-wide (non per-sample) input: tensors by content, other values by repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()
        return f"T{t.dtype}{tuple(t.shape)}".encode() + raw
    return repr(value).encode()


def fingerprints(batch_args, shared_args=(), batch_size=None, rows=None) -> list[bytes]:
    """One 16-byte BLAKE2b digest per sample over its slice of every batch argument plus all shared arguments.
    `rows`: the batch arguments' `row_digests`, when known (they are the costly part; the shared ones differ
    between the levels a call is looked up in)."""
    context = hashlib.blake2b(digest_size=16)
    for v in shared_args:
        context.update(_describe(v))
        context.update(b"|")
    keys = []
    for row in row_digests(batch_args, batch_size) if rows is None else rows:
        h = context.copy()
        h.update(row)
        keys.append(h.digest())
    return keys


def row_digests(batch_args, batch_size=None) -> list[bytes]:
    """One 16-byte BLAKE2b digest per sample over its slice of every batch argument (on a GPU, of the
    row-fingerprint kernel's digests)."""
    headers, rows = [], []
    for t in batch_args:
        if t.device.type in KERNEL_DEVICES:
            from ..kernels.row_fingerprint import row_fingerprint

            headers.append(f"fp{t.dtype}{tuple(t.shape[1:])}".encode())
            rows.append(row_fingerprint(t.detach()).cpu().numpy().view(np.uint8))  # (B, 16)
        else:
            headers.append(f"{t.dtype}{tuple(t.shape[1:])}".encode())
            rows.append(_as_bytes_rows(t))
    n = batch_size if batch_size is not None else (rows[0].shape[0] if rows else 0)
    digests = []
    for i in range(n):
        h = hashlib.blake2b(digest_size=16)
        for header, r in zip(headers, rows):
            h.update(header)
            h.update(r[i])
        digests.append(h.digest())
    return digests


class _Chunks:
    """Slots for one level and one per-sample shape signature: one tensor per frontier output per chunk. The
    first chunk has `slots` slots and each next one half the capacity so far (at least `slots`, at most
    MAX_CHUNK_BYTES; smaller when the budget leaves less), so a large dataset's entries sit in a few chunks
    (serving a batch costs one gather and one copy per chunk it touches and output), and a level reserves at
    most half again what it holds (plus one first chunk)."""

    def __init__(self, sample_shapes, dtypes, slots=CHUNK_SLOTS):
        self.first = slots
        self.sample_shapes = sample_shapes
        self.dtypes = dtypes
        self.chunks = []        # list of [tensor per output]
        self.on_disk = []       # whether chunk i is a memory-mapped file
        self.sizes = []         # slots of chunk i
        self.starts = []        # the first slot of chunk i
        self.used = 0
        self.bytes_per_slot = sum(int(np.prod(s)) * torch.empty((), dtype=d).element_size()
                                  for s, d in zip(sample_shapes, dtypes))

    def capacity(self):
        return self.starts[-1] + self.sizes[-1] if self.sizes else 0

    def next_sizes(self) -> list:
        """Slot counts to try for the next chunk, largest first, down to the first chunk's."""
        cap = max(self.first, MAX_CHUNK_BYTES // max(self.bytes_per_slot, 1))
        size = min(cap, max(self.first, self.capacity() // 2))
        sizes = []
        while size > self.first:
            sizes.append(size)
            size //= 2
        return sizes + [self.first]

    def add(self, tensors, size, on_disk):
        self.starts.append(self.capacity())
        self.sizes.append(size)
        self.chunks.append(tensors)
        self.on_disk.append(on_disk)

    def locate(self, slot) -> tuple:
        """(chunk, offset in it) of a slot."""
        chunk = bisect.bisect_right(self.starts, slot) - 1
        return chunk, slot - self.starts[chunk]


class Level:
    """Entries for one frozen prefix: the frontier tensors it hands to the trainable code, per sample."""

    def __init__(self, prefix, weights_version):
        self.prefix = tuple(prefix)
        self.weights_version = weights_version
        self.index: dict = {}       # key -> (shape signature, slot)
        self.groups: dict = {}      # shape signature -> _Chunks
        self.shared: dict = {}      # shapes + batch-wide inputs -> batch-independent outputs (e.g. masks)
        self.full = False
        self.used_at = 0            # the store's clock when it was last read or written (eviction order)


class ActivationStore:
    def __init__(self, config: CacheConfig, chunk_slots: int = CHUNK_SLOTS):
        self.config = config
        self.chunk_slots = chunk_slots
        self.levels: dict = {}      # prefix tuple -> Level
        self.memory_used = 0
        self.disk_used = 0
        self.spill_files = 0
        self._spill_dir = None
        self._finalizer = None
        self._clock = 0             # counts reads and writes: Level.used_at

    # -- levels ------------------------------------------------------------------------------------------
    def level(self, prefix, weights_version) -> Level:
        lvl = self.levels.get(tuple(prefix))
        if lvl is not None and lvl.weights_version != weights_version:
            self.drop(lambda p: set(p) >= set(prefix))  # frozen weights changed under this level
            lvl = None
        if lvl is None:
            lvl = self.levels[tuple(prefix)] = Level(prefix, weights_version)
        return lvl

    def drop(self, predicate) -> int:
        """Remove every level whose prefix satisfies `predicate`; returns how many entries went."""
        gone = 0
        for prefix in [p for p in self.levels if predicate(p)]:
            lvl = self.levels.pop(prefix)
            gone += len(lvl.index)
            for group in lvl.groups.values():
                for slots, disk in zip(group.sizes, group.on_disk):
                    size = slots * group.bytes_per_slot
                    if disk:
                        self.disk_used -= size
                    else:
                        self.memory_used -= size
        return gone

    def entries(self) -> int:
        return sum(len(lvl.index) for lvl in self.levels.values())

    def least_recently_used(self, but) -> list:
        """The prefixes of the levels other than `but`, least recently read or written first: the order in which
        they make room. (After a deepening a shallower level keeps serving the deeper prefix: it is the last to go,
        not the first.)"""
        return sorted((p for p in self.levels if p != tuple(but)), key=lambda p: self.levels[p].used_at)

    def _touch(self, lvl: Level) -> None:
        self._clock += 1
        lvl.used_at = self._clock

    # -- slots -------------------------------------------------------------------------------------------
    def _new_chunk(self, lvl: Level, group: _Chunks):
        """Add a chunk to `group` of `lvl`: the largest of its next sizes that fits in memory (evicting other
        levels, least recently used first, only when not even the smallest does), else whatever room the memory
        budget has left, else on disk; False when none fits."""
        sizes = group.next_sizes()

        def fits(slots):
            return self.memory_used + slots * group.bytes_per_slot <= self.config.memory_bytes

        if not fits(sizes[-1]):
            for victim in self.least_recently_used(but=lvl.prefix):
                self.drop(lambda prefix: prefix == victim)  # noqa: B023 (called at once)
                if fits(sizes[-1]):
                    break
        rest = (self.config.memory_bytes - self.memory_used) // max(group.bytes_per_slot, 1)
        for slots in sizes + [rest]:  # the last try fills what the budget has left
            if slots > 0 and fits(slots):
                group.add([torch.empty((slots,) + s, dtype=d, device=self.config.device)
                           for s, d in zip(group.sample_shapes, group.dtypes)], slots, False)
                self.memory_used += slots * group.bytes_per_slot
                return True
        if self.config.spill_dir is not None:
            for slots in sizes:
                if self.disk_used + slots * group.bytes_per_slot <= self.config.disk_bytes:
                    group.add(self._spill_chunk(group, slots), slots, True)
                    self.disk_used += slots * group.bytes_per_slot
                    return True
        return False

    def _spill_chunk(self, group: _Chunks, slots: int):
        if self._spill_dir is None:
            os.makedirs(self.config.spill_dir, exist_ok=True)
            _remove_dead_spill_dirs(self.config.spill_dir)
            self._spill_dir = tempfile.mkdtemp(prefix=f"frzcache-{os.getpid()}-", dir=self.config.spill_dir)
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        tensors = []
        for s, d in zip(group.sample_shapes, group.dtypes):
            nbytes = slots * int(np.prod(s)) * torch.empty((), dtype=d).element_size()
            path = os.path.join(self._spill_dir, f"chunk{self.spill_files:06d}.bin")
            self.spill_files += 1
            mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(nbytes, 1),))
            tensors.append(torch.from_numpy(mm)[:nbytes].view(d).reshape((slots,) + s))
        return tensors

    def close(self):
        """Free every entry and remove spill files now (a later spill makes a new folder)."""
        self.drop(lambda p: True)
        if self._finalizer is not None:
            self._finalizer()
        self._spill_dir, self._finalizer, self.spill_files = None, None, 0

    @property
    def spill_path(self):
        return self._spill_dir

    def put(self, lvl: Level, keys, outputs) -> int:
        """Store per-sample rows of `outputs` (batch-first tensors) under `keys`, making room by dropping other
        levels, least recently used first, when the budget is spent; returns how many were stored."""
        self._touch(lvl)
        if lvl.full:
            return 0
        sdt = self.config.storage_dtype
        stored_dtypes = tuple(sdt if (sdt is not None and o.is_floating_point()) else o.dtype for o in outputs)
        sig = tuple(tuple(o.shape[1:]) for o in outputs) + stored_dtypes
        group = lvl.groups.get(sig)
        if group is None:
            group = lvl.groups[sig] = _Chunks(tuple(tuple(o.shape[1:]) for o in outputs), stored_dtypes,
                                              self.chunk_slots)
        fresh, seen = [], set()  # rows to store: the first of each key not stored yet
        for row, key in enumerate(keys):
            if key not in lvl.index and key not in seen:
                seen.add(key)
                fresh.append(row)
        stored = 0
        while stored < len(fresh):  # one copy per output for each run of slots in one chunk, not one per row
            if group.used >= group.capacity() and not self._new_chunk(lvl, group):
                lvl.full = True
                break
            chunk, offset = group.locate(group.used)
            rows = fresh[stored:stored + group.sizes[chunk] - offset]
            n = len(rows)
            index = None if rows[-1] - rows[0] == n - 1 else torch.tensor(rows)  # None: a contiguous block
            for dest, o in zip(group.chunks[chunk], outputs):
                src = o[rows[0]:rows[0] + n] if index is None else o.index_select(0, index.to(o.device))
                dest[offset:offset + n].copy_(src)
            for j, row in enumerate(rows):
                lvl.index[keys[row]] = (sig, group.used + j)  # indexed only once written
            group.used += n
            stored += n
        return stored

    def get(self, lvl: Level, keys, rows, out_tensors) -> None:
        """Copy the entries for `keys` into `out_tensors` at batch positions `rows` (distinct; cast back if
        needed). Per shape group and output: one gather per chunk touched, into a buffer in chunk order, then
        one placement of the buffer's rows (a gather in the batch's order when `rows` are a run of positions, a
        batch served whole; else one index_copy_, which on a CPU costs about 4x a gather per byte)."""
        self._touch(lvl)
        by_group: dict = {}
        for key, row in zip(keys, rows):
            sig, slot = lvl.index[key]
            by_group.setdefault(sig, ([], []))
            by_group[sig][0].append(slot)
            by_group[sig][1].append(row)
        for sig, (slots, dst_rows) in by_group.items():
            group = lvl.groups[sig]
            slots = np.asarray(slots, dtype=np.int64)
            starts = np.asarray(group.starts, dtype=np.int64)
            chunk_of = np.searchsorted(starts, slots, side="right") - 1
            order = np.argsort(chunk_of, kind="stable")
            chunk_of, local = chunk_of[order], torch.from_numpy(slots[order] - starts[chunk_of[order]])
            cuts = [0, *(np.flatnonzero(np.diff(chunk_of)) + 1).tolist(), len(order)]
            dst_rows = np.asarray(dst_rows, dtype=np.int64)[order]
            first = int(dst_rows.min())
            run = int(dst_rows.max()) - first == len(dst_rows) - 1  # rows first..first+n-1, in some order
            in_order = run and bool((np.diff(dst_rows) > 0).all())
            place = None if in_order else torch.from_numpy(np.argsort(dst_rows) if run else dst_rows)
            for j, dst in enumerate(out_tensors):
                span = dst[first:first + len(dst_rows)] if run else None
                direct = in_order and dst.is_contiguous()  # gather straight into place
                buf = span if direct else torch.empty((len(dst_rows),) + tuple(dst.shape[1:]), dtype=dst.dtype,
                                                      device=dst.device)
                for a, b in zip(cuts, cuts[1:]):
                    src, idx = group.chunks[int(chunk_of[a])][j], local[a:b]
                    if src.device == dst.device and src.dtype == dst.dtype:
                        torch.index_select(src, 0, idx.to(src.device), out=buf[a:b])
                    else:
                        buf[a:b].copy_(_gather_cast(src, idx, dst))
                if direct:
                    continue
                if in_order:
                    span.copy_(buf)
                elif run and dst.is_contiguous():  # buf holds the rows in chunk order: gather them into place
                    torch.index_select(buf, 0, place.to(buf.device), out=span)
                elif run:
                    span.copy_(buf.index_select(0, place.to(buf.device)))
                else:
                    dst.index_copy_(0, place.to(dst.device), buf)


def _gather_cast(src: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rows `index` of `src` in `like`'s dtype and on its device: the gather-and-cast kernel when the entries
    already live on a GPU, else gather where they are, move, then cast."""
    if src.device == like.device and src.device.type in KERNEL_DEVICES:
        from ..kernels.gather_cast import gather_cast

        return gather_cast(src, index.to(src.device), like.dtype)
    return src.index_select(0, index).to(like.device).to(like.dtype)


def _remove_dead_spill_dirs(folder: str) -> None:
    """Spill folders of processes that no longer run (crashed before cleaning up) are removed unread."""
    for name in os.listdir(folder):
        if not name.startswith("frzcache-"):
            continue
        try:
            pid = int(name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue
