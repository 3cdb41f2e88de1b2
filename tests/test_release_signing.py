"""Signed releases (issue 13, point 3, and point 6's key and allowed-signers errors).

Oracles: stock OpenSSH. Keys are made with ``ssh-keygen -t ed25519``, signatures are checked
with ``ssh-keygen -Y verify`` exactly as a reader without SafeLM would, fingerprints with
``ssh-keygen -l``, and a release signed afterwards by stock ``ssh-keygen -Y sign`` must verify
in SafeLM. The forgery rewrites the privacy ledger so that every hash and the fresh accountant
agree again: only the signature can tell.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, write_cls_csv
from safelm import Config, train_run

from release_helpers import cli, failed_gates, one_error_line, sha

NS = "safelm-release"


@pytest.fixture(autouse=True)
def no_agent(monkeypatch):
    """Tests see no ssh-agent unless they start one (a developer's agent must not matter)."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)


def keygen(d: Path, name: str, passphrase: str = "") -> Path:
    key = d / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C",
                    f"{name}@safelm.test", "-f", str(key)], check=True, stdin=subprocess.DEVNULL)
    return key


def allowed_signers(path: Path, *keys: Path) -> Path:
    path.write_text("".join(f"{k.name}@safelm.test namespaces=\"{NS}\" "
                            f"{k.with_suffix('.pub').read_text()}" for k in keys))
    return path


def fingerprint(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", str(key.with_suffix(".pub"))],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def stock_verify(rel: Path, allowed: Path, identity: str) -> subprocess.CompletedProcess:
    with open(rel / "release.sha256", "rb") as f:
        return subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(allowed), "-I", identity,
                               "-n", NS, "-s", str(rel / "release.sha256.sig")], stdin=f,
                              capture_output=True, text=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here trains or scores tiny models: one torch thread."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    alice, mallory = keygen(d, "alice"), keygen(d, "mallory")
    return {"alice": alice, "mallory": mallory, "allowed": allowed_signers(d / "allowed",
                                                                            alice)}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("run")
    cfg = Config.load(None, TINY + ["train.task=classify", "train.epochs=2",
                                    "privacy.enabled=true", "privacy.target_epsilon=3",
                                    "privacy.delta=1e-3"])
    train_run(write_cls_csv(d / "cls.csv"), cfg, d / "dp")
    return d / "dp"


@pytest.fixture(scope="module")
def signed(tmp_path_factory, dp_run, keys) -> Path:
    from safelm.cli import main
    out = tmp_path_factory.mktemp("rel") / "signed"
    assert main(["release", str(dp_run), "--out", str(out), "--sign", str(keys["alice"])]) == 0
    return out


@pytest.fixture
def copy_of(tmp_path):
    import shutil

    def make(src: Path) -> Path:
        shutil.copytree(src, tmp_path / src.name)
        return tmp_path / src.name
    return make


# ---- signing and checking ---------------------------------------------------------------------
def test_stock_ssh_keygen_verifies_a_safelm_signature(signed, keys):
    assert (signed / "release.sha256.sig").read_text().startswith("-----BEGIN SSH SIGNATURE")
    proc = stock_verify(signed, keys["allowed"], "alice@safelm.test")
    assert proc.returncode == 0 and "Good" in proc.stdout + proc.stderr, proc.stderr
    # The namespace is part of what is signed: the same signature fails under another one.
    with open(signed / "release.sha256", "rb") as f:
        other = subprocess.run(["ssh-keygen", "-Y", "verify", "-f", str(keys["allowed"]), "-I",
                                "alice@safelm.test", "-n", "file", "-s",
                                str(signed / "release.sha256.sig")], stdin=f,
                               capture_output=True)
    assert other.returncode != 0
    sig = json.loads((signed / "release.json").read_text())["integrity"]["signature"]
    assert sig["key_fingerprint"] == fingerprint(keys["alice"]) and sig["namespace"] == NS
    card = (signed / "MODEL_CARD.md").read_text()
    assert fingerprint(keys["alice"]) in card and "ssh-keygen -Y verify" in card


def test_verify_checks_the_signature_against_allowed_signers(capsys, signed, keys, tmp_path):
    rc, out, err = cli(capsys, "verify", signed, "--allowed-signers", keys["allowed"])
    assert rc == 0, out + err
    line = next(ln for ln in out.splitlines() if ln.startswith("PASS signature"))
    assert "alice@safelm.test" in line and fingerprint(keys["alice"]) in line
    rc, out, _ = cli(capsys, "verify", signed, "--allowed-signers", keys["allowed"],
                     "--identity", "alice@safelm.test")
    assert rc == 0, out
    both = allowed_signers(tmp_path / "both", keys["alice"], keys["mallory"])
    rc, out, _ = cli(capsys, "verify", signed, "--allowed-signers", both, "--identity",
                     "mallory@safelm.test")
    assert rc == 1 and failed_gates(out) == {"signature"}, out
    only_mallory = allowed_signers(tmp_path / "m", keys["mallory"])
    rc, out, _ = cli(capsys, "verify", signed, "--allowed-signers", only_mallory)
    assert rc == 1 and failed_gates(out) == {"signature"} and "does not list" in out, out
    # Without --allowed-signers the signature is checked for being intact, and says it is
    # not checked for whose key it is.
    rc, out, _ = cli(capsys, "verify", signed)
    assert rc == 0 and "NOT checked" in out, out


def _forge_lower_epsilon(rel: Path) -> float:
    """Rewrite the privacy claim consistently: more noise in the history, the epsilon a fresh
    accountant gives for it, release.json to match, and both listings."""
    from opacus.accountants import create_accountant

    from audits.release.manifest import sums_text
    ledger = json.loads((rel / "privacy.json").read_text())
    ledger["history"] = [[s * 1.5, q, n] for s, q, n in ledger["history"]]
    acc = create_accountant(mechanism=ledger["accountant"])
    acc.history = [tuple(h) for h in ledger["history"]]
    old, ledger["epsilon"] = ledger["epsilon"], acc.get_epsilon(ledger["delta"])
    assert ledger["epsilon"] < old
    (rel / "privacy.json").write_text(json.dumps(ledger))
    m = json.loads((rel / "release.json").read_text())
    m["privacy"].update(epsilon=ledger["epsilon"], history=ledger["history"],
                        recomputed_epsilon=ledger["epsilon"])
    m["files"]["privacy.json"] = sha(rel / "privacy.json")
    (rel / "release.json").write_text(json.dumps(m))
    names = list(m["files"]) + ["release.json"]
    (rel / "release.sha256").write_text(sums_text({n: sha(rel / n) for n in names}))
    return ledger["epsilon"]


def test_consistent_forgery_fails_only_through_the_signature(capsys, signed, keys, copy_of):
    rel = copy_of(signed)
    _forge_lower_epsilon(rel)
    # Every hash and the fresh accountant agree with the forged claim ...
    rc, out, _ = cli(capsys, "verify", rel, "--allowed-signers", keys["allowed"])
    assert rc == 1 and failed_gates(out) == {"signature"}, out
    assert stock_verify(rel, keys["allowed"], "alice@safelm.test").returncode != 0
    # ... re-signed by the forger's own key: still not a key the reader trusts.
    from audits.release.signing import sign
    (rel / "release.sha256.sig").write_bytes(sign(keys["mallory"],
                                                  (rel / "release.sha256").read_bytes()))
    rc, out, _ = cli(capsys, "verify", rel, "--allowed-signers", keys["allowed"])
    assert rc == 1 and failed_gates(out) == {"signature"} and "does not list" in out, out


def test_forgery_that_drops_the_signature_fails_with_allowed_signers(capsys, signed, keys,
                                                                    copy_of):
    from audits.release.manifest import sums_text
    rel = copy_of(signed)
    _forge_lower_epsilon(rel)
    (rel / "release.sha256.sig").unlink()
    m = json.loads((rel / "release.json").read_text())
    del m["integrity"]["signature"]  # and pretend it was never signed
    (rel / "release.json").write_text(json.dumps(m))
    (rel / "release.sha256").write_text(sums_text({n: sha(rel / n) for n in
                                                   list(m["files"]) + ["release.json"]}))
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 0, out  # the forgery that hashes alone cannot catch (the point)
    rc, out, _ = cli(capsys, "verify", rel, "--allowed-signers", keys["allowed"])
    assert rc == 1 and failed_gates(out) == {"signature"} and "unsigned" in out, out


def test_removed_signature_fails(capsys, signed, keys, copy_of):
    rel = copy_of(signed)
    (rel / "release.sha256.sig").unlink()
    rc, out, _ = cli(capsys, "verify", rel, "--allowed-signers", keys["allowed"])
    assert rc == 1 and {"signature", "integrity"} <= failed_gates(out), out
    # Declared signed in release.json: even without --allowed-signers the loss is noticed.
    rc, out, _ = cli(capsys, "verify", rel)
    assert rc == 1 and "missing file release.sha256.sig" in out, out


def test_unsigned_release_verifies_without_allowed_signers(capsys, dp_run, keys, tmp_path):
    rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "rel")
    assert rc == 0, err
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel")
    assert rc == 0 and "signature" not in out, out
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel", "--allowed-signers", keys["allowed"])
    assert rc == 1 and failed_gates(out) == {"signature"}, out
    pol = tmp_path / "p.toml"
    pol.write_text("require_signature = true\n")
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel", "--policy", pol)
    assert rc == 1 and failed_gates(out) == {"signature"} and "--allowed-signers" in out, out
    # Signed afterwards with stock OpenSSH, the same release passes the policy.
    subprocess.run(["ssh-keygen", "-Y", "sign", "-f", str(keys["alice"]), "-n", NS,
                    str(tmp_path / "rel" / "release.sha256")], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    rc, out, _ = cli(capsys, "verify", tmp_path / "rel", "--policy", pol, "--allowed-signers",
                     keys["allowed"])
    assert rc == 0, out


# ---- bad keys and allowed-signers files: exit 2, one line, nothing written --------------------
def _no_release(tmp_path: Path) -> None:
    assert not (tmp_path / "rel").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rel.")]


@pytest.mark.parametrize("kind,needles", [
    ("text", ("not an OpenSSH private key",)),
    ("public", ("is a public key", "private key file")),
    ("missing", ("cannot read",)),
    ("directory", ("cannot read",)),
    ("encrypted", ("encrypted", "ssh-add")),
    ("open_permissions", ("chmod 600",)),
])
def test_bad_signing_keys_are_usage_errors(capsys, dp_run, keys, tmp_path, kind, needles):
    key = {"text": tmp_path / "notes.txt", "public": keys["alice"].with_suffix(".pub"),
           "missing": tmp_path / "nope", "directory": tmp_path}.get(kind)
    if kind == "text":
        key.write_text("hello\n")
    elif kind == "encrypted":
        key = keygen(tmp_path, "locked", passphrase="correct horse")
    elif kind == "open_permissions":
        key = keygen(tmp_path, "loose")
        key.chmod(0o644)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc, out, err = cli(capsys, "release", dp_run, "--out", out_dir / "rel", "--sign", key)
    one_error_line(rc, err, "--sign", *needles)
    _no_release(out_dir)


def test_encrypted_key_never_waits_for_a_passphrase(dp_run, tmp_path):
    """The real command, stdin closed and no terminal: it must end at once with exit 2."""
    key = keygen(tmp_path, "locked", passphrase="pw")
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run([sys.executable, "-m", "safelm.cli", "release", str(dp_run), "--out",
                           str(tmp_path / "rel"), "--sign", str(key)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, env=env,
                          start_new_session=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "ssh-add" in proc.stderr and not (tmp_path / "rel").exists()


def test_encrypted_key_signs_through_an_agent_that_holds_it(capsys, dp_run, keys, tmp_path,
                                                            monkeypatch):
    key = keygen(tmp_path, "locked", passphrase="pw")
    agent = subprocess.run(["ssh-agent", "-s", "-a", str(tmp_path / "agent.sock")],
                           capture_output=True, text=True, check=True).stdout
    pid = int(agent.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        monkeypatch.setenv("SSH_AUTH_SOCK", str(tmp_path / "agent.sock"))
        # An agent that does not hold the key: refused, naming the fix.
        rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / "r0", "--sign", key)
        one_error_line(rc, err, "ssh-add")
        askpass = tmp_path / "askpass.sh"
        askpass.write_text("#!/bin/sh\necho pw\n")
        askpass.chmod(stat.S_IRWXU)
        subprocess.run(["ssh-add", str(key)], check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, start_new_session=True,
                       env={**os.environ, "SSH_ASKPASS": str(askpass),
                            "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"})
        allowed = allowed_signers(tmp_path / "a", key)
        # The encrypted private key file, or its public half: the agent signs either way.
        for name, k in (("r1", key), ("r2", key.with_suffix(".pub"))):
            rc, _, err = cli(capsys, "release", dp_run, "--out", tmp_path / name, "--sign", k)
            assert rc == 0, err
            assert stock_verify(tmp_path / name, allowed, "locked@safelm.test").returncode == 0
    finally:
        os.kill(pid, signal.SIGTERM)


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_allowed_signers_is_a_usage_error(capsys, signed, tmp_path, kind):
    path = {"missing": tmp_path / "nope", "directory": tmp_path,
            "empty": tmp_path / "empty"}[kind]
    if kind == "empty":
        path.write_text("# nobody\n")
    rc, out, err = cli(capsys, "verify", signed, "--allowed-signers", path)
    one_error_line(rc, err, "--allowed-signers")
    assert out == ""


def test_identity_without_allowed_signers_is_a_usage_error(capsys, signed):
    rc, _, err = cli(capsys, "verify", signed, "--identity", "alice@safelm.test")
    one_error_line(rc, err, "--identity needs --allowed-signers")
