// The npm `asterisk-manager` package reading the same bytes as benches/ami_parse.rs
// from a local socket: a tiny server sends the banner, answers the Login, then streams
// fixture 15 (without its banner line) repeated until >= N messages. Counts every
// message the package parses ('rawevent': events and responses), per CPU second of
// the process (server and client share it, as in the Rust bench). Prints one JSON line.
//
// usage: NODE_PATH=<node_modules> node asterisk_manager_socket.js FIXTURE N
'use strict';
const fs = require('fs');
const net = require('net');

const [path, targetArg] = process.argv.slice(2);
const target = parseInt(targetArg, 10);
const raw = fs.readFileSync(path);
const body = raw.subarray(raw.indexOf(10) + 1);
let perCopy = 0;
for (let i = body.indexOf('\r\n\r\n'); i !== -1; i = body.indexOf('\r\n\r\n', i + 4)) perCopy++;
const copies = Math.ceil(target / perCopy);
const total = perCopy * copies;

const server = net.createServer((sock) => {
  sock.setNoDelay(true);
  sock.write('Asterisk Call Manager/13.0.0\r\n');
  let started = false;
  sock.on('data', (d) => {
    if (started) return;
    const m = /ActionID: ([^\r\n]+)/i.exec(d.toString());
    if (!m) return;
    started = true;
    sock.write(`Response: Success\r\nActionID: ${m[1]}\r\nMessage: Authentication accepted\r\n\r\n`);
    let sent = 0;
    const pump = () => {
      while (sent < copies) {
        sent++;
        if (!sock.write(body)) return sock.once('drain', pump);
      }
    };
    pump();
  });
  sock.on('error', () => {});
});

server.listen(0, '127.0.0.1', () => {
  const port = server.address().port;
  const ami = require('asterisk-manager')(port, '127.0.0.1', 'crm', 'crm-secret-123', true);
  let count = -1; // the login response is not part of the stream
  let start = 0;
  let cpu0 = null;
  ami.on('rawevent', () => {
    if (count === -1) {
      start = process.hrtime.bigint();
      cpu0 = process.cpuUsage();
    }
    count++;
    if (count === total) {
      const wall = Number(process.hrtime.bigint() - start) / 1e9;
      const used = process.cpuUsage(cpu0);
      const cpu = (used.user + used.system) / 1e6;
      console.log(JSON.stringify({
        peer: 'asterisk-manager', events: count, bytes: body.length * copies,
        cpu_seconds: cpu, wall_seconds: wall, eps: count / cpu, wall_eps: count / wall,
      }));
      process.exit(0);
    }
  });
});
