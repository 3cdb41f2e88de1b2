"""Signing ``release.sha256`` with OpenSSH (SSHSIG, namespace ``safelm-release``).

Why a signature: hashes show that the files of a release agree with each other, not who made
them. Someone who rewrites the privacy ledger, release.json and both listings consistently
passes every hash check; only a signature by a key the reader already trusts catches that.

Why stock ``ssh-keygen -Y`` and not a reimplementation: the point is that anyone can check a
release with a tool they already have (``ssh-keygen -Y verify -f allowed_signers -I IDENTITY
-n safelm-release -s release.sha256.sig < release.sha256``), with keys they already manage
(their SSH keys, an ssh-agent, GitHub's published keys). SafeLM only runs it.

Never a hang: ssh-keygen is run without a terminal (a new session), with the data on stdin,
``SSH_ASKPASS_REQUIRE=never`` and a timeout, so an encrypted key cannot wait for a passphrase.
An encrypted key works only through an ssh-agent that holds it; otherwise SafeLM refuses it
before doing anything, naming the fix.

Identity on ``verify``: by default the principal is looked up in the allowed_signers file with
``ssh-keygen -Y find-principals`` (whoever's key made the signature, if the file lists that
key); ``--identity NAME`` instead demands that NAME's key made it.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from safelm.errors import UserError

NAMESPACE = "safelm-release"
SIG = "release.sha256.sig"
TIMEOUT_S = 60
PRIVATE = re.compile(r"-----BEGIN (OPENSSH |RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")
PUBLIC = re.compile(r"^(ssh-|ecdsa-|sk-)\S+ [A-Za-z0-9+/=]+")
GOOD = re.compile(r'Good "[^"]*" signature (?:for (?P<who>.+?) )?with (?P<kind>\S+) key '
                  r"(?P<fp>\S+)")
FIX_KEY = "make one with 'ssh-keygen -t ed25519 -f KEY' and pass --sign KEY"


@dataclass
class Check:
    ok: bool
    detail: str


# The stock OpenSSH command that checks a signed release (on the card and in release.json).
CHECK = (f"ssh-keygen -Y verify -f allowed_signers -I IDENTITY -n {NAMESPACE} -s {SIG} "
         "< release.sha256")


def _ssh_keygen(args: list[str], data: bytes, timeout: float = TIMEOUT_S
                ) -> subprocess.CompletedProcess:
    """Run ssh-keygen with ``data`` on stdin, no terminal and no passphrase prompt."""
    exe = shutil.which("ssh-keygen")
    if exe is None:
        raise UserError("ssh-keygen not found; install OpenSSH (e.g. apt-get install "
                        "openssh-client) to sign or check release signatures")
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "SSH_ASKPASS")}
    env["SSH_ASKPASS_REQUIRE"] = "never"
    try:
        return subprocess.run([exe, *args], input=data, capture_output=True, env=env,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise UserError(f"ssh-keygen {' '.join(args[:2])} did not finish in {timeout:g} s "
                        "(a hardware key waiting for a touch?); use a key in a file or an "
                        "ssh-agent") from None


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in proc.stderr.decode(errors="replace").splitlines()
             if ln.strip() and not ln.startswith("@")]
    return lines[-1] if lines else f"exit status {proc.returncode}"


def _encrypted(text: str) -> bool:
    """Whether a private key file needs a passphrase (read from the file; nothing prompted)."""
    if "BEGIN ENCRYPTED PRIVATE KEY" in text or "Proc-Type: 4,ENCRYPTED" in text:
        return True
    if "BEGIN OPENSSH PRIVATE KEY" not in text:
        return False
    body = "".join(ln.strip() for ln in text.splitlines() if ln and not ln.startswith("-----"))
    try:
        raw = base64.b64decode(body, validate=False)
    except ValueError:
        return False
    magic = b"openssh-key-v1\0"
    if not raw.startswith(magic) or len(raw) < len(magic) + 4:
        return False
    n = int.from_bytes(raw[len(magic):len(magic) + 4], "big")
    return raw[len(magic) + 4:len(magic) + 4 + n] != b"none"


def check_key(key: str | Path) -> str:
    """Refuse (UserError) a ``--sign`` key that cannot sign without a prompt; return its
    fingerprint (``SHA256:...``). Checked by signing a probe before any release is built."""
    p = Path(key)
    try:
        text = p.read_bytes()[:1 << 16].decode("ascii", errors="replace")
    except OSError as e:
        raise UserError(f"--sign {p}: cannot read it ({e.strerror}); {FIX_KEY}") from None
    first = text.strip().splitlines()[0] if text.strip() else ""
    agent = bool(os.environ.get("SSH_AUTH_SOCK"))
    if PUBLIC.match(first):
        if not agent:
            raise UserError(f"--sign {p}: is a public key and no ssh-agent is running "
                            "(SSH_AUTH_SOCK unset); pass the private key file (without .pub), "
                            "or load the key with 'ssh-add'")
    elif not PRIVATE.match(first):
        raise UserError(f"--sign {p}: not an OpenSSH private key (no '-----BEGIN OPENSSH "
                        f"PRIVATE KEY-----' line); {FIX_KEY}")
    elif _encrypted(text) and not agent:
        raise UserError(f"--sign {p}: the key is encrypted with a passphrase and no ssh-agent "
                        "is running (SSH_AUTH_SOCK unset); SafeLM never prompts for it: run "
                        f"'eval $(ssh-agent) && ssh-add {p}', or use a key without a passphrase")
    probe = b"safelm signing-key check\n"
    sig = sign(p, probe, encrypted=_encrypted(text))
    return signature_fingerprint(sig, probe)


def sign(key: str | Path, data: bytes, *, encrypted: bool = False) -> bytes:
    """An SSHSIG signature (armored text) of ``data`` by ``key``, namespace safelm-release."""
    proc = _ssh_keygen(["-Y", "sign", "-f", str(key), "-n", NAMESPACE], data)
    if proc.returncode == 0 and proc.stdout.startswith(b"-----BEGIN SSH SIGNATURE-----"):
        return proc.stdout
    why, err = _last_line(proc), proc.stderr.decode(errors="replace")
    if "bad permissions" in err or "are too open" in err:
        raise UserError(f"--sign {key}: ssh-keygen refuses a private key that others can "
                        f"read; run 'chmod 600 {key}'")
    if encrypted or "passphrase" in why:
        raise UserError(f"--sign {key}: the key is encrypted and the ssh-agent does not hold "
                        f"it; run 'ssh-add {key}' (SafeLM never prompts for a passphrase)")
    raise UserError(f"--sign {key}: ssh-keygen could not sign with it ({why}); {FIX_KEY}")


def signature_fingerprint(sig: bytes, data: bytes) -> str:
    """The signing key's fingerprint, from a signature checked against ``data`` only (no
    trust): ``ssh-keygen -Y check-novalidate``."""
    ok, detail, fp = _novalidate(sig, data)
    if not ok or fp is None:
        raise UserError(f"ssh-keygen made a signature it cannot check ({detail}); is "
                        "ssh-keygen OpenSSH 8.2 or newer?")
    return fp


def _novalidate(sig: bytes, data: bytes) -> tuple[bool, str, str | None]:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="safelm-sig-") as tmp:
        sp = Path(tmp) / "sig"
        sp.write_bytes(sig)
        proc = _ssh_keygen(["-Y", "check-novalidate", "-n", NAMESPACE, "-s", str(sp)], data)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    m = GOOD.search(out)
    if proc.returncode != 0 or m is None:
        return False, _last_line(proc), None
    return True, f"{m['kind']} key {m['fp']}", m["fp"]


def read_allowed_signers(path: str | Path) -> Path:
    """``--allowed-signers`` must be a readable file with at least one signer line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"--allowed-signers {p}: cannot read it ({e.strerror}); give a "
                        "readable allowed_signers file (lines 'PRINCIPAL KEYTYPE BASE64', see "
                        "ssh-keygen(1) 'ALLOWED SIGNERS')") from None
    if not any(ln.strip() and not ln.lstrip().startswith("#") for ln in text.splitlines()):
        raise UserError(f"--allowed-signers {p}: no signer lines in it; add one like "
                        "'alice@example.org ssh-ed25519 AAAA...' (from the signer's .pub)")
    return p


def verify_signature(release: Path, allowed: Path | None, identity: str | None,
                     declared: dict | None) -> Check:
    """The ``signature`` gate: ``release.sha256.sig`` over ``release.sha256``.

    With ``allowed``: the stock ``ssh-keygen -Y verify`` against that file (principal from
    ``find-principals`` unless ``identity`` is given). Without: the signature is only checked
    to be intact and by the key release.json declares, and the detail says that whose key it
    is was not checked."""
    sig, sums = release / SIG, release / "release.sha256"
    if not sig.is_file():
        return Check(False, f"no {SIG}: the release is unsigned or its signature was removed"
                     + ("" if declared is None else
                        f" (release.json says it was signed by {declared.get('key_fingerprint')})"))
    if not sums.is_file():
        return Check(False, "no release.sha256 to check the signature against")
    data = sums.read_bytes()
    if allowed is None:
        ok, detail, fp = _novalidate(sig.read_bytes(), data)
        if not ok:
            return Check(False, f"{SIG} does not verify over release.sha256 ({detail})")
        want = (declared or {}).get("key_fingerprint")
        if want and want != fp:
            return Check(False, f"signed by {fp}, but release.json declares {want}")
        return Check(True, f"intact signature by {detail}; whose key this is was NOT checked "
                           "(pass --allowed-signers FILE)")
    if identity:
        names = [identity]
    else:
        proc = _ssh_keygen(["-Y", "find-principals", "-s", str(sig), "-f", str(allowed)], b"")
        names = [n for n in proc.stdout.decode(errors="replace").splitlines() if n.strip()]
        if proc.returncode != 0 or not names:
            ok, detail, _ = _novalidate(sig.read_bytes(), data)
            return Check(False, f"signed by a key that {allowed.name} does not list ("
                         f"{detail if ok else 'and the signature is not intact: ' + detail})")
    why = ""
    for name in names:
        proc = _ssh_keygen(["-Y", "verify", "-f", str(allowed), "-I", name, "-n", NAMESPACE,
                            "-s", str(sig)], data)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        m = GOOD.search(out)
        if proc.returncode == 0 and m:
            return Check(True, f'good "{NAMESPACE}" signature by {name} ({m["kind"]} key '
                               f"{m['fp']}) over release.sha256, checked by ssh-keygen against "
                               f"{allowed.name}")
        why = _last_line(proc)
    who = f"identity {identity!r}" if identity else ", ".join(names)
    return Check(False, f"the signature does not verify for {who} in {allowed.name} ({why}): "
                        "release.sha256 changed after signing, or another key signed it")
