"""Restore decisions, pure: only what differs is changed; zero GUIDs and unset MACs are skipped."""

from __future__ import annotations

from dataclasses import asdict, replace

from hypothesis import given
from hypothesis import strategies as st

from mofed_lifecycle.host.netlink_types import ZERO_GUID, LinkInfo, VfSettings
from mofed_lifecycle.sriov.model import PfSnapshot, Snapshot, VfSnapshot
from mofed_lifecycle.sriov.plan import (
    NumvfsAction,
    identity_changes,
    link_change,
    must_rebind,
    numvfs_action,
    vf_change,
)

MAC = "02:00:00:00:01:01"


def eth_vf(**kw) -> VfSnapshot:
    settings = VfSettings(index=1, mac=MAC, vlan=100, qos=3, spoofchk=False, trust=True,
                          link_state="enable", min_tx_rate=0, max_tx_rate=1000)
    return VfSnapshot(index=1, pci="0000:01:00.3", settings=replace(settings, **kw),
                      driver="mlx5_core", netdev="enp1s0f0v1", mtu=9000, up=True)


def link(address: str, mtu: int = 1500, up: bool = False) -> LinkInfo:
    return LinkInfo(ifindex=7, name="eth0", mtu=mtu, up=up, address=address, link_type=1)


def test_a_fresh_vf_gets_every_saved_setting():
    change = vf_change(eth_vf().settings, VfSettings(index=1, mac="00:00:00:00:00:00"), ib=False)
    assert (change.mac, change.vlan, change.qos, change.trust, change.spoofchk) == (
        MAC, 100, 3, True, False)
    assert (change.link_state, change.max_tx_rate, change.min_tx_rate) == ("enable", 1000, 0)
    assert identity_changes(change)


def test_a_vf_that_already_matches_needs_nothing():
    assert vf_change(eth_vf().settings, eth_vf().settings, ib=False).is_empty()


def test_unset_macs_and_zero_guids_are_skipped_not_written():
    saved = VfSettings(index=0, mac="00:00:00:00:00:00")
    assert vf_change(saved, VfSettings(index=0, mac="02:aa:00:00:00:01"), ib=False).mac is None
    ib = VfSettings(index=0, node_guid=ZERO_GUID, port_guid="00:11:22:33:44:55:66:77")
    change = vf_change(ib, VfSettings(index=0, node_guid=ZERO_GUID, port_guid=ZERO_GUID), ib=True)
    assert change.node_guid is None and change.port_guid == "00:11:22:33:44:55:66:77"
    assert change.mac is None  # IB VFs have no MAC to set


def test_settings_the_driver_did_not_report_are_left_alone():
    saved = VfSettings(index=0, trust=None, spoofchk=None, link_state=None)
    assert vf_change(saved, VfSettings(index=0, trust=True, spoofchk=False), ib=False).is_empty()


def test_numvfs_actions_follow_the_kernel_rules():
    assert numvfs_action(50, 0) is NumvfsAction.CREATE
    assert numvfs_action(50, 50) is NumvfsAction.KEEP
    assert numvfs_action(50, 8) is NumvfsAction.RECREATE  # EBUSY unless 0 first
    assert numvfs_action(0, 8) is NumvfsAction.NONE  # never destroy VFs the snapshot did not have


def test_a_bound_vf_is_rebound_only_when_its_netdev_cannot_show_its_identity():
    vf = eth_vf()
    assert must_rebind(vf, "mlx5_core", link(MAC), ib=False, identity_changed=True)
    assert not must_rebind(vf, "mlx5_core", link(MAC), ib=False, identity_changed=False)
    assert must_rebind(vf, "mlx5_core", link("02:99:99:99:99:99"), ib=False,
                       identity_changed=False)
    assert not must_rebind(vf, None, None, ib=False, identity_changed=True)  # binds once anyway
    vfio = replace(vf, driver="vfio-pci")
    assert not must_rebind(vfio, "vfio-pci", None, ib=False, identity_changed=True)


def test_link_change_sets_only_mtu_and_state_that_differ():
    vf = eth_vf()
    assert link_change(vf, link(MAC, mtu=1500, up=False)).mtu == 9000
    change = link_change(vf, link(MAC, mtu=9000, up=True))
    assert change.mtu is None and change.up is None


guids = st.one_of(st.just(ZERO_GUID),
                  st.binary(min_size=8, max_size=8).map(lambda b: ":".join(f"{x:02x}" for x in b)))
settings = st.builds(
    VfSettings, index=st.just(0),
    mac=st.binary(min_size=6, max_size=6).map(
        lambda b: ":".join(f"{x:02x}" for x in bytes([b[0] & 0xFE | 0x02]) + b[1:])),
    vlan=st.integers(0, 4095), qos=st.integers(0, 7), spoofchk=st.booleans(),
    trust=st.booleans(), link_state=st.sampled_from(["auto", "enable", "disable"]),
    min_tx_rate=st.integers(0, 100), max_tx_rate=st.integers(0, 100000),
    node_guid=guids, port_guid=guids)


@given(saved=settings, current=settings, ib=st.booleans())
def test_applying_the_change_makes_the_vf_match_and_a_second_pass_changes_nothing(saved, current,
                                                                                   ib):
    change = vf_change(saved, current, ib=ib)
    applied = replace(current, **{k: v for k, v in asdict(change).items() if v is not None})
    again = vf_change(saved, applied, ib=ib)
    assert again.is_empty()
    for key in ("vlan", "qos", "spoofchk", "trust", "link_state", "min_tx_rate", "max_tx_rate"):
        assert getattr(applied, key) == getattr(saved, key)
    if not ib:
        assert applied.mac == saved.mac
    for key in ("node_guid", "port_guid"):
        if ib and getattr(saved, key) != ZERO_GUID:
            assert getattr(applied, key) == getattr(saved, key)
        if getattr(saved, key) == ZERO_GUID:  # never written
            assert getattr(change, key) is None


def test_snapshot_round_trips_through_json():
    pf = PfSnapshot(pci="0000:01:00.0", netdev="enp1s0f0np0", link_type=1, mtu=9000, up=True,
                    mac="02:00:00:00:00:01", eswitch="legacy", numvfs=1, autoprobe=True,
                    vfs=(eth_vf(),))
    snap = Snapshot(taken_at=1.5, pfs=(pf,))
    assert Snapshot.from_json(snap.to_json()) == snap and snap.vf_count == 1


@given(st.permutations(list(range(6))))
def test_two_phase_renames_never_collide_and_end_with_the_saved_names(perm):
    from mofed_lifecycle.sriov.plan import rename_plan

    current = {i: f"rep{i}" for i in range(6)}
    wanted = {i: f"rep{perm[i]}" for i in range(6)}
    names = set(current.values())
    for old, new in rename_plan(current, wanted, lambda i: f"tmp{i}"):
        assert old in names and new not in names  # a rename never hits a name in use
        names.remove(old)
        names.add(new)
    assert names == set(wanted.values())
