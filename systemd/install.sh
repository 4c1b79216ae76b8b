#!/bin/sh
# Install or upgrade kolokol on a systemd machine without dpkg (the .deb does the same).
#
#   sudo systemd/install.sh              # build (cargo build --release) and install
#   sudo KOLOKOL_BIN=./kolokol systemd/install.sh   # install a binary built elsewhere
#
# Idempotent: run it again to upgrade. An existing /etc/kolokol/config.toml and the
# state in /var/lib/kolokol are never touched; the new example config goes next to the
# docs. DESTDIR=/some/root installs the files only (no user, no systemctl): for
# packagers and for trying it out.
set -eu

cd "$(dirname "$0")/.."
DESTDIR=${DESTDIR:-}
BINDIR=${BINDIR:-/usr/local/bin}
SHAREDIR=${SHAREDIR:-/usr/local/share/kolokol}
CONFDIR=/etc/kolokol
STATEDIR=/var/lib/kolokol
UNITDIR=/etc/systemd/system

say() { echo "kolokol install: $*"; }

# 1. The binary.
if [ -n "${KOLOKOL_BIN:-}" ]; then
    bin=$KOLOKOL_BIN
else
    # Build as the user who called sudo, so target/ stays theirs.
    if [ -n "${SUDO_USER:-}" ] && [ "$(id -u)" = 0 ]; then
        su "$SUDO_USER" -c "cargo build --release --locked"
    else
        cargo build --release --locked
    fi
    bin=${CARGO_TARGET_DIR:-target}/release/kolokol
fi
[ -x "$bin" ] || { say "no executable at $bin"; exit 1; }

if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    say "run as root (sudo), or set DESTDIR to install into a folder"
    exit 1
fi

# 2. The service user (member of `asterisk` to read recordings).
if [ -z "$DESTDIR" ]; then
    getent group kolokol >/dev/null || groupadd --system kolokol
    if ! getent passwd kolokol >/dev/null; then
        useradd --system --gid kolokol --home-dir "$STATEDIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "kolokol Asterisk-CRM connector" kolokol
        say "created system user kolokol"
    fi
    if getent group asterisk >/dev/null && ! id -nG kolokol | tr ' ' '\n' | grep -qx asterisk; then
        usermod -a -G asterisk kolokol
        say "added kolokol to group asterisk"
    fi
fi
owner() { # owner USER:GROUP -> install(1) flags, when the user exists here
    if [ -z "$DESTDIR" ]; then echo "-o ${1%%:*} -g ${1##*:}"; fi
}

# 3. Files. The binary is replaced atomically (install writes a new inode), so a
# running daemon keeps its old copy until the restart below.
install -d "$DESTDIR$BINDIR" "$DESTDIR$SHAREDIR/customizations/examples" "$DESTDIR$UNITDIR"
# -s: the release profile keeps debug info (for profiling); 120 MB -> 18 MB stripped.
if command -v strip >/dev/null; then strip_flag=-s; else strip_flag=; fi
install $strip_flag -m 0755 "$bin" "$DESTDIR$BINDIR/kolokol"
install -m 0644 customizations/README.md "$DESTDIR$SHAREDIR/customizations/"
install -m 0755 customizations/examples/* "$DESTDIR$SHAREDIR/customizations/examples/"
install -m 0644 etc/kolokol/config.toml "$DESTDIR$SHAREDIR/config.toml.example"
install -m 0644 README.md "$DESTDIR$SHAREDIR/README.md"

# shellcheck disable=SC2046
install -d -m 0750 $(owner root:kolokol) "$DESTDIR$CONFDIR" "$DESTDIR$CONFDIR/customizations"
if [ -e "$DESTDIR$CONFDIR/config.toml" ]; then
    say "kept $CONFDIR/config.toml (compare with $SHAREDIR/config.toml.example)"
else
    # shellcheck disable=SC2046
    install -m 0640 $(owner root:kolokol) etc/kolokol/config.toml "$DESTDIR$CONFDIR/config.toml"
    say "installed $CONFDIR/config.toml: set the [ami] and CRM secrets in it"
fi
# shellcheck disable=SC2046
install -d -m 0750 $(owner kolokol:kolokol) "$DESTDIR$STATEDIR"

# The unit points at the binary where this script put it.
sed "s|/usr/bin/kolokol|$BINDIR/kolokol|g" systemd/kolokol.service >"$DESTDIR$UNITDIR/kolokol.service.new"
chmod 0644 "$DESTDIR$UNITDIR/kolokol.service.new"
mv "$DESTDIR$UNITDIR/kolokol.service.new" "$DESTDIR$UNITDIR/kolokol.service"

# 4. systemd: pick up the unit; restart only a service that was running (upgrade).
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if systemctl is-active --quiet kolokol; then
        systemctl restart kolokol
        say "upgraded and restarted kolokol"
    else
        say "next: kolokol check-config && systemctl enable --now kolokol"
    fi
fi
