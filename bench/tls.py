"""The TLS transport on one machine: a test PKI, and its loopback throughput against gloo's.

``make_ca`` and ``issue`` run the openssl commands docs/multihost.md gives for a real deployment (there each party
makes its own key and request, and only the CA's holder signs); ``make_pki`` makes a CA and every party's key and
certificate in one folder, for tests and demos. The throughput run: two parties (two processes) exchange
``--mib`` MiB each way per all_to_all, over TLSMesh and over torch.distributed's gloo, on 127.0.0.1.

    PYTHONPATH=. python bench/tls.py --mib 64 --repeats 5
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pcmoe_engine.cli import free_port  # noqa: E402
from pcmoe_engine.tls import TLSMesh, identity  # noqa: E402
from pcmoe_engine.transport import TorchTransport  # noqa: E402

__all__ = ["make_ca", "issue", "make_pki", "main"]

CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str = "ca", days: int = 30) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key) as ``<name>.crt``, ``<name>.key``."""
    crt, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl("req", "-x509", *CURVE, "-keyout", str(key), "-out", str(crt), "-days", str(days),
             "-subj", f"/CN=pcmoe test CA {name}")
    return crt, key


def issue(ca: tuple[Path, Path], directory: Path, stem: str, name: str, days: int = 30) -> tuple[Path, Path]:
    """A key, and a certificate for ``name`` signed by ``ca`` (``days`` < 0: already expired), as
    ``<stem>.crt``, ``<stem>.key``."""
    crt, key, csr, ext = (directory / f"{stem}.{suffix}" for suffix in ("crt", "key", "csr", "ext"))
    _openssl("req", *CURVE, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text(f"subjectAltName=DNS:{name}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-days", str(days),
             "-extfile", str(ext), "-out", str(crt))
    csr.unlink()
    ext.unlink()
    return crt, key


def make_pki(directory: Path, parties: int, run_id: str) -> Path:
    """ca.crt and party<i>.crt / party<i>.key for pcmoe-party-<i>.<run_id>, i < parties, in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    for rank in range(parties):
        issue(ca, directory, f"party{rank}", identity(rank, run_id))
    return directory


def _party(rank: int, kind: str, ports: list[int], pki: str, mib: int, repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    if kind == "tls":
        transport = TLSMesh(rank, [("127.0.0.1", port) for port in ports], f"{pki}/party{rank}.crt",
                            f"{pki}/party{rank}.key", f"{pki}/ca.crt", "bench", 60.0)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[0]}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60))
        transport = TorchTransport()
    rows = mib * 2**20 // 4096  # rows of 1024 fp32
    send, recv = torch.randn(rows, 1024), torch.empty(rows, 1024)
    splits = [0, rows] if rank == 0 else [rows, 0]  # everything to the other party
    seconds, cpu = [], []
    for _ in range(repeats + 1):  # the first is warm-up
        transport.barrier()
        started, cpu_started = time.perf_counter(), time.process_time()
        transport.all_to_all_single(recv, send, splits, splits)
        seconds.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    transport.close()
    if rank == 0:
        Path(out).write_text(json.dumps([seconds[1:], cpu[1:]]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/tls.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB each party sends the other per all_to_all")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp:
        pki = make_pki(Path(tmp) / "pki", 2, "bench")
        for kind in ("gloo", "tls"):
            out = Path(tmp) / f"{kind}.txt"
            mp.spawn(_party, args=(kind, [free_port(), free_port()], str(pki), args.mib, args.repeats, str(out)),
                     nprocs=2)
            seconds, cpu = (sorted(values) for values in json.loads(out.read_text()))
            median, median_cpu = seconds[len(seconds) // 2], cpu[len(cpu) // 2]
            print(f"{kind:>4}: {args.mib} MiB each way per all_to_all between 2 parties on 127.0.0.1: median "
                  f"{median * 1e3:,.0f} ms, {args.mib * 2**20 / median / 1e6:,.0f} MB/s each way "
                  f"(best {args.mib * 2**20 / seconds[0] / 1e6:,.0f} MB/s; {len(seconds)} runs); party 0's CPU time "
                  f"{median_cpu * 1e3:,.0f} ms per all_to_all")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
