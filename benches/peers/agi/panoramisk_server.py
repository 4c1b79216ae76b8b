"""FastAGI peer for benches/agi_load.rs: panoramisk answering fixture 12's script.

Usage: PYTHONPATH=<dir with panoramisk> python3 panoramisk_server.py PORT
Prints "ready" once listening. The route table is a dict (the equivalent of a warm
cache): the caller id maps to (extension, name), and the answer is exactly what
fixture 12 recorded: SET VARIABLE KOLOKOL_DST 102, SET VARIABLE CALLERID(name) "Ivan Petrov".
"""

import asyncio
import sys

from panoramisk.fast_agi import Application

ROUTES = {"79161234567": ("102", "Ivan Petrov")}


async def autodistribution(request):
    found = ROUTES.get(request.headers.get("agi_callerid", ""))
    if not found:
        return
    ext, name = found
    reply = await request.send_command(f"SET VARIABLE KOLOKOL_DST {ext}")
    if reply.get("status_code") != 200:
        return
    await request.send_command(f'SET VARIABLE CALLERID(name) "{name}"')


async def main(port):
    app = Application(loop=asyncio.get_running_loop())
    app.add_route("autodistribution", autodistribution)
    server = await asyncio.start_server(app.handler, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
