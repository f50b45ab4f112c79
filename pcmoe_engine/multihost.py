"""One party per host: ``pcmoe party --rank I --parties N --rendezvous HOST:PORT [--config F] [--set ...]``.

``pcmoe train`` runs every party on one machine. Across hosts, each host runs its own party with ``pcmoe party``
(or torchrun with --nnodes: docs/multihost.md): the same training (``train.main``, in this process), only the
way the parties meet differs.

- transport.kind = "torch" (the default): torch.distributed's rendezvous at HOST:PORT, a TCP store party 0
  opens there (MASTER_ADDR, MASTER_PORT). gloo must use the network interface that reaches the other hosts:
  GLOO_SOCKET_IFNAME if set, else the interface this host routes HOST through (loopback only when HOST is this
  machine, i.e. every party is local). NCCL picks its own (NCCL_SOCKET_IFNAME).
- transport.kind = "tls" (``--peers H0:P0,H1:P1,...`` sets it): the mutually authenticated TLS mesh of tls.py;
  the parties meet at transport.peers and need no --rendezvous.

Each party writes its own party<i>/ under its own train.out_dir; party 0 merges what it can read, so parties on
other hosts are listed in its summary.json's parties_missing.
"""

import fcntl
import json
import os
import socket
import struct

from .config import Config, load_config, parse_address
from .faults import say
from .party import process_group_backend
from .tls import identity
from .train import main as train_main

__all__ = ["interface_towards", "run_party"]

SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


def interface_towards(host: str) -> tuple[str, str]:
    """(name, address) of the network interface this machine reaches ``host`` through (IPv4)."""
    try:
        target = socket.getaddrinfo(host, None, socket.AF_INET)[0][4][0]
    except socket.gaierror as e:
        raise ValueError(f"--rendezvous host {host!r} does not resolve ({e.strerror}): give a host name or IPv4 "
                         "address of party 0's machine") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # a UDP socket's connect sends nothing: it only asks the routing table for the local address
            s.connect((target, 9))
        except OSError as e:
            raise ValueError(f"no route from this machine to {host} ({e.strerror}): check the network, or set "
                             "GLOO_SOCKET_IFNAME to the interface to use") from None
        local = s.getsockname()[0]
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == local:
                return name, local
    raise ValueError(f"no network interface here holds {local}, the address that reaches {host}: set "
                     "GLOO_SOCKET_IFNAME to the interface to use")


def run_party(rank: int, parties: int, rendezvous: str | None, peers: str | None, config: str | None,
              overrides: list[str], preset: str | None = None) -> Config:
    """Train as party ``rank`` of ``parties`` in this process; returns the run's configuration. Bad input: a
    one-line ValueError before anything starts."""
    overrides = [*overrides, f"parties={parties}"]
    if peers:
        overrides += ["transport.kind=tls", f"transport.peers={json.dumps(peers.split(','))}"]
    cfg = load_config(config, overrides, preset=preset)
    if not 0 <= rank < parties:
        raise ValueError(f"--rank {rank} must be between 0 and {parties - 1} (--parties {parties})")
    t = cfg.transport
    if t.kind == "tls":
        if rendezvous:
            raise ValueError("--rendezvous is for transport.kind=torch: over TLS the parties meet at transport.peers "
                             "(--peers)")
        env = {}
        how = (f"TLS 1.3 mesh as {identity(rank, t.run_id or cfg.run_dir.name)} (CA {t.tls_ca}), listening on port "
               f"{parse_address(t.peers[rank])[1]}; peers {', '.join(t.peers)}")
    else:
        if not rendezvous:
            raise ValueError("pcmoe party needs --rendezvous HOST:PORT (party 0's host and a free port there), or "
                             "--peers HOST:PORT,... for the TLS transport")
        try:
            host, port = parse_address(rendezvous)
        except ValueError as e:
            raise ValueError(f"--rendezvous {e}") from None
        if ifname := os.environ.get("GLOO_SOCKET_IFNAME"):
            where = f"{ifname} (GLOO_SOCKET_IFNAME)"
        else:
            ifname, address = interface_towards(host)
            where = f"{ifname} ({address}, which reaches {host}; GLOO_SOCKET_IFNAME overrides)"
        env = {"MASTER_ADDR": host, "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": ifname}
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(parties), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", **env)
    if t.kind == "torch":
        how = (f"torch.distributed ({process_group_backend(cfg)}) rendezvous at {host}:{port}, gloo on {where}; "
               "unencrypted: use transport.kind=tls across sites")
    say(f"pcmoe party {rank} of {parties} | {how}")
    source = ["--config", config] if config else ["--preset", preset] if preset else []
    train_main(source + [a for o in overrides for a in ("--set", o)])
    return cfg
