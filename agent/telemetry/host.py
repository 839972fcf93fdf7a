"""Host metrics: observable OpenTelemetry instruments fed by psutil at each collection.

Names, units and attributes follow the OpenTelemetry `system.*` semantic conventions
(docs/agents.md lists them). Series are bounded on a busy node: pseudo and network
filesystems, loop/RAM disks, disk partitions and per-container `veth*` interfaces are
left out, and at most `MAX_FILESYSTEMS` / `MAX_DISKS` / `MAX_INTERFACES` of each are
reported (the first ones by name).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import psutil
from opentelemetry.metrics import CallbackOptions, Meter, Observation

log = logging.getLogger(__name__)

MAX_FILESYSTEMS = 32
MAX_DISKS = 32
MAX_INTERFACES = 32

CPU_MODES = ("user", "system", "idle", "iowait", "nice", "irq", "softirq", "steal")
MEMORY_STATES = ("used", "free", "cached", "buffers")
# Always reported (0 when none), so that an alert on e.g. zombies sees a value.
PROCESS_STATUSES = (
    psutil.STATUS_RUNNING,
    psutil.STATUS_SLEEPING,
    psutil.STATUS_DISK_SLEEP,
    psutil.STATUS_STOPPED,
    psutil.STATUS_ZOMBIE,
    psutil.STATUS_IDLE,
)

# Virtual filesystems (no disk behind them) and network filesystems (a hung server would
# block statvfs, and with it the whole collection).
SKIPPED_FILESYSTEMS = frozenset(
    {
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs",
        "devpts", "devtmpfs", "efivarfs", "fusectl", "fuse.lxcfs", "fuse.gvfsd-fuse",
        "hugetlbfs", "mqueue", "nsfs", "overlay", "proc", "pstore", "ramfs", "rpc_pipefs",
        "securityfs", "selinuxfs", "squashfs", "sysfs", "tmpfs", "tracefs", "aufs",
        "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "fuse.sshfs",
        "iso9660", "nullfs", "devfs", "fdescfs", "procfs", "linprocfs",
    }
)  # fmt: skip
SKIPPED_MOUNT_PREFIXES = ("/proc/", "/sys/", "/dev/", "/run/credentials/", "/snap/")
# Loop and RAM disks mirror files or memory; partitions are already counted in their disk.
SKIPPED_DISKS = re.compile(
    r"^(loop\d+|ram\d+|zram\d+|fd\d+|sr\d+"
    r"|(sd|vd|hd|xvd)[a-z]+\d+|nvme\d+n\d+p\d+|mmcblk\d+p\d+)$"
)
# One veth per container comes and goes with it: each would mint new series. Container
# traffic is still seen on its bridge. Loopback stays: local traffic (nginx to PHP-FPM,
# apps to their database) is real work on a hosting node.
SKIPPED_INTERFACES = re.compile(r"^veth")


@dataclass(frozen=True)
class Filesystem:
    device: str
    mountpoint: str


T = TypeVar("T")


class HostMetrics:
    """Registers the host instruments on `meter`; psutil is read on the collecting thread."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._cpu_previous = psutil.cpu_times()
        self._capped: set[str] = set()
        gauge, counter = meter.create_observable_gauge, meter.create_observable_counter
        gauge(
            "system.cpu.utilization",
            [self._cpu_utilization],
            "1",
            "Share of machine-wide CPU time per mode since the previous collection",
        )
        counter("system.cpu.time", [self._cpu_time], "s", "CPU seconds per mode")
        for window, index in (("1m", 0), ("5m", 1), ("15m", 2)):
            gauge(
                f"system.cpu.load_average.{window}",
                [self._load(index)],
                "1",
                f"Load average over {window}",
            )
        gauge("system.memory.usage", [self._memory_usage], "By", "Memory in use, per state")
        gauge("system.memory.utilization", [self._memory_utilization], "1", "Share of memory")
        gauge("system.paging.usage", [self._paging_usage], "By", "Swap space, per state")
        gauge("system.filesystem.usage", [self._filesystem_usage], "By", "Filesystem space")
        gauge(
            "system.filesystem.utilization",
            [self._filesystem_utilization],
            "1",
            "Share of filesystem space used (as df shows it)",
        )
        counter("system.disk.io", [self._disk_io], "By", "Bytes read and written")
        counter("system.disk.operations", [self._disk_operations], "{operation}", "Disk operations")
        counter("system.network.io", [self._network("bytes")], "By", "Network bytes")
        counter("system.network.errors", [self._network("errors")], "{packet}", "Network errors")
        counter("system.network.dropped", [self._network("dropped")], "{packet}", "Dropped packets")
        gauge("system.process.count", [self._process_count], "{process}", "Processes by status")
        gauge("system.uptime", [self._uptime], "s", "Seconds since boot")

    # --- CPU --------------------------------------------------------------------------

    def _cpu_utilization(self, _: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            now = psutil.cpu_times()
            previous, self._cpu_previous = self._cpu_previous, now
        deltas = {
            mode: max(0.0, getattr(now, mode, 0.0) - getattr(previous, mode, 0.0))
            for mode in CPU_MODES
            if hasattr(now, mode)
        }
        total = sum(deltas.values())
        if total <= 0:
            return []
        return [Observation(d / total, {"cpu.mode": mode}) for mode, d in deltas.items()]

    def _cpu_time(self, _: CallbackOptions) -> Iterable[Observation]:
        times = psutil.cpu_times()
        return [
            Observation(getattr(times, mode), {"cpu.mode": mode})
            for mode in CPU_MODES
            if hasattr(times, mode)
        ]

    @staticmethod
    def _load(index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(psutil.getloadavg()[index])]

        return observe

    # --- memory -----------------------------------------------------------------------

    def _memory_states(self) -> tuple[int, dict[str, int]]:
        vm = psutil.virtual_memory()
        return vm.total, {s: int(getattr(vm, s)) for s in MEMORY_STATES if hasattr(vm, s)}

    def _memory_usage(self, _: CallbackOptions) -> Iterable[Observation]:
        _total, states = self._memory_states()
        return [Observation(v, {"system.memory.state": s}) for s, v in states.items()]

    def _memory_utilization(self, _: CallbackOptions) -> Iterable[Observation]:
        total, states = self._memory_states()
        if total <= 0:
            return []
        return [Observation(v / total, {"system.memory.state": s}) for s, v in states.items()]

    def _paging_usage(self, _: CallbackOptions) -> Iterable[Observation]:
        swap = psutil.swap_memory()
        return [
            Observation(swap.used, {"system.paging.state": "used"}),
            Observation(swap.free, {"system.paging.state": "free"}),
        ]

    # --- filesystems and disks --------------------------------------------------------

    def filesystems(self) -> list[Filesystem]:
        """Real local filesystems, one per block device (bind mounts report the same
        space), first `MAX_FILESYSTEMS` by mountpoint."""
        chosen: dict[str, Filesystem] = {}
        for part in sorted(psutil.disk_partitions(all=True), key=lambda p: p.mountpoint):
            if part.fstype in SKIPPED_FILESYSTEMS or not part.fstype:
                continue
            if part.mountpoint.startswith(SKIPPED_MOUNT_PREFIXES) or part.device == "none":
                continue
            key = part.device if part.device.startswith("/") else part.mountpoint
            chosen.setdefault(key, Filesystem(part.device, part.mountpoint))
        found = sorted(chosen.values(), key=lambda f: f.mountpoint)
        return self._cap("filesystems", found, MAX_FILESYSTEMS)

    def _usage(self) -> list[tuple[Filesystem, int, int]]:
        out = []
        for fs in self.filesystems():
            try:
                usage = psutil.disk_usage(fs.mountpoint)
            except OSError as exc:
                log.debug("cannot read usage of %s: %s", fs.mountpoint, exc)
                continue
            out.append((fs, usage.used, usage.free))
        return out

    def _filesystem_usage(self, _: CallbackOptions) -> Iterable[Observation]:
        out = []
        for fs, used, free in self._usage():
            for state, value in (("used", used), ("free", free)):
                out.append(
                    Observation(
                        value,
                        {
                            "system.device": fs.device,
                            "system.filesystem.mountpoint": fs.mountpoint,
                            "system.filesystem.state": state,
                        },
                    )
                )
        return out

    def _filesystem_utilization(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(
                used / (used + free),
                {"system.device": fs.device, "system.filesystem.mountpoint": fs.mountpoint},
            )
            for fs, used, free in self._usage()
            if used + free > 0
        ]

    def _disks(self) -> list[tuple[str, Any]]:
        counters = psutil.disk_io_counters(perdisk=True) or {}
        names = sorted(n for n in counters if not SKIPPED_DISKS.match(n))
        return [(n, counters[n]) for n in self._cap("disks", names, MAX_DISKS)]

    def _disk_io(self, _: CallbackOptions) -> Iterable[Observation]:
        out = []
        for name, c in self._disks():
            out.append(
                Observation(c.read_bytes, {"system.device": name, "disk.io.direction": "read"})
            )
            out.append(
                Observation(c.write_bytes, {"system.device": name, "disk.io.direction": "write"})
            )
        return out

    def _disk_operations(self, _: CallbackOptions) -> Iterable[Observation]:
        out = []
        for name, c in self._disks():
            out.append(
                Observation(c.read_count, {"system.device": name, "disk.io.direction": "read"})
            )
            out.append(
                Observation(c.write_count, {"system.device": name, "disk.io.direction": "write"})
            )
        return out

    # --- network, processes, uptime ---------------------------------------------------

    def _network(self, kind: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        fields = {
            "bytes": ("bytes_recv", "bytes_sent"),
            "errors": ("errin", "errout"),
            "dropped": ("dropin", "dropout"),
        }[kind]

        def observe(_: CallbackOptions) -> Iterable[Observation]:
            counters = psutil.net_io_counters(pernic=True) or {}
            names = sorted(n for n in counters if not SKIPPED_INTERFACES.match(n))
            out = []
            for name in self._cap("network interfaces", names, MAX_INTERFACES):
                c = counters[name]
                for direction, field in zip(("receive", "transmit"), fields, strict=True):
                    out.append(
                        Observation(
                            getattr(c, field),
                            {"network.interface.name": name, "network.io.direction": direction},
                        )
                    )
            return out

        return observe

    def _process_count(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = dict.fromkeys(PROCESS_STATUSES, 0)
        for proc in psutil.process_iter(["status"]):
            status = proc.info.get("status")
            if isinstance(status, str):
                counts[status] = counts.get(status, 0) + 1
        return [Observation(n, {"process.status": status}) for status, n in sorted(counts.items())]

    def _uptime(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(max(0.0, time.time() - psutil.boot_time()))]

    # --- helpers ----------------------------------------------------------------------

    def _cap(self, kind: str, items: list[T], limit: int) -> list[T]:
        if len(items) > limit and kind not in self._capped:
            self._capped.add(kind)
            log.warning(
                "this node has %d %s; reporting the first %d to keep metric series bounded",
                len(items),
                kind,
                limit,
            )
        return items[:limit]
