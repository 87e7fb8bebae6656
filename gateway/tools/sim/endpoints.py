"""Where a simulated device's datagrams leave from and its replies arrive: a source
address and port, opened for one wake and closed after it.

Two kinds, one interface (`Endpoint`):
- `OwnSocket`: a UDP socket of its own, bound to the device's address and a port the
  kernel picks, connected to the gateway. Any source address, any family.
- `SharedPort`: the device's own loopback address (127.1.x.y) on one of a few UDP
  sockets that every device shares (`SharedPorts`), bound to the wildcard address: each
  datagram names its source address (IP_PKTINFO) and each reply is routed by the address
  it was sent to. What the gateway sees is what it saw with a socket of its own (the
  device's address, a port other than its last ones), for two system calls a wake
  instead of eight: socket, bind, connect, watching it and closing it were ~36 % of the
  fleet's busy samples, and the fleet costs 15-19 % less per report without them
  (docs/decisions.md, "The simulator against the gateway, fourth look").
  Used when every device has an IPv4 loopback address of its own (sim.source_addresses
  "per_device"); with a shared address the port is what tells devices apart, so each
  wake needs a socket of its own.

`Receiver` watches the sockets of their own in one epoll set.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import socket
import struct
from collections.abc import Callable
from typing import Protocol

RECV_BYTES = 2048
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value: Python 3.11 does not name it
_PKTINFO = struct.Struct("=I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_PKTINFO_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
RCVBUF_BYTES = 4 << 20

Received = Callable[[bytes], None]


class Receiver:
    """The sockets of their own (an exchange's, an LwM2M device's) in one epoll set of
    ours, which the event loop watches as a single reader. Watching a socket is one
    epoll_ctl and a dict entry; the loop's own add_reader/remove_reader cost ~5 µs more
    per wake with 2,500 sockets open (docs/decisions.md). Closing a socket takes it out of
    the set (its only descriptor)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch(self, sock: socket.socket, received: Received) -> None:
        """Call `received(datagram)` for each datagram that reaches `sock` (one read a
        call: the set is level-triggered, so a second one calls again, and no read ends in
        EAGAIN)."""
        fd = sock.fileno()
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = functools.partial(_receive, sock, received)
        if self._loop is None:  # the first socket: the loop starts watching the set
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._epoll.fileno(), self._ready)

    def forget(self, sock: socket.socket) -> None:
        """Stop calling back for `sock`; the caller closes it right after."""
        self._callbacks.pop(sock.fileno(), None)
        if not self._callbacks and self._loop is not None:  # idle: nothing left to watch
            self._loop.remove_reader(self._epoll.fileno())
            self._loop = None

    def close(self, sock: socket.socket) -> None:
        """Stop watching `sock` and close it."""
        self.forget(sock)
        sock.close()

    def _ready(self) -> None:
        callbacks = self._callbacks
        for fd, _ in self._epoll.poll(0):
            readable = callbacks.get(fd)
            if readable is not None:
                readable()


def _receive(sock: socket.socket, received: Received) -> None:
    try:
        data = sock.recv(RECV_BYTES)
    except OSError:  # nothing after all, or (connected) ICMP port unreachable: no gateway yet
        return
    received(data)


class Endpoint(Protocol):
    """One wake's source endpoint. `send` after `close` sends nothing."""

    @property
    def port(self) -> int: ...

    def send(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class OwnSocket:
    """An endpoint on a socket of its own (`sock`, bound and connected)."""

    __slots__ = ("_receiver", "_sock")

    def __init__(self, sock: socket.socket, receiver: Receiver, received: Received) -> None:
        self._sock = sock
        self._receiver = receiver
        receiver.watch(sock, received)

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    def send(self, data: bytes) -> None:
        if self._sock.fileno() == -1:  # closed while the datagram was in the air
            return
        # A full socket buffer or ICMP unreachable: the datagram is lost, as on a radio.
        with contextlib.suppress(OSError):
            self._sock.send(data)

    def close(self) -> None:
        if self._sock.fileno() != -1:
            self._receiver.close(self._sock)


class SharedPorts:
    """`count` (>= 3) wildcard-bound UDP sockets that carry every device's own loopback
    address to `target`. A device's endpoint is the next of them in turn, skipping the
    address's last two ports, so its port changes at every wake and rebind and a rebind
    never returns to the port it left (a late reply there would be taken for the new
    endpoint's); two endpoints of one address never share a socket. Only datagrams from
    `target` are taken."""

    def __init__(self, count: int, target: tuple[str, int]) -> None:
        if count < 3:
            raise ValueError("SharedPorts needs 3 ports at least: a rebind skips two")
        self._target = target
        self._next = 0
        self._socks: list[socket.socket] = []
        self._routes: list[dict[bytes, Received]] = []  # per socket: address -> its exchange
        self._addresses: dict[str, _Address] = {}
        # The event loop watches these few sockets itself, for good: no epoll set of our own
        # to poll again at each reply (Receiver's, for the sockets that come and go).
        self._loop = asyncio.get_running_loop()
        try:
            for index in range(count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
                self._socks.append(sock)
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                # Every awake device's replies queue here, not in a buffer of their own:
                # room for a loop stall in a storm (the kernel caps it at rmem_max).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES)
                sock.bind(("0.0.0.0", 0))
                self._routes.append({})
                self._loop.add_reader(sock.fileno(), self._readable, index)
        except BaseException:
            self.close()
            raise

    def open(self, source_ip: str, received: Received) -> SharedPort:
        """An endpoint from `source_ip` on a shared port that carries no other endpoint of
        this address (so a rebind, opened before the old endpoint closes, gets another
        port); OSError when every port already carries this address."""
        known = self._addresses.get(source_ip)
        if known is None:
            known = self._addresses[source_ip] = _Address(socket.inet_aton(source_ip))
        address = known.address
        count = len(self._socks)
        start = self._next = (self._next + 1) % count  # whichever wake came before: any port
        for step in range(count):
            index = (start + step) % count
            routes = self._routes[index]
            if address not in routes and index != known.last and index != known.before_last:
                routes[address] = received
                known.before_last, known.last = known.last, index
                return SharedPort(self._socks[index], routes, address, known.ancillary,
                                  self._target)
        raise OSError(f"all {count} shared ports carry {source_ip} already")

    def close(self) -> None:
        for sock in self._socks:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def _readable(self, index: int) -> None:
        try:
            data, ancillary, _, source = self._socks[index].recvmsg(RECV_BYTES, _PKTINFO_SPACE)
        except OSError:
            return
        if source != self._target or not ancillary:
            return  # not from the gateway: a connected socket would not see it either
        received = self._routes[index].get(ancillary[0][2][8:12])  # the datagram's destination
        if received is not None:
            received(data)


class _Address:
    """A device address on the shared ports: its IP_PKTINFO, its last two ports."""

    __slots__ = ("address", "ancillary", "before_last", "last")

    def __init__(self, address: bytes) -> None:
        self.address = address
        self.ancillary = [(socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, address, bytes(4)))]
        self.last = -1
        self.before_last = -1


class SharedPort:
    """An endpoint on a shared port: the device's address on one of SharedPorts' sockets."""

    __slots__ = ("_address", "_ancillary", "_routes", "_sock", "_target")

    def __init__(self, sock: socket.socket, routes: dict[bytes, Received], address: bytes,
                 ancillary: list[tuple[int, int, bytes]], target: tuple[str, int]) -> None:
        self._sock = sock
        self._routes: dict[bytes, Received] | None = routes
        self._address = address
        self._ancillary = ancillary
        self._target = target

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    def send(self, data: bytes) -> None:
        if self._routes is None:
            return
        with contextlib.suppress(OSError):  # lost, as on a radio
            self._sock.sendmsg((data,), self._ancillary, 0, self._target)

    def close(self) -> None:
        routes, self._routes = self._routes, None
        if routes is not None:
            del routes[self._address]
