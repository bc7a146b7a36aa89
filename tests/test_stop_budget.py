"""The SIGTERM budget `status` prints bounds the real worst case (issue 11, item 7): a stop that
lands as the swap starts, on a node whose storage and third-party RDMA modules all hang in
`modprobe` when they are loaded back, ends within it: the modules loaded back share one budget."""

from __future__ import annotations

import json
import signal
import time

from mofed_lifecycle.config import load_config
from mofed_lifecycle.lifecycle.budget import COMMAND_OVERRUN_S, stop_budget_s, tools_budget_s

from .test_lifecycle import JOURNAL, MARKER, events, lifecycle, wait_for
from .test_no_harm import vf_fields

HANGING = ["nvme_rdma", "nvmet_rdma", "rpcrdma", "ib_isert", "ib_srpt",  # storage ULPs
           "bnxt_re", "efa", "irdma", "siw", "rdma_rxe"]  # other vendors' RDMA providers
NODE = """
[node]
name = "hanging-modprobes"
time_scale = 0.01
seed = 5
[driver]
loaded_version = "24.10-1.1.4"
installed_version = "25.07-0.9.7"
openibd_restart_s = 50
extra_modules = [EXTRA]
[udev]
netdev_delay_s = 0.3
[[pf]]
pci = "0000:18:00.0"
name = "ibp24s0"
link = "ib"
numvfs = 2
vf.0 = { node_guid = "00:11:22:33:44:55:18:00", port_guid = "00:11:22:33:44:55:18:01" }
""".replace("EXTRA", ", ".join(f'{{ name = "{m}", holds = ["ib_core"], load_hangs = true }}'
                             for m in HANGING))
ENV = {"UNLOAD_STORAGE_MODULES": "true", "UNLOAD_THIRD_PARTY_RDMA_MODULES": "true",
       "TOOL_TIMEOUT_SEC": "1", "OPENIBD_TIMEOUT_SEC": "5", "VF_RESTORE_TIMEOUT_SEC": "5"}


def state_durations(root) -> dict[str, float]:
    hist = [h for h in json.loads((root / JOURNAL).read_text())["history"] if "state" in h]
    return {a["state"]: b["at"] - a["at"] for a, b in zip(hist, hist[1:], strict=False)}


def test_sigterm_as_the_swap_starts_ends_within_the_printed_budget_despite_hanging_modprobes(
        make_node):
    root, k = make_node(NODE, "hang")
    before = k.call("state")
    config = load_config({**ENV, "NVIDIA_NIC_DRIVER_VER": "25.07-0.9.7"})
    budget = stop_budget_s(config)
    p = lifecycle(root, env=ENV, wait=False)  # the daemon, not --once: it serves until SIGTERM
    wait_for(lambda: (root / JOURNAL).exists() and
             '"state": "blacklist"' in (root / JOURNAL).read_text(), "the swap to start")
    p.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = p.communicate(timeout=budget + 30)
    took = time.monotonic() - sent
    assert p.returncode == 0, stderr[-3000:]
    assert took <= budget, f"stopped in {took:.1f}s, budget {budget:g}s"
    # the modules loaded back shared one budget: ten hanging modprobes did not take ten timeouts
    spent = state_durations(root)["reload-aux"]
    assert spent <= tools_budget_s(config) + COMMAND_OVERRUN_S, spent
    after = k.call("state")
    assert after["blacklist_files"] == [] and not after["markers"][MARKER]
    assert vf_fields(after) == vf_fields(before)  # the swap was finished and the VFs restored
    assert not set(HANGING) & set(after["modules"])
    ev = events(stderr)
    named = {e["module"] for e in ev if e["event"] == "module.not_loaded_back"}
    assert named == set(HANGING)  # every one is named, tried or not
    # those never tried stay owed: the next start tries them again
    owed = json.loads((root / JOURNAL).read_text())["facts"]["unloaded_for_swap"]
    assert owed and set(owed) < set(HANGING)
