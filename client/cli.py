"""``free-client``: train a classifier on private classes, inspect a package, submit it to a FREE server.

    free-client train   --data glyphs|DIR|cifar-fs:PATH --classes 0-4 --arch conv4|resnet10|resnet18 --out FILE
                        [--dp-epsilon E --dp-delta D --max-grad-norm C] [--prior strokes] [--epochs N] ...
    free-client inspect FILE [--json]
    free-client keygen  --out KEY          (for servers with node authentication)
    free-client audit   --model FILE --data SPEC --classes 0-4 --out DIR   (privacy audit, docs/privacy.md)
    free-client submit  --model FILE --server HOST:PORT [--root-cert CA] [--insecure] [--timeout S] [--audit DIR]

Only the model package (weights + metadata) ever leaves the machine. ``submit`` validates the
package, starts a ``flower-supernode`` whose ClientApp answers the server's query with it, waits
for the server's acknowledgement, stops the SuperNode and its ``flower-superexec`` children, and
prints the model id (exit 0), or the server's reason for a rejection (exit 3), or a timeout
(exit 4). Every bad input gives a one-line error and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from free_dfml.common.cli import CliError, check_certificate, is_loopback, parse_address, run_cli

EXIT_REJECTED = 3
EXIT_TIMEOUT = 4

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train a private classifier and publish only its weights + metadata to a FREE server.")


def parse_classes(spec: str) -> list[int]:
    """``0-4``, ``0,1,2`` or ``0-2,7``: class indices of the data set's train split."""
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise CliError(f"--classes must look like 0-4 or 0,1,2 (got {spec!r})")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise CliError(f"--classes range {part} is empty")
        out.extend(range(a, b + 1))
    if len(out) < 2:
        raise CliError("--classes needs at least 2 classes")
    if len(set(out)) != len(out):
        raise CliError(f"--classes repeats a class: {spec}")
    return out


@app.command()
def train(
    data: str = typer.Option(..., "--data", help="glyphs | DIR | folder:DIR | cifar-fs:PATH"),
    classes: str = typer.Option(..., "--classes", help="class indices of the train split, e.g. 0-4 or 0,3,7"),
    arch: str = typer.Option("conv4", "--arch", help="conv4 | resnet10 | resnet18"),
    out: Path = typer.Option(..., "--out", help="the model package to write (.safetensors)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="default 30; DP recipe 20"),
    lr: Optional[float] = typer.Option(None, "--lr", help="default 0.01; DP recipe 1.0"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adam | sgd (momentum 0.9); default adam, DP recipe sgd"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=0,
                                             help="default 32; 0 = all training images (the DP recipe)"),
    augment: Optional[str] = typer.Option(None, "--augment",
                                          help="none | flip | crop | crop+flip; default none, DP recipe crop"),
    aug_mult: Optional[int] = typer.Option(None, "--aug-mult", min=1,
                                           help="augmented copies of each image per step (DP: its gradient is "
                                                "their mean); default 1, DP recipe 4"),
    width: Optional[int] = typer.Option(None, "--width", help="channel width (architecture default: 64)"),
    image_size: int = typer.Option(32, "--image-size", min=28),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", min=1),
    seed: int = typer.Option(0, "--seed"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="train with DP-SGD to this epsilon"),
    dp_delta: Optional[float] = typer.Option(None, "--dp-delta", help="DP delta (default: 1/(10 N))"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="DP per-sample gradient clipping norm"),
    prior: Optional[str] = typer.Option(None, "--prior",
                                        help="none | strokes: start from features pretrained on public random-stroke "
                                             "images (docs/privacy.md); default none, DP recipe strokes"),
    train_layers: Optional[str] = typer.Option(None, "--train-layers",
                                               help="all | head (the rest stays as it starts); default all, "
                                                    "DP recipe head"),
    share_labels: bool = typer.Option(False, "--share-labels", help="put the class names in the metadata"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Train a classifier on your own classes and write it as a model package.

    With --dp-epsilon, every recipe flag not given takes the DP recipe's value (features from the public stroke prior, only the head trained, full batches, SGD lr 1.0, 20 epochs, 4 shifted copies of each image).
    """
    from free_dfml.client.train import DP_RECIPE, TrainConfig, train_client
    from free_dfml.common.datasets import DataError, open_dataset
    from free_dfml.common.models import ARCHITECTURES
    from free_dfml.common.package import PackageError, save_package

    if arch not in ARCHITECTURES:
        raise CliError(f"--arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if dp_epsilon is not None and not dp_epsilon > 0:
        raise CliError("--dp-epsilon must be > 0")
    if dp_delta is not None and not 0 < dp_delta < 1:
        raise CliError("--dp-delta must be in (0, 1)")
    if dp_delta is not None and dp_epsilon is None:
        raise CliError("--dp-delta needs --dp-epsilon")
    if not max_grad_norm > 0:
        raise CliError("--max-grad-norm must be > 0")
    given = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, prior=prior,
                                   train_layers=train_layers, augment=augment, aug_mult=aug_mult).items()
             if v is not None}
    recipe = {**(DP_RECIPE if dp_epsilon is not None else {}), **given}
    if recipe.get("augment") == "none" and aug_mult is None:
        recipe["aug_mult"] = 1          # --augment none under DP: no copies to average
    kw = {"width": width} if width is not None else {}
    cfg = TrainConfig(arch=arch, arch_kwargs=kw, seed=seed, device=device, share_labels=share_labels,
                      dp_epsilon=dp_epsilon, dp_delta=dp_delta, max_grad_norm=max_grad_norm, **recipe)
    try:
        cfg.check()
    except ValueError as e:             # the message starts with the field: name its flag
        field, _, rest = str(e).partition(" ")
        raise CliError(f"--{field.replace('_', '-')} {rest}") from None
    if out.exists() and out.is_dir():
        raise CliError(f"--out is a folder: {out}")
    if not out.parent.exists():
        raise CliError(f"folder of --out does not exist: {out.parent}")
    class_list = parse_classes(classes)
    try:
        ds = open_dataset(data, image_size=image_size, seed=seed, images_per_class=images_per_class)
        ds.subset("train", class_list)
    except DataError as e:
        raise CliError(str(e)) from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn("training {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(arch, total=cfg.epochs, loss="-")
        prior_task = None

        def on_prior_epoch(epoch: int, loss: float) -> None:
            nonlocal prior_task
            if prior_task is None:
                from free_dfml.client import prior as public_prior
                prior_task = bar.add_task("the prior (once)", total=public_prior.DEFAULT_PRIOR.epochs, loss="-")
            bar.update(prior_task, completed=epoch + 1, loss=f"{loss:.3f}")

        def on_epoch(epoch: int, loss: float) -> None:
            bar.update(task, completed=epoch + 1, loss=f"{loss:.3f}")

        try:
            pkg, report = train_client(ds, class_list, cfg, on_epoch=on_epoch, on_prior_epoch=on_prior_epoch)
        except (DataError, ValueError) as e:
            raise CliError(str(e).splitlines()[0]) from None
    try:
        model_id = save_package(pkg, out)
    except (PackageError, OSError) as e:
        raise CliError(f"cannot write {out}: {e}") from None
    dp = pkg.meta.dp
    dp_txt = (f", DP epsilon={dp['epsilon']:.3g} delta={dp['delta']:.2g} noise={dp.get('noise_multiplier', 0):.3g}"
              if dp else "")
    print(f"wrote {out}: {arch}, {len(class_list)} classes, holdout accuracy "
          f"{report.get('holdout_accuracy', float('nan')):.3f}{dp_txt}, id {model_id[:16]}")


@app.command()
def audit(
    model: Path = typer.Option(..., "--model", help="the model package to audit"),
    data: str = typer.Option(..., "--data", help="the data it was trained on: glyphs | DIR | folder:DIR | cifar-fs:PATH"),
    classes: str = typer.Option(..., "--classes", help="the classes it was trained on, as given to train"),
    out: Path = typer.Option(..., "--out", help="folder for report.md, report.json and the image grids"),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=8, help="default: the model's input size"),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", min=1),
    seed: Optional[int] = typer.Option(None, "--seed", help="the training seed (default: the package's)"),
    holdout: float = typer.Option(0.2, "--holdout", help="share of each class held out at training"),
    preset: str = typer.Option("quick", "--preset", help="the server preset whose inversion the attacks run"),
    five_iterations: Optional[int] = typer.Option(None, "--five-iterations", min=1),
    scratch_steps: Optional[int] = typer.Option(None, "--scratch-steps", min=1,
                                                help="default: twice the preset's scratch_steps"),
) -> None:
    """Measure what the model reveals about its training images (inversion, membership), on this machine."""
    from free_dfml.client.audit import AuditConfig, AuditError, run_audit
    from free_dfml.client.audit_report import write_report
    from free_dfml.common.datasets import DataError, open_dataset
    from free_dfml.common.package import PackageError, load_package

    try:
        pkg = load_package(model)
    except PackageError as e:
        raise CliError(f"invalid package {model}: {e}", 1) from None
    if out.exists() and not out.is_dir():
        raise CliError(f"--out is a file: {out}")
    if not 0 < holdout < 1:
        raise CliError("--holdout must be in (0, 1)")
    class_list = parse_classes(classes)
    if seed is None:
        seed = int((pkg.meta.training or {}).get("seed", 0))
    try:
        ds = open_dataset(data, image_size=image_size or int(pkg.meta.input_shape[1]), seed=seed,
                          images_per_class=images_per_class)
        private = ds.subset("train", class_list)
    except DataError as e:
        raise CliError(str(e)) from None
    trained_on = (pkg.meta.training or {}).get("dataset")
    if trained_on is not None and trained_on != ds.name:
        raise CliError(f"the model was trained on the {trained_on!r} data set, --data gives {ds.name!r}")
    cfg = AuditConfig(preset=preset, five_iterations=five_iterations, scratch_steps=scratch_steps)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    with Progress(TextColumn("audit: {task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        try:
            doc = run_audit(pkg, private, holdout=holdout, seed=seed, cfg=cfg, progress=progress)
        except (AuditError, DataError, ValueError) as e:
            raise CliError(str(e).splitlines()[0]) from None
    doc["data"].update({"spec": data, "class_indices": class_list, "images_per_class": images_per_class})
    try:
        write_report(doc, out, command=" ".join(["free-client", *sys.argv[1:]]))
    except OSError as e:
        raise CliError(f"cannot write the report to {out}: {e}", 1) from None
    for line in doc["verdicts"]:
        print(line)
    print(f"report: {out / 'report.md'}")


@app.command()
def inspect(file: Path = typer.Argument(..., help="a model package (.safetensors)"),
            as_json: bool = typer.Option(False, "--json", help="print metadata + verdict as JSON")) -> None:
    """Show a package's metadata and whether it is valid (exit 1 if it is not)."""
    from free_dfml.common.package import PackageError, load_package
    try:
        pkg = load_package(file)
    except PackageError as e:
        if as_json:
            print(json.dumps({"file": str(file), "valid": False, "reason": str(e)}))
        raise CliError(f"invalid package {file}: {e}", 1) from None
    meta = json.loads(pkg.meta.to_json())
    n_params = sum(t.numel() for t in pkg.state.values())
    if as_json:
        print(json.dumps({"file": str(file), "valid": True, "model_id": pkg.model_id, "parameters": n_params,
                          "meta": meta}, indent=2, sort_keys=True))
        return
    print(f"file        {file}")
    print(f"model id    {pkg.model_id}")
    print(f"arch        {meta['arch']} {meta['arch_kwargs']}  ({n_params} parameters)")
    print(f"classes     {meta['num_classes']}" + (f"  {meta['class_labels']}" if meta.get("class_labels") else ""))
    print(f"input       {meta['input_shape']}  mean {meta['mean']}  std {meta['std']}")
    if meta.get("dp"):
        print("dp          " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(meta["dp"].items())))
    else:
        print("dp          none")
    if meta.get("training"):
        print(f"training    {json.dumps(meta['training'], sort_keys=True)}")
    print("verdict     valid")


@app.command()
def keygen(out: Path = typer.Option(..., "--out", help="private key file; the public key goes to OUT.pub")) -> None:
    """Make a SuperNode key pair (ECDSA P-384, OpenSSH format) for servers with node authentication."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    pub = out.with_name(out.name + ".pub")
    if out.exists() or pub.exists():
        raise CliError(f"{out} or {pub} exists already; not overwriting")
    if not out.parent.is_dir():
        raise CliError(f"folder of --out does not exist: {out.parent}")
    key = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                  serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH) + b"\n")
    print(f"wrote {out} (private: keep it) and {pub} (give it to the server operator: "
          f"free-server register-node --key {pub.name})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_str(s: str) -> str:
    return json.dumps(s)   # a JSON string is a valid TOML basic string


@app.command()
def submit(
    model: Path = typer.Option(..., "--model", help="the model package to publish"),
    server: str = typer.Option(..., "--server", help="the FREE server's HOST:PORT"),
    root_cert: Optional[Path] = typer.Option(None, "--root-cert", help="CA certificate (PEM) to verify the server (TLS)"),
    insecure: bool = typer.Option(False, "--insecure", help="connect without TLS to a non-loopback server"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds to wait for the server's answer"),
    auth_key: Optional[Path] = typer.Option(None, "--auth-key", help="SuperNode private key (node authentication)"),
    no_verify: bool = typer.Option(False, "--no-verify",
                                   help="skip local validation and send the file as it is (to test a server's checks)"),
    keep_logs: Optional[Path] = typer.Option(None, "--log", help="write the SuperNode's log to this file"),
    audit_dir: Optional[Path] = typer.Option(None, "--audit",
                                             help="print the verdicts of this audit (free-client audit --out) first"),
) -> None:
    """Publish a model package to a FREE server; prints the model id it was stored under."""
    if timeout <= 0:
        raise CliError("--timeout must be > 0")
    host, port = parse_address(server)
    if root_cert is not None:
        check_certificate(root_cert, "--root-cert")      # a bad file fails now, not at the timeout
    if root_cert is not None and insecure:
        raise CliError("--insecure conflicts with --root-cert")
    if root_cert is None and not insecure and not is_loopback(host):
        raise CliError(f"refusing to send to {host} without TLS: give --root-cert (or --insecure)")
    if auth_key is not None and not auth_key.is_file():
        raise CliError(f"no such file: {auth_key}")
    if audit_dir is not None and no_verify:
        raise CliError("--audit needs the package's id: it cannot be used with --no-verify")
    if not model.is_file():
        raise CliError(f"no such file: {model}" if no_verify else f"invalid package {model}: no such file: {model}",
                       2 if no_verify else 1)
    from free_dfml.client.submit import (start_validation, submit_with_retries, supernode_command, validation_result,
                                         write_ready)
    # validated in a child process (torch is imported there, and gone with it); nothing is sent before
    validator = None if no_verify else start_validation(model)
    checked: dict = {}
    with tempfile.TemporaryDirectory(prefix="free-client-") as tmp:
        ready = Path(tmp) / "ready.json"

        def gate() -> bool:
            if validator is None or checked:
                return True
            res = validation_result(validator)
            if res is None:
                return False
            if "error" in res:
                raise CliError(f"invalid package {model}: {res['error']}", 1)
            if audit_dir is not None:
                from free_dfml.client.audit_report import verdicts_for
                try:
                    lines = verdicts_for(audit_dir, res["id"])
                except ValueError as e:
                    raise CliError(str(e)) from None
                print(f"free-client: privacy audit of this model ({audit_dir}):", file=sys.stderr)
                for line in lines:
                    print(f"  {line}", file=sys.stderr)
            checked.update(res)
            write_ready(ready, res["id"])
            return True

        def cmd_for(ack: Path) -> list[str]:
            cfg = [f"model-path={_toml_str(str(model.resolve()))}", f"ack-path={_toml_str(str(ack))}",
                   f"verify={'false' if no_verify else 'true'}"]
            if not no_verify:               # the ClientApp waits for the validated id there
                cfg.append(f"ready-path={_toml_str(str(ready))}")
            return supernode_command(host, port, " ".join(cfg), _free_port(), root_cert, auth_key)
        log_path = keep_logs if keep_logs is not None else Path(tmp) / "supernode.log"
        try:
            started = time.time()
            result = None
            if validator is not None:           # before any SuperNode connects (see client/submit.py)
                try:
                    validator.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
                gate()
            if validator is None or checked:
                result = submit_with_retries(cmd_for, Path(tmp), log_path, timeout - (time.time() - started),
                                             gate=gate)
        finally:
            if validator is not None and validator.poll() is None:
                validator.kill()
                validator.wait()
    local_id = checked.get("id")
    if result is None:
        raise CliError(f"no answer from the server at {host}:{port} within {timeout:.0f} s "
                       "(is it running and reachable? is the address/certificate right?)", EXIT_TIMEOUT)
    if not result.get("accepted"):
        raise CliError(f"rejected by the server: {result.get('reason') or 'no reason given'}", EXIT_REJECTED)
    mid = result.get("model-id", "")
    if local_id is not None and mid != local_id:
        raise CliError(f"server stored id {mid} but the package's id is {local_id}", 1)
    note = "new in the zoo" if result.get("new") else "already in the zoo"
    print(f"free-client: accepted ({note})", file=sys.stderr)
    print(mid)


def main() -> None:
    sys.exit(run_cli(app, "free-client"))


if __name__ == "__main__":
    main()
