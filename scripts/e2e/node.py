#!/usr/bin/env python3
"""A real single-node Kubernetes on this host for meshaccel's end-to-end tests, with no kube-proxy.

    node.py up       start containerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
                     kubelet (binaries from scripts/e2e/build.sh, images from scripts/e2e/images.sh)
    node.py down     stop everything and remove every trace; exit 1 if a packet from the pod range went
                     to the uplink, or if something could not be removed
    node.py status   what runs, and the guard counters
    node.py env      shell lines that point kubectl at the node
    node.py leftovers  anything of a node still on the host (exit 1 if so)

Safety: pods live on one bridge with no masquerade; unreachable routes cover the service range and
the pod range beyond this node; an nft table counts (and drops) anything from the pod range that would
leave through another interface. Kernel settings the kubelet or the CNI change are restored at stop.
A component that does not come up stops the whole node, naming the component and its log.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pki import kubeconfig, make_pki  # scripts/e2e/pki.py, beside this file

CACHE = Path(os.environ.get("E2E_CACHE", "/var/cache/meshaccel/e2e"))
BIN = CACHE / "bin"
IMAGES = CACHE / "images"
CONTAINERD_ROOT = CACHE / "containerd"  # kept between runs: imported images survive
DATA = Path("/var/lib/meshaccel-e2e")  # this run's etcd, kubelet, PKI; wiped at up and down
RUN = Path("/run/meshaccel-e2e")
LOGS = Path("/var/log/meshaccel-e2e")  # kept after down, overwritten by the next up
STATE = RUN / "state.json"
LOCK = Path("/run/meshaccel-e2e.lock")

NODE_NAME = "e2e-node"
NODE_IP = "10.254.0.1"  # on a veth of its own: the node's "real" address, never on the uplink
NODE_LINK = "mae2e-node"
BRIDGE = "mae2e-cni0"
CLUSTER_POD_CIDR = "10.244.0.0/16"
NODE_POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
CLUSTER_DNS = "10.96.0.10"  # no DNS server answers there: names never leave the machine
NFT_TABLE = "mae2e_guard"
CNI_NETWORK = "mae2e"
ETCD_CLIENT = "http://127.0.0.1:12379"
ETCD_PEER = "http://127.0.0.1:12380"
API_PORT = 6443
API_URL = f"https://{NODE_IP}:{API_PORT}"
# Settings the kubelet (protectKernelDefaults: false) and the CNI bridge plugin write; restored at stop.
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding", "vm/overcommit_memory", "vm/panic_on_oom",
           "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables",
           "net/ipv4/conf/all/route_localnet")
# Host folders the meshaccel DaemonSet mounts (hostPath DirectoryOrCreate) and the files its agent
# writes there; removed at stop unless they were there before (`accel lab` shares /run/meshaccel).
AGENT_HOST_DIRS = (Path("/var/lib/meshaccel"), Path("/run/meshaccel"))
AGENT_HOST_FILES = (Path("/var/lib/meshaccel/identities.json"), Path("/run/meshaccel/xds.sock"),
                    Path("/run/meshaccel/certs.json"))
READY_TIMEOUT = 120.0


class NodeError(Exception):
    """A step failed: the message names it and where to look."""


def log(msg: str) -> None:
    print(f"e2e node: {msg}", file=sys.stderr, flush=True)


def run(*argv: str, check: bool = True, capture: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), capture_output=capture, text=True, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise NodeError(f"`{' '.join(argv)}` failed ({p.returncode}): {(p.stderr or p.stdout or '').strip()[-400:]}")
    return p


# --- state ---------------------------------------------------------------------------------------

@dataclass
class State:
    """What `up` changed on the host, so `down` undoes exactly that (also after a crash)."""

    started: float = 0.0
    pids: dict[str, int] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    shared_mounts: list[str] = field(default_factory=list)  # made shared by us: made private again
    bind_mounts: list[str] = field(default_factory=list)  # bind-mounted onto themselves by us
    created_dirs: list[str] = field(default_factory=list)
    files_before: dict[str, list[str]] = field(default_factory=dict)  # AGENT_HOST_DIRS entries at up
    iptables_chains: dict[str, list[str]] = field(default_factory=dict)  # "iptables:filter" -> chains at up
    uplinks: list[str] = field(default_factory=list)

    def save(self) -> None:
        RUN.mkdir(parents=True, exist_ok=True)
        tmp = STATE.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        tmp.replace(STATE)

    @classmethod
    def load(cls) -> State | None:
        try:
            return cls(**json.loads(STATE.read_text()))
        except FileNotFoundError:
            return None


@contextlib.contextmanager
def locked() -> Iterator[None]:
    with LOCK.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeError(f"another node.py holds {LOCK}; wait for it to finish") from None
        yield


# --- host discovery ------------------------------------------------------------------------------

def mounts() -> list[tuple[str, str, str, str]]:
    """(mount point, fs type, optional fields, root) of this mount namespace, from mountinfo."""
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        f = left.split()
        fstype = right.split()[0]
        out.append((f[4].replace("\\040", " "), fstype, " ".join(f[6:]), f[3]))
    return out


def cgroup2_mount() -> Path:
    """The unified hierarchy: /sys/fs/cgroup on pure v2 hosts, elsewhere (e.g. .../unified) on hybrid ones."""
    for point, fstype, _, root in mounts():
        if fstype == "cgroup2" and root == "/":
            return Path(point)
    raise NodeError("no cgroup2 hierarchy is mounted; meshaccel attaches at the cgroup v2 root")


def cgroup_v1_mounts() -> list[Path]:
    return [Path(p) for p, fstype, _, _ in mounts() if fstype == "cgroup"]


def restricted_oom_score_adj() -> bool:
    """True where this root lacks CAP_SYS_RESOURCE (bit 24), so oom_score_adj cannot go below 0."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) >> 24 & 1
    return False


def pure_cgroup_v2() -> bool:
    return cgroup2_mount() == Path("/sys/fs/cgroup")


def uplinks() -> list[str]:
    """Interfaces of the default routes (v4 and v6): where a leaked packet would leave."""
    names = set()
    for fam in ("-4", "-6"):
        p = run("ip", "-j", fam, "route", "show", "default", check=False)
        with contextlib.suppress(ValueError):
            for r in json.loads(p.stdout or "[]"):
                if r.get("dev"):
                    names.add(r["dev"])
    return sorted(names)


# --- configuration files -------------------------------------------------------------------------

def write_configs(st: State) -> None:
    pki = DATA / "pki"
    for user in ("admin", "controller-manager", "scheduler", "kubelet-client"):
        kubeconfig(DATA / f"{user}.kubeconfig", pki, user, API_URL)
    cni = RUN / "cni"
    (cni / "net.d").mkdir(parents=True, exist_ok=True)
    (cni / "net.d" / "10-mae2e.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "dataDir": str(cni / "ipam"),
                     "ranges": [[{"subnet": NODE_POD_CIDR}]], "routes": [{"dst": "0.0.0.0/0"}]},
        }],
    }, indent=1))
    # Registries that a missing image would be pulled from point at a closed local port: a pull fails at
    # once instead of leaving the machine (every image the node needs is imported beforehand).
    for reg in ("docker.io", "registry.k8s.io", "localhost", "quay.io", "gcr.io", "ghcr.io"):
        d = RUN / "certs.d" / reg
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text('server = "http://127.0.0.1:9"\n\n[host."http://127.0.0.1:9"]\n'
                                      '  capabilities = ["pull", "resolve"]\n')
    (RUN / "containerd.toml").write_text(f"""version = 2
root = "{CONTAINERD_ROOT}"
state = "{RUN / 'containerd'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{RUN / 'containerd.sock'}"
[ttrpc]
  address = "{RUN / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_cdi = false
  # Without CAP_SYS_RESOURCE (some sandboxed hosts) a negative oom_score_adj cannot be set; keep the
  # kubelet's values no lower than containerd's own instead of failing every pod.
  restrict_oom_score_adj = {'true' if restricted_oom_score_adj() else 'false'}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which('runc') or '/usr/sbin/runc'}"
        Root = "{RUN / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni / 'net.d'}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{RUN / 'certs.d'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{CACHE / 'containerd-opt'}"
""")
    (RUN / "resolv.conf").write_text(f"nameserver {CLUSTER_DNS}\n")
    kubelet = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{RUN / 'containerd.sock'}",
        "cgroupDriver": "cgroupfs",
        "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
        "tlsCertFile": str(pki / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(pki / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [CLUSTER_DNS], "clusterDomain": "cluster.local",
        "resolvConf": str(RUN / "resolv.conf"),
        "failSwapOn": False,
        "rotateCertificates": False, "serverTLSBootstrap": False,
        "maxPods": 40,
        # A shared dev machine: never evict the suite's pods for the disk or memory others use.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": True,
        "containerLogMaxSize": "10Mi",
    }
    if not pure_cgroup_v2():
        # Hybrid host (v1 controllers, v2 beside them): Kubernetes >= 1.35 refuses cgroup v1 unless told.
        kubelet["failCgroupV1"] = False
    (DATA / "kubelet.json").write_text(json.dumps(kubelet, indent=1))


# --- processes -----------------------------------------------------------------------------------

@dataclass
class Component:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    timeout: float = READY_TIMEOUT

    @property
    def log_path(self) -> Path:
        return LOGS / f"{self.name}.log"


def tls_context(client: str | None = "admin") -> ssl.SSLContext:
    pki = DATA / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.crt"), str(pki / f"{client}.key"))
    return ctx


def http_ok(url: str, ctx: ssl.SSLContext | None = None, expect: bytes | None = b"ok") -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3, context=ctx) as r:
            body = r.read()
            return r.status == 200 and (expect is None or expect in body)
    except (OSError, ValueError):
        return False


def insecure() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def api_get(path: str) -> dict | None:
    try:
        with urllib.request.urlopen(API_URL + path, timeout=5, context=tls_context()) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def node_ready() -> bool:
    node = api_get(f"/api/v1/nodes/{NODE_NAME}")
    conds = (node or {}).get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conds)


# For the failure drill (tests/e2e/test_0_node_failure.py): this component gets a flag it does not know,
# so it really fails to start.
BREAK_ENV = "MESHACCEL_E2E_BREAK"


def components() -> list[Component]:
    comps = _components()
    broken = os.environ.get(BREAK_ENV)
    for c in comps:
        if c.name == broken:
            c.argv.append("--meshaccel-e2e-no-such-flag")
    return comps


def _components() -> list[Component]:
    b = BIN
    pki = DATA / "pki"
    sock = RUN / "containerd.sock"
    return [
        Component("containerd", ["containerd", "--config", str(RUN / "containerd.toml"), "--log-level", "warn"],
                  lambda: sock.exists() and run("ctr", "--address", str(sock), "version", check=False).returncode == 0),
        Component("etcd", [str(b / "etcd"), "--name", "e2e", "--data-dir", str(DATA / "etcd"),
                           "--listen-client-urls", ETCD_CLIENT, "--advertise-client-urls", ETCD_CLIENT,
                           "--listen-peer-urls", ETCD_PEER, "--initial-advertise-peer-urls", ETCD_PEER,
                           "--initial-cluster", f"e2e={ETCD_PEER}", "--log-level", "warn",
                           "--unsafe-no-fsync"],  # a throwaway cluster on a shared disk
                  lambda: http_ok(f"{ETCD_CLIENT}/health", expect=b'"health":"true"')),
        Component("kube-apiserver", [
            str(b / "kube-apiserver"), f"--advertise-address={NODE_IP}", f"--bind-address={NODE_IP}",
            f"--secure-port={API_PORT}", f"--etcd-servers={ETCD_CLIENT}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--profiling=false", "--v=1"],
                  lambda: http_ok(f"{API_URL}/readyz", tls_context())),
        Component("kube-controller-manager", [
            str(b / "kube-controller-manager"), f"--kubeconfig={DATA / 'controller-manager.kubeconfig'}",
            f"--authentication-kubeconfig={DATA / 'controller-manager.kubeconfig'}",
            f"--authorization-kubeconfig={DATA / 'controller-manager.kubeconfig'}",
            "--bind-address=127.0.0.1", "--secure-port=10257", "--leader-elect=false",
            f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            "--allocate-node-cidrs=true", f"--cluster-cidr={CLUSTER_POD_CIDR}", "--node-cidr-mask-size=24",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--profiling=false", "--v=1"],
                  lambda: http_ok("https://127.0.0.1:10257/healthz", insecure())),
        Component("kube-scheduler", [
            str(b / "kube-scheduler"), f"--kubeconfig={DATA / 'scheduler.kubeconfig'}",
            f"--authentication-kubeconfig={DATA / 'scheduler.kubeconfig'}",
            f"--authorization-kubeconfig={DATA / 'scheduler.kubeconfig'}",
            "--bind-address=127.0.0.1", "--secure-port=10259", "--leader-elect=false", "--profiling=false", "--v=1"],
                  lambda: http_ok("https://127.0.0.1:10259/healthz", insecure())),
        Component("kubelet", [
            str(b / "kubelet"), f"--config={DATA / 'kubelet.json'}",
            f"--kubeconfig={DATA / 'kubelet-client.kubeconfig'}", f"--root-dir={DATA / 'kubelet'}",
            f"--cert-dir={DATA / 'kubelet-pki'}", f"--node-ip={NODE_IP}", f"--hostname-override={NODE_NAME}",
            "--v=1"],
                  node_ready, timeout=180),
    ]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def start(c: Component, st: State) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    logf = c.log_path.open("w")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
    env.pop("KUBERNETES_SERVICE_HOST", None)
    p = subprocess.Popen(c.argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                         start_new_session=True, env=env, cwd=str(DATA))
    logf.close()
    st.pids[c.name] = p.pid
    st.save()
    deadline = time.monotonic() + c.timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise NodeError(f"{c.name} exited with status {p.returncode} while starting; its log: {c.log_path}\n"
                            + tail(c.log_path))
        if c.ready():
            log(f"{c.name} ready (pid {p.pid}, log {c.log_path})")
            return
        time.sleep(0.5)
    raise NodeError(f"{c.name} did not become ready within {c.timeout:.0f}s; its log: {c.log_path}\n"
                    + tail(c.log_path))


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + ln[:300] for ln in text)


def stop_pid(name: str, pid: int, grace: float = 20.0) -> None:
    if not alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.2)
    if alive(pid):
        log(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            if not alive(pid):
                break
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- host changes: network, mounts, sysctls --------------------------------------------------------

def read_sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys", name).write_text(value)


def iptables_chains() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            p = run(tool, "-t", table, "-S", check=False)
            out[f"{tool}:{table}"] = [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("-N ")]
    return out


def nft_ruleset(uplink_names: list[str]) -> str:
    u = ", ".join(f'"{n}"' for n in uplink_names) or '"none"'
    return f"""table inet {NFT_TABLE} {{
  counter pod_to_uplink {{ }}
  counter pod_elsewhere {{ }}
  chain postrouting {{
    type filter hook postrouting priority 100; policy accept;
    ip saddr {CLUSTER_POD_CIDR} oifname {{ {u} }} counter name pod_to_uplink drop
    ip daddr {{ {CLUSTER_POD_CIDR}, {SERVICE_CIDR} }} oifname {{ {u} }} counter name pod_to_uplink drop
    ip saddr {CLUSTER_POD_CIDR} oifname != {{ "lo", "{BRIDGE}", "{NODE_LINK}" }} counter name pod_elsewhere drop
  }}
}}
"""


def guard_counters() -> dict[str, int] | None:
    p = run("nft", "-j", "list", "counters", "table", "inet", NFT_TABLE, check=False)
    if p.returncode != 0:
        return None
    out = {}
    for item in json.loads(p.stdout).get("nftables", []):
        c = item.get("counter")
        if c:
            out[c["name"]] = int(c["packets"])
    return out


def setup_host(st: State) -> None:
    st.uplinks = uplinks()
    st.sysctls = {k: v for k in SYSCTLS if (v := read_sysctl(k)) is not None}
    st.iptables_chains = iptables_chains()
    for d in AGENT_HOST_DIRS:
        st.files_before[str(d)] = sorted(os.listdir(d)) if d.is_dir() else []
        if not d.exists():
            st.created_dirs.append(str(d))
    # containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its state folder is.
    for d in (Path("/run/containerd"), Path("/run/containerd/s")):
        if not d.exists():
            st.created_dirs.append(str(d))
    st.save()
    # The guard first: from here on nothing from the pod range leaves.
    p = subprocess.run(["nft", "-f", "-"], input=nft_ruleset(st.uplinks), text=True, capture_output=True)
    if p.returncode != 0:
        raise NodeError(f"nft guard table: {p.stderr.strip()}")
    for cidr in (SERVICE_CIDR, CLUSTER_POD_CIDR):
        run("ip", "route", "replace", "unreachable", cidr, "proto", "static")
    # The node's address lives on a veth pair of its own (kernels without the dummy driver have veth):
    # it is local, so traffic to it never touches a wire.
    run("ip", "link", "add", NODE_LINK, "type", "veth", "peer", "name", f"{NODE_LINK}-p")
    run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK)
    run("ip", "link", "set", f"{NODE_LINK}-p", "up")
    run("ip", "link", "set", NODE_LINK, "up")
    # DaemonSet volumes with Bidirectional / HostToContainer propagation need shared host mounts, as a
    # systemd host has them: /sys/fs/bpf made shared (private again at stop); /run/netns bound onto
    # itself and shared, exactly as `ip netns add` does when it is not yet.
    netns = Path("/run/netns")
    if not netns.exists():
        netns.mkdir(parents=True)
        st.created_dirs.append(str(netns))
    if not any(p == str(netns) for p, _, _, _ in mounts()):
        run("mount", "--rbind", str(netns), str(netns))
        st.bind_mounts.append(str(netns))
        st.save()
    for point in ("/sys/fs/bpf", str(netns)):
        opts = next((o for p, _, o, _ in mounts() if p == point), "")
        if "shared:" not in opts:
            run("mount", "--make-shared", point)
            st.shared_mounts.append(point)
            st.save()


def import_images() -> None:
    """Import the archives whose content changed since the last import (containerd's root is kept)."""
    sock = str(RUN / "containerd.sock")
    done_file = CONTAINERD_ROOT / "meshaccel-e2e-imported.json"
    try:
        done = json.loads(done_file.read_text())
    except (OSError, ValueError):
        done = {}
    have = run("ctr", "--address", sock, "-n", "k8s.io", "images", "ls", "-q").stdout.split()
    for name in ("pause", "app", "meshaccel"):
        tar = IMAGES / f"{name}.tar"
        if not tar.exists():
            raise NodeError(f"image archive {tar} is missing; run scripts/e2e/images.sh")
        key = (IMAGES / f"{name}.key").read_text().strip() if (IMAGES / f"{name}.key").exists() else str(tar.stat().st_mtime)
        wanted = {"pause": "registry.k8s.io/pause:3.10.1", "app": "localhost/meshaccel-e2e-app:1",
                  "meshaccel": "docker.io/library/meshaccel:0.1.0"}[name]
        if done.get(name) == key and wanted in have:
            continue
        t0 = time.monotonic()
        for attempt in (1, 2):
            try:
                run("ctr", "--address", sock, "-n", "k8s.io", "images", "import", "--no-unpack=false", str(tar),
                    timeout=900)
                break
            except NodeError as e:
                # Seen once: a new version of an image unpacked over a parent layer it shares with the version
                # it replaces, whose snapshot containerd's collector took meanwhile ("parent snapshot ... does
                # not exist"). A second import extracts that layer afresh.
                if attempt == 2:
                    raise
                log(f"importing {wanted} failed, trying once more: {e}")
        # Pinned images are never garbage-collected by the kubelet.
        run("ctr", "--address", sock, "-n", "k8s.io", "images", "label", wanted, "io.cri-containerd.pinned=pinned",
            check=False)
        done[name] = key
        done_file.write_text(json.dumps(done))
        log(f"imported {wanted} ({time.monotonic() - t0:.0f}s)")


def up(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise NodeError("run as root: the node starts a kubelet and changes routes, mounts and nft rules")
    missing = [n for n in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet",
                           "kubectl", "crictl") if not (BIN / n).exists()]
    if missing:
        raise NodeError(f"missing binaries in {BIN}: {', '.join(missing)}; run scripts/e2e/setup.sh")
    for tool in ("containerd", "ctr", "runc", "nft", "ip", "mount"):
        if shutil.which(tool) is None:
            raise NodeError(f"{tool} is not installed; run scripts/e2e/setup.sh")
    if State.load() is not None:
        log("a previous node was not stopped: stopping it first")
        down_all(State.load())
    t0 = time.monotonic()
    shutil.rmtree(DATA, ignore_errors=True)
    shutil.rmtree(RUN, ignore_errors=True)
    for d in (DATA / "pki", RUN, LOGS, CONTAINERD_ROOT):
        d.mkdir(parents=True, exist_ok=True)
    st = State(started=time.time())
    st.save()
    try:
        setup_host(st)
        make_pki(DATA / "pki", NODE_NAME, NODE_IP, str(next(ipaddress.ip_network(SERVICE_CIDR).hosts())))
        write_configs(st)
        comps = components()
        start(comps[0], st)
        import_images()
        for c in comps[1:]:
            start(c, st)
        wait_default_sa()
    except (NodeError, subprocess.TimeoutExpired, OSError) as e:
        log(f"FAILED: {e}")
        log("stopping what was started")
        down_all(State.load() or st, quiet=True)
        return 1
    log(f"up in {time.monotonic() - t0:.0f}s: node {NODE_NAME} at {NODE_IP}, API {API_URL}; "
        f"KUBECONFIG={DATA / 'admin.kubeconfig'}")
    return 0


def wait_default_sa(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api_get("/api/v1/namespaces/default/serviceaccounts/default"):
            return
        time.sleep(0.5)
    raise NodeError(f"the default service account never appeared; see {LOGS / 'kube-controller-manager.log'}")


# --- down ------------------------------------------------------------------------------------------

def crictl(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "crictl"), "--runtime-endpoint", f"unix://{RUN / 'containerd.sock'}", "--timeout", "60s",
               *args, check=check, timeout=timeout)


def remove_pods(problems: list[str]) -> None:
    """Stop and remove every sandbox through the CRI: the CNI tears down each pod's network, containerd
    removes its netns and mounts. Netns paths are noted first, to sweep what a failure leaves."""
    if not (RUN / "containerd.sock").exists():
        return
    ids = crictl("pods", "-q").stdout.split()
    netns = []
    for pid in ids:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            info = json.loads(crictl("inspectp", pid).stdout)
            for ns in info["info"]["runtimeSpec"]["linux"]["namespaces"]:
                if ns.get("type") == "network" and ns.get("path"):
                    netns.append(ns["path"])
    if ids:
        crictl("stopp", *ids, timeout=300)
        p = crictl("rmp", "-f", *ids, timeout=300)
        if p.returncode != 0:
            problems.append(f"crictl rmp: {p.stderr.strip()[-300:]}")
    for path in netns:
        if Path(path).exists():
            run("umount", path, check=False)
            with contextlib.suppress(OSError):
                Path(path).unlink()


def stop_shims() -> None:
    """containerd-shim processes of our containerd outlive it; they name its socket in their argv."""
    sock = str(RUN / "containerd.sock")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and sock.encode() in argv:
            stop_pid("containerd-shim", int(d.name), grace=5)


def unmount_under(roots: list[Path], problems: list[str]) -> None:
    for _ in range(3):
        points = sorted({p for p, _, _, _ in mounts() if any(p == str(r) or p.startswith(f"{r}/") for r in roots)},
                        key=len, reverse=True)
        if not points:
            return
        for p in points:
            if run("umount", p, check=False).returncode != 0:
                run("umount", "-l", p, check=False)
    left = [p for p, _, _, _ in mounts() if any(p.startswith(str(r)) for r in roots)]
    if left:
        problems.append(f"mounts left: {', '.join(left)}")


def remove_cgroups(problems: list[str]) -> None:
    """The kubelet's cgroupfs tree (kubepods in each hierarchy), deepest first."""
    for root in [*cgroup_v1_mounts(), cgroup2_mount()]:
        top = root / "kubepods"
        if not top.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda t: len(t[0]), reverse=True):
            for _ in range(20):
                try:
                    os.rmdir(dirpath)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
        if top.exists():
            problems.append(f"cgroup {top} could not be removed")


def remove_iptables(st: State) -> None:
    """Chains the kubelet created (KUBE-*) and every rule jumping to them."""
    now = iptables_chains()
    for key, chains in now.items():
        tool, table = key.split(":")
        new = [c for c in chains if c not in st.iptables_chains.get(key, []) and c.startswith(("KUBE-", "CNI-"))]
        if not new:
            continue
        for line in run(tool, "-t", table, "-S", check=False).stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in new:
                run(tool, "-t", table, "-D", *parts[1:], check=False)
        for c in new:
            run(tool, "-t", table, "-F", c, check=False)
        for c in new:
            run(tool, "-t", table, "-X", c, check=False)


def bpf_leftovers() -> list[str]:
    """meshaccel's pins for this node and any program attached at the cgroup v2 root."""
    out = []
    pins = Path("/sys/fs/bpf/meshaccel") / NODE_NAME
    if pins.exists():
        out.append(f"pins left in {pins}")
    p = run("bpftool", "-j", "cgroup", "show", str(cgroup2_mount()), check=False)
    with contextlib.suppress(ValueError):
        progs = json.loads(p.stdout.strip() or "[]")  # nothing at all for an empty cgroup
        if progs:
            out.append(f"programs attached at {cgroup2_mount()}: {', '.join(str(x.get('name')) for x in progs)}")
    return out


def down_all(st: State | None, quiet: bool = False) -> list[str]:
    """Undo everything `up` did, in reverse; returns what could not be undone (never raises)."""
    problems: list[str] = []
    if st is None:
        st = State()
    pids = dict(st.pids)
    if "kubelet" in pids:
        stop_pid("kubelet", pids.pop("kubelet"))
    try:
        remove_pods(problems)
    except (subprocess.TimeoutExpired, OSError) as e:
        problems.append(f"removing pods: {e}")
    for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd", "containerd"):
        if name in pids:
            stop_pid(name, pids.pop(name))
    stop_shims()
    unmount_under([DATA, RUN, CONTAINERD_ROOT], problems)
    remove_cgroups(problems)
    for link in (BRIDGE, NODE_LINK):
        if Path(f"/sys/class/net/{link}").exists():
            run("ip", "link", "del", link, check=False)
    for cidr in (SERVICE_CIDR, CLUSTER_POD_CIDR):
        run("ip", "route", "del", "unreachable", cidr, check=False)
    remove_iptables(st)
    counters = guard_counters()
    run("nft", "delete", "table", "inet", NFT_TABLE, check=False)
    for point in st.shared_mounts:
        run("mount", "--make-private", point, check=False)
    for point in st.bind_mounts:
        ours = [e for e in os.listdir(point) if e.startswith("cni-")] if os.path.isdir(point) else []
        others = [p for p, _, _, _ in mounts() if p.startswith(f"{point}/")]
        if ours:
            problems.append(f"{point} still holds pod namespaces {ours}")
        elif others:
            # Namespaces others made meanwhile live on this mount: keep it, as `ip netns add` would.
            log(f"{point} stays a shared mount: it holds {len(others)} network namespaces of other programs")
        else:
            run("umount", point, check=False)
    for name, value in st.sysctls.items():
        if read_sysctl(name) != value:
            write_sysctl(name, value)
            if read_sysctl(name) != value:
                problems.append(f"sysctl {name} could not be restored to {value}")
    for f in AGENT_HOST_FILES:
        if f.name not in st.files_before.get(str(f.parent), []):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()
    if "/run/containerd" in st.created_dirs and not Path("/run/containerd/containerd.sock").exists():
        shutil.rmtree("/run/containerd", ignore_errors=True)  # only our shims' sockets were there
    for dname in reversed(st.created_dirs):
        with contextlib.suppress(OSError):
            Path(dname).rmdir()  # only if empty: someone else may have started using it meanwhile
    for p in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*") if Path("/var/lib/cni/results").is_dir() else []:
        p.unlink()
    shutil.rmtree(DATA, ignore_errors=True)
    problems += bpf_leftovers()
    for name, pid in pids.items():
        stop_pid(name, pid)
    if counters:
        leaked = {k: v for k, v in counters.items() if v}
        if leaked:
            problems.append(f"packets from the pod range headed off the node (dropped): {leaked}")
        elif not quiet:
            log(f"guard counters: {counters} (nothing from the pod range went to {', '.join(st.uplinks) or 'the uplink'})")
    shutil.rmtree(RUN, ignore_errors=True)
    return problems


def leftovers() -> list[str]:
    """Every trace a node could leave on the host, looked for from scratch (no recorded state needed)."""
    out = []
    if STATE.exists():
        out.append(f"state file {STATE}")
    ours = (str(BIN.resolve()) if BIN.exists() else str(BIN), str(RUN / "containerd.sock"))
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or d.name == str(os.getpid()):
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            exe = os.readlink(d / "exe")
        except OSError:
            continue
        if exe.startswith(ours[0]) or any(ours[1] in a or str(RUN / "containerd.toml") in a for a in argv):
            out.append(f"process {d.name} {' '.join(argv)[:120]}")
    roots = (str(DATA), str(RUN), str(CACHE))  # the cache: containerd's root and buildah's storage
    out += [f"mount {p}" for p, _, _, _ in mounts() if p.startswith(roots)]
    out += [f"link {n}" for n in (BRIDGE, NODE_LINK) if Path(f"/sys/class/net/{n}").exists()]
    routes = run("ip", "route", "show", "type", "unreachable", check=False).stdout
    out += [f"route unreachable {c}" for c in (SERVICE_CIDR, CLUSTER_POD_CIDR) if c in routes]
    if run("nft", "list", "table", "inet", NFT_TABLE, check=False).returncode == 0:
        out.append(f"nft table inet {NFT_TABLE}")
    out += [f"netns {p}" for p in Path("/run/netns").glob("cni-*")]
    out += [f"cgroup {r / 'kubepods'}" for r in [*cgroup_v1_mounts(), cgroup2_mount()] if (r / "kubepods").exists()]
    for key, chains in iptables_chains().items():
        out += [f"{key} chain {c}" for c in chains if c.startswith(("KUBE-", "CNI-"))]
    out += bpf_leftovers()
    return out


def check(args: argparse.Namespace) -> int:
    left = leftovers()
    for item in left:
        print(f"left behind: {item}")
    if not left:
        print("nothing of the e2e node is left on this host")
    return 1 if left else 0


def down(args: argparse.Namespace) -> int:
    st = State.load()
    if st is None and not args.force:
        log("no node is running (nothing recorded in /run/meshaccel-e2e)")
        return 0
    t0 = time.monotonic()
    problems = down_all(st)
    for p in problems:
        log(f"PROBLEM: {p}")
    log(f"down in {time.monotonic() - t0:.0f}s" + (", clean" if not problems else f", {len(problems)} problem(s)"))
    return 1 if problems else 0


def status(args: argparse.Namespace) -> int:
    st = State.load()
    if st is None:
        print("no e2e node")
        return 1
    for name, pid in st.pids.items():
        print(f"{name:<24} pid {pid:<8} {'running' if alive(pid) else 'GONE'}  log {LOGS / (name + '.log')}")
    print(f"guard counters: {guard_counters()}")
    print(f"KUBECONFIG={DATA / 'admin.kubeconfig'}")
    return 0


def env(args: argparse.Namespace) -> int:
    print(f"export KUBECONFIG={DATA / 'admin.kubeconfig'}")
    print(f"export PATH={BIN}:$PATH")
    print(f"export MESHACCEL_E2E_NODE={NODE_NAME} MESHACCEL_E2E_NODE_IP={NODE_IP} MESHACCEL_E2E_API_PORT={API_PORT}")
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up").set_defaults(func=up)
    d = sub.add_parser("down")
    d.add_argument("--force", action="store_true", help="sweep even if no state is recorded")
    d.set_defaults(func=down)
    sub.add_parser("status").set_defaults(func=status)
    sub.add_parser("env").set_defaults(func=env)
    sub.add_parser("leftovers", help="list anything of a node left on the host; exit 1 if there is").set_defaults(
        func=check)
    args = ap.parse_args(argv)
    try:
        with locked():
            return int(args.func(args))
    except NodeError as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
