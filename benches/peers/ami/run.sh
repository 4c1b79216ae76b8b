#!/usr/bin/env bash
# AMI parse throughput, side by side on the same bytes (fixture 15 repeated to
# >= AMI_BENCH_EVENTS messages, default 1,000,000):
#   * kolokol (benches/ami_parse.rs, release build, one core),
#   * panoramisk (Python, PyPI) parsing the bytes,
#   * asterisk-manager (Node, npm) reading them from a local socket.
# The peers are installed into a temp dir that is removed afterwards.
#
# usage: benches/peers/ami/run.sh        (from anywhere; needs cargo, python3 + pip, node + npm)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
cd "$root"
export AMI_BENCH_EVENTS="${AMI_BENCH_EVENTS:-1000000}"
fixture="$root/tests/fixtures/ami/15-burst-20-concurrent.ami"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "== installing peers into $tmp" >&2
python3 -m pip install --quiet --disable-pip-version-check --target "$tmp/py" panoramisk >&2
npm install --silent --no-audit --no-fund --prefix "$tmp/node" asterisk-manager >&2
py_ver="$(PYTHONPATH="$tmp/py" python3 -c 'import importlib.metadata as m; print(m.version("panoramisk"))' 2>/dev/null || echo '?')"
node_ver="$(node -p "require('$tmp/node/node_modules/asterisk-manager/package.json').version")"

echo "== kolokol (cargo bench --bench ami_parse)" >&2
rust_out="$(cargo bench --quiet --bench ami_parse 2>/dev/null)"
echo "$rust_out" >&2
rust_json="$(tail -n 1 <<<"$rust_out")"

echo "== panoramisk $py_ver (parser on the bytes)" >&2
py_json="$(PYTHONPATH="$tmp/py" python3 "$here/panoramisk_parse.py" "$fixture" "$AMI_BENCH_EVENTS")"
echo "$py_json" >&2

echo "== asterisk-manager $node_ver (from a local socket)" >&2
node_json="$(NODE_PATH="$tmp/node/node_modules" node "$here/asterisk_manager_socket.js" "$fixture" "$AMI_BENCH_EVENTS")"
echo "$node_json" >&2

python3 - "$rust_json" "$py_json" "$node_json" "$py_ver" "$node_ver" <<'PY'
import json, sys
rust, py, node = (json.loads(a) for a in sys.argv[1:4])
py_ver, node_ver = sys.argv[4:6]
mb = rust["bytes"] / rust["events"]
rows = [
    ("kolokol codec (64 KiB reads)", rust["codec_eps"]),
    ("kolokol codec + Event lookup", rust["lookup_eps"]),
    ("kolokol client over TCP", rust["client_eps"]),
    (f"panoramisk {py_ver} parser", py["eps"]),
    (f"asterisk-manager {node_ver} socket", node["eps"]),
]
print(f"\n{rust['events']:,} messages, {rust['bytes']/1e6:.0f} MB ({mb:.0f} bytes/message)\n")
print(f"| {'implementation':<34} | {'events/s':>12} | {'MB/s':>8} | {'vs panoramisk':>13} | {'vs asterisk-manager':>19} |")
print(f"|{'-'*36}|{'-'*14}|{'-'*10}|{'-'*15}|{'-'*21}|")
for name, eps in rows:
    print(f"| {name:<34} | {eps:>12,.0f} | {eps*mb/1e6:>8.1f} | {eps/py['eps']:>12.1f}x | {eps/node['eps']:>18.1f}x |")
PY
