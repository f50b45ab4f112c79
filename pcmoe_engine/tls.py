"""TLSMesh: the Wire's transport over mutually authenticated TLS 1.3, for parties on separate sites.

Identity. Each party holds a private key and a certificate issued by a CA the parties agree on
(transport.tls_ca). The certificate names the party: a subjectAltName DNS entry (or the common name)
``pcmoe-party-<rank>.<run_id>``, run_id being transport.run_id (default: the run's name). A party accepts a
connection only from a peer whose certificate chains to that CA, is valid now, and names the rank the peer
claims, so no party can pose as another, and a certificate issued for another collaboration (another run_id)
is refused even under the same CA. Before it listens, a party verifies its own certificate as its peers will
(``check_identity``): a wrong, expired or mismatched file stops it with one line.

Rendezvous. transport.peers lists every party's host:port in rank order. Party i listens on the port of its
own entry (all interfaces) and dials every other party's entry: one TLS connection per ordered pair, i -> j
carrying what i sends to j, so each connection has one writer and one reader (an ssl socket must not be read
and written by two threads at once). Dialling retries until the peer listens, within the peer timeout. A
connection that fails the checks is refused with one line naming its address and the reason; the party keeps
waiting for the real peer.

Data. ``all_to_all_single`` sends each peer its block and receives each peer's block concurrently: one
sending and one receiving thread per peer (ssl releases the GIL while it encrypts and moves bytes), each
running its blocks in the order the exchanges were issued, which is the same on every party. A block travels as
a frame: a 20-byte header (magic, sequence number, payload length), then the rows' bytes, staged through host
memory for GPU tensors. A peer that sends nothing for the timeout, closes its connection or sends a frame the
protocol did not expect raises ``PeerFailure`` with its rank. A party that gives up on a peer tells the others
which (a notice frame) before it closes its connections, so they blame that peer rather than its leaving.
"""

import concurrent.futures
import math
import socket
import ssl
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .config import Config, parse_address
from .transport import PeerFailure, Work

__all__ = ["TLSMesh", "identity", "tls_contexts", "check_identity"]

HELLO = struct.Struct("!4sI")  # b"PCMH", the dialling party's rank
FRAME = struct.Struct("!4sQQ")  # b"PCMF", sequence number, payload bytes
ACCEPTED = b"\x01"
HANDSHAKE_TIMEOUT_S = 10.0  # for a connection to finish its TLS handshake and hello (a stalled stranger waits no more)
SMALL_FRAME = 1 << 16  # payloads up to this size leave in one write with their header
MAX_NOTICE = 1024  # bytes of a failure notice's reason
NOTICE_TIMEOUT_S = 1.0  # how long a failing party tries to tell the others why


def identity(rank: int, run_id: str) -> str:
    """The name party ``rank``'s certificate must carry."""
    return f"pcmoe-party-{rank}.{run_id}"


def _names(cert: dict) -> list[str]:
    """The DNS names and common names a verified certificate (``SSLSocket.getpeercert()``) carries."""
    dns = [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]
    return list(dict.fromkeys(dns + [value for rdn in cert.get("subject", ()) for key, value in rdn
                                     if key == "commonName"]))


def _reason(e: Exception) -> str:
    """A TLS or socket error in a few words: OpenSSL's verification message or reason, else the error's text."""
    if isinstance(e, EOFError):
        return "the connection closed"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError):
        return (e.reason or str(e)).lower().replace("_", " ")
    if isinstance(e, TimeoutError):
        return "timed out"
    return getattr(e, "strerror", None) or str(e)


def tls_contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: TLS 1.3 only, this party's certificate, peers' certificates required and
    verified against ``ca``. Host names are not checked: a peer's identity is its certificate's party name."""
    contexts = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        context = ssl.SSLContext(purpose)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"transport.tls_cert={cert!r} with transport.tls_key={key!r} cannot be loaded "
                             f"({_reason(e)}): give this party's PEM certificate and the private key it was issued "
                             "for") from None
        try:
            context.load_verify_locations(ca)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"transport.tls_ca={ca!r} cannot be loaded ({_reason(e)}): give the PEM certificate of "
                             "the CA the parties agreed on") from None
        contexts.append(context)
    contexts[0].num_tickets = 0  # no session resumption: every connection authenticates in full
    return contexts[0], contexts[1]


def check_identity(server: ssl.SSLContext, client: ssl.SSLContext, expected: str, cert: str) -> None:
    """This party's certificate verified as its peers will verify it, in memory (a handshake with itself):
    it chains to the CA, is valid now and names ``expected``; else a one-line ValueError."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    ends = [client.wrap_bio(bios[0], bios[1]), server.wrap_bio(bios[2], bios[3], server_side=True)]
    pending = list(ends)
    try:
        for _ in range(6):
            for end in list(pending):
                try:
                    end.do_handshake()
                    pending.remove(end)
                except ssl.SSLWantReadError:
                    pass
            bios[2].write(bios[1].read())
            bios[0].write(bios[3].read())
    except ssl.SSLError as e:
        raise ValueError(f"transport.tls_cert={cert!r} would be refused by the other parties ({_reason(e)}): get "
                         "a valid certificate for this party from the parties' CA (transport.tls_ca)") from None
    names = _names(ends[0].getpeercert())
    if expected not in names:
        raise ValueError(f"transport.tls_cert={cert!r} is for {', '.join(names) or 'no name'}, not {expected} (this "
                         "party's rank and transport.run_id): use this party's own certificate")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; EOFError when the peer closes first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n


def _blocks(t: torch.Tensor, splits: list[int]) -> list[memoryview]:
    """The bytes of each party's rows of a contiguous CPU tensor (views: receiving into them fills ``t``)."""
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    flat = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
    offsets = [0]
    for rows in splits:
        offsets.append(offsets[-1] + rows * row_bytes)
    return [flat[a:b] for a, b in zip(offsets, offsets[1:])]


class TLSMesh:
    """Party ``rank``'s TLS connections to every other party (``peers``: each party's (host, port)). Connects on
    construction (within ``timeout_s``); ``timeout_s`` then bounds how long a peer may stay silent."""

    def __init__(self, rank: int, peers: list[tuple[str, int]], cert: str, key: str, ca: str, run_id: str,
                 timeout_s: float):
        self.rank, self.parties, self.run_id, self.timeout_s = rank, len(peers), run_id, timeout_s
        self.others = [p for p in range(self.parties) if p != rank]
        self.name = identity(rank, run_id)
        server, client = tls_contexts(cert, key, ca)
        check_identity(server, client, self.name, cert)
        self._in: dict[int, ssl.SSLSocket] = {}  # peer -> the connection it sends on
        self._out: dict[int, ssl.SSLSocket] = {}  # peer -> the connection this party sends on
        self._sequence = dict.fromkeys(self.others, 0)
        self._senders = {p: ThreadPoolExecutor(1, f"pcmoe-send-{p}") for p in self.others}
        self._receivers = {p: ThreadPoolExecutor(1, f"pcmoe-recv-{p}") for p in self.others}
        self._failure: PeerFailure | None = None
        try:
            self._connect(peers, server, client)
        except BaseException:
            self.close()
            raise
        for sock in (*self._in.values(), *self._out.values()):
            sock.settimeout(timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def from_config(cls, cfg: Config, rank: int, timeout_s: float) -> "TLSMesh":
        t = cfg.transport
        paths = [str(Path(p).expanduser()) for p in (t.tls_cert, t.tls_key, t.tls_ca)]
        return cls(rank, [parse_address(p) for p in t.peers], *paths, t.run_id or cfg.run_dir.name, timeout_s)

    # -- rendezvous -------------------------------------------------------------------------------------------

    def _connect(self, peers: list[tuple[str, int]], server: ssl.SSLContext, client: ssl.SSLContext) -> None:
        host, port = peers[self.rank]
        try:
            listener = socket.create_server(("", port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        except OSError as e:
            raise ValueError(f"transport.peers[{self.rank}]={host}:{port}: this party cannot listen on port {port} "
                             f"({_reason(e)}): free the port or choose another") from None
        listener.settimeout(0.2)
        deadline, stop, failure = time.monotonic() + self.timeout_s, threading.Event(), []
        acceptor = threading.Thread(target=self._accept, args=(listener, server, deadline, stop, failure))
        acceptor.start()
        try:
            for peer in self.others:
                self._out[peer] = self._dial(peer, peers[peer], client, deadline)
        except BaseException:
            stop.set()
            raise
        finally:
            acceptor.join()
            listener.close()
        if failure:
            raise failure[0]
        if missing := [p for p in self.others if p not in self._in]:
            host, port = peers[missing[0]]
            raise PeerFailure(missing[0], f"({host}:{port}) did not connect to this party within {self.timeout_s:g}"
                              " s: is it started, with the same transport.peers?", timed_out=True)

    def _accept(self, listener: socket.socket, server: ssl.SSLContext, deadline: float, stop: threading.Event,
                failure: list) -> None:
        """Take one authenticated connection from every other party; refuse (and report) any other."""
        try:
            while len(self._in) < len(self.others) and not stop.is_set() and time.monotonic() < deadline:
                try:
                    sock, address = listener.accept()
                except TimeoutError:
                    continue
                sock.settimeout(HANDSHAKE_TIMEOUT_S)
                try:
                    tls = server.wrap_socket(sock, server_side=True)
                except (OSError, ssl.SSLError) as e:
                    self._refuse(sock, address, f"TLS handshake failed ({_reason(e)})")
                    continue
                try:
                    hello = bytearray(HELLO.size)
                    _recv_exact(tls, memoryview(hello))
                    magic, claimed = HELLO.unpack(hello)
                except (OSError, EOFError) as e:
                    self._refuse(tls, address, f"no pcmoe hello ({_reason(e)})")
                    continue
                names = _names(tls.getpeercert())
                if magic != b"PCMH":
                    reason = "no pcmoe hello"
                elif claimed not in self.others:
                    reason = f"it claims rank {claimed}, not another party of this {self.parties}-party run"
                elif identity(claimed, self.run_id) not in names:
                    reason = (f"it claims rank {claimed}, but its certificate is for {', '.join(names) or 'no name'}, "
                              f"not {identity(claimed, self.run_id)}")
                elif claimed in self._in:
                    reason = f"party {claimed} is already connected"
                else:
                    try:
                        tls.sendall(ACCEPTED)
                        self._in[claimed] = tls
                        continue
                    except OSError as e:
                        reason = f"party {claimed} left during the hello ({_reason(e)})"
                self._refuse(tls, address, reason)
        except BaseException as e:  # raised by the constructor
            failure.append(e)

    def _refuse(self, sock: socket.socket, address, reason: str) -> None:
        sys.stderr.write(f"pcmoe: party {self.rank} refused a connection from {address[0]}:{address[1]}: {reason}\n")
        sys.stderr.flush()
        sock.close()

    def _dial(self, peer: int, address: tuple[str, int], client: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
        """Connect to ``peer`` (retrying until it listens), check its certificate, and introduce this party."""
        where = f"{address[0]}:{address[1]}"
        while True:
            try:
                sock = socket.create_connection(address, timeout=HANDSHAKE_TIMEOUT_S)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise PeerFailure(peer, f"does not answer at {where} ({_reason(e)}) after {self.timeout_s:g} s: "
                                      "is it started? check transport.peers and the firewall", timed_out=True) from None
                time.sleep(0.2)
        try:
            tls = client.wrap_socket(sock)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise PeerFailure(peer, f"at {where} was refused: TLS handshake failed ({_reason(e)})") from None
        names = _names(tls.getpeercert())
        if identity(peer, self.run_id) not in names:
            tls.close()
            raise PeerFailure(peer, f"at {where} was refused: its certificate is for {', '.join(names) or 'no name'}, "
                              f"not {identity(peer, self.run_id)}")
        try:
            tls.sendall(HELLO.pack(b"PCMH", self.rank))
            _recv_exact(tls, memoryview(bytearray(len(ACCEPTED))))
        except (OSError, EOFError) as e:
            tls.close()
            raise PeerFailure(peer, f"at {where} refused this party ({_reason(e)}): see its log") from None
        return tls

    # -- data -------------------------------------------------------------------------------------------------

    def _lost(self, peer: int, e: BaseException, silent: str) -> PeerFailure:
        if isinstance(e, TimeoutError):
            return PeerFailure(peer, f"{silent} for {self.timeout_s:g} s (hung or unreachable)", timed_out=True)
        if isinstance(e, EOFError):
            return PeerFailure(peer, "closed its connection: it exited or was killed")
        return PeerFailure(peer, f"lost its connection ({_reason(e)}): it exited, was killed or the network failed")

    def _send(self, peer: int, header: bytes, payload: memoryview | bytes) -> None:
        sock = self._out[peer]
        try:
            if len(payload) <= SMALL_FRAME:
                sock.sendall(header + bytes(payload))
            else:
                sock.sendall(header)
                sock.sendall(payload)
        except OSError as e:
            raise self._lost(peer, e, "took no data") from None

    def _receive(self, peer: int, sequence: int, into: memoryview) -> None:
        sock = self._in[peer]
        try:
            header = bytearray(FRAME.size)
            _recv_exact(sock, memoryview(header))
            magic, got, size = FRAME.unpack(header)
            if magic in (b"PCMX", b"PCMT") and size <= MAX_NOTICE:  # the peer gave up on party ``got``: why
                reason = bytearray(size)
                _recv_exact(sock, memoryview(reason))
                raise PeerFailure(got, reason.decode(errors="replace"), magic == b"PCMT", reported_by=peer)
            if magic != b"PCMF" or got != sequence or size != into.nbytes:
                raise PeerFailure(peer, f"sent frame {got} of {size} bytes where this party expected frame {sequence} "
                                  f"of {into.nbytes}: the parties are out of step (a different configuration?)")
            _recv_exact(sock, into)
        except (OSError, EOFError) as e:
            raise self._lost(peer, e, "sent nothing") from None

    def _failed(self, failure: BaseException) -> None:
        if isinstance(failure, PeerFailure) and self._failure is None:
            self._failure = failure

    def all_to_all_single(self, recv: torch.Tensor, send: torch.Tensor, recv_splits: list[int],
                          send_splits: list[int], async_op: bool = False) -> Work | None:
        """torch.distributed.all_to_all_single's contract over the mesh: ``Work`` with async_op, else done."""
        send_host = send.detach().contiguous().cpu()
        staged = recv.device.type != "cpu" or not recv.is_contiguous()
        recv_host = torch.empty(recv.shape, dtype=recv.dtype) if staged else recv
        outgoing, incoming = _blocks(send_host, send_splits), _blocks(recv_host, recv_splits)
        incoming[self.rank][:] = outgoing[self.rank]
        futures = []
        for peer in self.others:
            sequence = self._sequence[peer]
            self._sequence[peer] += 1
            header = FRAME.pack(b"PCMF", sequence, outgoing[peer].nbytes)
            futures.append(self._senders[peer].submit(self._send, peer, header, outgoing[peer]))
            futures.append(self._receivers[peer].submit(self._receive, peer, sequence, incoming[peer]))
        work = Work(futures, (lambda: recv.copy_(recv_host)) if staged else None, self._failed)
        if async_op:
            return work
        work.wait()
        return None

    def barrier(self) -> None:
        """Every party reached this point: an empty frame to and from every peer (no data)."""
        empty = torch.empty(0, dtype=torch.uint8)
        self.all_to_all_single(empty, empty, [0] * self.parties, [0] * self.parties)

    def close(self) -> None:
        """After a failure, tell the other peers which party failed (so they blame it, not this party's leaving);
        then close every connection (waking any thread still waiting on one) and stop the threads."""
        if (failure := self._failure) is not None:
            reason = failure.reason.encode()[:MAX_NOTICE]
            header = FRAME.pack(b"PCMT" if failure.timed_out else b"PCMX", failure.rank, len(reason))
            notices = [self._senders[p].submit(self._send, p, header, reason) for p in self._out if p != failure.rank]
            concurrent.futures.wait(notices, timeout=NOTICE_TIMEOUT_S)
        for sock in (*self._in.values(), *self._out.values()):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for pool in (*self._senders.values(), *self._receivers.values()):
            pool.shutdown(wait=True, cancel_futures=True)
