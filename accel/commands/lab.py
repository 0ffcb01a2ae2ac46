"""`accel lab up|down|exec|list|demo`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from accel import lab_agent
from accel.errors import UserError
from accel.lab import Lab, down_all, list_labs
from accel.state.model import MtlsMode


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = sub.add_parser("lab", help="simulated node(s) of pods in network namespaces").add_subparsers(
        dest="lab_command", required=True
    )
    up = lab.add_parser("up", help="build node(s) with N pods and attach the eBPF programs")
    up.add_argument("--pods", type=int, default=2, help="pods in all, spread over the nodes in turn")
    up.add_argument("--nodes", type=int, default=1, help="simulated nodes joined by a routed link")
    up.add_argument("--id", help="lab id (default: random)")
    up.add_argument("--no-bpf", action="store_true", help="plain kernel path, nothing attached")
    up.add_argument("--agent", action="store_true",
                    help="run `accel agent` for each node against one manifest folder of the lab's pods")
    up.add_argument("--envoy", action="store_true", help="with --agent: a real Envoy per node, on its agent's xDS")
    up.add_argument("--certs", action="store_true", help="with --agent: a lab CA and the agent's cert manager (SDS)")
    up.add_argument("--mtls", choices=["strict", "permissive", "disable"],
                    help="with --agent: meshaccel.io/mtls on the lab namespace")
    up.set_defaults(func=cmd_up)

    down = lab.add_parser("down", help="remove a lab (or --all labs, also what a crashed run left)")
    down.add_argument("--id")
    down.add_argument("--all", action="store_true")
    down.set_defaults(func=cmd_down)

    ex = lab.add_parser("exec", help="run a command inside a pod (its netns and cgroup)")
    ex.add_argument("--id")
    ex.add_argument("pod")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    ex.set_defaults(func=cmd_exec)

    ls = lab.add_parser("list", help="labs that are up")
    ls.set_defaults(func=lambda a: print("\n".join(list_labs())) or 0)

    demo = lab.add_parser("demo", help="build a lab, move bytes plain and accelerated, show the result")
    demo.add_argument("--megabytes", type=int, default=64, help="about this much each way in the byte check")
    demo.add_argument("--map", type=Path, default=Path("meshaccel-demo-map.svg"), metavar="FILE.svg|FILE.png",
                      help="where the service map of the demo's flows goes (default: %(default)s)")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from accel.demo import run
    from accel.flows_map import FORMATS

    if args.map.suffix.lower().lstrip(".") not in FORMATS:
        raise UserError(f"--map {args.map}: name the file .svg or .png (the format follows the suffix)")
    return run(args.megabytes, args.map.resolve())


def _pick(lab_id: str | None) -> Lab:
    if lab_id:
        return Lab.load_state(lab_id)
    labs = list_labs()
    if len(labs) == 1:
        return Lab.load_state(labs[0])
    if not labs:
        raise UserError("no lab is up; start one with `accel lab up --pods 2`")
    raise UserError(f"several labs are up ({', '.join(labs)}); choose one with --id")


def cmd_up(args: argparse.Namespace) -> int:
    if (args.envoy or args.certs or args.mtls) and not args.agent:
        raise UserError("--envoy, --certs and --mtls need --agent")
    # No splice guard in this process, which exits: the lab's agents (--agent) guard the splice.
    lab = Lab(args.pods, lab_id=args.id, attach=not args.no_bpf, nodes=args.nodes, guard=False).up()
    print(f"lab {lab.id} up: {len(lab.nodes)} node(s), {len(lab.pods)} pods, eBPF {'attached' if lab.attach else 'off'}")
    for n in lab.nodes.values():
        print(f"  {n.name}: {n.ipv4} (pods {n.subnet4}), netns={n.netns}, cgroup={n.cgroup}")
        for p in lab.pods_on(n.name):
            print(f"    {p.name:8} {p.ipv4:15} {p.ipv6:22} netns={p.netns}")
    if args.agent:
        try:
            cluster = lab_agent.LabCluster(lab, envoy=args.envoy, certs=args.certs,
                                           mtls=MtlsMode(args.mtls) if args.mtls else None).up()
        except BaseException:
            lab.down()
            raise
        for name, a in cluster.agents.items():
            print(f"agent for {name} (node {a.node}): {a.url} (accel status --agent {a.url})")
            if args.envoy:
                print(f"  envoy in {name}'s namespace, L7 listeners on {lab.node(name).ipv4}; admin: "
                      f"curl --unix-socket {a.admin_socket} http://x/config_dump")
        print(f"drop Services/EndpointSlices/HTTPRoutes/policies into {cluster.manifests}")
    print(f"run in a pod: accel lab exec --id {lab.id} pod1 -- CMD; remove: accel lab down --id {lab.id}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all:
        lab_agent.stop_all()
        removed = down_all()
        print(f"removed {len(removed)} lab(s){': ' + ', '.join(removed) if removed else ''}")
        return 0
    lab = _pick(args.id)
    lab_agent.stop(lab.id)
    lab.down()
    print(f"lab {lab.id} removed")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise UserError("give a command after the pod name: accel lab exec POD -- CMD")
    lab = _pick(args.id)
    cmd = lab.command(args.pod, argv)
    sys.stdout.flush()
    try:
        os.execvp(cmd[0], cmd)
    except OSError as e:
        raise UserError(f"cannot run {argv[0]!r}: {e.strerror}") from e
    return subprocess.call(cmd)  # not reached
