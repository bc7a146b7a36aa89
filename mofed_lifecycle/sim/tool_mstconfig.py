"""The stand-in `mstconfig [-e] -d PCI q [PARAM...]`: a PF's firmware configuration as NVRAM
holds it, with `-e` its Default, Current and Next Boot columns (a change waits for a cold boot).

Read from `.sim/fw.json` (the kernel process writes it as the firmware changes: `sim set fw`),
with `os`, `sys` and `json` only, like the stand-in modinfo: `doctor` asks once per PF.
"""

from __future__ import annotations

import json
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO


def mstconfig(root: str, argv: list[str], out: TextIO | None = None,
              err: TextIO | None = None) -> int:
    stdout, stderr = out or sys.stdout, err or sys.stderr
    query = "q" if "q" in argv else "query" if "query" in argv else None
    if "-d" not in argv[:-1] or query is None:
        print("-E- the simulated mstconfig only knows: mstconfig [-e] -d PCI q [PARAM...]",
              file=stderr)
        return 1
    pci = argv[argv.index("-d") + 1]
    try:
        with open(os.path.join(root, ".sim", "fw.json")) as f:
            fw = json.load(f).get(pci)
    except (OSError, ValueError):
        fw = None
    if fw is None:
        print(f"-E- Failed to open device: {pci}. No such device", file=stderr)
        return 1

    def b(v: bool) -> str:
        return "True(1)" if v else "False(0)"

    rows = {"NUM_OF_VFS": ("8", str(fw["num_of_vfs"]), str(fw["next_boot_num_of_vfs"])),
            "SRIOV_EN": (b(True), b(fw["sriov_en"]), b(fw["sriov_en"]))}
    wanted = [a for a in argv[argv.index(query) + 1:] if a in rows]
    print("\nDevice #1:\n----------\n\nDevice type:        ConnectX6DX\n"
          f"Device:             {pci}\n", file=stdout)
    extended = "-e" in argv
    print("Configurations:" + " " * 26 + ("Default             Current             Next Boot"
                                          if extended else "Next Boot"), file=stdout)
    for name in wanted or list(rows):
        d, c, n = rows[name]
        mark = "*" if extended and (c != d or n != d) else " "
        print(f"{mark}        {name:<32}" + (f"{d:<20}{c:<20}{n}" if extended else n),
              file=stdout)
    return 0


def main(root: str) -> int:
    return mstconfig(root, sys.argv[1:])
