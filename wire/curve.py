"""CurveZMQ on the lab's sockets: who holds which key, and the worker's gate that refuses the rest.

    workers (bind)   control ROUTER, KV PULL: CURVE servers, one key pair for the lab's workers ("server");
                     a ZAP handler lets in only client keys found in the key directory's authorized/
    clients (connect) coordinator DEALER ("coordinator"), prefill worker's KV PUSH ("prefill"): each its own
                     key pair, and the workers' public key

Every byte after the handshake is encrypted and authenticated (CurveZMQ: Curve25519 key exchange,
XSalsa20-Poly1305 per message). A peer without an authorized key gets nothing: the handshake fails and
the worker logs it (throttled: a scanner can retry at any rate).

A key directory (`homelab-disagg keys generate DIR`) holds ZeroMQ certificate files, as
`zmq.auth.create_certificates` writes them (`NAME.key` public, `NAME.key_secret` both halves, mode 0600):

    server.key, server.key_secret            every worker (the secret half only on worker hosts)
    coordinator.key, coordinator.key_secret  the coordinator (and `status`)
    prefill.key, prefill.key_secret          prefill workers, for the KV they push to decode workers
    authorized/coordinator.key, prefill.key  the client public keys workers let in
"""

from __future__ import annotations

import datetime
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from wire.throttled_log import ThrottledWarning

SERVER, COORDINATOR, PREFILL = "server", "coordinator", "prefill"
CLIENTS = (COORDINATOR, PREFILL)
AUTHORIZED_DIR = "authorized"
ZAP_DOMAIN = b"homelab-disagg"
_Z85_KEY_LEN = 40  # a 32-byte Curve25519 key in Z85 text
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
_PROTOCOL_ERRORS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "it does not speak CURVE (a client without keys?)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "its handshake does not decrypt (it holds another server key?)",
}


class CurveKeyError(ValueError):
    """A key file or directory that is missing, unreadable, malformed or too open."""


@dataclass(frozen=True)
class CurveKeys:
    """One side's CURVE keys, Z85 text (40 bytes each): its own key pair, and for a client the server's
    public key, for a server the client public keys it lets in."""

    public_key: bytes
    secret_key: bytes
    server_public_key: bytes = b""
    authorized_keys: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        for what, key in (("public", self.public_key), ("secret", self.secret_key),
                          *(("server public", k) for k in [self.server_public_key] if k),
                          *(("authorized", k) for k in self.authorized_keys)):
            _check_z85(key, f"the {what} key")

    def apply_client(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) a CURVE client of the server whose public key this holds."""
        if not self.server_public_key:
            raise CurveKeyError("these CURVE keys are a server's: a client needs the server's public key")
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.server_public_key

    def __repr__(self) -> str:  # never the secret half, whatever prints a config
        return f"CurveKeys(public_key={self.public_key.decode()!r}, ...)"


def _check_z85(key: bytes, what: str) -> None:
    try:
        ok = len(key) == _Z85_KEY_LEN and len(z85.decode(key)) == 32
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CurveKeyError(f"{what} is not a Z85 CURVE key of {_Z85_KEY_LEN} characters")


# --- key files -----------------------------------------------------------------------------------


def _cert_text(public_key: bytes, secret_key: bytes | None) -> str:
    kind = "Secret" if secret_key else "Public"
    lines = [f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by homelab-disagg keys  ****",
             f"#   ZeroMQ CURVE **{kind}** Certificate",
             "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions." if secret_key else
             "#   Exchange securely, or use a secure mechanism to verify the contents of this file after exchange.",
             "", "metadata", "curve", f'    public-key = "{public_key.decode()}"']
    if secret_key:
        lines.append(f'    secret-key = "{secret_key.decode()}"')
    return "\n".join(lines) + "\n"


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create `path` with `mode` from the first byte (no window where a secret is world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # whatever the umask took away from a public file


def generate_keys(key_dir: Path, overwrite: bool = False) -> list[Path]:
    """Make the lab's key pairs in `key_dir` (layout above); returns the files written. Refuses to replace
    existing keys unless `overwrite`: a new server key locks every client out until it has the new one."""
    key_dir = Path(key_dir)
    names = (SERVER, *CLIENTS)
    planned = [key_dir / f"{n}{ext}" for n in names for ext in (".key", ".key_secret")]
    planned += [key_dir / AUTHORIZED_DIR / f"{n}.key" for n in CLIENTS]
    existing = [p for p in planned if p.exists()]
    if existing and not overwrite:
        raise CurveKeyError(f"{key_dir} already holds keys ({existing[0].name}); keep them, or pass --force to "
                            "replace all of them (then every host needs the new ones)")
    for p in existing:
        p.unlink()
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    (key_dir / AUTHORIZED_DIR).mkdir(exist_ok=True)
    for name in names:
        public, secret = zmq.curve_keypair()
        _write_new(key_dir / f"{name}.key", _cert_text(public, None), 0o644)
        _write_new(key_dir / f"{name}.key_secret", _cert_text(public, secret), 0o600)
        if name in CLIENTS:
            _write_new(key_dir / AUTHORIZED_DIR / f"{name}.key", _cert_text(public, None), 0o644)
    return planned


def _read_cert(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveKeyError(f"CURVE key file {path} does not exist (make keys with `homelab-disagg keys generate DIR`)")
    if secret:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CurveKeyError(f"CURVE secret key {path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
                                f"chmod 600 {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"CURVE key file {path} is not a ZeroMQ certificate: {e}") from None
    if secret and not secret_key:
        raise CurveKeyError(f"CURVE key file {path} holds no secret key")
    for key in (public, secret_key):
        if key:
            _check_z85(key, f"a key in {path}")
    return public, secret_key


def server_keys(key_dir: Path) -> CurveKeys:
    """A worker's keys as a CURVE server: the lab's server key pair and the authorized client keys."""
    key_dir = Path(key_dir)
    public, secret = _read_cert(key_dir / f"{SERVER}.key_secret", secret=True)
    auth_dir = key_dir / AUTHORIZED_DIR
    authorized = frozenset(_read_cert(p, secret=False)[0] for p in sorted(auth_dir.glob("*.key"))) if auth_dir.is_dir() \
        else frozenset()
    if not authorized:
        raise CurveKeyError(f"no client public keys (*.key) in {auth_dir}: this worker would let no one in")
    return CurveKeys(public, secret, authorized_keys=authorized)


def client_keys(key_dir: Path, name: str) -> CurveKeys:
    """A client's keys (`name`: coordinator or prefill): its key pair and the workers' public key."""
    key_dir = Path(key_dir)
    public, secret = _read_cert(key_dir / f"{name}.key_secret", secret=True)
    server_public_file = key_dir / f"{SERVER}.key"
    if not server_public_file.exists() and (key_dir / f"{SERVER}.key_secret").exists():
        server_public_file = key_dir / f"{SERVER}.key_secret"  # a worker host holds only the pair
    server_public, _ = _read_cert(server_public_file, secret=False)
    return CurveKeys(public, secret, server_public_key=server_public)


# --- the worker's gate ---------------------------------------------------------------------------


class _Zap(ThreadAuthenticator):
    """ZeroMQ's ZAP handler in a thread, asking `allow(address, key)` for each CURVE handshake."""

    def __init__(self, ctx: zmq.Context, allow):
        super().__init__(ctx, log=logging.getLogger("zmq.auth"))
        self._allow = allow
        self._address = ""
        self.configure_curve_callback(ZAP_DOMAIN.decode(), self)  # the domain every guarded socket names

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"  # the peer's IP
        await super().handle_zap_message(msg)

    def callback(self, domain: str, client_key: bytes) -> bool:  # the credentials provider's hook
        return self._allow(self._address, client_key)


class CurveGuard:
    """A worker process's CURVE server side: `secure(sock)` makes a socket a CURVE server before it binds;
    a ZAP thread lets in only authorized client keys and logs each refusal with the peer's address and
    key; a monitor thread per socket logs handshakes that fail before ZAP asks (a peer without CURVE, or
    with another server key). One per process: ZeroMQ takes one ZAP handler per context."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys, log: logging.Logger):
        if not keys.authorized_keys:
            raise CurveKeyError("a CURVE server needs authorized client keys")
        self.keys, self.log = keys, log
        self._warn = ThrottledWarning(log)  # ZAP's refusals; each socket's handshake failures have their own
        self._stop = threading.Event()
        self._watches: list[tuple[zmq.Socket, zmq.Socket, threading.Thread]] = []
        self.num_refused = 0
        self._zap = _Zap(ctx, self._allow)
        self._zap.start()

    def secure(self, sock: zmq.Socket, what: str) -> None:
        """Before bind: CURVE server with the lab's server key, every handshake through ZAP."""
        sock.curve_server = True
        sock.curve_secretkey = self.keys.secret_key
        sock.curve_publickey = self.keys.public_key
        sock.zap_domain = ZAP_DOMAIN
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        t = threading.Thread(target=self._watch, args=(monitor, what, ThrottledWarning(self.log)),
                             name=f"curve-watch-{what}", daemon=True)
        self._watches.append((sock, monitor, t))
        t.start()

    def _allow(self, address: str, client_key: bytes) -> bool:
        if client_key in self.keys.authorized_keys:
            return True
        self.num_refused += 1
        self._warn("refused a CURVE handshake from %s: client key %s is not among this worker's authorized keys",
                   address, client_key.decode(errors="replace"))
        return False

    def _watch(self, monitor: zmq.Socket, what: str, warn: ThrottledWarning) -> None:
        while not self._stop.is_set():
            try:
                if not monitor.poll(200):
                    continue
                ev = parse_monitor_message(monitor.recv_multipart())
            except zmq.ZMQError:
                return  # the socket went away with its context
            self.num_refused += 1
            if ev["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the value is an errno: the peer hung up first
                why = f"its handshake broke off ({os.strerror(ev['value'])}): a peer without the lab's CURVE keys?"
            else:
                why = _PROTOCOL_ERRORS.get(ev["value"], f"ZeroMQ handshake error {ev['value']:#x}")
            warn("refused a peer on the %s socket %s: %s", what, ev["endpoint"].decode(errors="replace"), why)

    def close(self) -> None:
        """Before the context is destroyed: stop the watches and the ZAP thread."""
        self._stop.set()
        for sock, monitor, t in self._watches:
            t.join(timeout=2)
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
        self._watches.clear()
        self._zap.stop()
