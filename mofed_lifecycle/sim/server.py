"""The simulated node's kernel process: one per node root, serving requests over a Unix socket.

It holds the kernel state in memory (one writer, no lock contention), fires delayed events on
time, persists the state to `<root>/.sim/kernel.json` (debounced) and exits when idle. Clients start
it on demand (`client.KernelClient`); a restarted kernel process catches up on events that fell due
while none ran, as if time had passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from .client import socket_address
from .kernel import KernelError, SimKernel
from .model import load_state, save_state
from .node import NODE_ID
from .scenario_parse import parse_scenario
from .state import ground_truth

PERSIST_DEBOUNCE_S = 0.05  # at least; a big node saves less often (see persist)
PERSIST_DUTY = 0.1  # at most this share of the kernel's time goes to saving its state


class KernelServer:
    def __init__(self, root: Path, idle_exit_s: float) -> None:
        self.root = root
        self.simdir = root / ".sim"
        sc = parse_scenario((self.simdir / "scenario.toml").read_text(),
                            where=str(self.simdir / "scenario.toml"))
        self.k = SimKernel(root, sc, load_state(self.simdir / "kernel.json"))
        self.idle_exit_s = idle_exit_s
        self.clients = 0
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.persist_handle: asyncio.TimerHandle | None = None
        self.settled_waiters: list[asyncio.Future[None]] = []
        self.stop = asyncio.Event()
        self.persist_every_s = PERSIST_DEBOUNCE_S
        self.node_id = self.read_node_id()
        self.orphaned = False  # the node's directory is gone: exit without saving

    # ---- time and persistence ----------------------------------------------------------------
    def tick(self) -> None:
        """Apply due events, re-arm the timer, schedule a save, wake settled-waiters."""
        self.k.advance()
        loop = asyncio.get_running_loop()
        if self.timer:
            self.timer.cancel()
        due = self.k.next_due()
        if due is not None:
            self.timer = loop.call_later(max(0.0, due - time.time()), self.tick)
        elif self.settled_waiters:
            for f in self.settled_waiters:
                if not f.done():
                    f.set_result(None)
            self.settled_waiters.clear()
        if self.k.dirty and self.persist_handle is None:
            self.persist_handle = loop.call_later(self.persist_every_s, self.persist)

    def persist(self) -> None:
        self.persist_handle = None
        if self.k.dirty:
            start = time.monotonic()
            try:
                save_state(self.k.st, self.simdir / "kernel.json")
            except OSError:
                if self.node_gone():  # the idle watch says why and stops within a second
                    return
                raise
            self.k.dirty = False
            took = time.monotonic() - start
            self.persist_every_s = max(PERSIST_DEBOUNCE_S, took / PERSIST_DUTY)

    # ---- requests ----------------------------------------------------------------------------
    def dispatch(self, op: str, args: dict[str, Any]) -> Any:
        k = self.k
        simple: dict[str, Callable[[], Any]] = {
            "ping": lambda: {"pid": os.getpid()},
            "state": lambda: ground_truth(k.st, self.root),
            "sysfs_write": lambda: k.sysfs_write(args["path"], args["value"]),
            "nl_link": lambda: k.nl_link(args["name"]),
            "nl_links": k.nl_links,
            "nl_vfs": lambda: k.nl_vfs(args["pf"]),
            "nl_set_vf": lambda: k.nl_set_vf(args["pf"], args["vf"], args["change"]),
            # a list of IFLA_VF_INFOs, applied in order: the first refused one stops the rest
            "nl_set_vfs": lambda: k.nl_set_vfs(args["pf"], args["infos"]),
            "nl_set_link": lambda: k.nl_set_link(args["name"], args["change"]),
            "nl_del_altname": lambda: k.nl_del_altname(args["name"], args["altname"]),
            "set_default_route": lambda: k.set_default_route(args["dev"]),
            "nl_addrs": lambda: k.nl_addrs(args["name"]),
            "nl_addr_add": lambda: k.nl_addr_add(args["name"], args["cidr"]),
            "nl_routes": lambda: k.nl_routes(args["name"]),
            "nl_route_add": lambda: k.nl_route_add(args["name"], args["dst"]),
            "set_fw": lambda: k.set_fw(args["pf"], int(args["next_boot_num_of_vfs"])),
            "modprobe": lambda: [x for n in args["names"] for x in
                                 k.load_module(n, use_blacklist=args.get("blacklist", False),
                                               host_tree=bool(args.get("host_tree", False)))],
            "load_hangs": lambda: k.hanging_loads(args["names"]),
            "modprobe_remove": lambda: [x for n in args["names"] for x in k.remove_module(n)],
            "rmmod": lambda: k.unload_module(args["name"]),
            "lsmod": k.lsmod_rows,
            "peermem": k.peermem_info,
            "openibd_stop": k.openibd_stop,
            "openibd_start": lambda: k.openibd_start(alt=bool(args.get("alt", False))),
        }
        if op not in simple:
            raise KernelError(22, f"unknown request {op!r}")
        return simple[op]()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        try:
            while line := await reader.readline():
                self.last_activity = time.monotonic()
                req = json.loads(line)
                op, args = req.get("op", ""), req.get("args", {})
                if op == "subscribe":
                    await self.stream_events(writer)
                    return
                if op == "shutdown":
                    self.stop.set()
                    reply: dict[str, Any] = {"ok": True, "result": None}
                elif op == "wait_settled":
                    reply = await self.wait_settled(float(args.get("timeout", 30)))
                else:
                    self.k.advance()
                    self.k.reply_at = None
                    try:
                        reply = {"ok": True, "result": self.dispatch(op, args)}
                    except KernelError as e:
                        reply = {"ok": False, "errno": e.errno, "error": e.strerror}
                    except (KeyError, TypeError, ValueError) as e:
                        reply = {"ok": False, "errno": 22, "error": f"bad request {op}: {e!r}"}
                    self.tick()
                    if self.k.reply_at is not None:  # a synchronous probe: answer when it ends
                        await self.until(self.k.reply_at)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            self.clients -= 1
            self.last_activity = time.monotonic()
            with contextlib.suppress(Exception):
                writer.close()

    async def until(self, when: float) -> None:
        """Hold this connection's reply until wall time `when`, then apply what is due (the
        probe's netdev appears as the write returns). Other connections are served meanwhile."""
        delay = when - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.k.advance()
        self.tick()

    async def wait_settled(self, timeout: float) -> dict[str, Any]:
        """Answer once no kernel or udev event is pending (tests wait on this, not on sleeps)."""
        self.tick()
        if self.k.next_due() is None:
            return {"ok": True, "result": True}
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.settled_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return {"ok": True, "result": True}
        except TimeoutError:
            return {"ok": False, "errno": 62, "error": f"events still pending after {timeout}s"}

    async def stream_events(self, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.k.bus.subscribers.append(queue.put_nowait)
        try:
            writer.write(b'{"ok": true, "result": "subscribed"}\n')
            await writer.drain()
            while True:
                props = await queue.get()
                writer.write(json.dumps(props).encode() + b"\n")
                await writer.drain()
        finally:
            self.k.bus.subscribers.remove(queue.put_nowait)

    def read_node_id(self) -> str:
        try:
            return (self.simdir / NODE_ID).read_text().strip()
        except FileNotFoundError:  # a node made before node ids: its directory's inode
            return f"inode:{self.simdir.stat().st_ino}"

    def node_gone(self) -> str | None:
        """Why this process no longer serves a node: its directory was deleted (or replaced by a
        new node's, `sim init --force`)."""
        try:
            node_id = self.read_node_id()
        except OSError:
            return "its directory was deleted"
        return None if node_id == self.node_id else "its directory now holds another node"

    async def idle_watch(self) -> None:
        """Exit when the node is gone, or when no client has been connected for the idle time
        (events still pending are not a reason to stay: a later kernel process catches up)."""
        while not self.stop.is_set():
            await asyncio.sleep(1.0)  # sleep-ok: idle check period of the simulator process
            gone = self.node_gone()
            if gone:
                print(f"simulated kernel {os.getpid()}: exiting, {gone}", file=sys.stderr)
                self.orphaned = True
                self.stop.set()
            elif not self.clients and time.monotonic() - self.last_activity > self.idle_exit_s:
                self.stop.set()

    async def serve(self, *, listening: Callable[[], None] | None = None,
                    signals: bool = True) -> None:
        """Serve until stopped; `listening` is called once the socket accepts connections;
        `signals=False` off the main thread (`kernel_thread`), which stops it by `stop`."""
        sock = self.simdir / "kernel.sock"
        sock.unlink(missing_ok=True)
        self.k.tree.render_all(self.k.st)  # repair anything a killed predecessor left half-done
        self.tick()
        with socket_address(sock) as address:
            server = await asyncio.start_unix_server(self.handle, path=address)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT) if signals else ():
            loop.add_signal_handler(sig, self.stop.set)
        if listening:
            listening()
        watcher = asyncio.create_task(self.idle_watch())
        async with server:
            await self.stop.wait()
        watcher.cancel()
        if self.orphaned:
            return
        sock.unlink(missing_ok=True)
        self.k.dirty = True
        self.persist()


def hold_kernel_lock(root: Path, owner: str) -> TextIO | None:
    """The node's kernel lock, taken and saying `owner` (what `stop_kernel` reads), or None when
    another kernel already serves the node."""
    # "a+", not "w": a start that loses the race must not erase the winner's PID
    lock = open(root / ".sim" / "kernel.lock", "a+")  # noqa: SIM115 - the caller holds it
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    lock.truncate(0)
    lock.write(owner)
    lock.flush()
    return lock


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mofed-lifecycle-simkernel",
                                 description="The kernel process of a simulated node (internal).")
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--idle-exit", type=float,
                    default=float(os.environ.get("MOFED_SIM_IDLE_EXIT_S", "600")))
    a = ap.parse_args(argv)
    root = a.root.resolve()
    lock = hold_kernel_lock(root, f"{os.getpid()}\n")  # held for the process's life
    if lock is None:
        return 0  # another kernel process already serves this node
    asyncio.run(KernelServer(root, a.idle_exit).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
