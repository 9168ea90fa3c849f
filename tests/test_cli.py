"""Bad input to free-client / free-server / free-sim: a clear ONE-LINE error and a non-zero exit.

The commands run in-process through the same entry point as the console scripts
(:func:`free_dfml.common.cli.run_cli`), plus a few real console-script runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def cli(capsys, which: str, *argv: str) -> tuple[int, str, str]:
    from free_dfml.common.cli import run_cli
    if which == "free-client":
        from free_dfml.client.cli import app
    elif which == "free-server":
        from free_dfml.server.cli import app
    else:
        from free_dfml.sim.cli import app
    code = run_cli(app, which, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    assert lines[0].split(":")[0] in ("free-client", "free-server", "free-sim")
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def good_package(tmp_path_factory):
    from free_dfml.common.models import build_model
    from free_dfml.common.package import make_package, save_package
    net = build_model("conv4", num_classes=5, width=8)
    pkg = make_package(net, arch="conv4", arch_kwargs={"width": 8}, num_classes=5, input_shape=(3, 32, 32),
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    p = tmp_path_factory.mktemp("pkg") / "good.safetensors"
    save_package(pkg, p)
    return p


@pytest.mark.parametrize("make,needle", [
    (lambda d, g: d / "missing.safetensors", "no such file"),
    (lambda d, g: (d / "junk.safetensors", (d / "junk.safetensors").write_bytes(b"\x00" * 5))[0], "not a safetensors"),
    (lambda d, g: (d / "cut.safetensors", (d / "cut.safetensors").write_bytes(g.read_bytes()[:3000]))[0], "corrupt"),
    (lambda d, g: (d / "text.safetensors", (d / "text.safetensors").write_text("hello world, not a model"))[0],
     "not a safetensors"),
    (lambda d, g: d, "not a file"),
])
def test_inspect_bad_files(capsys, tmp_path, good_package, make, needle):
    code, _, err = cli(capsys, "free-client", "inspect", make(tmp_path, good_package))
    assert code == 1
    one_line_error(err, "invalid package", needle)


def test_inspect_good_file(capsys, good_package):
    code, out, err = cli(capsys, "free-client", "inspect", good_package)
    assert code == 0, err
    assert "verdict     valid" in out and "conv4" in out


@pytest.mark.parametrize("argv,needle", [
    (["submit", "--model", "MISSING", "--server", "127.0.0.1:9092"], "no such file"),
    (["submit", "--model", "GOOD", "--server", "nohostport"], "HOST:PORT"),
    (["submit", "--model", "GOOD", "--server", "127.0.0.1:99999"], "port"),
    (["submit", "--model", "GOOD", "--server", "10.1.2.3:9092"], "without TLS"),
    (["submit", "--model", "GOOD", "--server", "127.0.0.1:9092", "--timeout", "0"], "--timeout"),
    (["submit", "--model", "GOOD", "--server", "127.0.0.1:9092", "--root-cert", "MISSING"], "no such file"),
    (["submit", "--model", "GOOD"], "--server"),
    (["submit", "--model", "GOOD", "--server", "127.0.0.1:9092", "--bogus"], "--bogus"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--arch", "vgg", "--out", "OUT"], "--arch"),
    (["train", "--data", "glyphs", "--classes", "x", "--out", "OUT"], "--classes"),
    (["train", "--data", "glyphs", "--classes", "3", "--out", "OUT"], "at least 2"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "OUT", "--dp-epsilon", "-1"], "--dp-epsilon"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "OUT", "--dp-delta", "0.5"], "--dp-epsilon"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "OUT", "--epochs", "zero"], "epochs"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "OUT", "--prior", "imagenet"], "--prior"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "OUT", "--train-layers", "last"], "--train-layers"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "OUT", "--batch-size", "1"], "--batch-size"),
    (["train", "--data", "/nonexistent/dir", "--classes", "0-4", "--out", "OUT"], "nonexistent"),
    (["train", "--data", "glyphs", "--classes", "0-4", "--out", "/nonexistent/dir/m.safetensors"], "does not exist"),
    (["frobnicate"], "frobnicate"),
])
def test_client_bad_input(capsys, tmp_path, good_package, argv, needle):
    argv = [a.replace("MISSING", str(tmp_path / "missing.pem")).replace("GOOD", str(good_package))
             .replace("OUT", str(tmp_path / "out.safetensors")) for a in argv]
    code, _, err = cli(capsys, "free-client", *argv)
    assert code != 0
    one_line_error(err, needle)


@pytest.mark.parametrize("argv,needle", [
    (["start", "--address", "0.0.0.0:9092"], "without TLS"),
    (["start", "--address", "192.168.1.5:9092"], "without TLS"),
    (["start", "--address", "localhost"], "HOST:PORT"),
    (["start", "--tls-cert", "MISSING"], "--tls-key"),
    (["start", "--tls-cert", "MISSING", "--tls-key", "MISSING", "--tls-ca", "MISSING"], "no such file"),
    (["start", "--device", "tpu"], "--device"),
    (["start", "--startup-timeout", "0"], "--startup-timeout must be > 0"),
    (["start", "--max-iterations", "-1"], "config error: --max-iterations = -1: expected an integer >= 0"),
    (["start", "--preset", "huge"], "preset"),
    (["start", "--config", "MISSING"], "no such config file"),
    (["status", "--state", "NOSTATE"], "no state folder"),
    (["stop", "--state", "NOSTATE"], "no state folder"),
    (["export", "--state", "EMPTYSTATE", "--out", "OUT"], "no training checkpoint"),
    (["evaluate", "--state", "EMPTYSTATE"], "--data"),
    (["evaluate", "--state", "EMPTYSTATE", "--data", "glyphs", "--way", "1"], "--way"),
    (["start", "--bogus"], "--bogus"),
    (["start", "--node-auth"], "needs TLS"),
    (["register-node", "--state", "EMPTYSTATE", "--key", "MISSING"], "no such file"),
    (["register-node", "--state", "EMPTYSTATE", "--key", "KEYFILE"], "no server is running"),
])
def test_server_bad_input(capsys, tmp_path, argv, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "key.pub").write_text("ecdsa-sha2-nistp384 AAAA\n")
    argv = [a.replace("MISSING", str(tmp_path / "missing")).replace("KEYFILE", str(tmp_path / "key.pub")).replace("NOSTATE", str(tmp_path / "nostate"))
             .replace("EMPTYSTATE", str(tmp_path / "empty")).replace("OUT", str(tmp_path / "out.safetensors"))
            for a in argv]
    if argv[0] == "start":
        argv += ["--state", str(tmp_path / "state")]
    code, _, err = cli(capsys, "free-server", *argv)
    assert code != 0
    one_line_error(err, needle)


def test_server_bad_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("preset = [unclosed\n")
    code, _, err = cli(capsys, "free-server", "start", "--state", tmp_path / "s", "--config", bad)
    assert code != 0
    one_line_error(err, "cannot be parsed")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('colour = "blue"\n')
    code, _, err = cli(capsys, "free-server", "start", "--state", tmp_path / "s", "--config", unknown)
    assert code != 0
    one_line_error(err, "unknown setting")
    badfree = tmp_path / "badfree.toml"
    badfree.write_text('[free]\ninversion = "magic"\n')
    code, _, err = cli(capsys, "free-server", "start", "--state", tmp_path / "s", "--config", badfree)
    assert code != 0
    one_line_error(err, "inversion")
    unknown_free = tmp_path / "unknown_free.toml"     # the [free] table's sections: [free.generator] ...
    unknown_free.write_text('[free.generator]\nlr = 0.01\nnope = 1\n')
    code, _, err = cli(capsys, "free-server", "start", "--state", tmp_path / "s", "--config", unknown_free)
    assert code != 0
    one_line_error(err, "unknown FreeConfig key generator.nope")


@pytest.mark.parametrize("argv,needle", [
    (["run", "--arch", "vgg"], "--arch"),
    (["run", "--preset", "huge"], "--preset"),
    (["run", "--clients", "0"], "--clients"),
    (["run", "--dp-epsilon", "0"], "--dp-epsilon"),
])
def test_sim_bad_input(capsys, argv, needle):
    code, _, err = cli(capsys, "free-sim", *argv)
    assert code != 0
    one_line_error(err, needle)


@pytest.mark.parametrize("cmd", [
    ["free-client", "inspect", "/nonexistent/model.safetensors"],
    ["free-client", "submit", "--model", "/nonexistent/model.safetensors", "--server", "127.0.0.1:1"],
    ["free-server", "status", "--state", "/nonexistent/state"],
    ["free-server", "start", "--address", "8.8.8.8:9092", "--state", "/tmp/never-created-state"],
    ["free-sim", "run", "--arch", "nope"],
])
def test_console_scripts_one_line(cmd):
    r = subprocess.run([str(BIN / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    one_line_error(r.stderr)
    assert not Path("/tmp/never-created-state").exists()


def test_keygen_refuses_to_overwrite(capsys, tmp_path):
    code, out, err = cli(capsys, "free-client", "keygen", "--out", tmp_path / "k")
    assert code == 0, err
    assert (tmp_path / "k.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct((tmp_path / "k").stat().st_mode & 0o777) == "0o600"
    code, _, err = cli(capsys, "free-client", "keygen", "--out", tmp_path / "k")
    assert code != 0
    one_line_error(err, "not overwriting")


def test_client_side_never_imports_server_code():
    """An edge device installs the same wheel but must not load the server (its trainer, generator,
    Flower ServerApp): every client module imports only ``free_dfml.common``."""
    code = ("import sys, free_dfml.client.cli, free_dfml.client.client_app, free_dfml.client.train\n"
            "bad = sorted(m for m in sys.modules if m.startswith('free_dfml.server'))\n"
            "print(','.join(bad)); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"client modules loaded server modules: {r.stdout.strip()} {r.stderr[-500:]}"


def test_status_stays_small_with_many_submissions(capsys, tmp_path):
    """Thousands of rejections and hundreds of models: status.json holds the counts and the last
    STATUS_KEEP entries of each kind, is updated from the lines appended since the last write,
    and a line logged after a torn one (a crash mid-write) still counts."""
    import json

    from free_dfml.server.state import STATUS_KEEP, StateDir, build_status
    state = StateDir(tmp_path / "state").create()
    lines = [json.dumps({"event": "rejected", "reason": "r" * 5000 if i == 0 else f"bad {i} " + "x" * 290,
                         "category": "dp-policy" if i % 2 else None, "node": i}) for i in range(4000)]
    lines += [json.dumps({"event": "accepted", "model_id": f"{i:064x}", "arch": "conv4", "num_classes": 5,
                          "dp_epsilon": 8.0 if i % 4 == 0 else None}) for i in range(120)]
    lines += [json.dumps({"event": "accepted", "model_id": f"{i:064x}"}) for i in range(10)]   # resubmitted
    state.submissions_path.write_text("\n".join(lines) + '\n{"event": "rejected", "rea')     # torn by a crash
    st = build_status(state, phase="collecting", started_at=0.0)
    m = st["models"]
    assert (m["accepted"], m["rejected"], m["resubmissions"], m["dp"]) == (120, 4000, 10, 30)
    assert m["rejected_by_category"] == {"dp-policy": 2000, "invalid": 2000}
    assert len(st["accepted"]) == len(st["rejected"]) == STATUS_KEEP
    assert st["accepted"][-1]["id"] == f"{119:064x}" and st["rejected"][-1]["node"] == 3999
    assert st["dp_epsilons"] == [8.0] * 12                 # of the listed models (70..119)
    assert len(json.dumps(st)) < 40_000
    offset = state._summary.offset
    state.log_submission({"event": "rejected", "reason": "late", "node": 7})
    st = build_status(state, phase="collecting", started_at=0.0)
    assert st["models"]["rejected"] == 4001 and st["rejected"][-1]["reason"] == "late"
    assert state._summary.offset > offset
    state.write_status(st)
    code, out, err = cli(capsys, "free-server", "status", "--state", state.root)
    assert code == 0, err
    assert "120 accepted, 4001 rejected" in out and "70 earlier accepted model(s) not listed" in out
    assert len(out.splitlines()) < 80


def _pem_pair(tmp_path: Path, name: str, password: bytes | None = None) -> tuple[Path, Path]:
    """A self-signed certificate and its key (PEM), made in process with ``cryptography``."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    enc = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    c, k = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return c, k


def test_bad_certificate_files_fail_at_once_naming_the_file(capsys, tmp_path, good_package):
    """A garbage, missing or mismatched PEM file is refused before anything starts, in one line
    naming the option and the file (not after a connection timeout)."""
    from free_dfml.common.cli import check_certificate, check_private_key
    cert, key = _pem_pair(tmp_path, "server")
    other_cert, other_key = _pem_pair(tmp_path, "other")
    _, locked_key = _pem_pair(tmp_path, "locked", password=b"secret")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    check_certificate(cert, "--root-cert")          # a good pair passes
    check_private_key(cert, key, "--tls-key")
    for bad, needle in ((garbage, "not a readable PEM certificate"), (key, "not a readable PEM certificate"),
                        (tmp_path / "missing.pem", "no such file"), (tmp_path, "no such file")):
        code, _, err = cli(capsys, "free-client", "submit", "--model", good_package, "--server", "127.0.0.1:9",
                           "--root-cert", bad, "--timeout", "600")
        assert code == 2
        one_line_error(err, "--root-cert", str(bad), needle)
    state = tmp_path / "state"
    for tls, option, needle in (((cert, key, garbage), "--tls-ca", "not a readable PEM certificate"),
                                ((garbage, key, cert), "--tls-cert", "not a readable PEM certificate"),
                                ((cert, other_key, cert), "--tls-key", "KEY_VALUES_MISMATCH"),
                                ((cert, garbage, cert), "--tls-key", "not the unencrypted PEM private key"),
                                ((cert, locked_key, cert), "--tls-key", "not the unencrypted PEM private key")):
        code, _, err = cli(capsys, "free-server", "start", "--state", state, "--tls-cert", tls[0],
                           "--tls-key", tls[1], "--tls-ca", tls[2])
        assert code == 2
        bad = {"--tls-cert": tls[0], "--tls-key": tls[1], "--tls-ca": tls[2]}[option]
        one_line_error(err, option, str(bad), needle)
    assert not state.exists()


@pytest.mark.parametrize("text,flags,line", [
    ('[server]\nmin-models = "lots"\n', [], 'config error: [server] min-models = "lots": expected an integer >= 1'),
    ("min_models = 0\n", [], "config error: [server] min_models = 0: expected an integer >= 1"),
    ('[free]\nway = "five"\n', [], 'config error: [free] way = "five": expected an integer'),
    ("[free.learner]\nway = 1\n", [], "config error: [free] learner.way = 1: expected an integer >= 2"),
    ("[free]\ninversion_jitter = 1.5\n", [],
     "[free] generator.jitter (inversion_jitter) = 1.5: expected an integer"),
    ('poll-interval = "fast"\n', [], 'config error: [server] poll-interval = "fast": expected a number'),
    ('require-dp = "yes"\n', [], 'config error: [server] require-dp = "yes": expected true or false'),
    ('device = "tpu"\n', [], 'config error: [server] device = "tpu": expected one of auto, cpu, cuda, cuda:N'),
    ("[server]\nmax-parameters = -5\n", [],
     "config error: [server] max-parameters = -5: expected an integer in 1..2147483648"),
    ('[limits]\nx = 1\n', [], "unknown setting 'limits'"),
    ("", ["--min-models", "0"], "config error: --min-models = 0: expected an integer >= 1"),
    ("", ["--max-epsilon", "-1"], "config error: --max-epsilon = -1.0: expected a number >= 0 (0: no bound)"),
    ("max-iterations = 5\n[server]\nmax-iterations = 6\n", [], "max-iterations is given twice"),
])
def test_mistyped_config_values_fail_at_once_naming_the_key(capsys, monkeypatch, tmp_path, text, flags, line):
    """A value of the wrong type or out of range, in the config file or on the command line, stops
    `free-server start` before anything starts, in one line naming the key (not on every poll)."""
    from free_dfml.server import supervisor

    def never(*a, **k):
        raise AssertionError("the server was started")
    monkeypatch.setattr(supervisor, "Supervisor", never)
    monkeypatch.setattr(supervisor, "start_detached", never)
    cfg = tmp_path / "server.toml"
    cfg.write_text(text)
    code, _, err = cli(capsys, "free-server", "start", "--state", tmp_path / "state", "--config", cfg, *flags)
    assert code == 2
    one_line_error(err, line)
    assert not (tmp_path / "state").exists()


def test_config_file_settings_and_caps_reach_the_server_settings(tmp_path):
    """The loader itself: a [server] table and top-level keys, the admission caps among them, and
    [free] overrides; the FREE config is checked with the same key-naming errors free-sim and
    benchmarks get from common/config.py."""
    from free_dfml.common.config import ConfigError, FreeConfig
    from free_dfml.server.settings import load_config_file, settings_from
    from free_dfml.server.state import StateDir
    cfg = tmp_path / "server.json"
    cfg.write_text('{"min-models": 3, "server": {"max-input-side": 84, "max_payload_bytes": 2048},'
                   ' "free": {"learner": {"width": 16}}}')
    s = settings_from(StateDir(tmp_path / "s"), load_config_file(cfg), max_iterations=7, preset=None)
    assert (s.min_models, s.max_iterations, s.free_config) == (3, 7, {"learner": {"width": 16}})
    lim = s.limits()
    assert (lim.input_side, lim.package_bytes, lim.parameters) == (84, 2048, 16_000_000)
    with pytest.raises(ConfigError, match=r'^way = "five": expected an integer$'):
        FreeConfig.preset("tiny", way="five")
    with pytest.raises(ConfigError, match=r"^generator\.lr = 0: expected a number > 0$"):
        FreeConfig.preset("tiny", generator={"lr": 0})
