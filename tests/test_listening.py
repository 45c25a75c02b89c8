"""What an embedded run listens on: every TCP/UDP socket its processes (driver, GCS, raylet,
workers, agents, metrics exporters) listen on is bound to loopback."""
import ipaddress
import os
from pathlib import Path


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                line = (d / "stat").read_text()
                parent[int(d.name)] = int(line[line.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    mine, grew = {root}, True
    while grew:
        kids = {p for p, pp in parent.items() if pp in mine and p not in mine}
        mine |= kids
        grew = bool(kids)
    return mine


def _socket_inodes(pids: set[int]) -> set[str]:
    out = set()
    for pid in pids:
        try:
            for fd in (Path("/proc") / str(pid) / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    out.add(target[8:-1])
        except OSError:
            pass
    return out


def _addr(hex_addr: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    return ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))


def listening(pids: set[int]) -> list[tuple[str, str, int]]:
    """(protocol, address, port) of every listening TCP / bound UDP socket these processes hold."""
    inodes = _socket_inodes(pids)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            f = line.split()
            local, state, inode = f[1], f[3], f[9]
            if inode in inodes and (state == "0A" or proto.startswith("udp")):
                host, port = local.split(":")
                found.append((proto, str(_addr(host)), int(port, 16)))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (isinstance(ip, ipaddress.IPv6Address) and bool(ip.ipv4_mapped)
                              and ip.ipv4_mapped.is_loopback)


def test_an_embedded_run_listens_on_loopback_only(ray_executor):
    ray_executor.map(abs, [1, -2, 3], desc="")             # workers started too
    socks = listening(_descendants(os.getpid()))
    assert len(socks) >= 5, socks                           # GCS, raylet, workers, agents: seen
    open_ = [s for s in socks if not _loopback(s[1])]
    assert not open_, f"listening beyond loopback: {open_}"
