"""The TLS transport (pcmoe_engine/tls.py), parties as threads of this process on 127.0.0.1, with a test PKI the
openssl CLI makes: the mesh carries all_to_all like torch.distributed; strangers, impostors and plaintext are
refused with one line naming their address and why; a party checks its own certificate before it listens; a dead
or silent peer is named."""

import shutil
import socket
import ssl
import threading
import time

import pytest
import torch

from bench.tls import issue, make_ca, make_pki
from pcmoe_engine.cli import free_port
from pcmoe_engine.tls import HELLO, TLSMesh
from pcmoe_engine.transport import PeerFailure

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
RUN = "test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.crt, party0..2 for run "test"; other.crt: another CA; under it other2 (party 2); expired2 (party 2,
    expired); elsewhere2 (party 2 of another run, same CA)."""
    d = make_pki(tmp_path_factory.mktemp("pki"), 3, RUN)
    ca = (d / "ca.crt", d / "ca.key")
    issue(make_ca(d, "other"), d, "other2", f"pcmoe-party-2.{RUN}")
    issue(ca, d, "expired2", f"pcmoe-party-2.{RUN}", days=-1)
    issue(ca, d, "elsewhere2", "pcmoe-party-2.another-run")
    return d


def _mesh(pki, rank, peers, timeout_s=20.0, stem=None):
    stem = stem or f"party{rank}"
    return TLSMesh(rank, peers, str(pki / f"{stem}.crt"), str(pki / f"{stem}.key"), str(pki / "ca.crt"), RUN,
                   timeout_s)


def _in_threads(target, ranks):
    """target(rank) in one thread per rank; {rank: its result or the exception it raised}."""
    results = {}

    def run(rank):
        try:
            results[rank] = target(rank)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _peers(n):
    return [("127.0.0.1", free_port()) for _ in range(n)]


@pytest.fixture
def mesh3(pki):
    peers = _peers(3)
    meshes = _in_threads(lambda r: _mesh(pki, r, peers), range(3))
    yield meshes
    for m in meshes.values():
        m.close()


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cpu", torch.int64),
                                          pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_mesh_all_to_all_of_uneven_blocks(mesh3, device, dtype):
    """Rows send[sum(send_splits[:p]):...] reach party p, in party order, as torch.distributed's all_to_all_single
    would deliver them (async and not; GPU tensors staged through host memory); a party's own rows stay local."""
    width = 3
    # splits[src][dst]: rows src sends dst (zero-row blocks included)
    splits = [[2, 0, 3], [1, 4, 0], [0, 2, 5]]
    sent = {src: (torch.arange(sum(splits[src]) * width).reshape(-1, width) + 1000 * src).to(device, dtype)
            for src in range(3)}

    def exchange(rank):
        recv_splits = [splits[src][rank] for src in range(3)]
        recv = torch.empty(sum(recv_splits), width, dtype=dtype, device=device)
        work = mesh3[rank].all_to_all_single(recv, sent[rank], recv_splits, splits[rank], async_op=rank == 1)
        if work is not None:
            work.wait()
        mesh3[rank].barrier()
        return recv

    received = _in_threads(exchange, range(3))
    for dst in range(3):
        expected = [sent[src][sum(splits[src][:dst]):sum(splits[src][:dst + 1])] for src in range(3)]
        assert torch.equal(received[dst], torch.cat(expected))


def _stranger(port, pki=None, stem=None, claim=2, plaintext=False):
    """Connect to a party as someone else would; returns what the party answered (b"" when it hung up)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if plaintext:
            raw.sendall(HELLO.pack(b"PCMH", claim) + b"GET / HTTP/1.0\r\n\r\n")
            try:
                return raw.recv(100)
            except ConnectionResetError:
                return b""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if stem is not None:
            context.load_cert_chain(pki / f"{stem}.crt", pki / f"{stem}.key")
        try:
            with context.wrap_socket(raw) as tls:
                tls.sendall(HELLO.pack(b"PCMH", claim))
                return tls.recv(1)
        except (ssl.SSLError, OSError):
            return b""


def test_strangers_and_impostors_are_refused_and_the_parties_still_meet(pki, capfd):
    peers = _peers(3)
    meshes = {}
    party0 = threading.Thread(target=lambda: meshes.update({0: _mesh(pki, 0, peers)}))
    party0.start()
    time.sleep(0.5)  # party 0 listens; the others are not up yet
    port = peers[0][1]
    answers = [_stranger(port, plaintext=True), _stranger(port), _stranger(port, pki, "other2"),
               _stranger(port, pki, "expired2"), _stranger(port, pki, "elsewhere2"), _stranger(port, pki, "party1"),
               _stranger(port, pki, "party1", claim=7)]
    assert answers == [b""] * len(answers)  # nobody got in
    meshes.update(_in_threads(lambda r: _mesh(pki, r, peers), (1, 2)))
    party0.join()
    try:
        refused = [line for line in capfd.readouterr().err.splitlines() if line]
        assert all(line.startswith("pcmoe: party 0 refused a connection from 127.0.0.1:") for line in refused)
        reasons = [line.split(": ", 2)[2] for line in refused]
        assert reasons[0].startswith("TLS handshake failed (") and "version" in reasons[0]  # not TLS at all
        assert reasons[1] == "TLS handshake failed (peer did not return a certificate)"
        assert reasons[2] == "TLS handshake failed (certificate verify failed: unable to get local issuer certificate)"
        assert reasons[3] == "TLS handshake failed (certificate verify failed: certificate has expired)"
        claims = "it claims rank 2, but its certificate is for"
        assert reasons[4] == f"{claims} pcmoe-party-2.another-run, not pcmoe-party-2.{RUN}"  # another run, same CA
        assert reasons[5] == f"{claims} pcmoe-party-1.{RUN}, not pcmoe-party-2.{RUN}"  # party 1 posing as party 2
        assert reasons[6] == "it claims rank 7, not another party of this 3-party run"
        assert len(reasons) == 7

        def exchange(rank):  # and the real parties met
            recv = torch.empty(3)
            meshes[rank].all_to_all_single(recv, torch.full((3,), float(rank)), [1, 1, 1], [1, 1, 1])
            return recv.tolist()

        assert _in_threads(exchange, range(3)) == {rank: [0.0, 1.0, 2.0] for rank in range(3)}
    finally:
        for m in meshes.values():
            m.close()


@pytest.mark.parametrize("rank,stem,ca,message", [
    (2, "party1", "ca", f"is for pcmoe-party-1.{RUN}, not pcmoe-party-2.{RUN} (this party's rank and transport.run_id"),
    (2, "expired2", "ca", "would be refused by the other parties (certificate verify failed: certificate has expired)"),
    (2, "other2", "ca", "would be refused by the other parties (certificate verify failed: unable to get local issuer"),
    (2, "elsewhere2", "ca", "is for pcmoe-party-2.another-run"),
    (2, "party2", "other", "would be refused by the other parties (certificate verify failed: unable to get local"),
])
def test_a_party_checks_its_own_certificate_before_it_listens(pki, rank, stem, ca, message):
    with pytest.raises(ValueError, match="^transport.tls_cert=") as info:
        TLSMesh(rank, _peers(3), str(pki / f"{stem}.crt"), str(pki / f"{stem}.key"), str(pki / f"{ca}.crt"), RUN, 5)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unloadable_key_or_ca_is_one_line(pki):
    with pytest.raises(ValueError, match=r"transport.tls_cert=.* with transport.tls_key=.* cannot be loaded \(key "
                                         r"values mismatch\): give this party's PEM certificate and the private key"):
        TLSMesh(0, _peers(2), str(pki / "party0.crt"), str(pki / "party1.key"), str(pki / "ca.crt"), RUN, 5)
    with pytest.raises(ValueError, match=r"transport.tls_ca=.* cannot be loaded \(.*\): give the PEM certificate of"):
        TLSMesh(0, _peers(2), str(pki / "party0.crt"), str(pki / "party0.key"), str(pki / "party0.key"), RUN, 5)


def test_a_listener_with_another_partys_certificate_is_refused(pki):
    """Party 0 dials party 1's address and finds party 2's certificate there: it stops, naming the address."""
    impostor = socket.create_server(("127.0.0.1", 0))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "party2.crt", pki / "party2.key")

    def serve():
        sock, _ = impostor.accept()
        try:
            context.wrap_socket(sock, server_side=True).recv(1)
        except (ssl.SSLError, OSError):
            pass

    threading.Thread(target=serve, daemon=True).start()
    address = impostor.getsockname()
    with pytest.raises(PeerFailure) as info:
        _mesh(pki, 0, [("127.0.0.1", free_port()), address], timeout_s=5)
    assert info.value.rank == 1
    assert str(info.value) == (f"party 1 at 127.0.0.1:{address[1]} was refused: its certificate is for "
                               f"pcmoe-party-2.{RUN}, not pcmoe-party-1.{RUN}")
    impostor.close()


def test_a_party_that_never_starts_is_named(pki):
    peers = _peers(2)
    with pytest.raises(PeerFailure) as info:
        _mesh(pki, 0, peers, timeout_s=0.5)
    assert info.value.rank == 1 and info.value.timed_out
    assert str(info.value) == (f"party 1 does not answer at 127.0.0.1:{peers[1][1]} (Connection refused) after 0.5 s: "
                               "is it started? check transport.peers and the firewall")


def test_a_closed_or_silent_peer_is_named(pki):
    """Party 2 dies: 0 and 1 name it. Party 2 falls silent: each names it after its own timeout. Party 1 gives up
    on party 2 while party 0 waits for party 1: party 1 tells party 0 why as it leaves, and party 0 names party 2,
    not party 1's leaving."""
    row = torch.ones(3, 2)

    def exchange(rank):
        return meshes[rank].all_to_all_single(torch.empty(3, 2), row, [1, 1, 1], [1, 1, 1])

    def connected(timeouts):
        peers = _peers(3)
        return _in_threads(lambda r: _mesh(pki, r, peers, timeout_s=timeouts[r]), range(3))

    meshes = connected((20, 20, 20))
    meshes[2].close()  # as when its process is killed: its connections close
    failures = _in_threads(lambda r: _close_on_failure(meshes[r], exchange, r), (0, 1))
    assert all(str(failures[r]) == "party 2 closed its connection: it exited or was killed" for r in (0, 1))
    assert all(failures[r].rank == 2 and not failures[r].timed_out for r in (0, 1))

    meshes = connected((1.0, 0.5, 20))
    started = time.monotonic()
    failures = _in_threads(lambda r: _close_on_failure(meshes[r], exchange, r), (0, 1))
    assert time.monotonic() - started < 1.0 + 1.0  # within party 0's timeout
    assert str(failures[0]) == "party 2 sent nothing for 1 s (hung or unreachable)" and failures[0].timed_out
    assert str(failures[1]) == "party 2 sent nothing for 0.5 s (hung or unreachable)" and failures[1].timed_out
    meshes[2].close()

    meshes = connected((1.0, 20, 20))
    # Party 1 gave up on party 2 before it sent party 0 anything (as when it waited on an earlier exchange).
    meshes[1]._failed(PeerFailure(2, "sent nothing for 60 s (hung or unreachable)", timed_out=True))
    meshes[1].close()
    failure = _close_on_failure(meshes[0], exchange, 0)
    assert str(failure) == "party 2 sent nothing for 60 s (hung or unreachable) (reported by party 1)"
    assert failure.rank == 2 and failure.reported_by == 1 and failure.timed_out
    meshes[2].close()


def _close_on_failure(mesh, exchange, rank):
    """exchange(rank); on a failure close the mesh at once (as a party exiting would) and return the failure."""
    try:
        exchange(rank)
    except PeerFailure as e:
        mesh.close()
        return e
