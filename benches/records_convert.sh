#!/usr/bin/env bash
# Benchmark: `kolokol convert` against the `lame` command-line encoder (the same LAME
# library) on a 60-minute 8 kHz mono recording built by repeating a fixture, side by side:
#   - wall time ratio kolokol/lame (goal <= 1.0) and peak RSS (goal <= 32 MB), one file;
#   - eight files at once: CPU time / wall time shows how many cores were used.
#
# Usage: benches/records_convert.sh [--runs N] [--bitrate K] [--quality Q]
# Installs `lame` with apt-get if it is missing. Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=3
BITRATE=32
QUALITY=5
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) RUNS="$2"; shift 2 ;;
    --bitrate) BITRATE="$2"; shift 2 ;;
    --quality) QUALITY="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

if ! command -v lame >/dev/null; then
  echo "installing lame (Debian package) ..." >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq lame >/dev/null
fi

TARGET="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet --bin kolokol
KOLOKOL="$TARGET/release/kolokol"
[ -x "$KOLOKOL" ] || { echo "no binary at $KOLOKOL" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

exec python3 -u - "$KOLOKOL" "$WORK" "$RUNS" "$BITRATE" "$QUALITY" <<'PY'
import os, statistics, subprocess, sys, time, wave

kolokol, work, runs, bitrate, quality = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
fixture = "tests/fixtures/recordings/in-20261121-234741-79161234567-1795304861.0.wav"

# 60 minutes of 8 kHz mono 16-bit PCM: the 4 s fixture 900 times, written as it goes.
src = os.path.join(work, "hour.wav")
with wave.open(fixture, "rb") as w:
    params = w.getparams()
    frames = w.readframes(w.getnframes())
assert (params.framerate, params.nchannels, params.sampwidth) == (8000, 1, 2), params
reps = (3600 * 8000) // params.nframes
with wave.open(src, "wb") as out:
    out.setparams(params)
    for _ in range(reps):
        out.writeframesraw(frames)
audio_s = reps * params.nframes / 8000
size_mb = os.path.getsize(src) / 1e6

TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None

def run(cmds):
    """Start all commands at once; return (wall s, [(user+sys s, peak RSS KiB)]).

    Peak RSS comes from GNU time (-f %M), which forks from a small C process: a child
    forked from Python would report Python's own ~15 MB as its peak.
    """
    t0 = time.perf_counter()
    procs = []
    for i, c in enumerate(cmds):
        stats = os.path.join(work, f"time{i}.txt")
        full = [TIME, "-f", "%M %U %S", "-o", stats] + c if TIME else c
        procs.append((subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), stats))
    res = {}
    while len(res) < len(procs):
        pid, status, ru = os.wait4(-1, 0)
        res[pid] = (status, ru)
    wall = time.perf_counter() - t0
    out = []
    for p, stats in procs:
        status, ru = res[p.pid]
        if status != 0:
            sys.exit(f"{' '.join(p.args)} failed: {p.stderr.read().decode()}")
        if TIME:
            rss, u, s = open(stats).read().split()[-3:]
            out.append((float(u) + float(s), int(rss)))
        else:
            out.append((ru.ru_utime + ru.ru_stime, ru.ru_maxrss))
    return wall, out

def kolokol_cmd(i):
    return [kolokol, "convert", src, os.path.join(work, f"k{i}.mp3"), "--bitrate", bitrate, "--quality", quality]

def lame_cmd(i):
    return ["lame", "--quiet", "-m", "m", "--cbr", "-b", bitrate, "-q", quality, src, os.path.join(work, f"l{i}.mp3")]

lame_ver = subprocess.run(["lame", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
cores = os.cpu_count()
print(f"input: {audio_s/60:.0f} min, 8 kHz mono 16-bit, {size_mb:.1f} MB; {bitrate} kbit/s CBR, -q {quality}; {cores} cores")
print(f"peer: {lame_ver}")
print(f"load average before start: {os.getloadavg()[0]:.1f} (other work on the machine skews 'cores used')")

# One file, alternating so both see the same machine load; median of the runs.
k_wall, l_wall, k_rss, l_rss, k_cpu, l_cpu = [], [], [], [], [], []
for _ in range(runs):
    w, r = run([kolokol_cmd(0)]); k_wall.append(w); k_rss.append(r[0][1]); k_cpu.append(r[0][0])
    w, r = run([lame_cmd(0)]); l_wall.append(w); l_rss.append(r[0][1]); l_cpu.append(r[0][0])
kw, lw = statistics.median(k_wall), statistics.median(l_wall)
kc, lc = statistics.median(k_cpu), statistics.median(l_cpu)
ksz, lsz = os.path.getsize(os.path.join(work, "k0.mp3")), os.path.getsize(os.path.join(work, "l0.mp3"))
print()
print(f"one 60-minute file ({runs} runs, alternating)   wall (median)   CPU (median)   x real time   peak RSS    mp3 size")
print(f"  kolokol convert                       {kw:8.2f} s     {kc:8.2f} s   {audio_s/kw:10.0f}x   {max(k_rss)/1024:6.1f} MB   {ksz/1e6:6.2f} MB")
print(f"  lame                                  {lw:8.2f} s     {lc:8.2f} s   {audio_s/lw:10.0f}x   {max(l_rss)/1024:6.1f} MB   {lsz/1e6:6.2f} MB")
print(f"  wall-time ratio kolokol/lame: {kw/lw:.2f}, CPU-time ratio {kc/lc:.2f} (goal <= 1.0); kolokol peak RSS {max(k_rss)/1024:.1f} MB (goal <= 32 MB)")

# Eight files at once.
print()
print("eight 60-minute files at once   wall     CPU (user+sys)   cores used   peak RSS each")
for name, mk in (("kolokol convert", kolokol_cmd), ("lame", lame_cmd)):
    wall, r = run([mk(i) for i in range(8)])
    cpu = sum(c for c, _ in r)
    print(f"  {name:<28} {wall:6.2f} s   {cpu:8.2f} s        {cpu/wall:5.2f}      {max(m for _, m in r)/1024:5.1f} MB")
PY
