"""What an instance has attached and pinned, read from bpffs and the kernel (for `accel status`)."""

from __future__ import annotations

import os
from typing import Any

from sockops_bpf import libbpf, loader
from sockops_bpf.cgroup import cgroup_path_by_id
from sockops_bpf.layout import MAPS, pin_name
from sockops_bpf.maps import LB_MAP_NAMES, MESH_MAP_NAMES, open_lb, open_mesh, open_pinned


def describe(instance: str) -> dict[str, Any]:
    pdir = loader.pin_dir(instance)
    doc: dict[str, Any] = {"instance": instance, "pin_dir": str(pdir), "attachments": [], "maps": {},
                           "layouts": loader.layouts(instance)}
    links = {f"link_{name}": hook.kind or f"cgroup_{name.removeprefix('lb_')}" for name, hook in loader.HOOKS.items()}
    for link_name, hook in links.items():
        link_pin = pdir / link_name
        if not link_pin.exists():
            continue
        fd = libbpf.obj_get(str(link_pin))
        try:
            info = libbpf.link_info(fd)
            prog = libbpf.prog_fd_by_id(info.prog_id)
            try:
                name = libbpf.prog_info(prog).name.decode()
            finally:
                os.close(prog)
            cg = cgroup_path_by_id(info.cgroup_id)
            doc["attachments"].append({"program": name, "hook": hook, "cgroup": str(cg)})
        finally:
            os.close(fd)
    for name in MAPS:
        if (pdir / pin_name(name)).exists():
            fd = libbpf.obj_get(str(pdir / pin_name(name)))
            try:
                mi = libbpf.map_info(fd)
                doc["maps"][name] = {"id": mi.id, "max_entries": mi.max_entries}
                if mi.type == libbpf.BPF_MAP_TYPE_SOCKHASH:
                    ids = libbpf.prog_query(fd, libbpf.BPF_SK_MSG_VERDICT)
                    for pid in ids:
                        pfd = libbpf.prog_fd_by_id(pid)
                        try:
                            pname = libbpf.prog_info(pfd).name.decode()
                        finally:
                            os.close(pfd)
                        doc["attachments"].append({"program": pname, "hook": "sk_msg", "map": name})
            finally:
                os.close(fd)
    if {"local_endpoints", "sock_hash", "counters"} <= doc["maps"].keys():
        with open_pinned(pdir) as maps:
            doc["maps"]["local_endpoints"]["entries"] = len(maps.local_endpoints)
            doc["maps"]["sock_hash"]["entries"] = maps.socket_count()
            doc["counters"] = maps.counters()
    if set(LB_MAP_NAMES) <= doc["maps"].keys():
        with open_lb(pdir) as lb:
            for name, view in (("lb_services", lb.services), ("lb_slots", lb.slots), ("lb_skip", lb.skip)):
                doc["maps"][name]["entries"] = len(view)
            doc.setdefault("counters", {}).update(lb.counters())
    if set(MESH_MAP_NAMES) <= doc["maps"].keys():
        with open_mesh(pdir) as mesh:
            doc["maps"]["ipcache"]["entries"] = len(mesh.ipcache)
            doc["maps"]["local_pods"]["entries"] = len(mesh.local_pods)
            doc["maps"]["orig_dst"]["entries"] = len(mesh.orig_dst)
            doc.setdefault("counters", {}).update(mesh.counters())
    return doc
