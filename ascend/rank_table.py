"""HCCL rank tables for MindSpore runs launched the rank-table way (MindFormers' `run_distribute.sh`): one table
per server from its /etc/hccn.conf, then one table for the cluster.

    python ascend/rank_table.py generate --device_num "[0,8)" --output hccl_8p_server1.json      # on each server
    python ascend/rank_table.py merge hccl_8p_server1.json hccl_8p_server2.json --output hccl_2s_16p.json

`msrun` (MindSpore's launcher) needs no rank table; see ascend/README.md for both ways. The format is HCCL's
version 1.0 table: {"version", "server_count", "server_list": [{"server_id", "device": [{"device_id",
"device_ip", "rank_id"}], "host_nic_ip"}], "status"}. Merging keeps the servers in the order given and numbers
ranks 0..N-1 across them (server 1 owns ranks 0-7, server 2 ranks 8-15 for 8-card servers).
"""
import argparse
import json
import re
import socket
import sys
from pathlib import Path
from typing import Dict, List

from glm_tune.safe_output import atomic_write_json


class RankTableError(ValueError):
    """The inputs cannot make a rank table; the message says what is wrong."""


def parse_device_range(text: str) -> List[int]:
    """"[0,8)" -> [0..7]. HCCL groups cards 0-3 and 4-7; a range may cover one group or all eight."""
    match = re.fullmatch(r"\s*\[\s*(\d+)\s*,\s*(\d+)\s*\)\s*", text)
    if not match:
        raise RankTableError(f"--device_num {text!r}: expected a half-open range like \"[0,8)\"")
    first, end = int(match.group(1)), int(match.group(2))
    if not 0 <= first < end <= 8:
        raise RankTableError(f"--device_num {text!r}: cards are 0..7 and the range must not be empty")
    if (first, end) != (0, 8) and (first // 4 != (end - 1) // 4):
        raise RankTableError(f"--device_num {text!r} crosses the 0-3 / 4-7 card groups; use [0,8) or stay "
                             "inside one group")
    return list(range(first, end))


def read_hccn_conf(path) -> Dict[int, str]:
    """device id -> NIC IP from /etc/hccn.conf lines `address_<id>=<ip>`."""
    addresses = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"\s*address_(\d+)\s*=\s*([0-9.]+)\s*", line)
        if match:
            addresses[int(match.group(1))] = match.group(2)
    return addresses


def generate(devices: List[int], hccn_conf="/etc/hccn.conf", server_id: str = None) -> dict:
    addresses = read_hccn_conf(hccn_conf)
    missing = [d for d in devices if d not in addresses]
    if missing:
        raise RankTableError(f"{hccn_conf} has no address_<id> line for device(s) {missing}: set the NIC IPs "
                             "with hccn_tool first")
    server_id = server_id or socket.gethostbyname(socket.gethostname())
    device = [{"device_id": str(d), "device_ip": addresses[d], "rank_id": str(rank)}
              for rank, d in enumerate(devices)]
    return {"version": "1.0", "server_count": "1",
            "server_list": [{"server_id": server_id, "device": device, "host_nic_ip": "reserve"}],
            "status": "completed"}


def merge(tables: List[dict]) -> dict:
    servers, seen, rank = [], set(), 0
    for table in tables:
        for server in table["server_list"]:
            if server["server_id"] in seen:
                raise RankTableError(f"server {server['server_id']} appears in more than one table")
            seen.add(server["server_id"])
            devices = []
            for device in sorted(server["device"], key=lambda d: int(d["rank_id"])):
                devices.append({**device, "rank_id": str(rank)})
                rank += 1
            servers.append({**server, "device": devices})
    return {"version": "1.0", "server_count": str(len(servers)), "server_list": servers, "status": "completed"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="this server's table from its hccn.conf")
    gen.add_argument("--device_num", default="[0,8)", help="half-open card range, e.g. \"[0,8)\" or \"[0,4)\"")
    gen.add_argument("--hccn_conf", default="/etc/hccn.conf", help="the NIC configuration hccn_tool writes")
    gen.add_argument("--server_id", help="this server's IP (default: the host name's address)")
    gen.add_argument("--output", required=True, help="the JSON table to write")
    mer = sub.add_parser("merge", help="one cluster table from per-server tables, ranks in the order given")
    mer.add_argument("tables", nargs="+", help="per-server tables, first server first")
    mer.add_argument("--output", required=True, help="the JSON table to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            table = generate(parse_device_range(args.device_num), args.hccn_conf, args.server_id)
        else:
            table = merge([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.tables])
    except (RankTableError, OSError, KeyError, json.JSONDecodeError) as err:
        sys.exit(f"error: {err}")
    atomic_write_json(args.output, table)
    ranks = sum(len(s["device"]) for s in table["server_list"])
    print(f"wrote {args.output}: {table['server_count']} server(s), {ranks} rank(s)")
    return table


if __name__ == "__main__":
    main()
