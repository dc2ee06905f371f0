#!/usr/bin/env python3
"""Make a one-machine copy of a FLARE ``project.yml``: the server is named ``localhost`` (so it listens on loopback
only and its certificate matches), ports are free ones, and optionally only some sites and admins are kept.

    python deploy/local_project.py deploy/project.yml /tmp/rehearsal/project.yml [--clients hospital-a hospital-b]
        [--port PORT] [--admin-port PORT]

Used by the POC runner, the provisioned end-to-end test, and the rehearsal in docs/deployment.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any, Dict, List, Optional, Sequence

import yaml


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int) -> List[int]:
    ports: List[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def localize(project: Dict[str, Any], clients: Optional[Sequence[str]] = None, admins: Optional[Sequence[str]] = None,
             port: Optional[int] = None, admin_port: Optional[int] = None) -> Dict[str, Any]:
    """A copy of ``project`` for one machine (see the module docstring). ``port=None`` picks a free port; the admin
    port is the FL port unless ``admin_port`` is given (or the project had a separate one, then a free one)."""
    participants = project.get("participants") or []
    servers = [p for p in participants if p.get("type") == "server"]
    if len(servers) != 1:
        raise ValueError(f"project must have exactly one server, found {len(servers)}")
    known_clients = [p["name"] for p in participants if p.get("type") == "client"]
    unknown = sorted(set(clients or []) - set(known_clients))
    if unknown:
        raise ValueError(f"clients {unknown} are not in the project (it has {known_clients})")
    known_admins = [p["name"] for p in participants if p.get("type") == "admin"]
    unknown = sorted(set(admins or []) - set(known_admins))
    if unknown:
        raise ValueError(f"admins {unknown} are not in the project (it has {known_admins})")

    out = dict(project)
    kept = []
    for p in participants:
        p = dict(p)
        if p.get("type") == "client" and clients is not None and p["name"] not in clients:
            continue
        if p.get("type") == "admin" and admins is not None and p["name"] not in admins:
            continue
        if p.get("type") == "server":
            separate_admin = "admin_port" in p and p["admin_port"] != p.get("fed_learn_port")
            p["name"] = "localhost"
            p["fed_learn_port"] = port or free_port()
            if admin_port or separate_admin:
                p["admin_port"] = admin_port or free_ports(2)[1]
            else:
                p.pop("admin_port", None)
            p.pop("host_names", None)
            p.pop("default_host", None)
        kept.append(p)
    out["participants"] = kept
    return out


def server_ports(project: Dict[str, Any]) -> Dict[str, int]:
    server = [p for p in project["participants"] if p.get("type") == "server"][0]
    return {"fed_learn_port": server["fed_learn_port"], "admin_port": server.get("admin_port", server["fed_learn_port"])}


def write_local_project(src: str, dest: str, **kwargs: Any) -> Dict[str, Any]:
    with open(src) as f:
        project = yaml.safe_load(f)
    local = localize(project, **kwargs)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    with open(dest, "w") as f:
        f.write(f"# one-machine copy of {os.path.basename(src)} made by deploy/local_project.py\n")
        yaml.safe_dump(local, f, sort_keys=False)
    return local


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="project.yml to copy")
    parser.add_argument("dest", help="where to write the localhost copy")
    parser.add_argument("--clients", nargs="+", help="keep only these client sites")
    parser.add_argument("--admins", nargs="+", help="keep only these admins")
    parser.add_argument("--port", type=int, help="FL port (default: a free one)")
    parser.add_argument("--admin-port", type=int, help="separate admin port (default: same as the FL port)")
    args = parser.parse_args(argv)
    try:
        local = write_local_project(args.src, args.dest, clients=args.clients, admins=args.admins, port=args.port,
                                    admin_port=args.admin_port)
    except ValueError as e:
        print(f"local_project: error: {e}", file=sys.stderr)
        return 2
    ports = server_ports(local)
    print(f"wrote {args.dest}: server localhost, FL port {ports['fed_learn_port']}, admin port {ports['admin_port']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
