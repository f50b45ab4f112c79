"""The crossing point between parties: what may cross (``WIRE_KINDS``), and ``Wire``, through which every tensor
that leaves a party goes.

``Wire.exchange(kind, layer, send, send_splits, recv_splits)`` refuses any kind not in WIRE_KINDS, counts and
logs the bytes, applies the defences (clip and noise, ``PrivacyConfig``) to rows bound for other parties, packs
the ``*_fp8`` kinds (e4m3 with a per-row scale) and runs one ``all_to_all_single``; the ``Transfer`` it returns
unpacks on arrival and shows what arrived to the wire's observer. Three things ride on that one point:

- ``Tape``: a checkpointed block's recompute replays what its forward received instead of exchanging again, so
  no row crosses twice (and never with fresh noise); the recompute is local work only.
- ``ExchangeTimer``: per exchange, the compute the GPU queued between launch and wait (the window the transfer
  can hide behind) and the time it then stalled waiting (exposed communication), from CUDA events on the
  compute stream (host time on CPUs).
- ``observer``: an evaluation sees every tensor that arrives, as it arrived.

The defences draw from generators seeded by this party's secret (drawn from the OS, never derived from the
shared config, so no other party can reproduce them): the noise, and the secret order in which a dispatch's rows
cross (``permutation``, used by protocol.DistributedExperts). ``state_dict`` holds the secret and the generators'
states: a party's checkpoint carries them, so a resumed run continues both streams where they stopped.

With one party nothing crosses: exchanges return what was sent.
"""

import json
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .config import PrivacyConfig
from .rng import seeded
from .transport import Transport, TorchTransport

__all__ = ["WIRE_KINDS", "TRAINING_KINDS", "CONTROL_KINDS", "EXPORT_KINDS", "FP8_MAX", "WireEntry", "WireLog", "Wire",
           "Observer", "Transfer", "Tape", "ExchangeTimer", "clip_and_noise", "pack_fp8", "unpack_fp8"]

# What crosses between parties in training and evaluation (docs/privacy.md says what each reveals).
TRAINING_KINDS = (
    "splits",  # int64 [2] per peer and layer: the rows and the (token, expert) pairs it sends that peer
    "hidden",  # dispatched hidden states, origin -> host: one row per (token, host), or per pair (wire.dispatch)
    "hidden_fp8",  # the same rows as e4m3 bytes plus each row's fp32 scale (wire.hidden_dtype=fp8)
    "expert_mask",  # uint8 bitmask per dispatched row: which of the host's local experts the row picked
    "routing_weights",  # fp32, one per pair, origin -> host: only with wire.combine=host
    "output",  # expert outputs, host -> origin: one row per pair, or per (token, host) with wire.combine=host
    "output_grad",  # gradients of those outputs, origin -> host
    "output_grad_fp8",  # the same rows as e4m3 bytes plus scale (wire.grad_dtype=fp8)
    "routing_weights_grad",  # fp32, one per pair, host -> origin: only with wire.combine=host
    "hidden_grad",  # gradients of the dispatched rows, host -> origin: one per dispatched row
    # Control rows, int64, the same to every party (Wire.share; lockstep.py): numbers about the run, never data
    "handshake",  # at start: protocol version, per-option digests of the configuration, checkpoint steps held
    "health",  # every step: the step, which of loss / backbone / expert gradients are non-finite, last step saved
)
CONTROL_KINDS = ("handshake", "health")  # the training kinds that carry no model traffic

# What crosses only when the parties opt in to pool their experts at export (`pcmoe export --pool`, export.py).
EXPORT_KINDS = (
    "expert_weights",  # a party's routed experts' weights, one row per expert and MoE layer, to every other party
)
# What may cross between parties, and nothing else.
WIRE_KINDS = TRAINING_KINDS + EXPORT_KINDS

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def pack_fp8(rows: torch.Tensor) -> torch.Tensor:
    """[R, H] float rows -> [R, H + 4] uint8: each row in e4m3 scaled so its largest magnitude is 448, then the
    row's fp32 scale as 4 bytes. Relative error per element <= 2^-4, plus 2^-10 of the scale near zero."""
    rows32 = rows.float().contiguous()  # (a gradient may arrive expanded: viewing it as bytes needs real strides)
    scale = rows32.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    quantized = (rows32 / scale).to(torch.float8_e4m3fn)
    scale_bytes = scale.reshape(-1).contiguous().view(torch.uint8).view(-1, 4)  # [R, 1] may have stride 0 there
    return torch.cat([quantized.view(torch.uint8), scale_bytes], dim=1)


def unpack_fp8(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``pack_fp8``: [R, H + 4] uint8 -> [R, H] in ``dtype``."""
    quantized = packed[:, :-4].contiguous().view(torch.float8_e4m3fn)
    scale = packed[:, -4:].contiguous().view(torch.float32)
    return (quantized.float() * scale).to(dtype)


def clip_and_noise(rows: torch.Tensor, clip: float, noise: float, generator: torch.Generator | None,
                   copies: torch.Tensor | None = None) -> torch.Tensor:
    """Each row scaled to L2 norm <= clip, plus N(0, (noise * clip)^2) per coordinate (the Gaussian mechanism
    on rows of bounded norm), in the rows' dtype; clip = 0: the median norm of these rows (scale-free).

    ``copies``: for each row, the index of the first row of its group, where the rows of a group are positive
    multiples of one vector (one token's rows to one host: a pair dispatch's identical copies, the output
    gradients w_j * g of its pairs). Such a group is defended once: its largest row is clipped and noised, and
    each row crosses as its share (its norm over the largest) of that one result, so the copies never carry
    independent noise that a host could average away."""
    if rows.shape[0] == 0:
        return rows
    rows32 = rows.float()
    norm = rows32.norm(dim=-1, keepdim=True)
    share = None
    if copies is not None:
        top = norm.new_zeros(norm.shape[0]).scatter_reduce(0, copies, norm[:, 0], "amax", include_self=False)
        top = top[copies, None]
        share = torch.where(top > 0, norm / top, 0.0)
        direction = rows32.new_zeros(rows32.shape).index_add_(0, copies, rows32)[copies]
        rows32 = direction * (top / direction.norm(dim=-1, keepdim=True)).nan_to_num(posinf=0.0)
        norm = top
    if clip == 0:
        clip = norm.median()
    noisy = rows32 * (clip / norm).clamp(max=1.0)  # a zero row's inf clamps to 1
    if noise > 0:
        draw = torch.randn(rows.shape, generator=generator, device=rows.device)
        noisy = noisy + (draw if copies is None else draw[copies]) * (noise * clip)
    return (noisy if share is None else noisy * share).to(rows.dtype)


@dataclass
class WireEntry:
    """One transfer between two parties, as the audit sees it."""
    kind: str
    layer: int
    shape: tuple[int, ...]
    dtype: str
    bytes: int
    src: int
    dst: int


class WireLog:
    """Every transfer a party sends or receives (one entry per other party and direction, empty ones
    included); kept in memory, or written as JSON lines to ``path``."""

    def __init__(self, path=None):
        self.entries: list[WireEntry] = []
        self._file = open(path, "a", buffering=1) if path is not None else None

    def record(self, entry: WireEntry) -> None:
        if self._file is None:
            self.entries.append(entry)
        else:
            self._file.write(json.dumps(asdict(entry)) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


class ExchangeTimer:
    """Per exchange: bytes sent and received, the compute queued between its launch and its wait (``window_s``,
    what the transfer can hide behind) and how long the compute stream then stalled on it (``exposed_s``).
    CUDA events on the current stream (read by ``collect``, which synchronises), host clocks on CPUs.
    ``host_blocked_s``: how long the host waited on the device to read split sizes (``host_sync``). A party whose
    host is the slowest waits least there, since its device is never ahead of it: which party a run waits for."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.records: list[dict] = []
        self.host_blocked_s = 0.0

    def host_sync(self, read: Callable):
        """``read()``, a read of device values that blocks the host until they are there; its wall time counted."""
        start = time.perf_counter()
        value = read()
        self.host_blocked_s += time.perf_counter() - start
        return value

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def launched(self, kind: str, layer: int, sent: int, received: int) -> dict:
        record = {"kind": kind, "layer": layer, "bytes_sent": sent, "bytes_received": received,
                  "marks": [self._mark()]}
        self.records.append(record)
        return record

    def wait(self, record: dict, work) -> None:
        record["marks"].append(self._mark())
        work.wait()
        record["marks"].append(self._mark())

    def collect(self) -> list[dict]:
        """The exchanges since the last collect, with their window and exposed seconds."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for r in self.records:
            launch, before, after = r.pop("marks")
            span = (lambda a, b: a.elapsed_time(b) / 1e3) if self.cuda else (lambda a, b: b - a)
            out.append({**r, "window_s": span(launch, before), "exposed_s": span(before, after)})
        self.records = []
        return out


class Transfer:
    """A tensor on its way in: ``wait()`` returns it once it has arrived, unpacked (the first wait shows it to
    ``arrived``). What crossed stays packed here: a tape that keeps the transfer keeps fp8 bytes, and each wait
    unpacks them again, bitwise the same."""

    def __init__(self, tensor: torch.Tensor, work=None, unpack: Callable | None = None,
                 arrived: Callable | None = None, timer: ExchangeTimer | None = None, record: dict | None = None,
                 sent: torch.Tensor | None = None):
        self.tensor, self.work, self.unpack, self.arrived, self.timer, self.record = (
            tensor, work, unpack, arrived, timer, record)
        self.sent = sent  # a defended kind's rows as the hosts decode them (clipped, noised; fp8 and back)
        self.done = work is None and arrived is None

    def wait(self) -> torch.Tensor:
        if not self.done:
            if self.work is not None:
                self.timer.wait(self.record, self.work) if self.timer is not None else self.work.wait()
            if self.arrived is not None:
                self.arrived(self.unpack(self.tensor) if self.unpack is not None else self.tensor)
            self.done = True
        return self.unpack(self.tensor) if self.unpack is not None else self.tensor


class Tape:
    """What one checkpointed block received in its forward, in order. Recording, ``keep(make)`` runs ``make``
    and keeps its result; replaying (the recompute in backward), it returns the kept results in the same order
    and runs nothing: no exchange, no traffic, the same values bitwise."""

    def __init__(self):
        self.items: list = []
        self.replaying = False
        self._next = 0
        self._inside = False  # a keep inside a kept make() is part of that item: replaying it runs neither

    def keep(self, make: Callable):
        if not self.replaying:
            if self._inside:
                return make()
            self._inside = True
            try:
                item = make()
            finally:
                self._inside = False
            self.items.append(item)
            return item
        if self._next >= len(self.items):
            raise RuntimeError("a checkpointed block's recompute exchanged more than its forward did: the "
                               "recompute must repeat the forward exactly")
        item = self.items[self._next]
        self._next += 1
        if self._next == len(self.items):  # replayed in full: free what crossed as soon as it is used
            self.items, self._next = [], 0
        return item


# observer(kind, layer, received, recv_splits): the rows that arrived, from each party in party order.
Observer = Callable[[str, int, torch.Tensor, list[int]], None]


class Wire:
    """A party's link to the others: the transport that carries the rows (default: torch.distributed over
    ``group``, None for the default process group; transport.py), its traffic counters, an optional WireLog, the
    defences on what it sends (``privacy``; ``secret`` seeds this party's noise and row order, None: drawn from
    the OS), an optional ``observer`` shown every tensor that arrives, an optional ``timer`` (ExchangeTimer) and
    the ``tape`` of the checkpointed block being run, if any."""

    def __init__(self, party: int = 0, parties: int = 1, group=None, log: WireLog | None = None,
                 privacy: PrivacyConfig | None = None, secret: int | None = None, observer: Observer | None = None,
                 transport: Transport | None = None):
        self.party, self.parties, self.log, self.observer = party, parties, log, observer
        self.transport = transport if transport is not None else TorchTransport(group)
        self.timer: ExchangeTimer | None = None
        self.tape: Tape | None = None
        self.bytes_sent = dict.fromkeys(WIRE_KINDS, 0)
        self.bytes_received = dict.fromkeys(WIRE_KINDS, 0)
        privacy = privacy or PrivacyConfig()
        defences = (("hidden", privacy.hidden_clip, privacy.hidden_noise or 0.0),
                    ("output_grad", privacy.grad_clip, privacy.grad_noise or 0.0))
        self.defences = {kind: (clip, noise) for kind, clip, noise in defences if clip > 0 or noise > 0}
        self.shuffle = privacy.shuffle and parties > 1
        self.secret = secrets.randbits(63) if secret is None else secret
        self._generators: dict[tuple[str, str], torch.Generator] = {}  # (purpose, device) -> generator

    def _generator(self, purpose: str, device: torch.device) -> torch.Generator:
        """This party's secret generator for ``purpose`` ("noise", "order") on ``device`` (a stream of its own per
        device: a run resumed on another device does not replay the first one's)."""
        key = (purpose, str(device))
        if key not in self._generators:
            seed = seeded(self.secret, *key).initial_seed()
            self._generators[key] = torch.Generator(device).manual_seed(seed)
        return self._generators[key]

    def state_dict(self) -> dict:
        """The secret and where each generator stands: a resumed run draws on from there, bitwise as if it had
        never stopped, and never reuses noise or an order it has drawn before."""
        return {"secret": self.secret,
                "generators": {f"{purpose}@{device}": g.get_state()
                               for (purpose, device), g in self._generators.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.secret = state["secret"]
        self._generators = {}
        for key, generator_state in state["generators"].items():
            purpose, _, device = key.partition("@")
            self._generator(purpose, torch.device(device)).set_state(generator_state.cpu())

    def defends(self, kind: str) -> bool:
        """Whether rows of ``kind`` (or its fp8 form) are clipped or noised before they leave."""
        return kind.removesuffix("_fp8") in self.defences

    def permutation(self, owner: torch.Tensor) -> torch.Tensor:
        """A fresh secret order of rows grouped by destination (``owner``, ascending): a uniformly random
        permutation within each destination's block, from this party's order generator."""
        keys = torch.rand(owner.shape, dtype=torch.float64, generator=self._generator("order", owner.device),
                          device=owner.device)
        return (owner.double() + keys).argsort()

    def kept(self, make: Callable):
        """``make()``, kept on the tape of the checkpointed block being run (and replayed in its recompute)."""
        return make() if self.tape is None else self.tape.keep(make)

    def _defend(self, kind: str, send: torch.Tensor, send_splits: list[int], copies: torch.Tensor | None
                ) -> torch.Tensor:
        """The rows bound for other parties, clipped and noised (``copies``: see clip_and_noise); the party's own
        rows as they are."""
        clip, noise = self.defences[kind]
        start = sum(send_splits[:self.party])
        away = torch.ones(send.shape[0], dtype=torch.bool, device=send.device)
        away[start:start + send_splits[self.party]] = False
        if copies is not None:  # indices into the rows that leave (a group never spans two destinations)
            copies = (away.cumsum(0) - 1)[copies[away]]
        defended = send.clone()
        defended[away] = clip_and_noise(send[away], clip, noise, self._generator("noise", send.device), copies)
        return defended

    def exchange(self, kind: str, layer: int, send: torch.Tensor, send_splits: list[int],
                 recv_splits: list[int], async_op: bool = False, copies: torch.Tensor | None = None,
                 keep_sent: bool = False) -> Transfer:
        """THE crossing point: rows ``send[sum(send_splits[:p]):...]`` go to party p, rows from each party
        arrive in party order. Rows a party keeps for itself are copied locally and count as no traffic. A
        ``*_fp8`` kind takes float rows and arrives as float rows of the same dtype; e4m3 bytes cross.
        ``copies``: for a defended kind, the first row of each row's group of copies (clip_and_noise).
        ``keep_sent``: for a defended kind, keep the rows as the receivers decode them in ``Transfer.sent``.
        Inside a checkpointed block's recompute, returns what the forward received."""
        if kind not in WIRE_KINDS:
            raise ValueError(f"{kind!r} may not cross between parties; allowed: {', '.join(WIRE_KINDS)}")
        replaying = self.tape is not None and self.tape.replaying
        transfer = self.kept(lambda: self._exchange(kind, layer, send, send_splits, recv_splits, async_op, copies,
                                                    keep_sent))
        # A replay hands out a new tensor object (on the same memory, or unpacked anew from the same bytes): the
        # forward's tensor keeps its autograd history.
        return Transfer(transfer.wait().detach(), sent=transfer.sent) if replaying else transfer

    def _exchange(self, kind, layer, send, send_splits, recv_splits, async_op, copies, keep_sent) -> Transfer:
        base = kind.removesuffix("_fp8")
        defended = self.parties > 1 and base in self.defences
        if defended:
            send = self._defend(base, send, send_splits, copies)
        decoded = send if defended and keep_sent else None
        unpack = None
        if kind != base:
            row_dtype = send.dtype
            send = pack_fp8(send)
            unpack = lambda packed: unpack_fp8(packed, row_dtype)  # noqa: E731
            decoded = unpack(send) if decoded is not None else None
        row_shape = tuple(send.shape[1:])
        row_bytes = math.prod(row_shape) * send.element_size()
        sent = sum(send_splits[p] for p in range(self.parties) if p != self.party) * row_bytes
        received = sum(recv_splits[p] for p in range(self.parties) if p != self.party) * row_bytes
        self.bytes_sent[kind] += sent
        self.bytes_received[kind] += received
        if self.log is not None:
            dtype = str(send.dtype).removeprefix("torch.")
            for other in range(self.parties):
                if other != self.party:
                    self.log.record(WireEntry(kind, layer, (send_splits[other], *row_shape), dtype,
                                              send_splits[other] * row_bytes, self.party, other))
                    self.log.record(WireEntry(kind, layer, (recv_splits[other], *row_shape), dtype,
                                              recv_splits[other] * row_bytes, other, self.party))
        if self.parties == 1:
            return Transfer(send, None, unpack, sent=decoded)
        send = send.contiguous()
        recv = send.new_empty((sum(recv_splits), *row_shape))
        record = self.timer.launched(kind, layer, sent, received) if self.timer is not None else None
        work = self.transport.all_to_all_single(recv, send, recv_splits, send_splits, async_op=True)
        observer = self.observer
        arrived = (lambda rows: observer(kind, layer, rows, recv_splits)) if observer is not None else None
        transfer = Transfer(recv, work, unpack, arrived, self.timer, record, decoded)
        if not async_op:
            transfer.wait()
        return transfer

    def share(self, kind: str, row: torch.Tensor, lengths: list[int] | None = None) -> list[torch.Tensor]:
        """Send the same 1-D control ``row`` to every party; returns every party's row, in party order.
        ``lengths``: each party's row length, when they differ (default: all as long as this one's)."""
        n = row.numel()
        lengths = lengths or [n] * self.parties
        received = self.exchange(kind, -1, row.repeat(self.parties), [n] * self.parties, lengths).wait()
        return list(received.split(lengths))

    @property
    def total_sent(self) -> int:
        return sum(self.bytes_sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.bytes_received.values())
