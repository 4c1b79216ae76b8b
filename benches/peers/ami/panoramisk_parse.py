"""panoramisk's AMI parser on the same bytes as benches/ami_parse.rs.

Feeds fixture 15 (without its banner line) repeated until >= N messages into
panoramisk's AMIProtocol.data_received in 64 KiB pieces, as its asyncio transport
would (rates per CPU second of the thread, like the Rust bench), counting the messages it builds (handle_message replaced by a counter so only
framing + Message.from_line are measured). Prints one JSON line.

usage: PYTHONPATH=<dir with panoramisk> python3 panoramisk_parse.py FIXTURE N
"""
import json
import sys
import time

from panoramisk.ami_protocol import AMIProtocol

READ = 64 * 1024


class Transport:
    def write(self, data):
        pass


def main():
    path, target = sys.argv[1], int(sys.argv[2])
    raw = open(path, 'rb').read()
    body = raw[raw.index(b'\n') + 1:]
    # Messages per copy, counted the same way the Rust bench does (blocks).
    per_copy = body.count(b'\r\n\r\n')
    copies = -(-target // per_copy)
    pieces = [body[i:i + READ] for i in range(0, len(body), READ)]

    proto = AMIProtocol()
    proto.connection_made(Transport())
    proto.version = '13.0.0'  # skip banner sniffing, as after a real connect
    count = 0

    def handle_message(message):
        nonlocal count
        count += 1

    proto.handle_message = handle_message
    start, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(copies):
        for p in pieces:
            proto.data_received(p)
    cpu = time.thread_time() - cpu0
    wall = time.perf_counter() - start
    total = per_copy * copies
    if count != total:
        print(f'panoramisk built {count} messages, expected {total}', file=sys.stderr)
    print(json.dumps({
        'peer': 'panoramisk',
        'events': count,
        'bytes': len(body) * copies,
        'cpu_seconds': cpu,
        'wall_seconds': wall,
        'eps': count / cpu,
        'wall_eps': count / wall,
    }))


if __name__ == '__main__':
    main()
