"""The reload decision and the preflight plan: pure functions over srcversions and holder graphs."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from mofed_lifecycle.config import Config, load_config
from mofed_lifecycle.lifecycle.decide import compared_modules, decide
from mofed_lifecycle.lifecycle.preflight import (
    STACK,
    Category,
    ModuleFacts,
    classify,
    plan,
)

OLD, NEW = "1852822C2F9ABA6A93704E4", "AE6029416A873D39E95B044"
CORE3 = ("mlx5_core", "mlx5_ib", "ib_core")


def config(**env: str) -> Config:
    return load_config(env, require_driver_version=False)


BASE = config()


def graph(*rows: tuple[str, int, tuple[str, ...]]) -> dict[str, ModuleFacts]:
    return {name: ModuleFacts(name, refcnt, holders) for name, refcnt, holders in rows}


def ib_node(*, peermem_users: int = 1, **extra: tuple[int, tuple[str, ...]]) -> dict:
    """tiny-ib-holders: nvme_rdma holds ib_core and rdma_cm, mlx5_fwctl holds mlx5_core,
    nvidia_peermem holds ib_core and ib_uverbs and has `peermem_users` users."""
    rows = [
        ("mlx_compat", 4, ("ib_core", "mlx5_core", "mlx5_ib", "rdma_cm")),
        ("ib_core", 5, ("mlx5_ib", "rdma_cm", "ib_uverbs", "nvme_rdma", "nvidia_peermem")),
        ("ib_uverbs", 2, ("mlx5_ib", "nvidia_peermem")),
        ("rdma_cm", 1, ("nvme_rdma",)),
        ("mlx5_core", 2, ("mlx5_ib", "mlx5_fwctl")),
        ("mlx5_ib", 0, ()),
        ("mlx5_fwctl", 0, ()),
        ("nvme_rdma", 0, ()),
        ("nvidia_peermem", peermem_users, ()),
        *((name, rc, hs) for name, (rc, hs) in extra.items()),
    ]
    return graph(*rows)


# ---- decide --------------------------------------------------------------------------------


def test_compared_modules_cover_the_whole_stack_and_the_nfs_rdma_pair_only_when_enabled():
    mods = compared_modules(BASE)
    assert mods[:3] == CORE3
    for m in ("ib_uverbs", "ib_umad", "ib_ipoib", "ib_cm", "rdma_cm", "rdma_ucm", "mlx5_fwctl"):
        assert m in mods, m
    assert "nvme_rdma" not in mods
    nfs = compared_modules(config(ENABLE_NFSRDMA="yes"))
    assert nfs[-2:] == ("nvme_rdma", "rpcrdma")


def test_same_srcversions_mean_no_reload_and_the_line_shows_them():
    d = decide(dict.fromkeys(CORE3, NEW), dict.fromkeys(CORE3, NEW), CORE3)
    assert not d.reload and d.differences == ()
    line = d.explain()
    assert line.startswith("no reload: mlx5_core, mlx5_ib, ib_core loaded = installed")
    assert NEW in line and "\n" not in line


def test_a_changed_srcversion_reloads_and_the_line_names_both_and_what_did_not_change():
    loaded = {"mlx5_core": OLD, "mlx5_ib": NEW, "ib_core": None}
    d = decide(loaded, dict.fromkeys(CORE3, NEW), CORE3, present={"mlx5_core", "mlx5_ib"})
    assert d.reload and [c.module for c in d.differences] == ["mlx5_core", "ib_core"]
    assert d.explain() == (f"reload: mlx5_core srcversion {OLD} loaded ≠ {NEW} installed; "
                           f"ib_core not loaded (installed srcversion {NEW}); unchanged: mlx5_ib")


def test_a_module_absent_on_both_sides_or_installed_but_not_loaded_is_no_reason_to_reload():
    mods = (*CORE3, "nvme_rdma", "rpcrdma")
    loaded = dict.fromkeys(CORE3, NEW)
    d = decide(loaded, {**loaded, "nvme_rdma": NEW}, mods, present=set(CORE3))
    assert not d.reload and d.differences == ()
    assert d.to_load == ("nvme_rdma",)
    assert "installed, not loaded (no reason to reload): nvme_rdma" in d.explain()


def test_a_foreign_stack_module_reloads():
    mods = (*CORE3, "ib_uverbs", "rdma_ucm")
    inst = dict.fromkeys(mods, NEW)
    d = decide({**inst, "ib_uverbs": OLD}, inst, mods, present=set(mods))
    assert d.reload and [c.module for c in d.differences] == ["ib_uverbs"]
    assert f"ib_uverbs srcversion {OLD} loaded ≠ {NEW} installed" in d.explain()
    d = decide(inst, {**inst, "rdma_ucm": None}, mods, present=set(mods))
    assert d.reload and "rdma_ucm srcversion" in d.explain() and "not installed" in d.explain()


def test_an_unversioned_loaded_module_is_explained_truthfully():
    loaded = {"mlx5_core": None, "mlx5_ib": None, "ib_core": None}
    d = decide(loaded, dict.fromkeys(CORE3, NEW), CORE3, present=set(CORE3))
    assert d.reload
    assert ("mlx5_core has no srcversion (an unversioned, inbox build): cannot compare, "
            "reloading") in d.explain()
    assert "neither loaded nor installed" not in d.explain()


@given(st.dictionaries(st.sampled_from(["mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs",
                                        "nvme_rdma", "rpcrdma"]),
                       st.sampled_from(["A", "B"]), max_size=6))
def test_a_node_whose_loaded_stack_equals_the_installed_one_is_never_reloaded(installed):
    mods = ("mlx5_core", "mlx5_ib", "ib_core", "ib_uverbs", "nvme_rdma", "rpcrdma")
    if not all(m in installed for m in CORE3):
        return  # no installed driver: inspect refuses before deciding
    # the loaded stack is a subset of the installed modules, each the same build
    for loaded_set in (set(CORE3), set(installed)):
        loaded = {m: installed[m] for m in loaded_set}
        assert not decide(loaded, installed, mods, present=loaded_set).reload


def test_decision_json_is_serialisable_for_the_journal():
    d = decide({"mlx5_core": OLD}, {"mlx5_core": NEW}, ("mlx5_core", "mlx5_core"))
    j = json.loads(json.dumps(d.to_json()))
    assert j["reload"] is True and j["explanation"] == d.explain()
    assert j["modules"] == [{"module": "mlx5_core", "loaded": OLD, "installed": NEW,
                             "present": True, "differs": True}]


# ---- classify ------------------------------------------------------------------------------


def test_classify_by_the_configured_lists_with_the_stack_first():
    assert classify("ib_core", BASE) is Category.STACK
    assert classify("mlx5-fwctl", BASE) is Category.AUX
    assert classify("nvme_rdma", BASE) is Category.STORAGE
    assert classify("bnxt_re", BASE) is Category.THIRD_PARTY
    assert classify("nvidia_peermem", BASE) is Category.PEERMEM
    assert classify("zfs", BASE) is Category.UNKNOWN
    assert classify("mlx5_fwctl", config(MLX5_AUXILIARY_MODULES="")) is Category.UNKNOWN
    assert classify("ib_core", config(STORAGE_MODULES="ib_core")) is Category.STACK


# ---- plan ----------------------------------------------------------------------------------


def test_storage_holder_is_refused_unless_unloading_storage_is_allowed():
    p = plan(ib_node(), BASE)
    assert not p.ok
    assert p.refused == ("nvme_rdma (storage) holds ib_core, rdma_cm; set "
                         "UNLOAD_STORAGE_MODULES=true to let the reload unload it, or unload it "
                         "yourself")
    assert any("nvidia_peermem" in r for r in p.refusals[1:])  # the next problem is listed too


def test_peermem_in_use_is_refused_even_when_storage_may_be_unloaded():
    p = plan(ib_node(), config(UNLOAD_STORAGE_MODULES="true"))
    assert p.refused is not None and p.refused.startswith("nvidia_peermem holds ib_core, ib_uverbs")
    assert "refcnt 1" in p.refused and len(p.refusals) == 1


def test_allowed_plan_unloads_holders_first_and_reloads_all_but_peermem():
    p = plan(ib_node(peermem_users=0), config(UNLOAD_STORAGE_MODULES="true"))
    assert p.ok and p.refusals == ()
    assert p.unload == ("mlx5_fwctl", "nvidia_peermem", "nvme_rdma")
    assert p.reload_after == ("nvme_rdma", "mlx5_fwctl")
    assert json.loads(json.dumps(p.to_json()))["categories"]["nvme_rdma"] == "storage"


def test_nothing_outside_the_stack_holds_it_means_nothing_to_unload():
    facts = graph(("mlx_compat", 2, ("ib_core", "mlx5_core")), ("ib_core", 1, ("mlx5_ib",)),
                  ("mlx5_core", 1, ("mlx5_ib",)), ("mlx5_ib", 0, ()), ("tls", 1, ("mlx5_core",)))
    p = plan(facts, BASE)
    assert p.ok and p.unload == () and p.reload_after == ()


def test_a_holder_missing_from_the_module_list_is_refused_for_a_retry():
    facts = {k: v for k, v in ib_node().items() if k != "nvme_rdma"}  # unloaded between reads
    p = plan(facts, config(UNLOAD_STORAGE_MODULES="true"))
    assert p.refused is not None and p.refused.startswith("nvme_rdma holds ib_core but is not in "
                                                          "/proc/modules")
    assert p.refused.endswith("retry")


def test_third_party_provider_needs_its_own_switch():
    facts = ib_node(peermem_users=0, bnxt_re=(0, ()))
    facts["ib_core"] = replace(facts["ib_core"], holders=(*facts["ib_core"].holders, "bnxt_re"))
    allow = config(UNLOAD_STORAGE_MODULES="1")
    assert "set UNLOAD_THIRD_PARTY_RDMA_MODULES=true" in (plan(facts, allow).refused or "")
    p = plan(facts, replace(allow, unload_third_party_rdma_modules=True))
    assert p.ok and "bnxt_re" in p.unload and "bnxt_re" in p.reload_after


def test_unknown_module_is_never_unloaded_even_through_another_holder():
    facts = ib_node(peermem_users=0, lustre_lnet=(0, ()))
    facts["nvme_rdma"] = replace(facts["nvme_rdma"], refcnt=1, holders=("lustre_lnet",))
    p = plan(facts, config(UNLOAD_STORAGE_MODULES="true", UNLOAD_THIRD_PARTY_RDMA_MODULES="true"))
    assert p.refused is not None
    assert p.refused.startswith("lustre_lnet (unknown) holds ib_core via nvme_rdma")
    assert p.unload.index("lustre_lnet") < p.unload.index("nvme_rdma")


def test_module_with_users_that_are_not_modules_is_refused_with_the_count():
    facts = ib_node(peermem_users=0)
    facts["nvme_rdma"] = replace(facts["nvme_rdma"], refcnt=3)  # three connected controllers
    p = plan(facts, config(UNLOAD_STORAGE_MODULES="true"))
    assert p.refused is not None and p.refused.startswith("nvme_rdma (storage) holds")
    assert "3 user(s) that are not modules" in p.refused and "NVMe-oF" in p.refused


def test_auxiliary_modules_handling_disabled_makes_a_loaded_one_unknown():
    p = plan(ib_node(peermem_users=0), config(MLX5_AUXILIARY_MODULES="",
                                              UNLOAD_STORAGE_MODULES="true"))
    assert p.refused is not None and p.refused.startswith("mlx5_fwctl (unknown) holds mlx5_core")


def test_a_holder_cycle_is_refused_not_looped_on():
    facts = ib_node(peermem_users=0, a_mod=(1, ("b_mod",)), b_mod=(1, ("a_mod",)))
    facts["ib_core"] = replace(facts["ib_core"], holders=(*facts["ib_core"].holders, "a_mod"))
    p = plan(facts, config(STORAGE_MODULES="a_mod b_mod nvme_rdma", UNLOAD_STORAGE_MODULES="1"))
    assert p.refused is not None and "a_mod, b_mod form a cycle" in p.refused
    assert p.unload == () and p.reload_after == ()


def test_permanent_module_cannot_be_unloaded():
    facts = ib_node(peermem_users=0)
    facts["nvme_rdma"] = replace(facts["nvme_rdma"], permanent=True)
    p = plan(facts, config(UNLOAD_STORAGE_MODULES="true"))
    assert p.refused is not None and "nvme_rdma (storage)" in p.refused
    assert "permanent" in p.refused


# ---- properties ----------------------------------------------------------------------------

POOL = (*STACK[:8], "mlx5_vdpa", "mlx5_fwctl", "nvme_rdma", "rpcrdma", "xprtrdma", "ib_srpt",
        "bnxt_re", "irdma", "nvidia_peermem", "zfs", "lustre_lnet", "tls", "psample")


@st.composite
def dag_graphs(draw: st.DrawFn) -> dict[str, ModuleFacts]:
    """A random holder DAG: a module may only be held by modules drawn after it."""
    names = draw(st.lists(st.sampled_from(POOL), unique=True, min_size=1, max_size=14))
    facts = {}
    for i, name in enumerate(names):
        holders = tuple(h for h in names[i + 1:] if draw(st.booleans()))
        users = draw(st.sampled_from((0, 0, 0, 1, 2)))
        facts[name] = ModuleFacts(name, len(holders) + users, holders)
    return facts


def _stack_holders(facts: dict[str, ModuleFacts]) -> set[str]:
    found: set[str] = set()
    todo = [m for m in facts if m in STACK]
    while todo:
        for h in facts[todo.pop()].holders:
            if h not in STACK and h not in found:
                found.add(h)
                todo.append(h)
    return found


flags = st.builds(lambda s, t: replace(BASE, unload_storage_modules=s,
                                       unload_third_party_rdma_modules=t),
                  st.booleans(), st.booleans())


@settings(max_examples=300, deadline=None)
@given(dag_graphs(), flags)
def test_unload_order_is_holders_first_never_the_stack_and_rmmod_works(facts, cfg):
    p = plan(facts, cfg)
    assert set(p.unload) == _stack_holders(facts)  # every holder of the stack, nothing else
    assert not set(p.unload) & set(STACK)
    pos = {m: i for i, m in enumerate(p.unload)}
    for m in p.unload:
        for h in facts[m].holders:
            if h in STACK:  # held by the stack it holds: only openibd could unload it
                assert not p.ok and any(f"{m} (" in r and "itself held by" in r
                                        for r in p.refusals)
            else:
                assert h in pos and pos[h] < pos[m], (h, m, p.unload)
    assert "nvidia_peermem" not in p.reload_after and set(p.reload_after) <= set(p.unload)
    for i, m in enumerate(p.reload_after):  # dependencies first
        assert not set(p.reload_after[:i]) & set(facts[m].holders)
    if p.ok:  # each rmmod in turn finds no holder and no user left
        gone: set[str] = set()
        for m in p.unload:
            assert facts[m].users == 0 and set(facts[m].holders) <= gone
            gone.add(m)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(POOL),
                       st.tuples(st.integers(-1, 4), st.lists(st.sampled_from((*POOL, "gone")))),
                       max_size=12),
       flags)
def test_plan_never_raises_on_any_graph_cycles_and_stale_names_included(rows, cfg):
    facts = {n: ModuleFacts(n, rc, tuple(hs)) for n, (rc, hs) in rows.items()}
    p = plan(facts, cfg)
    assert p.ok == (p.refused is None) and not set(p.unload) & set(STACK)
    json.dumps(p.to_json())
