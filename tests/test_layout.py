"""maps.h and its Python mirror (sockops_bpf/layout.py) agree on every size and offset."""

from __future__ import annotations

import ctypes as ct
import shutil
import subprocess
from pathlib import Path

import pytest

from sockops_bpf import layout
from sockops_bpf.loader import SRC_DIR

pytestmark = pytest.mark.unit

STRUCTS = {"ip_addr": layout.IpAddr, "endpoint_info": layout.EndpointInfo, "sock_key": layout.SockKey,
           **layout.LB_STRUCTS, **layout.MESH_STRUCTS, **layout.POLICY_STRUCTS,
           **layout.FLOW_STRUCTS}
CONSTANTS = {
    **{k: getattr(layout, k) for k in (
        "MAX_ENDPOINTS", "MAX_SOCKETS", "CNT_MAX", "EP_F_LOOPBACK",
        "LB_MAX_SERVICES", "LB_MAX_SLOTS", "LB_MAX_BACKENDS", "LB_MAX_REVERSE", "LB_MAX_AFFINITY", "LB_MAX_SKIP",
        "LB_F_AFFINITY", "LB_SKIP_EXCLUDED", "LB_SKIP_ISTIO", "LB_CNT_MAX", "LB_MAX_CIDRS",
        "MESH_MAX_IPCACHE", "MESH_MAX_LOCAL_PODS", "MESH_MAX_ORIG_DST", "MESH_CAPTURE_PORT", "MESH_HBONE_PORT",
        "IPC_F_LOCAL", "IPC_F_MTLS", "IPC_F_STRICT", "IPC_F_HOST", "IDENTITY_UNKNOWN", "IDENTITY_HOST",
        "IDENTITY_WORLD", "IDENTITY_REMOTE_NODE", "POD_F_CAPTURE", "MESH_CNT_MAX",
        "POL_MAX_ENTRIES", "POL_MAX_RULES", "POL_ANY_PORT_PREFIXLEN", "POL_INGRESS", "POL_EGRESS", "POL_ALLOW",
        "POL_DENY", "FLOW_RING_BYTES", "FLOW_OPEN", "FLOW_CLOSE", "FLOW_REFUSED", "FLOW_PATH_TCP",
        "FLOW_PATH_SPLICED", "FLOW_PATH_TUNNEL", "FLOW_PATH_UDP", "FLOW_REASON_NO_BACKEND", "FLOW_REASON_NO_SERVICE",
        "FLOW_REASON_POLICY", "FLOW_REASON_STRICT_PLAINTEXT", "FLOW_F_BYTES_LOWER_BOUND", "FLOW_CNT_MAX")},
    **{f"CNT_{c.name}": int(c) for c in layout.Counter},
    **{f"LB_CNT_{c.name}": int(c) for c in layout.LbCounter},
    **{f"MESH_CNT_{c.name}": int(c) for c in layout.MeshCounter},
    **{f"FLOW_CNT_{c.name}": int(c) for c in layout.FlowCounter},
}


def c_layout(tmp_path: Path) -> dict[str, int]:
    """Compile a probe against maps.h with the host compiler and read what it prints."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed for the layout probe"
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "maps.h"', "int main(void) {"]
    for name, cls in STRUCTS.items():
        lines.append(f'printf("{name} %zu\\n", sizeof(struct {name}));')
        for field, _ in cls._fields_:
            lines.append(f'printf("{name}.{field} %zu\\n", offsetof(struct {name}, {field}));')
    for const in CONSTANTS:
        lines.append(f'printf("{const} %ld\\n", (long)({const}));')
    lines += ["return 0;", "}"]
    src = tmp_path / "probe.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "probe"
    subprocess.run([cc, "-DMESHACCEL_LAYOUT_ONLY", f"-I{SRC_DIR}", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def py_layout() -> dict[str, int]:
    d: dict[str, int] = {}
    for name, cls in STRUCTS.items():
        d[name] = ct.sizeof(cls)
        for field, _ in cls._fields_:
            d[f"{name}.{field}"] = getattr(cls, field).offset
    d.update(CONSTANTS)
    return d


def test_c_and_python_layouts_agree(tmp_path: Path) -> None:
    assert c_layout(tmp_path) == py_layout()


def test_ipv4_is_stored_ipv4_mapped() -> None:
    a = layout.IpAddr.from_ip("10.1.2.3")
    assert bytes(a.addr) == bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3])
    assert str(a.to_ip()) == "10.1.2.3"
    assert str(layout.IpAddr.from_ip("fd00::1").to_ip()) == "fd00::1"


def test_every_pinned_map_is_pinned_under_its_layout_version() -> None:
    """maps.h pins each map at <name> (layout 1) or <name>_v<N>; layout.py says which N, and the loader
    and the map views open pins by that name (a layout change that forgets one side fails here)."""
    import re

    text = (SRC_DIR / "maps.h").read_text()
    pinned = set(re.findall(r'PIN_DIR "/(\w+)"', text))
    assert pinned == {layout.pin_name(name) for name in layout.MAPS} | {"flow_events"}  # a ring buffer: no mirror
    for (name, version), _migration in layout.MIGRATIONS.items():
        assert version < layout.layout_version(name), f"a migration of {name} from its current layout"
