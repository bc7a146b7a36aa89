"""The environment contract: every variable the Network Operator injects, parsed once, validated.

The variables, their defaults and their meaning are today's driver container's
(`shared/field-notes.md` §2), so the operator can run us unchanged. `load_config(os.environ)`
returns a frozen `Config` or raises `ConfigError` whose one-line message names the variable, the
value and what is accepted (the CLI turns it into exit code 2). `SPECS` is the single table the
README's configuration section is generated from (`mofed-lifecycle config --markdown`).

Rules common to every variable:
- an unset variable takes its default; so does one set to the empty string, except where the empty
  string is meaningful (MLX5_AUXILIARY_MODULES="" disables the auxiliary-module handling, and free
  text variables whose default is "");
- surrounding whitespace is ignored;
- booleans accept true/false, 1/0, yes/no in any case, and nothing else;
- secrets (UBUNTU_PRO_TOKEN) are never logged nor echoed in an error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from .config_values import (  # noqa: F401 - some re-exported: callers parse with them
    parse_abs_path,
    parse_blacklist_modules,
    parse_bool,
    parse_build_flags,
    parse_count,
    parse_inventory_path,
    parse_modprobe_conf,
    parse_module_params,
    parse_node_ip,
    parse_optional_abs_path,
    parse_prom_path,
    parse_refused_secret,
    parse_refused_true,
    parse_seconds,
    parse_space_modules,
    parse_text,
    parse_udev_rules_path,
    parse_uplink_policy,
    parse_version,
    seconds_in,
)


class ConfigError(ValueError):
    """A bad environment variable: the message names it, its value and what is accepted."""


# ---- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One environment variable: its Config field, parser, default (as text) and meaning."""

    var: str
    field: str
    parse: Callable[[str], Any]
    default: str | None  # None: required
    meaning: str
    empty_is_value: bool = False  # "" is a value of its own rather than "use the default"
    secret: bool = False


DEFAULT_STORAGE = "ib_iser ib_isert ib_srp ib_srpt nvme_rdma nvmet_rdma rpcrdma xprtrdma"
DEFAULT_THIRD_PARTY = ("bnxt_re efa erdma iw_cxgb4 hfi1 hns_roce ionic_rdma irdma ib_qib mana_ib "
                       "ocrdma qedr rdma_rxe siw vmw_pvrdma")
DEFAULT_BLACKLIST = "mlx5_core:mlx5_ib:ib_umad:ib_uverbs:ib_ipoib:rdma_cm:rdma_ucm:ib_core:ib_cm"

SPECS: tuple[Spec, ...] = (
    Spec("NVIDIA_NIC_DRIVER_VER", "driver_version", parse_version, None,
         "driver version: build cache key and DTK flag name (only `run` needs it)"),
    Spec("NVIDIA_NIC_DRIVER_PATH", "driver_path", parse_optional_abs_path, "",
         "`run sources`: the driver's source tree (the directory holding install.pl); required "
         "in that mode", empty_is_value=True),
    Spec("NVIDIA_NIC_CONTAINER_VER", "container_version", parse_text, "",
         "container version, logged", empty_is_value=True),
    Spec("NVIDIA_NIC_DRIVERS_INVENTORY_PATH", "inventory_path", parse_inventory_path, "",
         "`run sources`: the build cache (`<kernel>/<version>` with `.checksum` and "
         "`.buildconfig`); a matching entry is installed without building, others' are "
         "cleaned; empty: every start builds", empty_is_value=True),
    Spec("ENABLE_NFSRDMA", "enable_nfsrdma", parse_bool, "false",
         "also compare nvme_rdma and rpcrdma srcversions; `modprobe rpcrdma` after the load"),
    Spec("UNLOAD_STORAGE_MODULES", "unload_storage_modules", parse_bool, "false",
         "allow unloading the storage ULPs that hold ib_core"),
    Spec("STORAGE_MODULES", "storage_modules", parse_space_modules, DEFAULT_STORAGE,
         "storage ULPs, space separated"),
    Spec("UNLOAD_THIRD_PARTY_RDMA_MODULES", "unload_third_party_rdma_modules", parse_bool, "false",
         "allow unloading other vendors' RDMA providers"),
    Spec("THIRD_PARTY_RDMA_MODULES", "third_party_rdma_modules", parse_space_modules,
         DEFAULT_THIRD_PARTY, "other vendors' RDMA providers, space separated"),
    Spec("MLX5_AUXILIARY_MODULES", "mlx5_auxiliary_modules", parse_space_modules,
         "mlx5_vdpa mlx5_fwctl mlx5_dpll",
         "unloaded before and reloaded after the restart; empty disables", empty_is_value=True),
    Spec("OFED_BLACKLIST_MODULES", "blacklist_modules", parse_blacklist_modules, DEFAULT_BLACKLIST,
         "modules blacklisted on the host around the reload, colon separated"),
    Spec("OFED_BLACKLIST_MODULES_FILE", "blacklist_file", parse_modprobe_conf,
         "/host/etc/modprobe.d/blacklist-ofed-modules.conf",
         "the blacklist file: the host's modprobe.d as mounted in the container"),
    Spec("BLACKLIST_SETTLE_SEC", "blacklist_settle_s", seconds_in(0, 60), "3",
         "after writing the blacklist, wait this long before unloading anything: udev re-reads "
         "modprobe.d lazily (at most every 3 s), and until it has, the host's udev may load its "
         "own driver by alias while the stack is unloaded; 0: no wait"),
    Spec("CREATE_IFNAMES_UDEV", "create_ifnames_udev", parse_bool, "false",
         "true (the operator injects it): a stale MLX_UDEV_RULES_FILE is removed at start and "
         "stop, and the rule keeping the inbox driver's short names (no `npN` suffix) is "
         "written when the node's ConnectX netdevs have them"),
    Spec("RESTORE_DRIVER_ON_POD_TERMINATION", "restore_driver_on_termination", parse_bool, "false",
         "on stop, put the inbox driver back (`mlnxofedctl --alt-mods force-restart`)"),
    Spec("BIND_DELAY_SEC", "bind_delay_s", seconds_in(0, 600), "4",
         "accepted for compatibility, and has no effect: today's fixed sleep per bind is "
         "replaced by waiting for each VF's probe and udev event (VF_RESTORE_TIMEOUT_SEC bounds "
         "it)"),
    Spec("USE_DKMS", "use_dkms", parse_refused_true, "false",
         "refused when true: runtime DKMS is not implemented (`run sources` builds with "
         "install.pl into the inventory, which a restart reuses)"),
    Spec("DTK_OCP_DRIVER_BUILD", "dtk_ocp_driver_build", parse_bool, "false",
         "`run sources` on OpenShift: hand the build to the driver-toolkit sidecar "
         "(`mofed-lifecycle dtk-build`, or upstream's) through DTK_OCP_NIC_SHARED_DIR"),
    Spec("DTK_OCP_NIC_SHARED_DIR", "dtk_shared_dir", parse_abs_path,
         "/mnt/shared-nvidia-nic-driver-toolkit",
         "DTK shared directory (`/<sanitised kernel>` is appended)"),
    Spec("DTK_BUILD_TIMEOUT_SEC", "dtk_build_timeout_s", seconds_in(1, 86400), "2400",
         "`run sources` with DTK: the longest wait for the sidecar's done flag (noticed by "
         "inotify at once); a sidecar that stops beating is reported within its heartbeat"),
    Spec("APPEND_DRIVER_BUILD_FLAGS", "append_driver_build_flags", parse_build_flags, "",
         "extra install.pl flags (shell words), part of the build cache's fingerprint",
         empty_is_value=True),
    Spec("BUILD_TIMEOUT_SEC", "build_timeout_s", seconds_in(1, 86400), "3600",
         "one driver build (install.pl) may take this long before it is killed (its log is "
         "kept, its tail is in the error)"),
    Spec("BUILD_PROGRESS_SEC", "build_progress_s", seconds_in(0.05, 30), "30",
         "seconds between progress lines of a running build (or DTK wait)"),
    Spec("ENTRYPOINT_DEBUG", "entrypoint_debug", parse_bool, "false",
         "keep a debug trace, and sleep before exiting on failure"),
    Spec("DEBUG_LOG_FILE", "debug_log_file", parse_abs_path, "/tmp/entrypoint_debug_cmds.log",
         "where the debug trace goes"),
    Spec("DEBUG_SLEEP_SEC_ON_EXIT", "debug_sleep_on_exit_s", seconds_in(0, 86400), "300",
         "with ENTRYPOINT_DEBUG, seconds to sleep before exiting on failure"),
    Spec("DRIVER_READY_PATH", "driver_ready_path", parse_abs_path,
         "/run/mellanox/drivers/.driver-ready", "the readiness marker"),
    Spec("LOCK_FILE_PATH", "lock_file_path", parse_abs_path, "/run/mellanox/drivers/.lock",
         "flock held while running: one instance per node"),
    Spec("MLX_DRIVERS_MOUNT", "drivers_mount", parse_abs_path, "/run/mellanox/drivers",
         "the drivers mount shared with the host (journal and status live here)"),
    Spec("SHARED_KERNEL_HEADERS_DIR", "shared_kernel_headers_dir", parse_abs_path,
         "/usr/src/", "the headers (ofa_kernel) the GPU side builds nvidia-peermem against: "
         "bind-mounted at MLX_DRIVERS_MOUNT + this path; a stale mount there is made again at "
         "start, and it is unmounted on stop"),
    Spec("MLX_UDEV_RULES_FILE", "udev_rules_file", parse_udev_rules_path,
         "/host/etc/udev/rules.d/77-mlnx-net-names.rules",
         "the short-name udev rule CREATE_IFNAMES_UDEV writes (the host's rules.d as mounted)"),
    # mofed-lifecycle's own settings (not in today's container): bounds on waits and retries.
    Spec("OPENIBD_TIMEOUT_SEC", "openibd_timeout_s", seconds_in(0.01, 14400), "600",
         "one `openibd restart` may take this long before it is killed and retried"),
    Spec("OPENIBD_ATTEMPTS", "openibd_attempts", parse_count, "3",
         "`openibd restart` attempts before the reload counts as failed"),
    Spec("TOOL_TIMEOUT_SEC", "tool_timeout_s", seconds_in(0.5, 3600), "60",
         "one modinfo, modprobe, rmmod or mount may take this long before it is killed; the "
         "commands of one step (the stack's modinfo, the holders unloaded, the modules loaded "
         "back) share twice this, so hanging modprobes cannot stretch a stop past its budget"),
    Spec("RECHECK_INTERVAL_SEC", "recheck_interval_s", seconds_in(0.01, 86400), "60",
         "after a refused or failed reload: seconds between re-checks (the daemon stays up)"),
    Spec("VF_RESTORE_TIMEOUT_SEC", "vf_restore_timeout_s", seconds_in(0.01, 14400), "300",
         "one deadline for the whole VF restore (PF netdevs back, every VF netdev ready)"),
    Spec("VF_RESTORE_WORKERS", "vf_restore_workers", parse_count, "8",
         "VFs whose netdev is finished (MTU, up/down) concurrently"),
    Spec("VF_BIND_WORKERS", "vf_bind_workers", parse_count, "16",
         "VF bind writes in flight at once; each lasts its VF's driver probe, so where the NIC "
         "probes in parallel the VFs come back about as fast as the slowest probe"),
    Spec("UPLINK_POLICY", "uplink_policy", parse_uplink_policy, "restore",
         "the node's default route on a ConnectX PF the reload takes down (directly or through a "
         "bond): restore (its addresses, routes, MTU and bond membership saved, then re-applied "
         "as soon as the PF is back, before its VFs; a VLAN on the PF itself, which dies with "
         "it, refuses the reload), refuse (the reload), ignore (warn only)"),
    Spec("NODE_IP", "node_ip", parse_node_ip, "",
         "the node's IP (in Kubernetes the DaemonSet sets it from status.hostIP): the netdev "
         "holding it is protected by UPLINK_POLICY like the default route's; empty: the default "
         "route's only"),
    Spec("READY_ON_PARTIAL_RESTORE", "ready_on_partial_restore", parse_bool, "true",
         "set the readiness marker when some VFs could not be restored (they are reported by PCI "
         "address in the log and status.json, and retried at the next start); false: stay not "
         "ready and retry every RECHECK_INTERVAL_SEC"),
    Spec("HEARTBEAT_INTERVAL_SEC", "heartbeat_interval_s", seconds_in(0.05, 3600), "10",
         "seconds between heartbeats (`heartbeat.json` beside the journal) that `mofed-lifecycle "
         "probe live` checks"),
    Spec("METRICS_TEXTFILE", "metrics_textfile", parse_prom_path, "",
         "Prometheus metrics for node_exporter's textfile collector, rewritten atomically on "
         "every state change (a `.prom` path); empty: off", empty_is_value=True),
    # The peermem loader (`mofed-lifecycle peermem`, GPU side) and the lifecycle's side of it.
    Spec("PEERMEM_UNLOAD_WAIT_SEC", "peermem_unload_wait_s", seconds_in(0, 3600), "30",
         "before a reload, seconds to wait for a watching peermem loader to unload nvidia_peermem "
         "(then the lifecycle unloads it itself if unused, or refuses the reload if in use)"),
    Spec("GPU_DRIVER_READY_PATH", "gpu_driver_ready_path", parse_abs_path,
         "/run/nvidia/validations/.driver-ctr-ready",
         "the GPU driver container's readiness marker"),
    Spec("PEERMEM_WAIT_GPU_DRIVER", "peermem_wait_gpu_driver", parse_bool, "false",
         "peermem: also wait for GPU_DRIVER_READY_PATH and the `nvidia` module (a sidecar); false "
         "when it runs inside the GPU driver container, before that marker exists"),
    Spec("PEERMEM_MODULE_PARAMS", "peermem_module_params", parse_module_params, "",
         "peermem: module parameters for `modprobe nvidia-peermem`, space separated `name=value`",
         empty_is_value=True),
    Spec("PEERMEM_MODPROBE_TIMEOUT_SEC", "peermem_modprobe_timeout_s", seconds_in(0.01, 3600),
         "60", "peermem: `modprobe nvidia-peermem` may take this long before it is killed"),
    Spec("PEERMEM_DEBOUNCE_SEC", "peermem_debounce_s", seconds_in(0, 600), "1",
         "peermem: the NIC driver's srcversions must stay the same this long before a load"),
    Spec("PEERMEM_RECHECK_SEC", "peermem_recheck_s", seconds_in(0.01, 3600), "10",
         "peermem: the longest pause between re-checks of what inotify cannot see (modules, "
         "/proc/kallsyms) while waiting; rechecks back off from 0.1 s to this"),
    Spec("UBUNTU_PRO_TOKEN", "ubuntu_pro_token", parse_refused_secret, "",
         "refused when set: attaching Ubuntu Pro (upstream, to fetch ESM kernel headers) is not "
         "implemented; put the headers in the image (never logged)", empty_is_value=True,
         secret=True),
)


@dataclass(frozen=True)
class Config:
    """The parsed environment. Paths are node paths: resolve them through `NodePaths`."""

    driver_version: str
    driver_path: str
    container_version: str
    inventory_path: str
    enable_nfsrdma: bool
    unload_storage_modules: bool
    storage_modules: tuple[str, ...]
    unload_third_party_rdma_modules: bool
    third_party_rdma_modules: tuple[str, ...]
    mlx5_auxiliary_modules: tuple[str, ...]
    blacklist_modules: tuple[str, ...]
    blacklist_settle_s: float
    blacklist_file: str
    create_ifnames_udev: bool
    restore_driver_on_termination: bool
    bind_delay_s: float
    use_dkms: bool
    dtk_ocp_driver_build: bool
    dtk_shared_dir: str
    dtk_build_timeout_s: float
    append_driver_build_flags: str
    build_timeout_s: float
    build_progress_s: float
    entrypoint_debug: bool
    debug_log_file: str
    debug_sleep_on_exit_s: float
    driver_ready_path: str
    lock_file_path: str
    drivers_mount: str
    shared_kernel_headers_dir: str
    udev_rules_file: str
    openibd_timeout_s: float
    openibd_attempts: int
    tool_timeout_s: float
    recheck_interval_s: float
    vf_restore_timeout_s: float
    vf_restore_workers: int
    vf_bind_workers: int
    uplink_policy: str
    node_ip: str
    ready_on_partial_restore: bool
    heartbeat_interval_s: float
    metrics_textfile: str
    peermem_unload_wait_s: float
    gpu_driver_ready_path: str
    peermem_wait_gpu_driver: bool
    peermem_module_params: tuple[str, ...]
    peermem_modprobe_timeout_s: float
    peermem_debounce_s: float
    peermem_recheck_s: float
    ubuntu_pro_token: str

    def __repr__(self) -> str:  # a traceback or a debug print never shows the secret
        return f"Config({self.loggable()!r})"

    def loggable(self) -> dict[str, Any]:
        """Every field, secrets replaced by "(set)" / "(unset)": safe to log."""
        out: dict[str, Any] = {}
        for spec in SPECS:
            value = getattr(self, spec.field)
            if spec.secret:
                value = "(set)" if value else "(unset)"
            elif isinstance(value, tuple):
                value = list(value)
            out[spec.field] = value
        return out


def _describe(value: str) -> str:
    shown = value if len(value) <= 80 else value[:77] + "..."
    return repr(shown)


def load_config(env: Mapping[str, str], *, require_driver_version: bool = True) -> Config:
    """Parse `env` (normally os.environ) into a Config; ConfigError names the first bad one."""
    values: dict[str, Any] = {}
    for spec in SPECS:
        raw = env.get(spec.var)
        text = raw.strip() if raw is not None else None
        if text is None or (text == "" and not spec.empty_is_value):
            if spec.default is None:
                if require_driver_version:
                    raise ConfigError(f"{spec.var} is not set: it is required; set it to the "
                                      "installed driver's version, e.g. 25.07-0.9.7")
                values[spec.field] = ""
                continue
            text = spec.default
        try:
            values[spec.field] = spec.parse(text)
        except ValueError as e:
            shown = "(hidden: a secret)" if spec.secret else _describe(raw or "")
            raise ConfigError(f"{spec.var}={shown}: {e}") from None
    return Config(**values)



def markdown_table() -> str:
    """The README's configuration table, generated from SPECS."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SPECS:
        default = "required" if s.default is None else (f"`{s.default}`" if s.default else '""')
        rows.append(f"| `{s.var}` | {default} | {s.meaning} |")
    return "\n".join(rows)


assert {s.field for s in SPECS} == {f.name for f in fields(Config)}, "SPECS and Config disagree"
